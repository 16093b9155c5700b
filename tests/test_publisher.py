"""Group commit, partial failures and load shedding (unit tests with an in-process queue double)."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import QueueBroken, QueueError, QueueSaturated
from engine.publisher import Publisher, _Request, pack
from engine.queues import QueueProfile


class RecordingQueue:
    """Stores what it is sent; can fail chosen entries or whole calls, or stall."""

    profile = QueueProfile(max_message_bytes=1000)

    def __init__(self, fail_entries=(), fail_calls=0, delay=0.0):
        self.calls: list[list[bytes]] = []
        self.stored: list[bytes] = []
        self.fail_entries = list(fail_entries)  # per call: set of entry indices to fail
        self.fail_calls = fail_calls
        self.delay = delay

    async def send_batch(self, bodies):
        self.calls.append(list(bodies))
        await asyncio.sleep(self.delay)
        if self.fail_calls:
            self.fail_calls -= 1
            raise QueueError("unreachable")
        failed = self.fail_entries.pop(0) if self.fail_entries else set()
        self.stored += [b for i, b in enumerate(bodies) if i not in failed]
        return sorted(failed)


def run(coro):
    return asyncio.run(coro)


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
    queue = RecordingQueue(fail_entries=[{0}] * 10)

    async def body(publisher):
        big = lines("a", 40)  # fills an entry of its own
        return await asyncio.gather(
            publisher.publish(big, 40), publisher.publish(lines("b", 1), 1), return_exceptions=True
        )

    first, second = run(with_publisher(queue, body, max_attempts=3))
    assert isinstance(first, QueueError) or isinstance(second, QueueError)


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
    queue = RecordingQueue(delay=0.5)

    async def body(publisher):
        first = asyncio.create_task(publisher.publish(lines("a", 8), 8))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueSaturated):
            await publisher.publish(lines("b", 3), 3)
        await first

    run(with_publisher(queue, body, max_pending_records=10))


def test_timeout_withdraws_a_request_not_yet_sent():
    queue = RecordingQueue(delay=1.0)

    async def body(publisher):
        first = asyncio.create_task(publisher.publish(lines("a", 1), 1))
        await asyncio.sleep(0.05)  # "a" is in flight; "b" waits behind it
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
    assert entries[0].requests == [requests[0], requests[1]] or entries[0].requests == [requests[0]]
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
