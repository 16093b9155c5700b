"""Posting raw frames to ``/ingest/can`` in batches: the HTTP client of ``canpipe replay`` and
``simulate --can``. Retries 429 and 503 (honouring ``Retry-After``) and connection errors with backoff; any
other refusal fails the batch, counted by cause. A client like any gateway: HTTP only, no receiver import.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import random

import aiohttp
import msgspec

from engine.can.frame import format_frame_id

RETRY_STATUSES = {429, 503}
_encoder = msgspec.json.Encoder()


def iso_utc(epoch_s: float) -> str:
    """A timestamp for the wire: UTC, microseconds, ``Z`` (the receiver's canonical form)."""
    moment = dt.datetime.fromtimestamp(epoch_s, dt.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def wire_frame(timestamp_s: float, vehicle_id: str, frame_id: int, data: bytes) -> dict[str, str]:
    """One frame as ``/ingest/can`` takes it."""
    return {
        "timestamp": iso_utc(timestamp_s),
        "vehicle_id": vehicle_id,
        "can_id": format_frame_id(frame_id),
        "data": data.hex(),
    }


@dataclasses.dataclass
class PostCounts:
    """Frames posted and what came of them; ``failed`` maps a cause to its frames."""

    sent: int = 0
    accepted: int = 0
    requests: int = 0
    retries: int = 0
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def failed_frames(self) -> int:
        return sum(self.failed.values())


class FramePoster:
    """An aiohttp session posting batches of frames to ``url/ingest/can``, at most ``max_in_flight`` at once."""

    def __init__(
        self, url: str, api_key: str | None, *, max_in_flight: int = 8, max_attempts: int = 6, timeout_s: float = 30
    ) -> None:
        self.url = url.rstrip("/") + "/ingest/can"
        self.headers = {"Content-Type": "application/json"} | ({"X-API-Key": api_key} if api_key else {})
        self.max_attempts = max_attempts
        self.counts = PostCounts()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FramePoster:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()
        assert self._session is not None
        await self._session.close()

    async def submit(self, frames: list[dict[str, str]]) -> None:
        """Post a batch in the background once a slot is free (waits while ``max_in_flight`` are out)."""
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._send(frames))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every batch submitted so far to be answered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def _send(self, frames: list[dict[str, str]]) -> None:
        try:
            await self.post(frames)
        finally:
            self._slots.release()

    async def post(self, frames: list[dict[str, str]]) -> bool:
        """Post one batch, retrying what may succeed later; True when it was accepted (202)."""
        assert self._session is not None, "use FramePoster as an async context manager"
        counts = self.counts
        counts.sent += len(frames)
        body = _encoder.encode(frames)
        reason = ""
        for attempt in range(self.max_attempts):
            if attempt:
                counts.retries += 1
            counts.requests += 1
            retry_after = None
            try:
                async with self._session.post(self.url, data=body, headers=self.headers) as response:
                    answer = await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except TimeoutError:
                status, answer, reason = 0, b"", "no answer in time"
            except aiohttp.ClientError as exc:
                status, answer, reason = 0, b"", f"{type(exc).__name__}: {exc}"
            if status == 202:
                counts.accepted += len(frames)
                return True
            if status:
                reason = f"HTTP {status}: {answer[:300].decode(errors='replace').strip()}"
            if status and status not in RETRY_STATUSES:
                counts.failed[reason] += len(frames)
                return False
            delay = min(5.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.5)
            if retry_after and retry_after.isdigit():
                delay = max(delay, min(float(retry_after), 5.0))
            await asyncio.sleep(delay)
        counts.failed[f"{reason} (after {self.max_attempts} attempts)"] += len(frames)
        return False
