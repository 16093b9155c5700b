"""The lake: `canpipe compact` (raw JSONL -> Parquet) and `canpipe query` (DuckDB over raw and Parquet).

The Parquet rows are checked against the plain-Python ground truth of tests/canpipe_truth.py (its own JSON
parser and dedup), and the query answers against the aggregator's output file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from canpipe_testing import ROOT, make_record
from canpipe_truth import hour_lines, parse_record

from engine.aggregator import HourFailure, aggregate_hour, aggregate_isolated, output_path
from engine.errors import ConfigError
from engine.lake import compact, query
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


def truth_rows(data_dir, hour=HOUR, file_order: bool = False) -> list[tuple]:
    """The hour's records as the ground truth reads them: first copy of each dedup key, sorted by
    (vehicle_id, timestamp, can_id), or in the order of the raw files (``file_order``)."""
    lines, _, _ = hour_lines(data_dir, hour)
    kept: dict[tuple, dict] = {}
    for line in lines:
        r = parse_record(line)
        if r is not None:
            kept.setdefault((r["vehicle"], r["can"], r["ts"]), r)
    rows = [
        (r["vehicle"], r["ts"], r["can"], *(r["payload"].get(s) for s in SIGNALS), r["ingest"]) for r in kept.values()
    ]
    return rows if file_order else sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def parquet_rows(path, file_order: bool = False) -> list[tuple]:
    table = pq.read_table(path)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

    def us(t: dt.datetime) -> int:
        return (t - epoch) // dt.timedelta(microseconds=1)

    d = table.to_pydict()
    rows = [
        (v, us(t), int(c, 16), *(d[s][k] for s in SIGNALS), us(i))
        for k, (v, t, c, i) in enumerate(zip(d["vehicle_id"], d["timestamp"], d["can_id"], d["ingest_received_at"]))
    ]
    if file_order:
        assert len(set(d["raw_order"])) == len(rows)
        rows = [row for _, row in sorted(zip(d["raw_order"], rows))]
    return rows


def test_compacted_rows_are_the_deduplicated_raw_rows_sorted_by_vehicle_and_time(hour_dir):
    result = compact_hour(hour_dir, HOUR)

    path = parquet_path(hour_dir, HOUR)
    assert path == hour_dir / "parquet/year=2025/month=10/day=19/hour=17/part-0.parquet" == result.path
    expected = truth_rows(hour_dir)
    assert parquet_rows(path) == expected
    # raw_order gives back the order of the raw files, the first copy of each record where copies were
    assert parquet_rows(path, file_order=True) == truth_rows(hour_dir, file_order=True) != expected
    assert result.rows == len(expected) and result.duplicates == 20 and result.raw_records == len(expected) + 20
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(3).compression == "ZSTD"
    schema = pq.read_schema(path)
    assert str(schema.field("timestamp").type) == "timestamp[us, tz=UTC]"
    assert all(str(schema.field(s).type) == "double" for s in SIGNALS)
    # the record that carried only two signals has nulls for the others, not zeros
    partial = [row for row in parquet_rows(path) if row[2] == 0x332]
    assert len(partial) == 1 and partial[0][3:8] == (None,) * 5 and partial[0][8:10] == (21.5, 24.0)


def test_compacting_twice_changes_nothing_and_late_data_goes_to_a_late_file(hour_dir):
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
    # the main file is left as it was; the 5 late rows are in a small file beside it
    assert result.late and result.rows == 5 and result.path.name.startswith("late-")
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(parquet_rows(path) + parquet_rows(result.path)) == truth_rows(hour_dir)
    assert sorted(p.name for p in path.parent.iterdir()) == [result.path.name, "part-0.parquet"]  # no temp file
    assert compact_hour(hour_dir, HOUR).skipped and pending_hours(hour_dir, NEXT + dt.timedelta(minutes=10)) == []

    merged = compact_hour(hour_dir, HOUR, force=True)  # a merge: the hour whole in the main file again
    assert merged.merged == 1 and parquet_rows(path) == truth_rows(hour_dir)
    assert [p.name for p in path.parent.iterdir()] == ["part-0.parquet"]


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


def test_partition_columns_are_integers_also_in_the_first_hours_days_and_months(tmp_path):
    """DuckDB keeps a partition value with a leading zero ("07") as text: without declared types, every view's
    hour, day and month were VARCHAR from 00:00 to 09:59 (and in days and months 01-09), BIGINT otherwise, so a
    query that worked at 17:00 failed at 07:00. Here an early hour and a late one, in every view."""
    from engine.lake.daily import merge_day

    early, late = dt.datetime(2026, 1, 5, 7, tzinfo=dt.UTC), dt.datetime(2026, 1, 5, 23, tzinfo=dt.UTC)
    for hour in (early, late):
        records = [make_record(i, vehicle_id="EV-1") for i in range(3)]
        for i, r in enumerate(records):
            r["timestamp"] = (hour + dt.timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
        write_raw(tmp_path, "batch-1-a.jsonl", stored(records, hour + dt.timedelta(minutes=1)), hour)
        compact_hour(tmp_path, hour)
    merge_day(tmp_path, early.date())
    for view in ("raw", "parquet", "daily"):
        sql = f"SELECT DISTINCT printf('%04d-%02d-%02d', year, month, day), typeof(month), typeof(day) FROM {view}"
        assert query.run(tmp_path, sql)[1] == [("2026-01-05", "BIGINT", "BIGINT")], view
    for view in ("raw", "parquet"):
        sql = f"SELECT DISTINCT hour, typeof(hour) FROM {view} ORDER BY hour"
        assert query.run(tmp_path, sql)[1] == [(7, "BIGINT"), (23, "BIGINT")], view


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


# --- canpipe aggregate from the Parquet file: the same bytes as from the raw JSONL ---

EXTENDED = "0x18FF50E5"  # a 29-bit (J1939-style) CAN id beside the standard 0x132


def fleet_records(hour: dt.datetime, rng: random.Random, count: int) -> list[dict]:
    """Records of 5 vehicles at microsecond times, two CAN ids (one 29-bit) sometimes at the same instant,
    with random values: float sums over them depend on the order they are added in."""
    out = []
    for i in range(count):
        moment = hour + dt.timedelta(seconds=i * 7 + rng.random() * 5)
        cv = rng.uniform(3.3, 4.1)
        ct = rng.uniform(10, 35)
        payload = {
            "battery_soc": rng.uniform(5, 95),
            "battery_voltage": rng.uniform(300, 420),
            "battery_current": rng.uniform(-150, 150),
            "cell_voltage_min": cv,
            "cell_voltage_max": cv + rng.uniform(0, 0.1),
            "cell_temp_min": ct,
            "cell_temp_max": ct + rng.uniform(0, 5),
        }
        r = {
            "timestamp": moment.isoformat().replace("+00:00", "Z"),
            "vehicle_id": rng.choice(["EV-3", "EV-1", "EV-10", "EV-2", "TRUCK-7"]),
            "can_id": rng.choice(["0x132", EXTENDED]),
            "payload": payload,
        }
        out.append(r)
        if i % 9 == 0:  # the other CAN id at the same instant: both are records
            out.append(r | {"can_id": EXTENDED if r["can_id"] == "0x132" else "0x132"})
    return out


@pytest.fixture
def fleet(tmp_path):
    """Three hours, each from two writers whose files interleave every vehicle's time line (the file order
    is not the time order). Hour 1: a redelivered batch whose copies carry other values (the first copy in
    file order counts), a record with two signals, a corrupt line, a torn tail; hour 2: plain; hour 3: a
    file of nothing but corrupt lines (no record at all)."""
    rng = random.Random(13)
    hours = [HOUR, NEXT, NEXT + dt.timedelta(hours=1)]
    for n, hour in enumerate(hours[:2]):
        records = fleet_records(hour, rng, 300)
        ingest = hour + dt.timedelta(minutes=40)
        a, b = records[0::2], records[1::2]
        body_b = stored(b, ingest)
        if n == 0:
            copies = [r | {"payload": r["payload"] | {"battery_soc": 99.5}} for r in a[10:30]]
            partial = {"timestamp": a[3]["timestamp"], "vehicle_id": "EV-2", "can_id": "0x333"}
            partial["payload"] = {"cell_temp_min": 21.5, "cell_temp_max": 24.0}
            lines = stored([*copies, partial], ingest + dt.timedelta(seconds=5)).splitlines(keepends=True)
            body_b += lines[0] + b'{"vehicle_id": "EV-1"}\n' + b"".join(lines[1:]) + TORN_TAIL
        write_raw(tmp_path, "batch-1-a.jsonl", stored(a, ingest), hour)
        write_raw(tmp_path, "batch-2-b.jsonl", body_b, hour)
    write_raw(tmp_path, "batch-1-a.jsonl", b"not json\n{}\n", hours[2])
    return tmp_path, hours


def aggregates(data_dir, hours) -> dict[dt.datetime, bytes]:
    for hour in hours:
        aggregate_hour(data_dir, hour)
    return {hour: output_path(data_dir, hour).read_bytes() for hour in hours}


def from_lake(caplog) -> set[str]:
    """The hours the aggregator took from a Parquet file, as its log says."""
    return {r.args[0] for r in caplog.records if r.name == "canpipe.lake" and "from" in r.msg}


def test_aggregate_from_parquet_is_byte_identical_to_the_jsonl_aggregate(fleet, caplog):
    data_dir, hours = fleet
    caplog.set_level(logging.INFO, logger="canpipe.lake")
    from_jsonl = aggregates(data_dir, hours)
    assert not from_lake(caplog)
    for hour in hours:
        compact_hour(data_dir, hour)
    from_parquet = aggregates(data_dir, hours)

    assert from_lake(caplog) == {"2025-10-19T17", "2025-10-19T18", "2025-10-19T19"}
    assert from_parquet == from_jsonl
    first = json.loads(from_parquet[HOUR])
    assert first["input"]["duplicates_dropped"] == 20 and first["input"]["corrupt_lines"] == 1
    assert first["input"]["torn_tail_bytes"] == len(TORN_TAIL) and first["input"]["files"] == 2
    assert {v["vehicle_id"] for v in first["vehicles"]} == {"EV-1", "EV-10", "EV-2", "EV-3", "TRUCK-7"}
    empty = json.loads(from_parquet[hours[2]])
    assert empty["vehicles"] == [] and empty["input"]["corrupt_lines"] == 2
    # the data is such that the order of the sums shows: added in the Parquet file's (vehicle, time) order
    # instead of the raw files' order, some vehicle's mean of some signal differs in its last bits
    table = pq.read_table(parquet_path(data_dir, HOUR)).to_pydict()
    differ = 0
    for vehicle in set(table["vehicle_id"]):
        mine = [k for k, v in enumerate(table["vehicle_id"]) if v == vehicle]
        read = sorted(mine, key=lambda k: table["raw_order"][k])
        for name in SIGNALS:
            in_time = [table[name][k] for k in mine if table[name][k] is not None]
            as_read = [table[name][k] for k in read if table[name][k] is not None]
            differ += _sequential_sum(in_time) != _sequential_sum(as_read)
    assert differ > 0


def _sequential_sum(values: list[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def test_late_data_after_compaction_is_read_from_the_raw_files_until_compacted_again(fleet, caplog):
    data_dir, hours = fleet
    caplog.set_level(logging.INFO, logger="canpipe.lake")
    compact_hour(data_dir, HOUR)
    before = aggregates(data_dir, [HOUR])[HOUR]
    late = fleet_records(HOUR, random.Random(7), 20)
    write_raw(data_dir, "batch-9-c.jsonl", stored(late, NEXT + dt.timedelta(minutes=3)))
    caplog.clear()

    with_late = aggregates(data_dir, [HOUR])[HOUR]  # the Parquet file is older than the raw files
    assert not from_lake(caplog) and with_late != before
    assert json.loads(with_late)["input"]["files"] == 3
    compact_hour(data_dir, HOUR)
    assert aggregates(data_dir, [HOUR])[HOUR] == with_late and from_lake(caplog) == {"2025-10-19T17"}


def test_a_parquet_file_without_the_aggregate_metadata_is_not_used(fleet, caplog):
    data_dir, _ = fleet
    expected = aggregates(data_dir, [HOUR])[HOUR]
    compact_hour(data_dir, HOUR)
    path = parquet_path(data_dir, HOUR)
    table = pq.read_table(path)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"canpipe.aggregate"}
    pq.write_table(table.replace_schema_metadata(meta), path)  # as the first compact wrote it
    caplog.set_level(logging.INFO, logger="canpipe.lake")

    assert aggregates(data_dir, [HOUR])[HOUR] == expected
    assert not from_lake(caplog) and "no canpipe.aggregate metadata" in caplog.text


def test_the_lake_as_the_long_term_form_aggregate_with_the_raw_hour_deleted(fleet):
    """Raw hours deleted after compaction: ``canpipe aggregate --hour`` gives the same document from the
    Parquet file alone (the input report is the raw files' at compaction)."""
    data_dir, _ = fleet
    expected = aggregates(data_dir, [HOUR])[HOUR]
    compact_hour(data_dir, HOUR)
    shutil.rmtree(data_dir / "raw" / "year=2025/month=10/day=19/hour=17")
    output_path(data_dir, HOUR).unlink()
    env = os.environ | {"CANPIPE_DATA_DIR": str(data_dir), "CANPIPE_LOG_FORMAT": "text"}

    done = subprocess.run(
        [sys.executable, "-m", "engine", "aggregate", "--hour", "2025-10-19T17"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert output_path(data_dir, HOUR).read_bytes() == expected
    nothing = subprocess.run(
        [sys.executable, "-m", "engine", "aggregate", "--hour", "2025-10-19T16"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nothing.returncode == 1 and "no raw data for 2025-10-19T16" in nothing.stderr


def test_aggregate_from_parquet_reads_a_row_group_at_a_time_with_vehicles_across_groups(fleet, monkeypatch):
    """A large hour is read a row group at a time (bounded memory); a vehicle whose rows run on into the
    next row group is rolled up with all of them: the bytes do not change."""
    data_dir, hours = fleet
    from_jsonl = aggregates(data_dir, hours[:2])
    monkeypatch.setattr(compact, "ROW_GROUP_ROWS", 7)
    for hour in hours[:2]:
        compact_hour(data_dir, hour)
    source = pq.ParquetFile(parquet_path(data_dir, HOUR))
    firsts = [source.read_row_group(g).column("vehicle_id")[0].as_py() for g in range(source.num_row_groups)]
    lasts = [source.read_row_group(g).column("vehicle_id")[-1].as_py() for g in range(source.num_row_groups)]
    assert source.num_row_groups > 40 and any(a == b for a, b in zip(lasts, firsts[1:]))

    assert aggregates(data_dir, hours[:2]) == from_jsonl


def test_a_damaged_parquet_file_gives_way_to_the_raw_files_and_is_an_error_without_them(fleet, caplog):
    data_dir, _ = fleet
    expected = aggregates(data_dir, [HOUR])[HOUR]
    compact_hour(data_dir, HOUR)
    path = parquet_path(data_dir, HOUR)
    path.write_bytes(path.read_bytes()[:-100])  # the footer cut off: not a Parquet file any more

    assert aggregates(data_dir, [HOUR])[HOUR] == expected
    assert "cannot be read" in caplog.text and "the raw files are read instead" in caplog.text
    shutil.rmtree(data_dir / "raw" / "year=2025/month=10/day=19/hour=17")
    failed = aggregate_isolated(data_dir, HOUR)
    assert isinstance(failed, HourFailure) and "Parquet" in failed.error
