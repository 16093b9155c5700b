"""A closed day merged into one file (``parquet-daily/``) against its 24 hourly files: merge time, sizes, and a
DuckDB scan of the day over each tree, same run, alternating.

A small fleet's day (bench/generate_hour.py lines, 1 % duplicates): every hour generated and compacted, then
``merge_day`` timed; the scan is one GROUP BY over the whole day (the query of bench_lake.py).

    python bench/bench_lake_daily.py --records-per-hour 50000 --rounds 3
    python -m pytest bench/bench_lake_daily.py      # CI: a small day; the two trees answer alike
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_hour import generate  # noqa: E402

from engine.lake.compact import compact_hour  # noqa: E402
from engine.lake.daily import daily_folder, merge_day  # noqa: E402

DAY = dt.datetime(2025, 10, 19, tzinfo=dt.UTC)
QUERY = (
    "SELECT vehicle_id, count(*), avg(battery_soc), max(cell_temp_max) "
    "FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY vehicle_id"
)


def measure(records_per_hour: int, vehicles: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="canpipe-bench-daily-") as tmp:
        data_dir = Path(tmp)
        for hh in range(24):
            hour = DAY + dt.timedelta(hours=hh)
            generate(data_dir, hour, rate=max(1, records_per_hour // 3600), vehicles=vehicles, duplicates=0.01,
                     records=records_per_hour)  # fmt: skip
            compact_hour(data_dir, hour)
        merge_s = []
        for _ in range(rounds):
            (daily_folder(data_dir, DAY.date()) / "part-0.parquet").unlink(missing_ok=True)
            start = time.perf_counter()
            result = merge_day(data_dir, DAY.date())
            merge_s.append(time.perf_counter() - start)
        hourly = sorted((data_dir / "parquet").rglob("*.parquet"))
        globs = {
            "hourly": f"{data_dir}/parquet/year=*/month=*/day=*/hour=*/*.parquet",
            "daily": f"{data_dir}/parquet-daily/year=*/month=*/day=*/*.parquet",
        }
        con = duckdb.connect()
        con.execute("SET threads = 2")
        scan: dict[str, list[float]] = {name: [] for name in globs}
        answers = {}
        for _ in range(rounds):
            for name, glob in globs.items():
                start = time.perf_counter()
                answers[name] = sorted(con.execute(QUERY.format(glob=glob)).fetchall())
                scan[name].append(time.perf_counter() - start)
        return {
            "rows": result.rows,
            "merge_s": min(merge_s),
            "hourly_files": len(hourly),
            "hourly_bytes": sum(p.stat().st_size for p in hourly),
            "daily_bytes": result.parquet_bytes,
            "scan_hourly_s": min(scan["hourly"]),
            "scan_daily_s": min(scan["daily"]),
            "same_answers": float(_close(answers["hourly"], answers["daily"])),
        }


def _close(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and x[1] == y[1] and abs(x[2] - y[2]) < 1e-9 and x[3] == y[3] for x, y in zip(a, b)
    )


def report(m: dict[str, float]) -> str:
    return (
        f"{m['rows']:,.0f} rows: merged in {m['merge_s']:.2f} s ({m['rows'] / m['merge_s']:,.0f} rows/s); "
        f"{m['hourly_files']:.0f} hourly files {m['hourly_bytes'] / 1e6:.1f} MB -> 1 day file "
        f"{m['daily_bytes'] / 1e6:.1f} MB; DuckDB scan of the day: hourly {m['scan_hourly_s'] * 1000:.0f} ms, "
        f"daily {m['scan_daily_s'] * 1000:.0f} ms"
    )


def test_a_merged_day_answers_as_its_hours():
    m = measure(2000, 50, 1)
    print(report(m))
    assert m["same_answers"] and m["hourly_files"] == 24 and m["rows"] > 24 * 1900


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records-per-hour", type=int, default=50_000)
    parser.add_argument("--vehicles", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(report(measure(args.records_per_hour, args.vehicles, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
