"""One contract suite for every queue backend: the semantics the pipeline relies on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from engine.errors import ConfigError, QueueError
from engine.queues import QueueAttributes, QueueProfile, QueueUsage, open_queue


@pytest.fixture(params=["sqlite", "sqs"])
def queue_url(request, tmp_path) -> str:
    if request.param == "sqs":
        return request.getfixturevalue("sqs_env")["CANPIPE_QUEUE_URL"]
    return f"sqlite:///{tmp_path / 'q.db'}"


@pytest.fixture
def run():
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture
def queue(queue_url, run):
    q = open_queue(queue_url)
    run(q.create(QueueAttributes(visibility_timeout_s=30, max_receive_count=3)))
    yield q
    run(q.close())


def bodies(messages) -> list[bytes]:
    return sorted(m.body for m in messages)


def receive_all(run, queue, expected: int, wait_s: float = 2.0, timeout_s: float = 20.0):
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < expected and time.monotonic() < deadline:
        got += run(queue.receive(10, wait_s))
    return got


def test_send_receive_delete(run, queue):
    assert run(queue.send_batch([b"a", b"b", b"c"])) == []
    got = receive_all(run, queue, 3)
    assert bodies(got) == [b"a", b"b", b"c"]
    assert all(m.receive_count == 1 and m.first_receive_ms >= m.sent_at_ms for m in got)
    assert run(queue.stats()).in_flight == 3
    assert run(queue.delete_batch([m.receipt for m in got])) == []
    stats = run(queue.stats())
    assert (stats.visible, stats.in_flight) == (0, 0)
    assert run(queue.receive(10, 0)) == []


def test_received_message_is_invisible_until_its_timeout_then_redelivered(run, queue):
    run(queue.send_batch([b"x"]))
    first = receive_all(run, queue, 1)
    run(queue.change_visibility([first[0].receipt], 1))
    assert run(queue.receive(10, 0)) == []  # still invisible
    again = receive_all(run, queue, 1, wait_s=3)
    assert again[0].body == b"x" and again[0].receive_count == 2
    assert again[0].first_receive_ms == first[0].first_receive_ms
    assert run(queue.delete_batch([again[0].receipt])) == []
    assert run(queue.receive(10, 0)) == [] and run(queue.stats()).in_flight == 0


def test_change_visibility_to_zero_releases_at_once(run, queue):
    run(queue.send_batch([b"x"]))
    (msg,) = receive_all(run, queue, 1)
    run(queue.change_visibility([msg.receipt], 0))
    assert bodies(run(queue.receive(10, 1))) == [b"x"]


def test_dead_letter_after_max_receive_count_and_redrive(run, queue):
    run(queue.send_batch([b"poison"]))
    for count in (1, 2, 3):
        (msg,) = receive_all(run, queue, 1)
        assert msg.receive_count == count
        run(queue.change_visibility([msg.receipt], 0))
    assert run(queue.receive(10, 0.2)) == []  # the fourth receive moves it to the DLQ
    stats = run(queue.stats())
    assert (stats.visible, stats.in_flight, stats.dead_letter) == (0, 0, 1)
    assert run(queue.redrive()) == 1
    (msg,) = receive_all(run, queue, 1)
    assert msg.body == b"poison" and msg.receive_count == 1
    assert run(queue.stats()).dead_letter == 0


def test_long_poll_waits_without_messages_and_wakes_on_send(run, queue, queue_url):
    started = time.monotonic()
    assert run(queue.receive(10, 1.0)) == []
    assert 0.9 <= time.monotonic() - started < 5

    other = open_queue(queue_url)

    async def send_later(receiving):
        await asyncio.sleep(0.5)  # the scenario itself: the send comes while the receive is in its long poll
        assert not receiving.done(), "the receive returned before anything was sent"
        await other.send_batch([b"late"])

    async def poll():
        t0 = time.monotonic()
        receiving = asyncio.ensure_future(queue.receive(10, 10.0))
        sender = asyncio.create_task(send_later(receiving))
        got = await receiving
        await sender
        return got, time.monotonic() - t0

    got, waited = run(poll())
    run(other.close())
    assert bodies(got) == [b"late"]
    assert waited < 5  # woken by the send, not by the 10 s wait running out


def test_purge_and_stats(run, queue):
    run(queue.send_batch([b"1", b"2"]))
    assert run(queue.stats()).visible == 2
    run(queue.purge())
    assert run(queue.stats()).visible == 0


def test_many_competing_receivers_get_each_message_once(run, queue, queue_url):
    run(queue.send_batch([str(i).encode() for i in range(10)]))
    run(queue.send_batch([str(i).encode() for i in range(10, 20)]))
    others = [open_queue(queue_url) for _ in range(3)]

    async def drain(q):
        out = []
        while got := await q.receive(3, 0.3):
            out += got
        return out

    async def all_of_them():
        return await asyncio.gather(*(drain(q) for q in others))

    results = run(all_of_them())
    for q in others:
        run(q.close())
    seen = sorted(int(m.body) for part in results for m in part)
    assert seen == list(range(20))


def test_oversized_message_is_refused(run, queue):
    run(queue.ping())  # SQS: reads the queue's MaximumMessageSize
    with pytest.raises(QueueError):
        too_big = os.urandom(queue.profile.max_message_bytes * 2).hex().encode()  # text that won't compress
        run(queue.send_batch([too_big]))


def test_every_backend_declares_its_profile_and_usage(queue_url, queue, run):
    """The contract callers rely on instead of probing attributes: a frozen profile with the pacing and
    size limit, and usage() counters for a backend billed per request (SQS) or None (SQLite)."""
    profile = queue.profile
    assert isinstance(profile, QueueProfile)
    assert isinstance(profile.max_message_bytes, int) and profile.max_message_bytes >= 64 * 1024
    assert isinstance(profile.send_concurrency, int) and profile.send_concurrency >= 1
    assert profile.send_linger_s >= 0 and profile.receive_interval_s >= 0
    with pytest.raises(AttributeError):
        profile.send_concurrency = 2  # frozen: no caller retunes a backend behind the others' backs
    run(queue.ping())
    usage = queue.usage()
    if queue_url.startswith("sqlite://"):
        assert usage is None
        assert (profile.send_linger_s, profile.receive_interval_s) == (0.0, 0.0)
    else:
        assert isinstance(usage, QueueUsage)
        assert usage.billed_requests >= 1 and usage.requests_by_action["GetQueueAttributes"] >= 1
        assert (profile.send_concurrency, profile.send_linger_s, profile.receive_interval_s) == (16, 0.05, 0.2)


def test_operator_pacing_overrides_the_backend_profile():
    sqs_like = QueueProfile(max_message_bytes=1000, send_concurrency=16, send_linger_s=0.05, receive_interval_s=0.2)
    assert sqs_like.with_overrides(send_linger_ms=None, receive_interval_ms=None) == sqs_like
    tuned = sqs_like.with_overrides(send_linger_ms=0, receive_interval_ms=500)
    assert (tuned.send_linger_s, tuned.receive_interval_s) == (0.0, 0.5)
    assert (tuned.max_message_bytes, tuned.send_concurrency) == (1000, 16)


def test_unknown_url_scheme_names_the_setting():
    with pytest.raises(ConfigError, match="CANPIPE_QUEUE_URL"):
        open_queue("redis://localhost")


def test_unreachable_sqlite_path_raises_queue_error(run, tmp_path):
    (tmp_path / "dir.db").mkdir()
    q = open_queue(f"sqlite:///{tmp_path / 'dir.db'}")
    with pytest.raises(QueueError):
        run(q.ping())
    run(q.close())


def test_retention_drops_expired_messages(run, tmp_path):
    q = open_queue(f"sqlite:///{tmp_path / 'r.db'}")
    run(q.create(QueueAttributes(retention_s=60)))
    run(q.send_batch([b"old"]))
    assert run(q.stats()).visible == 1
    queue_time = q._clock.now_ms
    q._clock.now_ms = lambda: queue_time() + 61_000  # the queue's own clock, 61 s on: past the retention
    assert run(q.receive(10, 0)) == []
    assert run(q.stats()).visible == 0
    run(q.close())


# --- the embedded queue: backlog cost, redrive retention, clock jumps, depth bound, broken files -------------

DAY_MS = 86_400_000


def load_backlog(path, count: int, body: bytes = b'{"r":1}\n' * 20) -> None:
    """``count`` visible messages written straight into the file in one transaction (fast, any schema)."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        now = time.time_ns() // 1_000_000
        names = ["body", "sent_ms", "visible_ms"] + (["retained_ms"] if "retained_ms" in columns else [])
        with conn:
            conn.executemany(
                f"INSERT INTO messages ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                ((body, *[now] * (len(names) - 1)) for _ in range(count)),
            )
    finally:
        conn.close()  # the last connection checkpoints the WAL: no send pays for the load


def test_a_send_during_a_large_drain_never_waits_long_for_the_lock(run, tmp_path):
    """Two consumers drain a 100k backlog while a receiver sends 20 times a second: no send is refused
    ("database is locked") and none waits long, because receive and delete cost O(log n) under the lock."""
    path = tmp_path / "q.db"
    url = f"sqlite:///{path}"
    setup = open_queue(url)
    run(setup.ping())
    run(setup.close())
    load_backlog(path, 100_000)
    drainers = [open_queue(url) for _ in range(2)]
    sender = open_queue(url)

    async def drain(q, stop):
        while not stop.is_set():
            got = await q.receive(10, 0)
            assert await q.delete_batch([m.receipt for m in got]) == []

    async def scenario():
        stop = asyncio.Event()
        tasks = [asyncio.create_task(drain(q, stop)) for q in drainers]
        waits = []
        try:
            for _ in range(60):  # 3 s at 20 sends/s
                started = time.monotonic()
                assert await sender.send_batch([b"probe"]) == []
                waits.append(time.monotonic() - started)
                await asyncio.sleep(max(0.0, 0.05 - waits[-1]))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        return waits

    waits = run(scenario())
    for q in [*drainers, sender]:
        run(q.close())
    worst = max(range(len(waits)), key=waits.__getitem__)
    assert waits[worst] < 1.0, f"send {worst} waited {waits[worst]:.2f} s (median {sorted(waits)[30]:.3f} s)"


def test_redriven_dead_letters_get_a_fresh_retention_period(run, tmp_path):
    """A message dead-lettered 5 days after it was sent is redriven and then read, not swept unread by the
    4-day retention (SQS's redrive also starts a new retention period)."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'q.db'}"
    q = open_queue(url)
    run(q.create(QueueAttributes(max_receive_count=1)))
    run(q.send_batch([b"precious"]))
    (msg,) = receive_all(run, q, 1)
    run(q.change_visibility([msg.receipt], 0))
    assert run(q.receive(10, 0.2)) == [] and run(q.stats()).dead_letter == 1
    run(q.close())
    conn = sqlite3.connect(tmp_path / "q.db")
    with conn:  # simulated age: sent five days ago
        conn.execute("UPDATE dead_letters SET sent_ms = sent_ms - ?", (5 * DAY_MS,))
    conn.close()
    q = open_queue(url)
    assert run(q.redrive()) == 1
    run(q.close())
    q = open_queue(url)  # a fresh consumer: its first receive runs the retention sweep
    got = receive_all(run, q, 1, timeout_s=5)
    run(q.close())
    assert bodies(got) == [b"precious"]
    assert got[0].sent_at_ms < time.time_ns() // 1_000_000 - 4 * DAY_MS  # the original send time is kept


@pytest.mark.parametrize("jump_ms", [5 * DAY_MS, -DAY_MS], ids=["forward-5-days", "back-1-day"])
def test_a_wall_clock_jump_neither_purges_nor_stalls_the_queue(run, tmp_path, monkeypatch, jump_ms):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    q = open_queue(url)
    run(q.send_batch([b"kept"]))
    run(q.close())
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + jump_ms * 1_000_000)
    q = open_queue(url)
    got = run(q.receive(10, 0))
    run(q.close())
    assert bodies(got) == [b"kept"]


def test_depth_bound_refuses_sends_as_saturated_until_consumers_catch_up(run, tmp_path, monkeypatch):
    from engine.errors import QueueSaturated

    monkeypatch.setenv("CANPIPE_QUEUE_MAX_BYTES", "2500")
    q = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
    run(q.send_batch([b"x" * 1000, b"y" * 1000]))
    with pytest.raises(QueueSaturated, match="CANPIPE_QUEUE_MAX_BYTES"):
        run(q.send_batch([b"z" * 1000]))
    got = receive_all(run, q, 2)
    assert run(q.delete_batch([m.receipt for m in got])) == []
    assert run(q.send_batch([b"z" * 1000])) == []
    stats = run(q.stats())
    assert (stats.visible, stats.size_bytes) == (1, 1000)
    run(q.close())


def test_a_queue_file_deleted_while_in_use_is_refused_until_restored(run, tmp_path):
    """No send is acknowledged into an unlinked file; restoring the file (same inode) recovers by itself."""
    from engine.errors import QueueBroken

    path = tmp_path / "q.db"
    q = open_queue(f"sqlite:///{path}")
    run(q.send_batch([b"before"]))
    os.link(path, tmp_path / "backup.db")
    os.unlink(path)
    with pytest.raises(QueueBroken, match="deleted"):
        run(q.send_batch([b"lost"]))
    with pytest.raises(QueueBroken, match="deleted"):
        run(q.ping())
    assert not path.exists()  # never silently recreated empty
    os.link(tmp_path / "backup.db", path)
    deadline = time.monotonic() + 10
    while True:
        try:
            run(q.send_batch([b"after"]))
            break
        except QueueBroken:
            assert time.monotonic() < deadline, "did not recover after the file was restored"
            time.sleep(0.2)
    assert bodies(receive_all(run, q, 2)) == [b"after", b"before"]
    run(q.close())


def damaged_queue(run, path) -> bytes:
    """A queue file with messages, then garbage over every page but the header page; returns its bytes."""
    q = open_queue(f"sqlite:///{path}")
    run(q.send_batch([b"m" * 5000 for _ in range(10)]))
    run(q.close())
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    return path.read_bytes()


def test_a_corrupted_queue_is_refused_at_open_with_a_recovery_path_and_kept(run, tmp_path):
    from engine.errors import QueueBroken

    path = tmp_path / "q.db"
    damaged = damaged_queue(run, path)
    q = open_queue(f"sqlite:///{path}")
    with pytest.raises(QueueBroken, match=r"(?s)damaged.*operations\.md") as caught:
        run(q.receive(10, 0))
    assert str(path) in str(caught.value)
    run(q.close())
    assert path.read_bytes() == damaged


def test_a_queue_locked_by_another_process_fails_ping_quickly_and_recovers(run, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "q.db"
    q = open_queue(f"sqlite:///{path}")
    run(q.ping())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE');"
            "print('locked', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        with pytest.raises(QueueError, match="locked"):
            run(q.ping())
        assert time.monotonic() - started < 2.0
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    run(q.ping())
    run(q.close())


def test_a_queue_file_from_before_the_indexed_schema_is_migrated(run, tmp_path):
    import sqlite3

    path = tmp_path / "q.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, sent_ms INTEGER NOT NULL,"
            " visible_ms INTEGER NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0, first_receive_ms INTEGER,"
            " receipt TEXT); CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, body BLOB NOT NULL,"
            " sent_ms INTEGER NOT NULL, receive_count INTEGER NOT NULL, dead_ms INTEGER NOT NULL);"
            " CREATE TABLE attributes (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        )
    load_backlog(path, 3, b"old")
    q = open_queue(f"sqlite:///{path}")
    got = receive_all(run, q, 3)
    assert bodies(got) == [b"old"] * 3
    assert run(q.delete_batch([m.receipt for m in got])) == []
    assert run(q.stats()).visible == 0
    run(q.close())


def test_an_unreachable_sqs_endpoint_says_what_to_do(run, monkeypatch):
    from canpipe_testing import AWS_TEST_ENV, free_port

    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    q = open_queue(f"http://127.0.0.1:{free_port()}/123456789012/nowhere")
    with pytest.raises(QueueError, match="unreachable"):
        run(q.ping())
    run(q.close())


def test_a_missing_sqs_queue_says_to_create_it(run, sqs_env):
    q = open_queue(sqs_env["CANPIPE_QUEUE_URL"])  # never created
    with pytest.raises(QueueError, match="canpipe queue create"):
        run(q.ping())
    run(q.close())


def test_a_damaged_queue_is_not_read_whole_again_while_it_stays_the_same_file(run, tmp_path, monkeypatch):
    """quick_check reads the whole file: a receiver refusing a damaged queue must not repeat it every second."""
    import sqlite3

    from engine.errors import QueueBroken
    from engine.queues import sqlite as backend

    path = tmp_path / "q.db"
    damaged_queue(run, path)
    checks: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: checks.append(sql) if "quick_check" in sql else None)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    monkeypatch.setattr(backend, "REOPEN_AFTER_BROKEN_S", 0.0)
    q = open_queue(f"sqlite:///{path}")
    for _ in range(5):
        with pytest.raises(QueueBroken):
            run(q.ping())
    run(q.close())
    assert len(checks) == 1


def test_a_closed_queue_refuses_calls_with_a_queue_error(run, queue, queue_url):
    # the publisher turns a QueueError into a 503 at once; anything else would kill its task
    q = open_queue(queue_url)  # a second client of the queue the fixture created
    run(q.send_batch([b"warm-up"]))
    run(q.close())
    with pytest.raises(QueueError):
        run(q.send_batch([b"after close"]))
