"""The queue under faults, for real: a Granian receiver and consumer processes while the embedded queue's
file is locked by another process, deleted or damaged, while it is full, and while the SQS endpoint (moto's
server) is down. What a user sees each time: 503 with Retry-After within a bounded time, /health saying
why, consumers that wait without burning CPU, and everything working again by itself once the queue is
back; a damaged embedded queue is refused at start with a message naming the file and the way out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from canpipe_testing import (
    AWS_TEST_ENV,
    children,
    create_queue,
    free_port,
    http,
    key,
    make_record,
    on_disk,
    post_json,
    start_moto,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.slow

SEND_BOUND_S = 15.0  # publish timeout (5 s) plus the lock wait, with room for a loaded machine
RESTARTING_CPU_S = 1.5  # three restarts within the window
IDLE_CPU_S = 0.6  # CPU a consumer may spend over WATCH_S while the queue is unavailable (no busy loop)
WATCH_S = 4.0


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time of ``pids`` so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def post_one(url: str, index: int) -> tuple[int, dict, object, dict]:
    record = make_record(index)
    status, headers, body = post_json(url, record, timeout=SEND_BOUND_S + 10)
    return status, headers, body, record


def refused_within_bound(url: str, index: int) -> dict:
    started = time.monotonic()
    status, headers, body, _ = post_one(url, index)
    assert status == 503, (status, body)
    assert int(headers["retry-after"]) > 0
    assert time.monotonic() - started < SEND_BOUND_S
    return headers


def health(url: str) -> tuple[int, dict]:
    status, _, body = http("GET", url + "/health", timeout=10)
    return status, json.loads(body)


def consumers_stay_idle(consumer, bound_s: float = IDLE_CPU_S) -> None:
    pids = {consumer.pid} | children(consumer.pid)
    before = cpu_seconds(pids)
    time.sleep(WATCH_S)  # measuring an interval of CPU time, not waiting for a condition
    spent = cpu_seconds(pids) - before
    assert spent < bound_s, f"consumers spent {spent:.2f} s of CPU in {WATCH_S} s while the queue was unavailable"


def accepted_until_ok(url: str, start_index: int, timeout: float) -> dict:
    """Post until one is accepted (the queue is back); return the accepted record."""
    found: list[dict] = []
    counter = [start_index]

    def attempt() -> bool:
        counter[0] += 1
        status, _, _, record = post_one(url, counter[0])
        if status == 202:
            found.append(record)
        return bool(found)

    wait_for(attempt, timeout, "the receiver to accept records again")
    return found[0]


def all_on_disk(data_dir: Path, records: list[dict], timeout: float = 60) -> None:
    wanted = {key(r) for r in records}
    wait_for(lambda: wanted <= {key(r) for r in on_disk(data_dir)}, timeout, "every accepted record on disk")


@pytest.fixture
def pipeline(env, serve, start):
    """A receiver and one consumer on the embedded queue, both seen working."""
    url = serve(env)
    consumer = start(["consume", "--workers", "1"], env)
    status, _, _, record = post_one(url, 0)
    assert status == 202
    return url, consumer, [record]


def test_locked_by_another_process(pipeline, data_dir):
    url, consumer, accepted = pipeline
    all_on_disk(data_dir, accepted)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE');"
            "print('locked', flush=True); sys.stdin.read()",
            str(data_dir / "queue.db"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        refused_within_bound(url, 1)
        status, body = health(url)
        assert status == 503 and "locked" in body["queue"], body
        consumers_stay_idle(consumer)
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    accepted.append(accepted_until_ok(url, 100, 30))
    assert health(url)[0] == 200
    all_on_disk(data_dir, accepted)


def test_deleted_while_running_is_refused_until_restored(pipeline, data_dir, tmp_path, env, start):
    url, consumer, accepted = pipeline
    db = data_dir / "queue.db"
    os.link(db, tmp_path / "queue-backup.db")
    os.unlink(db)
    refused_within_bound(url, 1)
    status, body = health(url)
    assert status == 503 and "deleted" in body["queue"], body
    assert not db.exists(), "a running process recreated the deleted queue empty"
    # the worker exits (QueueBroken) and is restarted after 0.5, 1, 2 s: each start imports the consumer
    # (~0.2-0.3 s of CPU on this box). A busy loop would spend the whole window: 4 s.
    consumers_stay_idle(consumer, bound_s=RESTARTING_CPU_S)
    os.link(tmp_path / "queue-backup.db", db)  # the file is back
    accepted.append(accepted_until_ok(url, 100, 30))
    if consumer.popen.poll() is not None:  # it failed closed (QueueBroken) for its own supervisor to restart it
        assert consumer.popen.returncode != 0
        start(["consume", "--workers", "1"], env)
    assert health(url)[0] == 200
    all_on_disk(data_dir, accepted)


def test_damaged_while_running_then_refused_at_start(pipeline, data_dir, env, start):
    url, consumer, accepted = pipeline
    all_on_disk(data_dir, accepted)
    db = data_dir / "queue.db"
    with open(db, "r+b") as f:  # every byte of the file overwritten, as a failing disk or a stray writer would
        size = f.seek(0, 2)
        f.seek(0)
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    counter = [1]

    def refused() -> bool:
        counter[0] += 1
        return post_one(url, counter[0])[0] == 503

    wait_for(refused, 30, "the receiver to refuse records into a damaged queue")
    wait_for(lambda: health(url)[0] == 503, 10, "/health to report the damage")
    assert "damaged" in health(url)[1]["queue"] or "malformed" in health(url)[1]["queue"]
    damaged = db.read_bytes()
    for args in (["serve", "--port", str(free_port())], ["consume", "--workers", "1"]):
        proc = start(args, env)
        assert proc.popen.wait(60) == 1
        out = proc.output()
        assert str(db) in out and "docs/operations.md" in out, out
    assert db.read_bytes()[: len(damaged)] == damaged  # never recreated empty


def test_full_queue_answers_503_saturated_until_consumers_catch_up(env, serve, start, data_dir):
    url = serve(env | {"CANPIPE_QUEUE_MAX_BYTES": "20000"})
    accepted: list[dict] = []
    index = 0
    while True:
        index += 1
        status, headers, body, record = post_one(url, index)
        if status != 202:
            break
        accepted.append(record)
        assert index < 1000, "the queue was never full"
    assert status == 503 and body["error"] == "saturated" and int(headers["retry-after"]) > 0, (status, body)
    start(["consume", "--workers", "1"], env)
    accepted.append(accepted_until_ok(url, 10_000, 30))
    all_on_disk(data_dir, accepted)


@pytest.fixture
def private_moto(tmp_path):
    """A moto server of this test's own, which the test stops and starts again on the same port."""
    port = free_port()
    procs: list[subprocess.Popen] = []

    def up() -> subprocess.Popen:
        procs.append(start_moto(port, tmp_path / f"moto-{len(procs)}.log"))
        return procs[-1]

    yield port, up
    for proc in procs:
        stop_process(proc)


def test_sqs_endpoint_down_then_back(private_moto, env, serve, start, data_dir):
    port, up = private_moto
    moto = up()
    queue_url = f"http://127.0.0.1:{port}/123456789012/canpipe-faults"
    sqs = env | AWS_TEST_ENV | {"CANPIPE_QUEUE_URL": queue_url}
    sqs.pop("AWS_ENDPOINT_URL_SQS", None)
    sqs.pop("AWS_ENDPOINT_URL", None)
    create_queue_env(sqs, queue_url)
    url = serve(sqs)
    consumer = start(["consume", "--workers", "1"], sqs)
    status, _, _, record = post_one(url, 0)
    assert status == 202
    accepted = [record]
    all_on_disk(data_dir, accepted)

    moto.terminate()
    moto.wait(10)
    refused_within_bound(url, 1)
    status, body = health(url)
    assert status == 503 and body["queue"], body
    consumers_stay_idle(consumer)

    up()  # the endpoint is back (moto keeps no state: the queue is created again, as after a restore)
    create_queue_env(sqs, queue_url)
    accepted.append(accepted_until_ok(url, 100, 60))
    assert health(url)[0] == 200
    all_on_disk(data_dir, accepted[1:])


def create_queue_env(env: dict[str, str], queue_url: str) -> None:
    saved = {name: os.environ.get(name) for name in AWS_TEST_ENV}
    os.environ.update(AWS_TEST_ENV)
    try:
        create_queue(queue_url)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
