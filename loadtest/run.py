"""One load-test run: start the pipeline, drive it with locust, wait for the drain, measure."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from loadtest import pipeline as pipeline_mod
from loadtest.cpu import CpuMeter
from loadtest.generator import LoadResult, run_locust
from loadtest.scenario import Scenario

# the seed's targets
INGEST_P95_MS = 100.0
END_TO_END_P95_MS = 5000.0
RATE_TOLERANCE = 0.10  # achieved records/s within 10 % of the target


@dataclasses.dataclass
class Outcome:
    scenario: Scenario
    load: LoadResult
    accepted: int  # records answered 202
    unique_on_disk: int | None
    drained: bool
    drain_s: float  # from locust's end until every accepted record was written
    stages: dict[str, dict[str, float]] | None
    cpu_s: dict[str, float]
    exit_codes: dict[str, int]
    running_url: str | None = None  # set when a running receiver was targeted instead of a started pipeline

    @property
    def lost(self) -> int | None:
        """Accepted records not on disk (negative would mean records on disk that locust saw fail)."""
        return None if self.unique_on_disk is None else self.accepted - self.unique_on_disk

    @property
    def achieved_rate(self) -> float:
        """Accepted records/s while every user was running (spawn and stop excluded)."""
        return self.load.steady_successes_s() * self.scenario.batch

    @property
    def average_rate(self) -> float:
        """Accepted records/s over the whole locust run, spawn included."""
        return self.accepted / self.load.elapsed_s if self.load.elapsed_s else 0.0

    def stage_p95(self, stage: str) -> float:
        return self.stages[stage]["p95"] if self.stages else math.nan

    def targets(self) -> dict[str, tuple[bool, str]]:
        """Each seed target: (met, measured value as text)."""
        ingest, e2e = self.stage_p95("ingest"), self.stage_p95("end_to_end")
        low = self.scenario.rate * (1 - RATE_TOLERANCE)
        return {
            f"achieved rate >= {low:g} records/s (target - 10 %)": (
                self.achieved_rate >= low,
                f"{self.achieved_rate:,.0f} records/s",
            ),
            f"ingest P95 < {INGEST_P95_MS:g} ms": (ingest < INGEST_P95_MS, f"{ingest:.1f} ms"),
            f"end-to-end P95 < {END_TO_END_P95_MS / 1000:g} s": (e2e < END_TO_END_P95_MS, f"{e2e:.0f} ms"),
            "zero errors": (self.load.failures == 0, f"{self.load.failures} failed requests"),
            "zero lost": (
                self.lost == 0 and self.drained,
                f"{self.lost} lost" + ("" if self.drained else ", NOT drained"),
            ),
        }

    @property
    def passed(self) -> bool:
        return all(met for met, _ in self.targets().values())


def run_scenario(
    scenario: Scenario,
    out_dir: Path,
    *,
    queue_url: str | None = None,
    url: str | None = None,
    data_dir: Path | None = None,
    drain_timeout_s: float = 120.0,
) -> Outcome:
    """Run ``scenario`` against a fresh pipeline (or ``url``); locust's CSVs and the logs go to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_mod.start(
        consumers=scenario.consumers,
        receiver_workers=scenario.receiver_workers,
        queue_url=queue_url,
        url=url,
        data_dir=data_dir,
        log_dir=out_dir,
    )
    meter = CpuMeter()
    try:
        for name, proc in pipe.processes.items():
            meter.watch(name, proc.pid)  # from here on: start-up imports are not the load's cost
        load = run_locust(scenario, pipe.url, pipe.api_key, out_dir, meter)
        ended = time.monotonic()
        accepted = load.accepted_records
        drained = pipe.drain(accepted, drain_timeout_s)
        drain_s = time.monotonic() - ended
        cpu_s = meter.stop()
        stages = pipe.stages()
    finally:
        meter.stop()
        unique = pipe.unique_on_disk() if pipe.processes or pipe.data_dir else None
        codes = pipe.stop()
    return Outcome(scenario, load, accepted, unique, drained, drain_s, stages, cpu_s, codes, url)
