"""The battery simulator: N vehicles posting telemetry to a receiver over keep-alive HTTP.

A client like any vehicle gateway: it talks HTTP and never imports the receiver.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import random
import time

import aiohttp
import msgspec

from engine.battery import PackModel  # the pack each vehicle simulates (engine/battery.py)
from engine.kernels import LatencyHistogram
from engine.schema import UTC

CAN_IDS = ("0x132", "0x292", "0x332")
RETRY_STATUSES = {429, 503}
LATE_AFTER_S = 0.1  # a send leaving this long after its schedule is late (event-loop or CPU lag)
SHORTFALL_RATIO = 0.95  # achieved under this share of the target rate is a shortfall
LATE_RATIO = 0.05  # more than this share of sends late is a shortfall (a few lag behind on a busy machine)
_encoder = msgspec.json.Encoder()


@dataclasses.dataclass
class SimulationResult:
    """What a run did. Rates are records per second; ``late`` counts requests that left after their schedule."""

    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0
    late: int = 0  # sends held back by the in-flight bound or leaving over LATE_AFTER_S behind their schedule
    target_rate: float = 0.0  # records/s asked for: vehicles * 1000 / rate_ms
    elapsed_s: float = 0.0  # from the start to the last vehicle's last scheduled send (not the drain of answers)
    achieved_rate: float = 0.0  # sum over vehicles of records sent / that vehicle's sending window
    http_ms: LatencyHistogram = dataclasses.field(default_factory=LatencyHistogram)
    accepted_records: list[dict] = dataclasses.field(default_factory=list)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # reason -> records

    @property
    def short(self) -> bool:
        """True when the asked rate was not kept: under 95 % of the target, or over 5 % of the sends late."""
        if not self.target_rate or not self.sent:
            return bool(self.target_rate)
        return self.achieved_rate < SHORTFALL_RATIO * self.target_rate or self.late > LATE_RATIO * self.requests_sent

    @property
    def requests_sent(self) -> int:
        """First attempts: requests the schedule asked for (retries excluded)."""
        return self.requests - self.retries


def vehicle_ids(count: int) -> list[str]:
    return [f"EV-{i:05d}" for i in range(count)]


class Simulator:
    """``vehicles`` vehicles, each sampling every ``rate_ms`` and posting ``batch`` records per request.

    Open-loop: a vehicle sends on its schedule without waiting for the answer, so a slow receiver does not
    lower the rate it is offered. Requests in flight are bounded (``max_in_flight_per_vehicle`` and
    ``max_in_flight`` in all) so memory stays bounded; a send that the bound holds back counts as late.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        vehicles: int = 10,
        rate_ms: float = 200.0,
        duration_s: float = 10.0,
        batch: int = 1,
        seed: int = 0,
        max_attempts: int = 6,
        keep_accepted: bool = False,
        count: int = 0,
        max_in_flight: int = 512,
        max_in_flight_per_vehicle: int = 64,
    ) -> None:
        self.url = url.rstrip("/") + "/ingest"
        self.headers = {"Content-Type": "application/json"} | ({"X-API-Key": api_key} if api_key else {})
        self.vehicles, self.rate_ms, self.duration_s, self.batch = vehicles, rate_ms, duration_s, max(1, batch)
        self.seed, self.max_attempts, self.keep_accepted = seed, max_attempts, keep_accepted
        self.count = count  # stop after this many records in all (0: run for duration_s)
        self.max_in_flight, self.max_in_flight_per_vehicle = max(1, max_in_flight), max(1, max_in_flight_per_vehicle)
        self.generated = 0
        self.result = SimulationResult(target_rate=vehicles * 1000.0 / rate_ms)

    async def run(self) -> SimulationResult:
        # as many connections as requests may be in flight: a connection pool smaller than the bound would
        # hold requests back inside aiohttp, closing the loop this class exists to keep open
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, force_close=False)
        in_flight = asyncio.Semaphore(self.max_in_flight)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            ids = vehicle_ids(self.vehicles)
            # built before the clock starts: a pack draws its ~400 cell parameters, a fleet of thousands ~0.5 s
            packs = [PackModel(random.Random(f"{self.seed}-{vid}")) for vid in ids]
            start = time.monotonic()
            windows = await asyncio.gather(
                *(self._vehicle(session, vid, i, start, in_flight, packs[i]) for i, vid in enumerate(ids))
            )
        # per vehicle, so that the vehicles' staggered starts do not count as idle time
        self.result.achieved_rate = sum(records / window_s for records, window_s in windows if window_s > 0)
        return self.result

    async def _vehicle(
        self,
        session: aiohttp.ClientSession,
        vehicle_id: str,
        index: int,
        start: float,
        in_flight: asyncio.Semaphore,
        pack: PackModel,
    ) -> tuple[int, float]:
        """Send on schedule until the duration or count is reached; returns (records sent, sending window s).

        A vehicle that fell behind catches up as fast as the bound lets it, but never past the duration: the
        records it could not send in time are a shortfall, not a longer run."""
        period = self.rate_ms / 1000.0
        mine = asyncio.Semaphore(self.max_in_flight_per_vehicle)
        tasks: set[asyncio.Task[None]] = set()
        offset = (index % 97) * period / 97  # vehicles do not tick in lock-step
        pending: list[dict] = []
        tick = 0
        due = begin = start + offset
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        while (
            due - start < self.duration_s
            and time.monotonic() - start < self.duration_s
            and not (self.count and self.generated >= self.count)
        ):
            self.generated += 1
            pending.append(
                {
                    "timestamp": dt.datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                    "vehicle_id": vehicle_id,
                    "can_id": CAN_IDS[tick % len(CAN_IDS)],
                    "payload": pack.step(period),
                }
            )
            tick += 1
            if len(pending) >= self.batch:
                held = mine.locked() or in_flight.locked()
                if not await _acquire((mine, in_flight), start + self.duration_s):
                    tick -= len(pending)  # the duration ended while they waited for a slot: never sent
                    pending = []
                    break
                if held or time.monotonic() - due > LATE_AFTER_S:
                    self.result.late += 1
                task = asyncio.create_task(self._send(session, pending, (mine, in_flight)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                pending = []
            due = begin + tick * period
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        ended = time.monotonic()
        self.result.elapsed_s = max(self.result.elapsed_s, ended - start)
        if pending:
            await self._post(session, pending)
        if tasks:
            await asyncio.gather(*tasks)
        return tick, ended - begin

    async def _send(
        self, session: aiohttp.ClientSession, records: list[dict], slots: tuple[asyncio.Semaphore, ...]
    ) -> None:
        try:
            await self._post(session, records)
        finally:
            for slot in slots:
                slot.release()

    async def _post(self, session: aiohttp.ClientSession, records: list[dict]) -> None:
        body = _encoder.encode(records if self.batch > 1 else records[0])
        result = self.result
        result.sent += len(records)
        reason = ""
        for attempt in range(self.max_attempts):
            if attempt:
                result.retries += 1
            t0 = time.perf_counter()
            try:
                async with session.post(self.url, data=body, headers=self.headers) as response:
                    answer = await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except TimeoutError:
                status, retry_after, answer, reason = 0, None, b"", "no answer within 30 s"
            except aiohttp.ClientError as exc:
                status, retry_after, answer, reason = 0, None, b"", f"{type(exc).__name__}: {exc}"
            result.requests += 1
            result.http_ms.record((time.perf_counter() - t0) * 1000.0)
            if status == 202:
                result.accepted += len(records)
                if self.keep_accepted:
                    result.accepted_records.extend(records)
                return
            if status:
                reason = f"HTTP {status}: {answer[:200].decode(errors='replace').strip()}"
            if status and status not in RETRY_STATUSES:
                result.rejected += len(records)
                result.errors[reason] += len(records)
                return
            delay = min(5.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.5)
            if retry_after and retry_after.isdigit():
                delay = max(delay, min(float(retry_after), 5.0))
            await asyncio.sleep(delay)
        result.failed += len(records)
        result.errors[f"{reason} (after {self.max_attempts} attempts)"] += len(records)


async def _acquire(slots: tuple[asyncio.Semaphore, ...], deadline: float) -> bool:
    """Take one of each slot, waiting at most until ``deadline`` (monotonic s); False, holding none, if not."""
    taken: list[asyncio.Semaphore] = []
    try:
        for slot in slots:
            await asyncio.wait_for(slot.acquire(), max(0.0, deadline - time.monotonic()))
            taken.append(slot)
    except TimeoutError:
        for slot in taken:
            slot.release()
        return False
    return True


def describe(result: SimulationResult) -> str:
    """The run's summary: counts, the asked and achieved rate, HTTP latency, and why records did not get in."""
    http = result.http_ms
    p = (lambda q: f"{http.quantile(q):.1f}") if http.count else (lambda q: "-")
    lines = [
        f"sent {result.sent}, accepted {result.accepted}, rejected {result.rejected}, failed {result.failed}, "
        f"retries {result.retries}; HTTP P50 {p(0.5)} ms, P99 {p(0.99)} ms over {result.requests} requests",
        f"rate: target {result.target_rate:.1f} records/s, achieved {result.achieved_rate:.1f} records/s "
        f"over {result.elapsed_s:.1f} s, {result.late} late sends",
    ]
    if result.short:
        lines.append(
            f"SHORTFALL: sent {result.achieved_rate:.1f} of the {result.target_rate:.1f} records/s asked "
            f"({result.achieved_rate / result.target_rate:.0%}), {result.late} of {result.requests_sent} sends late: "
            "the receiver answered too slowly for the requests allowed in flight (--max-in-flight), "
            "or this machine could not generate the load"
        )
    for reason, records in result.errors.most_common(3):
        lines.append(f"  {records} records: {reason}")
    return "\n".join(lines)
