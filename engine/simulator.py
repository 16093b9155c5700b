"""The battery simulator: N vehicles posting telemetry to a receiver over keep-alive HTTP.

A client like any vehicle gateway: it talks HTTP and never imports the receiver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import time

import aiohttp
import msgspec

from engine.kernels import LatencyHistogram
from engine.schema import UTC

CELLS_IN_SERIES = 96
CAPACITY_AH = 230.0
CAN_IDS = ("0x132", "0x292", "0x332")
RETRY_STATUSES = {429, 503}
_encoder = msgspec.json.Encoder()


class PackModel:
    """A simple lithium-ion pack: SOC by coulomb counting, OCV line, internal resistance, I^2R heating."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.soc = rng.uniform(35.0, 95.0)
        self.current = rng.uniform(10.0, 60.0)
        self.temp = rng.uniform(18.0, 30.0)
        self.resistance = 0.06 + rng.uniform(0.0, 0.02)  # ohm, whole pack

    def step(self, dt_s: float) -> dict[str, float]:
        rng = self.rng
        # current: a mean-reverting random walk around a cruise draw, with regenerative braking bursts
        self.current += 0.2 * (35.0 - self.current) + rng.gauss(0.0, 12.0)
        self.current = max(-250.0, min(450.0, self.current))
        self.soc = max(0.0, min(100.0, self.soc - self.current * dt_s / (CAPACITY_AH * 3600.0) * 100.0))
        self.temp += dt_s * (self.current**2 * self.resistance / 4000.0 - (self.temp - 25.0) / 600.0)
        self.temp = max(-20.0, min(70.0, self.temp))
        cell_ocv = 3.0 + 1.2 * self.soc / 100.0
        pack_v = CELLS_IN_SERIES * cell_ocv - self.current * self.resistance
        cell_v = pack_v / CELLS_IN_SERIES
        spread_v = 0.004 + abs(rng.gauss(0.0, 0.004))
        spread_t = 0.5 + abs(rng.gauss(0.0, 1.0))
        return {
            "battery_soc": round(self.soc, 3),
            "battery_voltage": round(pack_v, 2),
            "battery_current": round(self.current, 2),
            "cell_voltage_min": round(cell_v - spread_v / 2, 4),
            "cell_voltage_max": round(cell_v + spread_v / 2, 4),
            "cell_temp_min": round(self.temp - spread_t / 2, 2),
            "cell_temp_max": round(self.temp + spread_t / 2, 2),
        }


@dataclasses.dataclass
class SimulationResult:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0
    http_ms: LatencyHistogram = dataclasses.field(default_factory=LatencyHistogram)
    accepted_records: list[dict] = dataclasses.field(default_factory=list)


def vehicle_ids(count: int) -> list[str]:
    return [f"EV-{i:05d}" for i in range(count)]


class Simulator:
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
    ) -> None:
        self.url = url.rstrip("/") + "/ingest"
        self.headers = {"Content-Type": "application/json"} | ({"X-API-Key": api_key} if api_key else {})
        self.vehicles, self.rate_ms, self.duration_s, self.batch = vehicles, rate_ms, duration_s, max(1, batch)
        self.seed, self.max_attempts, self.keep_accepted = seed, max_attempts, keep_accepted
        self.count = count  # stop after this many records in all (0: run for duration_s)
        self.generated = 0
        self.result = SimulationResult()

    async def run(self) -> SimulationResult:
        connector = aiohttp.TCPConnector(limit=min(256, self.vehicles), force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            start = time.monotonic()
            await asyncio.gather(
                *(self._vehicle(session, vid, i, start) for i, vid in enumerate(vehicle_ids(self.vehicles)))
            )
        return self.result

    async def _vehicle(self, session: aiohttp.ClientSession, vehicle_id: str, index: int, start: float) -> None:
        rng = random.Random(f"{self.seed}-{vehicle_id}")
        pack = PackModel(rng)
        period = self.rate_ms / 1000.0
        await asyncio.sleep(rng.uniform(0, period))  # vehicles do not tick in lock-step
        pending: list[dict] = []
        tick = 0
        while time.monotonic() - start < self.duration_s and not (self.count and self.generated >= self.count):
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
                await self._post(session, pending)
                pending = []
            next_at = start + tick * period + (index % 97) * period / 97
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if pending:
            await self._post(session, pending)

    async def _post(self, session: aiohttp.ClientSession, records: list[dict]) -> None:
        body = _encoder.encode(records if self.batch > 1 else records[0])
        result = self.result
        result.sent += len(records)
        for attempt in range(self.max_attempts):
            if attempt:
                result.retries += 1
            t0 = time.perf_counter()
            try:
                async with session.post(self.url, data=body, headers=self.headers) as response:
                    await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError):
                status, retry_after = 0, None
            result.requests += 1
            result.http_ms.record((time.perf_counter() - t0) * 1000.0)
            if status == 202:
                result.accepted += len(records)
                if self.keep_accepted:
                    result.accepted_records.extend(records)
                return
            if status and status not in RETRY_STATUSES:
                result.rejected += len(records)
                return
            delay = min(5.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.5)
            if retry_after and retry_after.isdigit():
                delay = max(delay, min(float(retry_after), 5.0))
            await asyncio.sleep(delay)
        result.failed += len(records)


def describe(result: SimulationResult) -> str:
    http = result.http_ms
    p = (lambda q: f"{http.quantile(q):.1f}") if http.count else (lambda q: "-")
    return (
        f"sent {result.sent}, accepted {result.accepted}, rejected {result.rejected}, failed {result.failed}, "
        f"retries {result.retries}; HTTP P50 {p(0.5)} ms, P99 {p(0.99)} ms over {result.requests} requests"
    )
