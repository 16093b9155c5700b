"""The lake: `canpipe compact` (raw JSONL -> Parquet) and `canpipe query` (DuckDB over raw and Parquet).

The Parquet rows are checked against the plain-Python ground truth of tests/canpipe_truth.py (its own JSON
parser and dedup), and the query answers against the aggregator's output file.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from canpipe_testing import ROOT, make_record
from canpipe_truth import hour_lines, parse_record

from engine.aggregator import aggregate_hour, output_path
from engine.errors import ConfigError
from engine.lake import query
from engine.lake.compact import compact_hour, parquet_path, pending_hours
from engine.schema import SIGNALS, decode_records, encode_stored

HOUR = dt.datetime(2025, 10, 19, 17, tzinfo=dt.UTC)
NEXT = HOUR + dt.timedelta(hours=1)
VEHICLES = ["EV-3", "EV-1", "EV-10", "EV-2"]  # not in name order: the file must be sorted by id, not arrival
TORN_TAIL = b'{"timestamp":"2025-10-19T17:'


def stored(records: list[dict], ingest: dt.datetime = HOUR + dt.timedelta(minutes=30)) -> bytes:
    return encode_stored(decode_records(json.dumps(records).encode(), ndjson=False), ingest)


def record(i: int, vehicle: str, **payload: float) -> dict:
    r = make_record(i, vehicle_id=vehicle, **payload)
    r["timestamp"] = (HOUR + dt.timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
    return r


def write_raw(data_dir, name: str, body: bytes, hour: dt.datetime = HOUR):
    folder = data_dir / "raw" / f"year={hour:%Y}/month={hour:%m}/day={hour:%d}/hour={hour:%H}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(body)


@pytest.fixture
def hour_dir(tmp_path):
    """An hour of 4 vehicles, two CAN ids interleaved, with copies (a redelivered batch), a record carrying
    only some signals, a corrupt line and a torn tail."""
    first = [record(i, VEHICLES[i % 4], battery_soc=50 + i / 10) for i in range(80)]
    partial = {"timestamp": record(200, "EV-2")["timestamp"], "vehicle_id": "EV-2", "can_id": "0x332"}
    partial["payload"] = {"cell_temp_min": 21.5, "cell_temp_max": 24.0}
    second = [record(i, VEHICLES[i % 4], battery_soc=60.0) for i in range(60, 100)] + [partial]
    write_raw(tmp_path, "batch-1-a.jsonl", stored(first))
    lines = stored(second).splitlines(keepends=True)
    write_raw(tmp_path, "batch-2-b.jsonl", b"".join(lines[:3]) + b"not json\n" + b"".join(lines[3:]) + TORN_TAIL)
    return tmp_path


def truth_rows(data_dir, hour=HOUR) -> list[tuple]:
    """The hour's records as the ground truth reads them: first copy of each dedup key, sorted by
    (vehicle_id, timestamp, can_id)."""
    lines, _, _ = hour_lines(data_dir, hour)
    kept: dict[tuple, dict] = {}
    for line in lines:
        r = parse_record(line)
        if r is not None:
            kept.setdefault((r["vehicle"], r["can"], r["ts"]), r)
    rows = [
        (r["vehicle"], r["ts"], r["can"], *(r["payload"].get(s) for s in SIGNALS), r["ingest"]) for r in kept.values()
    ]
    return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def parquet_rows(path) -> list[tuple]:
    table = pq.read_table(path)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

    def us(t: dt.datetime) -> int:
        return (t - epoch) // dt.timedelta(microseconds=1)

    d = table.to_pydict()
    return [
        (v, us(t), int(c, 16), *(d[s][k] for s in SIGNALS), us(i))
        for k, (v, t, c, i) in enumerate(zip(d["vehicle_id"], d["timestamp"], d["can_id"], d["ingest_received_at"]))
    ]


def test_compacted_rows_are_the_deduplicated_raw_rows_sorted_by_vehicle_and_time(hour_dir):
    result = compact_hour(hour_dir, HOUR)

    path = parquet_path(hour_dir, HOUR)
    assert path == hour_dir / "parquet/year=2025/month=10/day=19/hour=17/part-0.parquet" == result.path
    expected = truth_rows(hour_dir)
    assert parquet_rows(path) == expected
    assert result.rows == len(expected) and result.duplicates == 20 and result.raw_records == len(expected) + 20
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(3).compression == "ZSTD"
    schema = pq.read_schema(path)
    assert str(schema.field("timestamp").type) == "timestamp[us, tz=UTC]"
    assert all(str(schema.field(s).type) == "double" for s in SIGNALS)
    # the record that carried only two signals has nulls for the others, not zeros
    partial = [row for row in parquet_rows(path) if row[2] == 0x332]
    assert len(partial) == 1 and partial[0][3:8] == (None,) * 5 and partial[0][8:10] == (21.5, 24.0)


def test_compacting_twice_changes_nothing_and_late_data_is_merged_at_the_next_run(hour_dir):
    compact_hour(hour_dir, HOUR)
    path = parquet_path(hour_dir, HOUR)
    before = path.stat()
    again = compact_hour(hour_dir, HOUR)
    assert again.skipped and path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino == before.st_ino
    assert pending_hours(hour_dir, NEXT + dt.timedelta(minutes=10)) == []

    late = [record(i, "EV-9", battery_soc=10.0) for i in range(300, 305)]
    write_raw(hour_dir, "batch-3-c.jsonl", stored(late, ingest=NEXT + dt.timedelta(minutes=2)))
    assert pending_hours(hour_dir, NEXT + dt.timedelta(minutes=10)) == [HOUR]
    result = compact_hour(hour_dir, HOUR)
    assert not result.skipped and parquet_rows(path) == truth_rows(hour_dir)
    assert sum(1 for row in parquet_rows(path) if row[0] == "EV-9") == 5
    assert [p.name for p in path.parent.iterdir()] == ["part-0.parquet"]  # no temp file left behind


def test_an_hour_without_raw_data_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="no raw data for hour 2025-10-19T17"):
        compact_hour(tmp_path, HOUR)
    assert not (tmp_path / "parquet").exists()


def test_query_answers_equal_the_aggregate(hour_dir):
    aggregate_hour(hour_dir, HOUR)
    compact_hour(hour_dir, HOUR)
    doc = json.loads(output_path(hour_dir, HOUR).read_bytes())
    sql = (
        "SELECT vehicle_id, count(*) AS n, min(battery_soc) AS lo, max(battery_soc) AS hi, avg(battery_soc) AS mean "
        "FROM {view} GROUP BY vehicle_id ORDER BY vehicle_id"
    )
    columns, rows = query.run(hour_dir, sql.format(view="parquet"))
    assert columns == ["vehicle_id", "n", "lo", "hi", "mean"]
    by_vehicle = {v["vehicle_id"]: v for v in doc["vehicles"]}
    assert [r[0] for r in rows] == sorted(by_vehicle)
    for vehicle_id, n, lo, hi, mean in rows:
        soc = by_vehicle[vehicle_id]["battery_soc"]
        assert n == by_vehicle[vehicle_id]["message_count"]
        assert (lo, hi) == (soc["min"], soc["max"]) and math.isclose(mean, soc["avg"], rel_tol=1e-9)
    # the raw view holds every copy (at-least-once); deduplicated in SQL it agrees with the Parquet rows
    (raw_count,), (distinct,) = (
        query.run(hour_dir, "SELECT count(*) FROM raw")[1][0],
        query.run(hour_dir, "SELECT count(*) FROM (SELECT DISTINCT vehicle_id, can_id, timestamp FROM raw)")[1][0],
    )
    assert raw_count == len(truth_rows(hour_dir)) + 20 and distinct == len(truth_rows(hour_dir))
    assert query.run(hour_dir, "SELECT DISTINCT year, month, day, hour FROM parquet")[1] == [(2025, 10, 19, 17)]


def test_query_on_an_empty_lake_answers_zero_and_bad_sql_is_a_clear_error(tmp_path):
    assert query.run(tmp_path, "SELECT count(*) FROM raw")[1] == [(0,)]
    assert query.run(tmp_path, "SELECT count(*) FROM parquet")[1] == [(0,)]
    with pytest.raises(ConfigError, match="query: .*nonsense"):
        query.run(tmp_path, "SELECT nonsense FROM raw")


def test_render_formats():
    columns = ["vehicle_id", "n", "at"]
    rows = [("EV-1", 3, dt.datetime(2025, 10, 19, 17, tzinfo=dt.UTC)), (None, 10, None)]
    table = query.render(columns, rows, "table").splitlines()
    assert table[0].split() == columns and table[-1] == "(2 rows)" and table[2].split()[:2] == ["EV-1", "3"]
    assert query.render(columns, rows, "csv").splitlines() == [
        "vehicle_id,n,at",
        "EV-1,3,2025-10-19T17:00:00+00:00",
        ",10,",
    ]
    lines = [json.loads(line) for line in query.render(columns, rows, "json").splitlines()]
    assert lines == [
        {"vehicle_id": "EV-1", "n": 3, "at": "2025-10-19T17:00:00+00:00"},
        {"vehicle_id": None, "n": 10, "at": None},
    ]


def test_compact_and_query_from_the_command_line(hour_dir):
    env = os.environ | {"CANPIPE_DATA_DIR": str(hour_dir), "CANPIPE_LOG_FORMAT": "text"}

    def canpipe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "engine", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )

    done = canpipe("compact")  # every closed hour: this one ended long ago
    assert done.returncode == 0, done.stderr
    assert f"compacted 2025-10-19T17: {len(truth_rows(hour_dir))} records (20 duplicates dropped)" in done.stdout
    again = canpipe("compact")
    assert again.returncode == 0 and "nothing to compact" in again.stdout
    forced = canpipe("compact", "--hour", "2025-10-19T17")
    assert forced.returncode == 0 and "up to date" in forced.stdout

    out = canpipe("query", "--format", "csv", "SELECT vehicle_id, count(*) AS n FROM parquet GROUP BY 1 ORDER BY 1")
    assert out.returncode == 0, out.stderr
    counts = {row[0]: row[1] for row in (line.split(",") for line in out.stdout.splitlines()[1:])}
    assert counts == {v: str(sum(1 for r in truth_rows(hour_dir) if r[0] == v)) for v in counts}
    assert set(counts) == set(VEHICLES)

    bad = canpipe("query", "SELECT * FROM nowhere")
    assert bad.returncode != 0 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
