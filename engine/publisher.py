"""Group commit: concurrent requests coalesce into queue batches.

Every request hands over its stored bytes (NDJSON) and waits. One flusher packs whatever is pending
into entries of up to the queue's message size, at most 10 entries a call, and sends. While a call is
in flight new requests pile up and ride the next one, so the batch grows with the load. A request is
acknowledged only when every entry holding its records was stored; exactly the failed entries of a
partial batch are retried with jittered backoff; a queue that is full (QueueSaturated) or broken
(QueueBroken) is not retried but reported as it is, at once. Work in flight is bounded: past the bound, publish
raises QueueSaturated at once (the receiver answers 503) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Sequence

from engine.errors import QueueBroken, QueueError, QueueSaturated
from engine.queues import MAX_BATCH_ENTRIES, Queue

log = logging.getLogger("canpipe.publisher")
NEAR_FULL = 0.8  # past this share of max_pending_records in flight, a warning (at most every 10 s) says 503s are near


class _Request:
    __slots__ = ("chunk", "records", "future", "entries_left", "enqueued_at", "settled")

    def __init__(self, chunk: bytes, records: int, future: asyncio.Future[None]) -> None:
        self.chunk = chunk
        self.records = records
        self.future = future
        self.entries_left = 0
        self.settled = False
        self.enqueued_at = future.get_loop().time() if future is not None else 0.0


class _Entry:
    __slots__ = ("parts", "size", "requests")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.requests: list[_Request] = []

    def add(self, request: _Request, part: bytes) -> None:
        self.parts.append(part)
        self.size += len(part)
        if not self.requests or self.requests[-1] is not request:
            self.requests.append(request)
            request.entries_left += 1


def _split_lines(chunk: bytes, limit: int) -> list[bytes]:
    """Cut an NDJSON chunk larger than ``limit`` at line ends into pieces of at most ``limit`` bytes."""
    pieces, start = [], 0
    while len(chunk) - start > limit:
        cut = chunk.rfind(b"\n", start, start + limit) + 1
        if cut <= start:
            raise QueueError(f"one record is larger than the queue's message limit of {limit} bytes")
        pieces.append(chunk[start:cut])
        start = cut
    pieces.append(chunk[start:])
    return pieces


def pack(requests: Sequence[_Request], limit: int) -> list[_Entry]:
    """Pack requests into entries of at most ``limit`` bytes, keeping a request whole when it fits."""
    entries: list[_Entry] = []
    current = _Entry()
    for request in requests:
        for part in _split_lines(request.chunk, limit) if len(request.chunk) > limit else (request.chunk,):
            if current.size + len(part) > limit:
                entries.append(current)
                current = _Entry()
            current.add(request, part)
    if current.parts:
        entries.append(current)
    return entries


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Publisher:
    """Coalesces ``publish`` calls into ``send_batch`` calls on ``queue``."""

    def __init__(
        self,
        queue: Queue,
        *,
        max_pending_records: int = 200_000,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 0.05,
        concurrency: int = 1,
        linger_s: float = 0.0,
    ) -> None:
        self.queue = queue
        self.max_pending_records = max_pending_records
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.linger_s = linger_s
        self.pending_records = 0
        self.calls = 0
        self._last_refusal_log = -1e9
        self._last_near_full_log = -1e9
        self._pending: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._flusher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._calls_in_flight: set[asyncio.Task[None]] = set()
        self._waiting: collections.deque[_Request] = collections.deque()  # in order of enqueued_at: of deadline
        self._waiting_event = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flusher = loop.create_task(self._flush_forever())
        self._watcher = loop.create_task(self._watch_deadlines())

    async def close(self, deadline_s: float | None = None) -> None:
        """Finish what was handed over, then stop; wait at most ``deadline_s`` seconds (default: the publish
        timeout) for the queue. Past it, every request not yet acknowledged fails with QueueError (its client
        gets a 503 and may retry) and close returns: a queue that never answers cannot hold a shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if deadline_s is None else deadline_s)
        while (self._pending or self._calls_in_flight) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._pending or self._calls_in_flight:
            error = QueueError("the queue did not answer before shutdown")
            requests, self._pending = self._pending, []
            for request in requests:
                self._finish(request, error)
            calls = list(self._calls_in_flight)
            for call in calls:
                call.cancel()  # _send fails the requests it carried
            await asyncio.gather(*calls, return_exceptions=True)
            log.warning(
                "publisher closed: the queue did not answer within the deadline; %d waiting requests failed and %d"
                " unanswered calls abandoned",
                len(requests),
                len(calls),
                extra={"stage": "publish"},
            )
        for task in (self._flusher, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def publish(self, chunk: bytes, records: int) -> None:
        """Return once all ``records`` in ``chunk`` are stored in the queue; raise QueueError otherwise."""
        if self.pending_records + records > self.max_pending_records:
            raise QueueSaturated(f"{self.pending_records} records already in flight")
        request = _Request(chunk, records, asyncio.get_running_loop().create_future())
        request.future.add_done_callback(_retrieve)  # a caller that timed out never reads the outcome
        self.pending_records += records
        if self.pending_records > NEAR_FULL * self.max_pending_records:
            self._near_full()
        self._pending.append(request)
        self._wakeup.set()
        # the deadline is watched by one task for every request (_watch_deadlines), not a timer handle each:
        # a timer's creation and cancellation cost more than the rest of publish
        self._waiting.append(request)
        if len(self._waiting) == 1:
            self._waiting_event.set()
        await request.future

    async def _watch_deadlines(self) -> None:
        """Expire the requests past ``timeout_s`` (``_expire``), oldest first, waking at most every
        ``timeout_s / 50`` (at least 10 ms; a request times out within 2 % of its timeout) and at least every
        0.1 s while requests wait."""
        loop = asyncio.get_running_loop()
        tick = max(0.01, self.timeout_s / 50)
        waiting = self._waiting
        while True:
            while waiting and waiting[0].future.done():
                waiting.popleft()
            if not waiting:
                self._waiting_event.clear()
                await self._waiting_event.wait()
                continue
            due = waiting[0].enqueued_at + self.timeout_s - loop.time()
            if due > 0:  # at least every 0.1 s, to drop the answered requests (and their bytes) from the deque
                await asyncio.sleep(min(max(due, tick), 0.1))
                continue
            self._expire(waiting.popleft())

    def _near_full(self) -> None:
        """Warn (at most every 10 s) that requests are about to be shed with 503: the queue is not keeping up."""
        now = asyncio.get_running_loop().time()
        if now - self._last_near_full_log >= 10.0:
            self._last_near_full_log = now
            log.warning(
                "%d of at most %d records waiting for the queue: near the bound past which requests get 503",
                self.pending_records,
                self.max_pending_records,
                extra={"stage": "publish"},
            )

    def _expire(self, request: _Request) -> None:
        """The request waited too long: fail it, and withdraw it when not yet handed to the queue. One
        already handed over stays counted as in flight until the queue answers."""
        error = QueueError(f"queue did not acknowledge within {self.timeout_s:g} s")
        if request in self._pending:
            self._pending.remove(request)
            self._finish(request, error)
        elif not request.future.done():
            request.future.set_exception(error)

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if self.linger_s and self._pending:
                # gather for up to linger_s after the oldest request, unless a message is full already
                if sum(len(r.chunk) for r in self._pending) < self.queue.profile.max_message_bytes:
                    await asyncio.sleep(max(0.0, self._pending[0].enqueued_at + self.linger_s - loop.time()))
            await self._slots.acquire()
            self._wakeup.clear()
            requests, self._pending = self._pending, []
            if not requests:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._send(requests))
            self._calls_in_flight.add(task)
            task.add_done_callback(self._calls_in_flight.discard)

    async def _send(self, requests: list[_Request]) -> None:
        try:
            try:
                entries = pack(requests, self.queue.profile.max_message_bytes)
            except QueueError as exc:
                for request in requests:
                    self._finish(request, exc)
                return
            calls = [entries[i : i + MAX_BATCH_ENTRIES] for i in range(0, len(entries), MAX_BATCH_ENTRIES)]
            await asyncio.gather(*(self._send_call(call) for call in calls))
        except asyncio.CancelledError:  # close gave up on the queue: nobody may wait on these any longer
            for request in requests:
                self._finish(request, QueueError("the queue did not answer before shutdown"))
            raise
        finally:
            self._slots.release()
            if self._pending:
                self._wakeup.set()

    async def _send_call(self, entries: list[_Entry]) -> None:
        todo = entries
        error: Exception = QueueError("send failed")
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            self.calls += 1
            try:
                failed = set(await self.queue.send_batch([b"".join(entry.parts) for entry in todo]))
            except (QueueSaturated, QueueBroken) as exc:
                # not transient within a request's timeout: answer at once (503), as saturation or breakage,
                # instead of retrying into a full or damaged queue and reporting a generic failure
                now = asyncio.get_running_loop().time()
                if now - self._last_refusal_log >= 10.0:  # one line per 10 s, not one per batch under load
                    self._last_refusal_log = now
                    log.warning("send_batch refused: %s", exc, extra={"stage": "publish"})
                error = exc
                break
            except QueueError as exc:
                error, failed = exc, set(range(len(todo)))
                log.warning(
                    "send_batch failed (attempt %d of %d): %s",
                    attempt + 1,
                    self.max_attempts,
                    exc,
                    extra={"stage": "publish"},
                )
            for index, entry in enumerate(todo):
                if index not in failed:
                    for request in entry.requests:
                        request.entries_left -= 1
                        if request.entries_left == 0:
                            self._finish(request, None)
            todo = [todo[i] for i in sorted(failed)]
            if not todo:
                return
            if len(failed) != len(entries):
                error = QueueError(f"{len(todo)} entries of a batch failed")
        for entry in todo:
            for request in entry.requests:
                self._finish(request, error)

    def _finish(self, request: _Request, error: Exception | None) -> None:
        if request.settled:
            return
        request.settled = True
        self.pending_records -= request.records
        if request.future.done():
            return
        if error is None:
            request.future.set_result(None)
        else:
            request.future.set_exception(error)
