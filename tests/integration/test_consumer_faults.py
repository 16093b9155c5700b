"""Consumer faults on real processes (``canpipe serve`` + ``canpipe consume``, the embedded queue, real files).

kill -9 at chosen moments and at random, a full or read-only disk, fsync errors, a poison message,
visibility expiry with two supervisors on one queue. Each ends the same way: lost = 0 (every record that
got 202 is in the raw files, and nothing else is), every raw file parses line by line (no torn tail, no
empty file), no dead letters unless a poison message was sent, and the aggregate of every hour equals the
ground truth computed from its lines.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from canpipe_testing import (
    ROOT,
    Fleet,
    children,
    create_queue,
    key,
    make_record,
    on_disk,
    queue_counts,
    queue_empty,
    queue_stats,
    wait_for,
    wait_until,
)
from canpipe_truth import assert_aggregate_matches

from engine.aggregator import aggregate_hour, parse_hour
from engine.metrics import read_snapshots
from engine.queues import open_queue
from engine.schema import decode_records, encode_stored, stored_decoder
from engine.storage import iter_raw_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def fast(env: dict[str, str], **extra: str) -> dict[str, str]:
    """Short visibility timeout, so that what a dead consumer held comes back within seconds."""
    return env | {"CANPIPE_VISIBILITY_TIMEOUT_S": "3"} | extra


def load(url: str, seed: int, seconds: float = 4.0) -> list[dict]:
    """A small fleet posting for ``seconds``; returns the records that got 202 (all of them must)."""
    result = Fleet(url, vehicles=10, rate_ms=50, duration_s=seconds, seed=seed).start().join(120)
    assert result.failed == result.rejected == 0, result
    return result.accepted_records


def drained(data_dir: Path, queue_url: str, accepted: list[dict]) -> bool:
    want = {key(r) for r in accepted}
    return queue_empty(queue_url) and want <= {key(r) for r in on_disk(data_dir)}


def check_files_and_aggregates(data_dir: Path, accepted: list[dict], why: str = "") -> None:
    """lost = 0 and nothing invented, every line a stored record, every hour's aggregate exact."""
    for path in iter_raw_files(data_dir / "raw"):
        data = path.read_bytes()
        assert data, f"empty file left behind: {path} {why}"
        assert data.endswith(b"\n"), f"torn tail in {path} {why}"
        for number, line in enumerate(data.splitlines(), 1):
            try:
                stored_decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                pytest.fail(f"{path}:{number} is not a stored record ({exc}) {why}")
    stored = on_disk(data_dir)
    assert {key(r) for r in stored} == {key(r) for r in accepted}, f"lost or invented records {why}"
    for hour in sorted({r["ingest_received_at"][:13] for r in stored}):
        aggregate_hour(data_dir, parse_hour(hour))
        assert_aggregate_matches(data_dir, hour)


def canpipe(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "engine", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# --- 1. kill -9 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["while_receiving", "after_writev", "after_fsync", "after_delete"])
def test_kill_9_at_a_chosen_moment_loses_nothing(serve, start, env, data_dir, tmp_path, point):
    env = fast(env)
    url = serve(env)
    marker = tmp_path / "killed"
    fault = {"CANPIPE_FAULT_KILL_AT": point, "CANPIPE_FAULT_AT_BATCH": "2", "CANPIPE_FAULT_ONCE": str(marker)}
    consumers = start(["consume", "--workers", "2"], env | fault)
    accepted = load(url, seed=11)
    wait_for(marker.exists, 30, f"a consumer killed at {point}")
    wait_for(lambda: drained(data_dir, env["CANPIPE_QUEUE_URL"], accepted), 90, "the queue drained to disk")
    assert consumers.stop() == 0, consumers.output()
    assert "exited with -9" in consumers.output()  # it died, and the supervisor restarted it
    check_files_and_aggregates(data_dir, accepted, f"(killed at {point})")


def test_random_kill_9_of_consumers_under_load_loses_nothing(serve, start, env, data_dir):
    seed = int(os.environ.get("CANPIPE_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    env = fast(env)
    url = serve(env)
    consumers = start(["consume", "--workers", "2"], env)
    fleet = Fleet(url, vehicles=20, rate_ms=40, duration_s=8, seed=seed).start()
    kills = 0
    while fleet.result is None and kills < 8:
        time.sleep(rng.uniform(0.4, 1.2))  # the chaos schedule (not a wait for a condition)
        workers = sorted(children(consumers.pid))
        if workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
            kills += 1
    result = fleet.join(120)
    assert result.failed == result.rejected == 0 and kills >= 3, f"seed={seed}"
    accepted = result.accepted_records
    wait_for(lambda: drained(data_dir, env["CANPIPE_QUEUE_URL"], accepted), 120, f"drain (seed={seed})")
    assert consumers.stop() == 0, consumers.output()
    check_files_and_aggregates(data_dir, accepted, f"(seed={seed}, {kills} kills)")


# --- 4. disk full, read-only, fsync errors -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 1 MiB tmpfs as the data directory (needs root to mount); the queue stays outside it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def disk_env(env: dict[str, str], disk: Path, tmp_path: Path) -> dict[str, str]:
    queue_url = f"sqlite:///{tmp_path / 'queue.db'}"
    create_queue(queue_url, max_receive_count=2, visibility_timeout_s=1)
    return env | {"CANPIPE_DATA_DIR": str(disk), "CANPIPE_QUEUE_URL": queue_url, "CANPIPE_VISIBILITY_TIMEOUT_S": "1"}


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def no_files_written(disk: Path) -> bool:
    return not any(p.is_file() for p in (disk / "raw").rglob("*")) if (disk / "raw").exists() else True


def ride_out_storage_failure(consumers, queue_url: str, disk: Path) -> None:
    """Storage fails for longer than max_receive_count (2) visibility timeouts (1 s): nothing may be
    dead-lettered, deleted or left behind as a file."""
    wait_for(lambda: consumers.output().count("write failed") >= 4, 60, "four failed writes (3.5 s of backoff)")
    stats = queue_stats(queue_url)
    assert stats.dead_letter == 0, stats
    assert stats.visible + stats.in_flight > 0, stats  # nothing deleted that is not on disk
    assert no_files_written(disk), sorted((disk / "raw").rglob("*"))


def test_disk_full_dead_letters_nothing_and_writes_everything_once_space_returns(
    serve, start, env, small_disk, tmp_path
):
    env = disk_env(env, small_disk, tmp_path)
    filler = fill(small_disk)
    url = serve(env)
    consumers = start(["consume", "--workers", "2"], env)
    accepted = load(url, seed=41, seconds=2.0)
    ride_out_storage_failure(consumers, env["CANPIPE_QUEUE_URL"], small_disk)
    filler.unlink()  # space returns
    wait_for(lambda: drained(small_disk, env["CANPIPE_QUEUE_URL"], accepted), 60, "everything written")
    assert consumers.stop() == 0, consumers.output()
    assert "receiving resumed" in consumers.output()
    assert queue_stats(env["CANPIPE_QUEUE_URL"]).dead_letter == 0
    check_files_and_aggregates(small_disk, accepted, "(disk full)")


def test_a_full_data_dir_is_reported_by_check_but_the_daemons_start_and_wait(env, small_disk, tmp_path):
    """A full disk is a passing state: `canpipe check` names it, a consumer starts anyway (and rides it out,
    above); a read-only data dir is configuration: the consumer refuses to start, exit 1, with the reason."""
    env = disk_env(env, small_disk, tmp_path)
    filler = fill(small_disk)
    check = subprocess.run(
        [sys.executable, "-m", "engine", "check", "--consumer-only"], env=env, capture_output=True, text=True
    )
    assert check.returncode == 1 and "No space left on device" in check.stdout, check.stdout + check.stderr
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        consume = subprocess.run(
            [sys.executable, "-m", "engine", "consume", "--workers", "1"], env=env, capture_output=True, text=True
        )
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert consume.returncode == 1 and "Read-only file system" in consume.stderr, consume.stderr


def test_read_only_data_directory_dead_letters_nothing(serve, start, env, small_disk, tmp_path):
    env = disk_env(env, small_disk, tmp_path)
    url = serve(env)
    consumers = start(["consume", "--workers", "2"], env)
    # past the start-up checks (which refuse a read-only data dir): both workers running
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "consumers started")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        accepted = load(url, seed=43, seconds=2.0)
        ride_out_storage_failure(consumers, env["CANPIPE_QUEUE_URL"], small_disk)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    wait_for(lambda: drained(small_disk, env["CANPIPE_QUEUE_URL"], accepted), 60, "everything written")
    assert consumers.stop() == 0, consumers.output()
    assert queue_stats(env["CANPIPE_QUEUE_URL"]).dead_letter == 0
    check_files_and_aggregates(small_disk, accepted, "(read-only)")


def test_fsync_errors_rewrite_the_batch_to_a_new_file(serve, start, env, data_dir):
    env = fast(env)
    url = serve(env)
    consumers = start(["consume", "--workers", "2"], env | {"CANPIPE_FAULT_FSYNC_EIO": "2"})
    accepted = load(url, seed=47)
    wait_for(lambda: drained(data_dir, env["CANPIPE_QUEUE_URL"], accepted), 60, "everything written")
    assert consumers.stop() == 0, consumers.output()
    assert "Input/output error (CANPIPE_FAULT_FSYNC_EIO)" in consumers.output()
    assert queue_stats(env["CANPIPE_QUEUE_URL"]).dead_letter == 0
    check_files_and_aggregates(data_dir, accepted, "(fsync EIO)")


# --- 5. poison ---------------------------------------------------------------------------------------------


def test_poison_message_is_dead_lettered_without_stopping_anything_and_redriven_once_fixed(serve, start, env, data_dir):
    queue_url = env["CANPIPE_QUEUE_URL"]
    create_queue(queue_url, max_receive_count=3)  # visibility timeout 30 s: poison must not wait 3 x 30 s
    url = serve(env)
    consumers = start(["consume", "--workers", "2"], env)

    async def send_poison() -> None:
        queue = open_queue(queue_url)
        try:
            assert await queue.send_batch([b"this is not canpipe NDJSON\n"]) == []
        finally:
            await queue.close()

    asyncio.run(send_poison())
    accepted = load(url, seed=53, seconds=2.0)
    wait_for(lambda: queue_stats(queue_url).dead_letter == 1, 30, "the poison message in the dead-letter queue")
    wait_for(lambda: drained(data_dir, queue_url, accepted), 30, "the rest written")
    assert "dead_letter 1" in canpipe(env, "queue", "stats")
    assert "exited with" not in consumers.output()  # no crash, no crash loop

    # the operator repairs the message (here: replaces its body) and redrives it
    fixed = decode_records(msgspec.json.encode([make_record(0, vehicle_id="EV-FIXED")]), ndjson=False)
    body = encode_stored(fixed, fixed[0].timestamp)
    with sqlite3.connect(data_dir / "queue.db") as conn:
        conn.execute("UPDATE dead_letters SET body = ?", (body,))
    assert "redrove 1" in canpipe(env, "queue", "redrive")
    accepted += [msgspec.json.decode(body)]
    wait_for(lambda: drained(data_dir, queue_url, accepted), 30, "the redriven message written")
    assert queue_stats(queue_url).dead_letter == 0
    assert consumers.stop() == 0, consumers.output()
    check_files_and_aggregates(data_dir, accepted, "(poison)")


# --- 6. duplicate delivery -----------------------------------------------------------------------------------


def stop_holding_a_batch(pid: int, data_dir: Path) -> bool:
    """SIGSTOP ``pid`` while it holds received messages and no write lock on the queue (else let it go on and
    say False): stopped just after its delete it would hold nothing, and nothing would be redelivered."""
    os.kill(pid, signal.SIGSTOP)
    probe = sqlite3.connect(data_dir / "queue.db", timeout=0.2, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        if queue_counts(data_dir)[1] > 0:
            return True
    except sqlite3.OperationalError:
        pass
    finally:
        probe.close()
    os.kill(pid, signal.SIGCONT)
    return False


def test_visibility_expiry_with_two_supervisors_gives_duplicates_only(serve, start, env, data_dir):
    env = env | {"CANPIPE_VISIBILITY_TIMEOUT_S": "2"}
    url = serve(env)
    holding = {"CANPIPE_BATCH_SECONDS": "3", "CANPIPE_BATCH_RECORDS": "100000"}  # the first holds its batches long
    first = start(["consume", "--workers", "1"], env | holding)
    fleet = Fleet(url, vehicles=10, rate_ms=50, duration_s=8, seed=61).start()
    wait_for(lambda: children(first.pid), 30, "the first supervisor's worker")
    (stalled,) = children(first.pid)
    # a stalled worker: no heartbeat, its batch outlives the visibility timeout. Stopped outside a queue
    # transaction: one frozen inside it would hold the embedded queue's write lock (see docs/reliability.md)
    wait_for(lambda: stop_holding_a_batch(stalled, data_dir), 30, "the worker stopped holding a batch, not writing")
    try:
        second = start(["consume", "--workers", "1"], env)
        # 2 s of visibility plus the second supervisor's start; generous for a loaded CI machine
        redelivered = wait_until(
            lambda: read_snapshots(data_dir / "metrics").counters["canpipe_consumer_redelivered_messages_total"] > 0,
            60,
        )
        assert redelivered, (
            f"the second supervisor did not receive the stalled batch again within 60 s; queue {queue_counts(data_dir)}"
            f"\n--- first:\n{first.output()[-3000:]}\n--- second:\n{second.output()[-3000:]}"
        )
    finally:
        os.kill(stalled, signal.SIGCONT)  # it wakes up and writes its (now duplicate) batch too
    result = fleet.join(120)
    assert result.failed == result.rejected == 0
    accepted = result.accepted_records
    wait_for(lambda: drained(data_dir, env["CANPIPE_QUEUE_URL"], accepted), 60, "drain")
    assert first.stop() == 0 and second.stop() == 0, first.output() + second.output()
    assert len(on_disk(data_dir)) > len({key(r) for r in accepted})  # the stalled batch is there twice
    check_files_and_aggregates(data_dir, accepted, "(two supervisors)")


# --- a broken queue ----------------------------------------------------------------------------------------


def test_a_deleted_queue_file_makes_consumers_exit_for_the_supervisor_to_restart(start, env, data_dir):
    create_queue(env["CANPIPE_QUEUE_URL"])
    consumers = start(["consume", "--workers", "1"], env)
    metrics = data_dir / "metrics"
    wait_for(lambda: metrics.is_dir() and any(metrics.glob("consumer-*.metrics")), 30, "a consumer working")
    (worker,) = children(consumers.pid)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{data_dir / 'queue.db'}{suffix}").unlink(missing_ok=True)
    wait_for(lambda: f"consumer pid {worker} exited with 3" in consumers.output(), 60, "the worker to exit 3")
    assert "the queue is broken" in consumers.output()
    wait_for(lambda: "restarting in" in consumers.output(), 10, "the supervisor to schedule a restart")
