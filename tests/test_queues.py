"""One contract suite for every queue backend: the semantics the pipeline relies on."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from engine.errors import ConfigError, QueueError
from engine.queues import QueueAttributes, open_queue


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

    async def send_later():
        await asyncio.sleep(0.5)
        await other.send_batch([b"late"])

    async def poll():
        sender = asyncio.create_task(send_later())
        t0 = time.monotonic()
        got = await queue.receive(10, 10.0)
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
        run(queue.send_batch([os.urandom(queue.max_message_bytes * 2).hex().encode()]))  # text that won't compress


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
    run(q.create(QueueAttributes(retention_s=1)))
    run(q.send_batch([b"old"]))
    time.sleep(1.1)
    assert run(q.receive(10, 0)) == []
    run(q.close())
