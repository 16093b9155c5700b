"""``canpipe replay LOG --dbc FILE``: a recorded bus log (candump ``.log``, Vector ``.asc``, ``.blf``, and
whatever else ``can.LogReader`` reads) posted through ``/ingest/can`` in batches, paced by its timestamps.

Frames the receiver would refuse are not sent but skipped and counted by reason: an id not in the DBC, an id
whose message the signal map leaves out, a multiplexer page without a mapped signal, a data length the DBC
does not give the message, decoded values out of the schema's physical ranges, error and remote frames.

Timestamps: the log's own (absolute) ones when the first frame falls within the receiver's clock window
(``CANPIPE_MAX_AGE_S`` back, ``CANPIPE_MAX_FUTURE_SKEW_S`` ahead), else re-based: the log's first frame at
the start of the replay (at ``--speed 1``), or its last frame at the start (any other speed, so that no
frame is stamped ahead of the receiver's clock). With the log's timestamps, replaying a log again sends the
same (vehicle, can_id, timestamp) keys, so the aggregates do not change: the copies are dropped as duplicates.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.can.client import FramePoster, iso_utc, wire_frame
from engine.can.codec import CanCodec
from engine.schema import Payload

TIMESTAMP_MODES = ("auto", "log", "now")
SCREEN_CHUNK = 1000  # frames read ahead and screened with one batch decode per CAN id
PACING_SLACK_S = 0.005  # frames due within this of each other go out in one batch


@dataclasses.dataclass
class ReplaySummary:
    """What a replay did; ``skipped`` and ``failed`` map a reason or cause to its frames."""

    log: str
    frames_read: int = 0
    sent: int = 0
    accepted: int = 0
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    timestamps: str = ""  # how the frames were stamped, for the summary
    elapsed_s: float = 0.0
    requests: int = 0
    retries: int = 0

    @property
    def failed_frames(self) -> int:
        return sum(self.failed.values())


def describe(summary: ReplaySummary) -> str:
    """The summary ``canpipe replay`` prints."""
    skipped = sum(summary.skipped.values())
    lines = [
        f"replay {summary.log}: {summary.frames_read} frames read, {summary.sent} sent, {summary.accepted} accepted, "
        f"{summary.failed_frames} failed, {skipped} skipped; {summary.requests} requests "
        f"({summary.retries} retries) in {summary.elapsed_s:.1f} s",
        f"timestamps: {summary.timestamps}",
    ]
    for reason, frames in summary.skipped.most_common():
        lines.append(f"  skipped {frames} frames: {reason}")
    for cause, frames in summary.failed.most_common():
        lines.append(f"  FAILED {frames} frames: {cause}")
    return "\n".join(lines)


def vehicle_id_for(log: Path) -> str:
    """A vehicle id from a log's file name (``drive 2024-05-01.blf`` -> ``drive-2024-05-01``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.:-]+", "-", log.stem).lstrip("_.:-")[:64]
    return cleaned or "replay"


def read_log(path: Path) -> Iterator[Any]:
    """The frames of a log with python-can, timestamps as seconds since the epoch where the format keeps them
    (an ASC file's ``date`` header is applied rather than its times relative to the start)."""
    import can

    if path.suffix.lower() == ".asc":
        return iter(can.ASCReader(str(path), relative_timestamp=False))
    return iter(can.LogReader(str(path)))


class Screen:
    """Decides, with the codec, which frames of a chunk the receiver would take; the others' skip reasons."""

    def __init__(self, codec: CanCodec) -> None:
        self.codec = codec
        self._messages: dict[int, Any] = {}

    def _message(self, frame_id: int) -> Any:
        if frame_id not in self._messages:
            try:
                self._messages[frame_id] = self.codec.message(frame_id)
            except KeyError:
                self._messages[frame_id] = None
        return self._messages[frame_id]

    def reasons(self, frames: list[Any]) -> list[str | None]:
        """Per frame None (send it) or why it is skipped."""
        reasons: list[str | None] = [None] * len(frames)
        groups: dict[int, list[int]] = {}
        for index, frame in enumerate(frames):
            message = None if frame.is_error_frame or frame.is_remote_frame else self._message(frame.arbitration_id)
            if frame.is_error_frame:
                reasons[index] = "error frame"
            elif frame.is_remote_frame:
                reasons[index] = "remote frame"
            elif message is None:
                reasons[index] = "CAN id not in the DBC"
            elif frame.arbitration_id not in self.codec.by_frame:
                reasons[index] = "message not in the signal map"
            elif len(frame.data) != message.length:
                reasons[index] = "data length differs from the DBC"
            else:
                groups.setdefault(frame.arbitration_id, []).append(index)
        for frame_id, indices in groups.items():
            rows = self.codec.payloads(frame_id, [bytes(frames[i].data) for i in indices])
            for index, row in zip(indices, rows):
                if not row:
                    reasons[index] = "multiplexer page without a mapped signal"
                    continue
                try:
                    msgspec.convert(row, Payload)
                except msgspec.ValidationError:
                    reasons[index] = "decoded value outside the physical ranges"
        return reasons


def _chunks(frames: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(frames)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class Replayer:
    """One log to one receiver. ``speed`` scales the log's time (2.0 twice as fast); None: as fast as possible."""

    def __init__(
        self,
        log: Path,
        codec: CanCodec,
        url: str,
        *,
        api_key: str | None = None,
        vehicle_id: str | None = None,
        speed: float | None = 1.0,
        batch: int = 100,
        timestamps: str = "auto",
        max_age_s: float = 7 * 86400.0,
        max_future_s: float = 300.0,
        max_attempts: int = 6,
    ) -> None:
        if timestamps not in TIMESTAMP_MODES:
            raise ValueError(f"timestamps must be one of {TIMESTAMP_MODES}, got {timestamps!r}")
        self.log, self.codec, self.url, self.api_key = log, codec, url, api_key
        self.vehicle_id = vehicle_id or vehicle_id_for(log)
        self.speed, self.batch, self.mode = speed, max(1, batch), timestamps
        self.max_age_s, self.max_future_s, self.max_attempts = max_age_s, max_future_s, max_attempts

    def _offset(self, first_s: float, start_wall: float) -> tuple[float, str]:
        """Seconds added to every log timestamp, and how the summary says it."""
        plausible = start_wall - self.max_age_s <= first_s <= start_wall + self.max_future_s
        if self.mode == "log" or (self.mode == "auto" and plausible):
            return 0.0, f"the log's own (first frame {iso_utc(first_s)})"
        why = "asked for" if self.mode == "now" else "the log's own are outside the receiver's clock window"
        if self.speed == 1.0:
            return start_wall - first_s, f"re-based ({why}): the log's first frame at {iso_utc(start_wall)}"
        last_s = first_s
        for frame in read_log(self.log):  # a second pass: a faster replay must not stamp frames ahead
            last_s = max(last_s, frame.timestamp)
        return start_wall - last_s, f"re-based ({why}): the log's last frame at {iso_utc(start_wall)}"

    async def run(self) -> ReplaySummary:
        summary = ReplaySummary(str(self.log))
        screen = Screen(self.codec)
        started = time.monotonic()
        start_wall = time.time()
        offset: float | None = None
        first_s = 0.0
        pending: list[dict[str, str]] = []
        async with FramePoster(self.url, self.api_key, max_attempts=self.max_attempts) as poster:
            for chunk in _chunks(read_log(self.log), SCREEN_CHUNK):
                summary.frames_read += len(chunk)
                if offset is None:
                    first_s = chunk[0].timestamp
                    offset, summary.timestamps = self._offset(first_s, start_wall)
                for frame, reason in zip(chunk, screen.reasons(chunk)):
                    if reason is not None:
                        summary.skipped[reason] += 1
                        continue
                    if self.speed is not None:
                        due = started + (frame.timestamp - first_s) / self.speed
                        if due - time.monotonic() > PACING_SLACK_S:
                            if pending:
                                await poster.submit(pending)
                                pending = []
                            await asyncio.sleep(due - time.monotonic())
                    pending.append(
                        wire_frame(frame.timestamp + offset, self.vehicle_id, frame.arbitration_id, bytes(frame.data))
                    )
                    if len(pending) >= self.batch:
                        await poster.submit(pending)
                        pending = []
            if pending:
                await poster.submit(pending)
        counts = poster.counts
        summary.sent, summary.accepted, summary.failed = counts.sent, counts.accepted, counts.failed
        summary.requests, summary.retries = counts.requests, counts.retries
        summary.elapsed_s = time.monotonic() - started
        if not summary.timestamps:
            summary.timestamps = "none (the log holds no frames)"
        return summary
