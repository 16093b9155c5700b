"""Locust as the load generator: a headless subprocess (with forked workers past one core's worth of
requests), and its CSV statistics read back."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from loadtest.cpu import CpuMeter
from loadtest.scenario import Scenario

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STOP_TIMEOUT_S = 10  # users finish the request in flight at the end: an accepted record is then counted


@dataclasses.dataclass
class HistoryPoint:
    """One second of locust's stats history (its percentiles are over the last few seconds)."""

    t_s: float  # seconds since the first request
    users: int
    requests_s: float
    failures_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclasses.dataclass
class LoadResult:
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    requests_per_s: dict[int, int]  # unix second -> requests completed in it (locust's own count)
    failures_per_s: dict[int, int]
    history: list[HistoryPoint]
    errors: list[str]  # "count x message" from locust's failures CSV
    exit_code: int
    accepted_records: int = 0  # 202-answered records, summed over every locust process's own count

    @property
    def elapsed_s(self) -> float:
        """Seconds from the first to the end of the last second with a completed request."""
        return float(max(self.requests_per_s) - min(self.requests_per_s) + 1) if self.requests_per_s else 0.0

    def steady_successes_s(self) -> float:
        """Mean successful requests/s over the whole seconds of the run: the first (spawn) and last (stop)
        second are partial and left out."""
        seconds = sorted(self.requests_per_s)
        if len(seconds) < 3:
            return (self.requests - self.failures) / self.elapsed_s if self.elapsed_s else 0.0
        inner = range(seconds[0] + 1, seconds[-1])
        ok = sum(self.requests_per_s.get(t, 0) - self.failures_per_s.get(t, 0) for t in inner)
        return ok / len(inner)


def run_locust(scenario: Scenario, url: str, api_key: str, out_dir: Path, meter: CpuMeter) -> LoadResult:
    """Drive ``url`` for ``scenario.duration_s`` and return locust's statistics (CSV files in ``out_dir``)."""
    prefix = out_dir / "locust"
    count_dir = out_dir / "accepted"
    count_dir.mkdir(exist_ok=True)
    for old in count_dir.glob("accepted-*.txt"):
        old.unlink()
    users = scenario.users
    args = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "-u",
        str(users),
        "-r",
        str(max(users, 1)),  # everybody within a second: the target rate holds from the start
        "-t",
        f"{scenario.duration_s:g}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--only-summary",
        "--json-file",
        str(prefix),  # locust appends .json
        "--loglevel",
        "WARNING",
    ]
    if scenario.processes > 1:
        args += ["--processes", str(scenario.processes)]
    args.append(scenario.user_class)
    env = os.environ | {
        "CANPIPE_API_KEY": api_key,
        "LOADTEST_REQUESTS_PER_USER_S": repr(scenario.requests_per_user_s),
        "LOADTEST_BATCH": str(scenario.batch),
        "LOADTEST_COUNT_DIR": str(count_dir),
    }
    with open(out_dir / "locust.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        meter.watch("locust", proc.pid)
        timeout_s = scenario.duration_s + STOP_TIMEOUT_S + 60
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    result = read_stats(prefix, scenario, code)
    result.accepted_records = sum(int(p.read_text()) for p in count_dir.glob("accepted-*.txt"))
    return result


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan  # locust writes "N/A" before the first answer


def _percentile(response_times: dict[int, int], q: float) -> float:
    """Locust's percentile rule over its (rounded) response-time buckets, ms."""
    total = sum(response_times.values())
    if not total:
        return math.nan
    need, seen = total * q, 0
    for ms in sorted(response_times):
        seen += response_times[ms]
        if seen >= need:
            return float(ms)
    return float(max(response_times))


def read_stats(prefix: Path, scenario: Scenario, exit_code: int) -> LoadResult:
    """Totals from ``<prefix>.json`` (written at exit, so complete), the per-second chart data from
    ``<prefix>_stats_history.csv``, errors from ``<prefix>_failures.csv``."""
    json_path = Path(f"{prefix}.json")
    if not json_path.exists():
        log = prefix.with_name("locust.log")
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"locust wrote no statistics (exit {exit_code}); its log ends with:\n{tail}")
    entries = json.loads(json_path.read_text())
    response_times: collections.Counter[int] = collections.Counter()
    per_s: collections.Counter[int] = collections.Counter()
    fail_per_s: collections.Counter[int] = collections.Counter()
    for entry in entries:
        response_times.update({int(k): v for k, v in entry["response_times"].items()})
        per_s.update({int(k): v for k, v in entry["num_reqs_per_sec"].items()})
        fail_per_s.update({int(k): v for k, v in entry["num_fail_per_sec"].items()})
    history: list[HistoryPoint] = []
    history_path = Path(f"{prefix}_stats_history.csv")
    rows = [r for r in _csv_rows(history_path) if r["Name"] == "Aggregated"]
    t0 = min(per_s) if per_s else int(rows[0]["Timestamp"]) if rows else 0  # the chart's origin: first request
    for r in rows:
        history.append(
            HistoryPoint(
                float(int(r["Timestamp"]) - t0), int(r["User Count"]), _num(r["Requests/s"]), _num(r["Failures/s"]),
                _num(r["50%"]), _num(r["95%"]), _num(r["99%"]),
            )
        )  # fmt: skip
    errors = [f"{row['Occurrences']} x {row['Error']}" for row in _csv_rows(Path(f"{prefix}_failures.csv"))]
    return LoadResult(
        requests=sum(e["num_requests"] for e in entries),
        failures=sum(e["num_failures"] for e in entries),
        p50_ms=_percentile(response_times, 0.50),
        p95_ms=_percentile(response_times, 0.95),
        p99_ms=_percentile(response_times, 0.99),
        max_ms=max((e["max_response_time"] for e in entries), default=math.nan),
        requests_per_s=dict(per_s),
        failures_per_s=dict(fail_per_s),
        history=history,
        errors=errors,
        exit_code=exit_code,
    )
