"""The queue protocol: the one thing the receiver and the consumers share.

Two backends with the same semantics (visibility timeout, receive count, dead-letter queue, long poll):
``sqlite:///PATH`` (embedded, the default) and SQS queue URLs (``https://...``, ``http://HOST:PORT/...``).
A backend knows nothing of HTTP or files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

from engine.errors import ConfigError

DEFAULT_VISIBILITY_TIMEOUT_S = 30
DEFAULT_RETENTION_S = 345_600  # 4 days, as SQS
DEFAULT_DLQ_RETENTION_S = 1_209_600  # 14 days: longer than the source queue's, as AWS advises
DEFAULT_RECEIVE_WAIT_S = 20
DEFAULT_MAX_RECEIVE_COUNT = 5
MAX_BATCH_ENTRIES = 10  # SendMessageBatch / DeleteMessageBatch limit


@dataclasses.dataclass(slots=True)
class Received:
    """A message handed to a consumer; ``receipt`` deletes it or changes its visibility."""

    message_id: str
    receipt: str
    body: bytes
    sent_at_ms: int
    first_receive_ms: int
    receive_count: int


@dataclasses.dataclass(frozen=True)
class QueueStats:
    visible: int
    in_flight: int
    delayed: int
    dead_letter: int
    size_bytes: int | None = None  # message bytes held (the embedded queue's CANPIPE_QUEUE_MAX_BYTES counts these)
    oldest_age_s: float | None = None  # age of the oldest message; None where unknown (SQS: CloudWatch only)


@dataclasses.dataclass(frozen=True)
class QueueAttributes:
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    retention_s: int = DEFAULT_RETENTION_S
    receive_wait_s: int = DEFAULT_RECEIVE_WAIT_S
    max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT
    dlq_retention_s: int = DEFAULT_DLQ_RETENTION_S


@dataclasses.dataclass(frozen=True)
class QueueProfile:
    """How callers should pace a backend: what one call may carry and how often calls should be made.

    ``max_message_bytes``: the largest body ``send_batch`` takes. ``send_concurrency``: concurrent send calls
    per publisher. ``send_linger_s``: how long a publisher gathers requests into fuller (on SQS: cheaper)
    calls. ``receive_interval_s``: a consumer polls at most this often unless a receive came back full.
    """

    max_message_bytes: int
    send_concurrency: int = 1
    send_linger_s: float = 0.0
    receive_interval_s: float = 0.0

    def with_overrides(self, *, send_linger_ms: float | None, receive_interval_ms: float | None) -> QueueProfile:
        """This profile with the operator's pacing (CANPIPE_SEND_LINGER_MS, CANPIPE_RECEIVE_INTERVAL_MS, in
        milliseconds) where set; None keeps the backend's own."""
        return dataclasses.replace(
            self,
            send_linger_s=self.send_linger_s if send_linger_ms is None else send_linger_ms / 1000.0,
            receive_interval_s=self.receive_interval_s if receive_interval_ms is None else receive_interval_ms / 1000.0,
        )


@dataclasses.dataclass(frozen=True)
class QueueUsage:
    """What a per-request-billed backend (SQS) has been asked for by this process: API calls by action and
    billed requests (every 64 KiB of a request is one)."""

    requests_by_action: Mapping[str, int]
    billed_requests: int


class Queue(Protocol):
    """What every backend offers. Bodies are bytes; each may hold many telemetry records."""

    @property
    def profile(self) -> QueueProfile:
        """The backend's pacing and size limit (SQS learns its message size from the queue on first send)."""

    def usage(self) -> QueueUsage | None:
        """Request counters for a backend billed per request; None for one that is not (SQLite)."""

    async def send_batch(self, bodies: Sequence[bytes]) -> list[int]:
        """Send up to 10 bodies; return the indices of the entries that failed (empty: all stored).
        Raises QueueError when the queue cannot be reached at all."""

    async def receive(self, max_messages: int = 10, wait_s: float = 20.0) -> list[Received]:
        """Up to ``max_messages``, waiting up to ``wait_s`` for the first one (long poll)."""

    async def delete_batch(self, receipts: Sequence[str]) -> list[str]:
        """Delete by receipt; return the receipts that could not be deleted."""

    async def change_visibility(self, receipts: Sequence[str], timeout_s: float) -> None: ...

    async def stats(self) -> QueueStats: ...

    async def create(self, attributes: QueueAttributes = QueueAttributes()) -> None: ...

    async def purge(self) -> int: ...

    async def redrive(self) -> int:
        """Move every dead-lettered message back to the queue; return how many."""

    async def ping(self) -> None:
        """Raise QueueError unless the queue is reachable."""

    async def close(self) -> None: ...


def open_queue(
    url: str, *, visibility_timeout_s: float | None = None, max_bytes: int | None = None, create: bool = True
) -> Queue:
    """The backend for ``url``: ``sqlite:///PATH`` or an SQS queue URL.

    ``max_bytes``: the embedded queue's depth bound (None: CANPIPE_QUEUE_MAX_BYTES; 0: unbounded). SQS
    has no such bound here: its backlog is AWS's to hold. ``create=False``: a missing embedded queue file is a
    QueueError, not a new empty queue (read-only commands); an SQS queue is never created by opening it.
    """
    if url.startswith("sqlite://"):
        from engine.config import Settings
        from engine.queues.sqlite import SqliteQueue

        if max_bytes is None:
            max_bytes = Settings.from_env().queue_max_bytes
        return SqliteQueue(
            url.removeprefix("sqlite://"), visibility_timeout_s=visibility_timeout_s, max_bytes=max_bytes, create=create
        )
    if url.startswith(("https://", "http://")):
        from engine.queues.sqs import SqsQueue

        return SqsQueue(url, visibility_timeout_s=visibility_timeout_s)
    raise ConfigError(f"CANPIPE_QUEUE_URL: expected sqlite:///PATH or an SQS queue URL, got {url!r}")


def refuse_broken_queue(url: str) -> None:
    """At start-up: raise QueueBroken (naming the file and the way to recover) when the queue's storage is
    damaged, so a process refuses to start instead of serving 503s. A transient problem (a lock held by
    another process, an SQS endpoint not up yet) is left to the retries and to /health."""
    import asyncio

    from engine.errors import QueueBroken, QueueError

    async def probe() -> None:
        queue = open_queue(url)
        try:
            await asyncio.wait_for(queue.ping(), 30)
        except QueueBroken:
            raise
        except (QueueError, TimeoutError):
            pass
        finally:
            await queue.close()

    asyncio.run(probe())
