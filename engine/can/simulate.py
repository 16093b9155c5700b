"""``canpipe simulate --can``: the battery model's values encoded into raw frames with a DBC (cantools) and
posted to ``/ingest/can`` in batches.

Every tick a vehicle sends one frame per mapped message, and one per multiplexer page for a multiplexed
message, each at its own timestamp spread over the tick: the dedup key is (vehicle_id, can_id, timestamp),
so two pages of one id stamped with the same instant would be dropped as copies of each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Any

from engine.can.client import FramePoster, PostCounts, wire_frame
from engine.can.codec import CanCodec
from engine.simulator import PackModel, vehicle_ids


@dataclasses.dataclass(frozen=True)
class _Page:
    """One frame to encode per tick: a message, its multiplexer value (None: not multiplexed), which canonical
    value goes into which signal, and fixed values for the message's other signals."""

    frame_id: int
    message: Any
    signals: dict[str, str]  # canonical -> DBC signal
    fixed: dict[str, float]


def _filler(signal: Any) -> float:
    """A value for a signal the map leaves out: the one its raw 0 stands for (its offset), which every signal can
    encode whatever its sign, length or declared range."""
    return float(signal.offset)


class FrameEncoder:
    """Canonical values to frames with a codec's DBC and signal map (the inverse of ``CanCodec.payloads``)."""

    def __init__(self, codec: CanCodec) -> None:
        self.pages: list[_Page] = []
        for frame_id, mapped in sorted(codec.by_frame.items()):
            message = codec.message(frame_id)
            pages = sorted({i for s in mapped if s.multiplexer_ids for i in s.multiplexer_ids})
            selectors: list[int | None] = [*pages] if pages else [None]
            for selector in selectors:
                present = [
                    s
                    for s in message.signals
                    if s.multiplexer_ids is None or (selector is not None and selector in s.multiplexer_ids)
                ]
                signals = {
                    s.canonical: s.signal
                    for s in mapped
                    if s.multiplexer_ids is None or (selector is not None and selector in s.multiplexer_ids)
                }
                fixed = {s.name: _filler(s) for s in present if s.name not in signals.values()}
                for s in present:
                    if s.is_multiplexer and selector is not None:
                        fixed[s.name] = selector
                self.pages.append(_Page(frame_id, message, signals, fixed))

    def frames(self, values: dict[str, float]) -> list[tuple[int, bytes]]:
        """One (frame id, data) per page, in a fixed order."""
        out = []
        for page in self.pages:
            data = page.fixed | {signal: values[canonical] for canonical, signal in page.signals.items()}
            out.append((page.frame_id, page.message.encode(data, strict=False)))
        return out


@dataclasses.dataclass
class CanSimulationResult:
    ticks: int
    counts: PostCounts
    elapsed_s: float


def describe(result: CanSimulationResult) -> str:
    counts = result.counts
    lines = [
        f"sent {counts.sent} frames ({result.ticks} vehicle ticks), accepted {counts.accepted}, "
        f"failed {counts.failed_frames}; {counts.requests} requests ({counts.retries} retries) in "
        f"{result.elapsed_s:.1f} s"
    ]
    for cause, frames in counts.failed.most_common(3):
        lines.append(f"  {frames} frames: {cause}")
    return "\n".join(lines)


class CanSimulator:
    """``vehicles`` vehicles sampling every ``rate_ms`` for ``duration_s`` (or until ``count`` ticks in all), their
    frames posted ``batch`` to a request."""

    def __init__(
        self,
        url: str,
        codec: CanCodec,
        *,
        api_key: str | None = None,
        vehicles: int = 10,
        rate_ms: float = 200.0,
        duration_s: float = 10.0,
        batch: int = 100,
        seed: int = 0,
        count: int = 0,
        max_in_flight: int = 16,
    ) -> None:
        self.url, self.api_key = url, api_key
        self.encoder = FrameEncoder(codec)
        self.vehicles, self.period_s, self.duration_s = vehicles, rate_ms / 1000.0, duration_s
        self.batch, self.seed, self.count, self.max_in_flight = max(1, batch), seed, count, max_in_flight
        self.ticks = 0

    async def run(self) -> CanSimulationResult:
        started = time.monotonic()
        async with FramePoster(self.url, self.api_key, max_in_flight=self.max_in_flight) as poster:
            await asyncio.gather(*(self._vehicle(poster, v) for v in vehicle_ids(self.vehicles)))
        return CanSimulationResult(self.ticks, poster.counts, time.monotonic() - started)

    async def _vehicle(self, poster: FramePoster, vehicle_id: str) -> None:
        pack = PackModel(random.Random(f"{self.seed}-{vehicle_id}"))
        start = time.monotonic()
        pending: list[dict[str, str]] = []
        tick = 0
        while tick * self.period_s < self.duration_s and not (self.count and self.ticks >= self.count):
            await asyncio.sleep(max(0.0, start + tick * self.period_s - time.monotonic()))
            if self.count and self.ticks >= self.count:  # the other vehicles reached it meanwhile
                break
            self.ticks += 1
            tick += 1
            frames = self.encoder.frames(pack.step(self.period_s))
            now = time.time()
            spacing = self.period_s / len(frames)  # distinct instants: pages of one id are not copies
            for index, (frame_id, data) in enumerate(frames):
                pending.append(wire_frame(now + index * spacing, vehicle_id, frame_id, data))
            if len(pending) >= self.batch:
                await poster.submit(pending)
                pending = []
        if pending:
            await poster.submit(pending)
