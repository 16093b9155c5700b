"""The lake: compaction throughput, an hour's size and DuckDB scan time as JSONL, JSONL.zst and Parquet, and late
data: a late batch to a late file against compacting the hour again.

    .venv/bin/python bench/bench_lake.py [--records 400000] [--vehicles 1000] [--rounds 3]

One hour is generated (bench/generate_hour.py, canpipe's own lines, 1 % duplicates), compacted with
``engine.lake.compact`` (a fresh process's work, timed in process: the scan, dedup, sort and the Parquet
write), and scanned by DuckDB (2 threads, the machine's cores) with one per-vehicle query over each form:
the raw JSONL, the same files zstd-compressed (level 3, as a writer would), and the Parquet file. Best of
``--rounds``, alternating. Late data: a batch of 1 % more records (new keys, the same vehicles) lands in the
compacted hour; ``compact`` writes its rows to a late file (the lake's keys of those vehicles read to
deduplicate against) and is timed against the whole hour compacted again (what late data cost before, and
what a merge costs), alternating; the aggregate's read of the hour from main + late file against from the
merged file, and DuckDB's scan of main + late file. The guards in CI (quick mode, a small hour): Parquet is
at least 5x smaller than the JSONL and DuckDB scans it at least 2x faster; the late file is written at least
3x faster than the hour compacted again; same run.
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

from engine.aggregator.hours import fingerprint, hour_inputs  # noqa: E402
from engine.lake.compact import compact_hour  # noqa: E402
from engine.lake.read import hour_totals  # noqa: E402

HOUR = dt.datetime(2025, 10, 19, 17, tzinfo=dt.UTC)
QUERY = "SELECT vehicle_id, count(*), min(battery_soc), max(battery_soc), avg(battery_voltage) FROM {src} GROUP BY 1"


def _zstd_copy(data_dir: Path) -> Path | None:
    try:
        import zstandard
    except ImportError:
        return None
    out = data_dir / "raw-zst"
    compressor = zstandard.ZstdCompressor(level=3)
    for path in (data_dir / "raw").rglob("*.jsonl"):
        target = out / path.relative_to(data_dir / "raw")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".jsonl.zst").write_bytes(compressor.compress(path.read_bytes()))
    return out


def _sources(data_dir: Path, zst: Path | None, parquet: Path) -> dict[str, tuple[str, int]]:
    columns = (
        "{'timestamp': 'TIMESTAMPTZ', 'vehicle_id': 'VARCHAR', 'can_id': 'VARCHAR', 'payload': "
        "'STRUCT(battery_soc DOUBLE, battery_voltage DOUBLE)', 'ingest_received_at': 'TIMESTAMPTZ'}"
    )

    def json_source(root: Path, pattern: str) -> str:
        inner = f"read_json('{root}/**/{pattern}', format='newline_delimited', columns={columns}, ignore_errors=true)"
        return (
            f"(SELECT vehicle_id, payload.battery_soc AS battery_soc, payload.battery_voltage AS battery_voltage "
            f"FROM {inner})"
        )

    def size(root: Path, pattern: str) -> int:
        return sum(p.stat().st_size for p in root.rglob(pattern))

    sources = {"jsonl": (json_source(data_dir / "raw", "*.jsonl"), size(data_dir / "raw", "*.jsonl"))}
    if zst is not None:
        sources["jsonl.zst"] = (json_source(zst, "*.jsonl.zst"), size(zst, "*.jsonl.zst"))
    sources["parquet"] = (f"read_parquet('{parquet}')", parquet.stat().st_size)
    return sources


def measure(records: int, vehicles: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="canpipe-bench-lake-") as tmp:
        data_dir = Path(tmp)
        lines = generate(
            data_dir, HOUR, rate=max(1, records // 3600), vehicles=vehicles, duplicates=0.01, records=records
        )
        compact_s = []
        for _ in range(rounds):
            start = time.perf_counter()
            result = compact_hour(data_dir, HOUR, force=True)
            compact_s.append(time.perf_counter() - start)
        zst = _zstd_copy(data_dir)
        sources = _sources(data_dir, zst, result.path)
        con = duckdb.connect()
        con.execute("SET threads = 2")
        scan_s: dict[str, list[float]] = {name: [] for name in sources}
        answers = {}
        for _ in range(rounds):
            for name, (src, _) in sources.items():  # alternating: noise hits every form alike
                start = time.perf_counter()
                answers[name] = sorted(con.execute(QUERY.format(src=src)).fetchall())
                scan_s[name].append(time.perf_counter() - start)
        counts = {name: sum(row[1] for row in rows) for name, rows in answers.items()}
        late = _late(data_dir, records, vehicles, rounds, con)
        return {
            **late,
            "lines": lines,
            "records": result.rows,
            "compact_s": min(compact_s),
            "compact_records_per_s": lines / min(compact_s),
            "bytes": {name: size for name, (_, size) in sources.items()},
            "scan_s": {name: min(times) for name, times in scan_s.items()},
            "rows_scanned": counts,
        }


def _late(data_dir: Path, records: int, vehicles: int, rounds: int, con: duckdb.DuckDBPyConnection) -> dict:
    """A late batch of 1 % of the hour: to a late file, against the hour compacted again, alternating."""
    with tempfile.TemporaryDirectory(prefix="canpipe-bench-late-") as tmp:
        # half an hour later and 1 % of the records: other times, so other keys, of the same vehicles
        lines = generate(
            Path(tmp),
            HOUR + dt.timedelta(minutes=30),
            rate=1,
            vehicles=vehicles,
            duplicates=0,
            seed=11,
            records=max(1, records // 100),
        )
        late_raw = []
        for k, path in enumerate(sorted((Path(tmp) / "raw").rglob("*.jsonl"))):
            target = next((data_dir / "raw").rglob("*.jsonl")).parent / f"batch-9{k}-late.jsonl"
            target.write_bytes(path.read_bytes())
            late_raw.append(target)
    aside = data_dir / "late-aside"
    aside.mkdir()
    late_s, full_s, read_late_s, read_merged_s, scan_s = [], [], [], [], []
    for _ in range(rounds):
        for path in late_raw:  # the hour compacted without the late batch, as before it came
            path.rename(aside / path.name)
        compact_hour(data_dir, HOUR, force=True)
        for path in late_raw:
            (aside / path.name).rename(path)
        start = time.perf_counter()
        result = compact_hour(data_dir, HOUR)
        late_s.append(time.perf_counter() - start)
        assert result.late, result
        inputs = fingerprint(data_dir, hour_inputs(data_dir, HOUR))
        start = time.perf_counter()
        assert hour_totals(data_dir, HOUR, inputs) is not None
        read_late_s.append(time.perf_counter() - start)
        folder = result.path.parent
        start = time.perf_counter()
        con.execute(f"SELECT count(*), avg(battery_voltage) FROM read_parquet('{folder}/*.parquet')").fetchall()
        scan_s.append(time.perf_counter() - start)
        late_rows, late_bytes = result.rows, result.parquet_bytes
        start = time.perf_counter()
        merged = compact_hour(data_dir, HOUR, force=True)
        full_s.append(time.perf_counter() - start)
        assert merged.merged == 1, merged
        start = time.perf_counter()
        assert hour_totals(data_dir, HOUR, inputs) is not None
        read_merged_s.append(time.perf_counter() - start)
    return {
        "late_lines": lines,
        "late_rows": late_rows,
        "late_bytes": late_bytes,
        "late_s": min(late_s),
        "recompact_s": min(full_s),
        "read_late_s": min(read_late_s),
        "read_merged_s": min(read_merged_s),
        "scan_late_s": min(scan_s),
    }


def report(m: dict) -> str:
    out = [
        f"hour: {m['lines']:,} lines, {m['records']:,} records after dedup",
        f"compact: {m['compact_s']:.3f} s = {m['compact_records_per_s']:,.0f} lines/s",
        f"{'form':<10} {'bytes':>14} {'x smaller':>10} {'DuckDB scan s':>14}",
    ]
    base = m["bytes"]["jsonl"]
    for name, size in m["bytes"].items():
        out.append(f"{name:<10} {size:>14,} {base / size:>10.1f} {m['scan_s'][name]:>14.4f}")
    out += [
        f"late batch: {m['late_lines']:,} lines -> late file of {m['late_rows']:,} rows, {m['late_bytes']:,} bytes",
        f"  compact to a late file {m['late_s']:.3f} s; the hour compacted again {m['recompact_s']:.3f} s "
        f"({m['recompact_s'] / m['late_s']:.1f}x)",
        f"  aggregate's read of the hour: main + late file {m['read_late_s']:.3f} s, merged {m['read_merged_s']:.3f} s",
        f"  DuckDB scan of main + late file {m['scan_late_s']:.4f} s (the main file alone above)",
    ]
    return "\n".join(out)


def test_guard_parquet_smaller_and_faster_to_scan():
    m = measure(records=60_000, vehicles=200, rounds=3)
    print("\n" + report(m))
    # every form holds the same lines (the Parquet file holds them once: duplicates dropped)
    assert m["rows_scanned"]["jsonl"] == m["lines"] and m["rows_scanned"]["parquet"] == m["records"]
    assert m["bytes"]["parquet"] * 5 <= m["bytes"]["jsonl"], m["bytes"]
    assert m["scan_s"]["parquet"] * 2 <= m["scan_s"]["jsonl"], m["scan_s"]
    # a late batch costs a small file, not the hour again (before: every late batch rewrote the hour)
    assert m["late_s"] * 3 <= m["recompact_s"], (m["late_s"], m["recompact_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(report(measure(args.records, args.vehicles, args.rounds)))


if __name__ == "__main__":
    main()
