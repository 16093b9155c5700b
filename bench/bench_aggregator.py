"""The hourly aggregator vs DuckDB on the same generated hour: wall time and peak RSS, same run.

Default (CI quick mode): a small hour at 30 records/s. The issue's sizes:
    CANPIPE_BENCH_AGG_RATE=500  python -m pytest bench/bench_aggregator.py -s -p no:cacheprovider --timeout 0   (1.8 M)
    CANPIPE_BENCH_AGG_RATE=5000 python -m pytest bench/bench_aggregator.py -s -p no:cacheprovider --timeout 0   (18 M)
Each side runs in its own process (so peak RSS is its own), alternately, best of several runs.
CANPIPE_BENCH_AGG_DIR=DIR reuses an hour generated before with bench/generate_hour.py.

One-shot processes, the way a cron job runs it: ``canpipe aggregate --hour H`` (``python -m engine``) against
``python bench/duckdb_hour.py DIR`` (DuckDB alone imported), each a fresh process timed from start to exit,
alternating, on hours in each writer's shape (bench/generate_hour.py --shape):
    python bench/bench_aggregator.py --sizes 10000,100000,400000 --shapes canpipe,ms,mixed --rounds 5 [--dir D]
prints one row per hour: median, min and max of each side and the ratio of the medians. The CI guard
``test_guard_aggregate_vs_duckdb_other_writers`` does the same on a mixed-shape hour and on one with unknown
fields, at the quick size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from generate_hour import generate

from engine.kernels._select import extensions_disabled
from engine.schema import SIGNALS, UTC

ROOT = Path(__file__).resolve().parent.parent
RATE = int(os.environ.get("CANPIPE_BENCH_AGG_RATE", "30"))
HOUR = dt.datetime(2025, 10, 19, 17, tzinfo=UTC)

# Peak RSS of this process (KiB): VmHWM, not getrusage's ru_maxrss, which Linux carries over an exec from the
# parent (the pytest process, large after generating the hour), so it reported pytest's peak, not ours
SELF_PEAK_KB = """
def self_peak_kb():
    with open("/proc/self/status") as status:
        return max([int(line.split()[1]) for line in status if line.startswith("VmHWM:")] or [0])
"""
OURS = (
    SELF_PEAK_KB
    + """
import json, resource, sys, time
from engine import aggregator
hour = aggregator.parse_hour("2025-10-19T17")
start = time.perf_counter()
result = aggregator.aggregate_hour(sys.argv[1], hour)
peak = max(self_peak_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # workers: large hours
print(json.dumps({"seconds": time.perf_counter() - start, "records": result.records, "peak_rss_mb": peak / 1024}))
"""
)
DUCK = (
    SELF_PEAK_KB
    + """
import json, sys, time
sys.path.insert(0, sys.argv[2])
import duckdb_hour
start = time.perf_counter()
rows = duckdb_hour.run(sys.argv[1] + "/raw/*/*/*/*/*.jsonl")
print(json.dumps({"seconds": time.perf_counter() - start, "vehicles": len(rows),
                  "peak_rss_mb": self_peak_kb() / 1024}))
"""
)


@pytest.fixture(scope="module")
def hour_dir(tmp_path_factory) -> Path:
    if os.environ.get("CANPIPE_BENCH_AGG_DIR"):  # an hour generated before (bench/generate_hour.py)
        return Path(os.environ["CANPIPE_BENCH_AGG_DIR"])
    data_dir = tmp_path_factory.mktemp(f"hour-{RATE}")
    generate(data_dir, HOUR, RATE, vehicles=min(1000, RATE * 2), duplicates=0.01)
    return data_dir


def measure(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(extensions_disabled(), reason="CANPIPE_NO_EXTENSIONS=1: the guard is for the compiled scanner")
def test_guard_aggregator_vs_duckdb(hour_dir):
    ours, duck = [], []
    for _ in range(5 if RATE <= 500 else 1):
        ours.append(measure(OURS, str(hour_dir)))
        duck.append(measure(DUCK, str(hour_dir), str(ROOT / "bench")))
    best_ours = min(ours, key=lambda r: r["seconds"])
    best_duck = min(duck, key=lambda r: r["seconds"])
    ratio = best_duck["seconds"] / best_ours["seconds"]
    peak = max(r["peak_rss_mb"] for r in ours)
    print(
        f"\naggregate {best_ours['records']:,} records ({RATE}/s): canpipe {best_ours['seconds']:.2f} s, "
        f"peak RSS {peak:.0f} MB; DuckDB {best_duck['seconds']:.2f} s, peak RSS "
        f"{max(r['peak_rss_mb'] for r in duck):.0f} MB; canpipe is {ratio:.2f}x DuckDB's speed"
    )
    # CI guard at the quick size, below the measured ratio so noise does not fail it (0.73-0.87 on a quiet
    # machine, 0.61-0.68 in loaded CI runs); with the compiled kernels lost it is ~0.2 (4.6x slower). The
    # target (faster than DuckDB at 1.8 M and 18 M records, under 1 GB) is checked in the full runs
    assert ratio >= 0.5, f"aggregator at {ratio:.2f}x DuckDB's speed (guard 0.5x)"
    assert peak < 1024, f"peak RSS {peak:.0f} MB"


# --- one-shot processes, any writer's lines -------------------------------------------------------------


def one_shot_commands(data_dir: Path) -> dict[str, list[str]]:
    return {
        "canpipe": [
            sys.executable,
            "-m",
            "engine",
            "aggregate",
            "--hour",
            "2025-10-19T17",
            "--data-dir",
            str(data_dir),
        ],
        "duckdb": [sys.executable, str(ROOT / "bench" / "duckdb_hour.py"), str(data_dir), ",".join(SIGNALS)],
    }


def race(data_dir: Path, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each side as a fresh process, alternating (a warm-up round of each first: page cache,
    and the bytecode cache: an installed canpipe runs from the .pyc files pip compiled, so a
    PYTHONDONTWRITEBYTECODE=1 in the environment would time a compile of every module it imports)."""
    commands = one_shot_commands(data_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "canpipe-bench-pycache"))
    seconds: dict[str, list[float]] = {side: [] for side in commands}
    for k in range(rounds + 1):
        for side, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if k:
                seconds[side].append(time.perf_counter() - start)
    return seconds


# the other writers' shapes the guards race on, and what losing the fast path for them cost (DuckDB / canpipe)
OTHER_WRITERS = {
    # every writer's shape in one hour (ms/s/us, +00:00, key order, spaces, nulls, 1 % unknown fields): with the
    # fast path lost for other writers canpipe took ~10x DuckDB's time
    "mixed": "a mixed-shape hour",
    # fields the record does not have on every line (at the top and in the payload): skipped by the compiled
    # scanner on its fast path; sent to the twin line by line instead (~10 us a line) canpipe would take 2-3x
    # DuckDB's time at this size
    "extra": "unknown fields on every line",
}


@pytest.fixture(scope="module", params=sorted(OTHER_WRITERS))
def other_writers_hour_dir(request, tmp_path_factory) -> tuple[str, Path]:
    data_dir = tmp_path_factory.mktemp(f"{request.param}-{RATE}")
    generate(data_dir, HOUR, RATE, vehicles=min(1000, RATE * 2), duplicates=0.01, shape=request.param)
    return request.param, data_dir


@pytest.mark.skipif(extensions_disabled(), reason="CANPIPE_NO_EXTENSIONS=1: the guard is for the compiled scanner")
def test_guard_aggregate_vs_duckdb_other_writers(other_writers_hour_dir):
    # both timed as fresh processes, on lines other tools write
    shape, data_dir = other_writers_hour_dir
    seconds = race(data_dir, rounds=3)
    ours, duck = min(seconds["canpipe"]), min(seconds["duckdb"])
    what = OTHER_WRITERS[shape]
    print(f"\none-shot, {what} at {RATE}/s: canpipe {ours:.3f} s, DuckDB {duck:.3f} s ({duck / ours:.2f}x)")
    assert duck / ours >= 0.6, f"canpipe aggregate at {duck / ours:.2f}x DuckDB's speed, {what} (guard 0.6x)"


def _main() -> None:
    from generate_hour import SHAPES

    parser = argparse.ArgumentParser(description="one-shot canpipe aggregate vs DuckDB, by writer shape and size")
    parser.add_argument("--sizes", default="10000,100000,400000")
    parser.add_argument("--shapes", default=",".join((*SHAPES, "mixed")))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="hours are generated here once and reused (default: a temp dir)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="canpipe-bench-agg-"))
    print("| hour | lines | canpipe median (min-max) | DuckDB median (min-max) | DuckDB / canpipe |")
    print("|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        for shape in args.shapes.split(","):
            data_dir = root / f"{shape}-{size}"
            if not data_dir.exists():
                generate(
                    data_dir, HOUR, max(1, size // 3600), vehicles=1000, duplicates=0.01, shape=shape, records=size
                )
            lines = sum(p.read_bytes().count(b"\n") for p in (data_dir / "raw").rglob("*.jsonl"))
            s = race(data_dir, args.rounds)
            ours, duck = statistics.median(s["canpipe"]), statistics.median(s["duckdb"])
            print(
                f"| {shape} | {lines:,} | {ours:.3f} s ({min(s['canpipe']):.3f}-{max(s['canpipe']):.3f}) | "
                f"{duck:.3f} s ({min(s['duckdb']):.3f}-{max(s['duckdb']):.3f}) | {duck / ours:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    _main()
