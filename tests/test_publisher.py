"""Group commit, partial failures and load shedding (unit tests with an in-process queue double)."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.errors import QueueBroken, QueueError, QueueSaturated
from engine.publisher import Publisher, _Request, pack
from engine.queues import QueueProfile


class RecordingQueue:
    """Stores what it is sent; can fail chosen entries or whole calls, stall (``delay``), or hold every
    call until the test sets ``released`` (``hold=True``: a queue that does not answer)."""

    profile = QueueProfile(max_message_bytes=1000)

    def __init__(self, fail_entries=(), fail_calls=0, delay=0.0, hold=False):
        self.calls: list[list[bytes]] = []
        self.stored: list[bytes] = []
        self.fail_entries = list(fail_entries)  # per call: set of entry indices to fail
        self.fail_calls = fail_calls
        self.delay = delay
        self.released = asyncio.Event() if hold else None

    async def send_batch(self, bodies):
        self.calls.append(list(bodies))
        await asyncio.sleep(self.delay)
        if self.released is not None:
            await self.released.wait()
        if self.fail_calls:
            self.fail_calls -= 1
            raise QueueError("unreachable")
        failed = self.fail_entries.pop(0) if self.fail_entries else set()
        self.stored += [b for i, b in enumerate(bodies) if i not in failed]
        return sorted(failed)


def run(coro):
    return asyncio.run(coro)


async def until(condition, timeout_s: float = 5.0) -> None:
    """Yield to the loop until ``condition()`` holds (fails the test after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


async def with_publisher(queue, body, **kw):
    publisher = Publisher(queue, backoff_s=0.001, **kw)
    publisher.start()
    try:
        return await body(publisher)
    finally:
        await publisher.close()
        assert publisher.pending_records == 0  # nothing left accounted as in flight


def lines(tag: str, n: int) -> bytes:
    return b"".join(b'{"r":"%s%d"}\n' % (tag.encode(), i) for i in range(n))


def test_concurrent_requests_coalesce_into_few_calls():
    queue = RecordingQueue(delay=0.01)

    async def body(publisher):
        await asyncio.gather(*(publisher.publish(lines(f"q{i}-", 2), 2) for i in range(200)))

    run(with_publisher(queue, body))
    assert len(queue.calls) < 20  # 200 requests, a handful of calls
    stored = b"".join(queue.stored)
    assert stored.count(b"\n") == 400
    assert all(len(entry) <= 1000 for call in queue.calls for entry in call)
    assert all(len(call) <= 10 for call in queue.calls)


def test_partial_failure_retries_exactly_the_failed_entries():
    queue = RecordingQueue(fail_entries=[{1}])

    async def body(publisher):
        await asyncio.gather(*(publisher.publish(lines(f"q{i}-", 20), 20) for i in range(6)))

    run(with_publisher(queue, body))
    first, retry = queue.calls
    assert retry == [first[1]]  # only the failed entry went again
    assert b"".join(sorted(queue.stored)).count(b"\n") == 120


def test_request_fails_when_its_entry_keeps_failing_and_others_succeed():
    queue = RecordingQueue(fail_entries=[{0}] * 10)  # the first entry of every call fails
    big = lines("a", 80)  # 950 bytes: with "b" it would pass the 1000-byte message, so "b" gets entry 1

    async def body(publisher):
        return await asyncio.gather(
            publisher.publish(big, 80), publisher.publish(lines("b", 5), 5), return_exceptions=True
        )

    first, second = run(with_publisher(queue, body, max_attempts=3))
    assert isinstance(first, QueueError) and second is None
    assert queue.stored == [lines("b", 5)]
    assert queue.calls == [[big, lines("b", 5)], [big], [big]]  # only the failing entry went again


def test_unreachable_queue_fails_after_retries_and_recovers():
    queue = RecordingQueue(fail_calls=3)

    async def body(publisher):
        with pytest.raises(QueueError):
            await publisher.publish(lines("x", 1), 1)
        await publisher.publish(lines("y", 1), 1)
        return publisher.pending_records

    assert run(with_publisher(queue, body, max_attempts=3)) == 0
    assert queue.stored == [lines("y", 1)]


def test_saturation_sheds_load_instead_of_queueing():
    queue = RecordingQueue(hold=True)

    async def body(publisher):
        first = asyncio.create_task(publisher.publish(lines("a", 8), 8))
        await until(lambda: queue.calls)  # "a" is in flight: 8 of 10 records taken
        with pytest.raises(QueueSaturated):
            await publisher.publish(lines("b", 3), 3)
        queue.released.set()
        await first
        assert queue.stored == [lines("a", 8)]

    run(with_publisher(queue, body, max_pending_records=10))


def test_timeout_withdraws_a_request_not_yet_sent():
    queue = RecordingQueue(hold=True)

    async def body(publisher):
        first = asyncio.create_task(publisher.publish(lines("a", 1), 1))
        await until(lambda: queue.calls)  # "a" is in flight; "b" waits behind it (one call at a time)
        with pytest.raises(QueueError, match="did not acknowledge"):
            await publisher.publish(lines("b", 1), 1)
        with pytest.raises(QueueError):
            await first
        return publisher.pending_records

    assert run(with_publisher(queue, body, timeout_s=0.2)) == 1  # "a" is still in flight, "b" was withdrawn
    assert all(b"b0" not in entry for call in queue.calls for entry in call)


def test_pack_keeps_requests_whole_and_splits_only_oversized_ones():
    loop = asyncio.new_event_loop()
    requests = [
        _Request(lines("a", 10), 10, loop.create_future()),
        _Request(lines("b", 200), 200, loop.create_future()),
    ]
    entries = pack(requests, 1000)
    loop.close()
    # "a" (110 bytes) and b's first piece (near 1000) do not fit one entry, and a piece is never cut further
    assert entries[0].requests == [requests[0]] and entries[0].size == 110
    assert all(e.requests == [requests[1]] for e in entries[1:])
    assert all(e.size <= 1000 and b"".join(e.parts).endswith(b"\n") for e in entries)
    assert b"".join(b"".join(e.parts) for e in entries) == lines("a", 10) + lines("b", 200)
    assert requests[1].entries_left == sum(requests[1] in e.requests for e in entries)
    with pytest.raises(QueueError, match="larger than"):
        pack([_Request(b"x" * 2000 + b"\n", 1, None)], 1000)


def test_linger_gathers_requests_into_fewer_calls():
    queue = RecordingQueue()

    async def body(publisher):
        async def trickle(i):
            await asyncio.sleep(i * 0.002)  # one request every 2 ms
            await publisher.publish(lines(f"t{i}-", 1), 1)

        await asyncio.gather(*(trickle(i) for i in range(40)))

    run(with_publisher(queue, body, linger_s=0.03, concurrency=4))
    assert len(queue.calls) <= 6  # about 80 ms of requests in calls that each gathered 30 ms
    assert b"".join(queue.stored).count(b"\n") == 40


class RefusingQueue(RecordingQueue):
    """A backend that refuses every send with one error, as a full or a damaged queue does."""

    def __init__(self, error: QueueError):
        super().__init__()
        self.error = error

    async def send_batch(self, bodies):
        self.calls.append(list(bodies))
        raise self.error


@pytest.mark.parametrize("error", [QueueSaturated("queue full"), QueueBroken("queue file deleted")])
def test_a_full_or_broken_queue_is_reported_at_once_as_itself(error):
    """The receiver answers 503 'saturated' (with Retry-After) for a full queue, not a generic failure after
    five retries into it; a broken queue is not retried either."""
    queue = RefusingQueue(error)

    async def body(publisher):
        with pytest.raises(type(error)) as caught:
            await publisher.publish(lines("x", 1), 1)
        return caught.value

    raised = run(with_publisher(queue, body, timeout_s=5.0))
    assert raised is error
    assert len(queue.calls) == 1


def test_close_gives_up_on_a_queue_that_never_answers():
    """Shutdown is bounded: past the deadline every request still waiting fails with QueueError (the receiver
    answers 503, the client retries) and close returns, instead of waiting forever on the queue."""
    queue = RecordingQueue(hold=True)  # never released

    async def scenario():
        publisher = Publisher(queue, timeout_s=60.0)
        publisher.start()
        sent = asyncio.create_task(publisher.publish(lines("a", 1), 1))
        await until(lambda: queue.calls)  # "a" is handed to the queue
        waiting = asyncio.create_task(publisher.publish(lines("b", 1), 1))  # "b" waits behind it
        await until(lambda: publisher.pending_records == 2)
        started = time.monotonic()
        await publisher.close(deadline_s=0.2)
        closed_in = time.monotonic() - started
        outcomes = await asyncio.gather(sent, waiting, return_exceptions=True)
        return closed_in, outcomes, publisher.pending_records

    closed_in, outcomes, pending = run(scenario())
    assert 0.2 <= closed_in < 5
    assert all(isinstance(o, QueueError) and "did not answer before shutdown" in str(o) for o in outcomes)
    assert pending == 0
    assert queue.stored == []


def test_close_deadline_defaults_to_the_publish_timeout():
    queue = RecordingQueue(hold=True)

    async def scenario():
        publisher = Publisher(queue, timeout_s=0.3)
        publisher.start()
        sent = asyncio.create_task(publisher.publish(lines("a", 1), 1))
        await until(lambda: queue.calls)
        started = time.monotonic()
        await publisher.close()
        with pytest.raises(QueueError):
            await sent
        return time.monotonic() - started

    assert 0.3 <= run(scenario()) < 5
