"""Closed days merged into one file (``parquet-daily/``): the day's rows are exactly its hours' lake rows,
sorted by vehicle and time with the hour as a column; a day unchanged is left alone; late data makes the
day again; the ``daily`` view answers as the ``parquet`` view; the same over S3 through ``canpipe compact``."""

from __future__ import annotations

import datetime as dt
import os
import random
import subprocess
import sys

import pyarrow.parquet as pq
from canpipe_testing import ROOT
from test_lake import (
    HOUR,
    NEXT,
    fleet,  # noqa: F401 - the fixture
    fleet_records,
    stored,
    truth_rows,
    write_raw,
)

from engine.lake import query
from engine.lake.compact import compact_hour
from engine.lake.daily import daily_folder, merge_day, pending_days

DAY = HOUR.date()
NOW = dt.datetime(2025, 10, 21, tzinfo=dt.UTC)
COLUMNS = ["vehicle_id", "timestamp", "can_id", "battery_soc", "battery_voltage", "ingest_received_at", "hour"]


def day_rows(folder) -> list[tuple]:
    table = pq.ParquetFile(folder / "part-0.parquet").read(columns=COLUMNS)
    return list(zip(*(table.column(c).to_pylist() for c in COLUMNS)))


def expected(data_dir, hours) -> list[tuple]:
    """The ground truth's deduplicated rows of ``hours``, sorted by (vehicle, time, CAN id), in COLUMNS."""
    rows = []
    for hour in hours:
        for r in truth_rows(data_dir, hour):
            vehicle, ts, can, soc, volt, ingest = r[0], r[1], r[2], r[3], r[4], r[-1]
            rows.append((vehicle, ts, can, soc, volt, ingest, hour.hour))
    return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def as_truth(rows: list[tuple]) -> list[tuple]:
    """Parquet rows as the ground truth writes them: microseconds since the epoch, CAN ids as numbers."""
    micros = lambda t: int(t.timestamp()) * 1_000_000 + t.microsecond  # noqa: E731
    return [(v, micros(ts), int(c, 16), soc, volt, micros(ing), h) for v, ts, c, soc, volt, ing, h in rows]


def test_a_closed_day_is_one_file_of_its_hours_rows_and_is_made_again_after_late_data(fleet):  # noqa: F811
    data_dir, hours = fleet
    for hour in hours[:2]:
        compact_hour(data_dir, hour)
    assert pending_days(data_dir, NOW) == [DAY]
    assert pending_days(data_dir, HOUR + dt.timedelta(hours=7, minutes=4)) == []  # closed at 00:05 the next day
    result = merge_day(data_dir, DAY)
    folder = daily_folder(data_dir, DAY)
    assert not result.skipped and result.hours == 2 and [p.name for p in result.paths] == ["part-0.parquet"]
    assert as_truth(day_rows(folder)) == expected(data_dir, hours[:2])
    assert "raw_order" not in pq.read_schema(folder / "part-0.parquet").names

    stamp = (folder / "part-0.parquet").stat().st_mtime_ns
    assert pending_days(data_dir, NOW) == [] and merge_day(data_dir, DAY).skipped  # twice: nothing changes
    assert (folder / "part-0.parquet").stat().st_mtime_ns == stamp

    write_raw(data_dir, "batch-9-late.jsonl", stored(fleet_records(NEXT, random.Random(4), 9), NEXT), NEXT)
    assert compact_hour(data_dir, NEXT).late  # a late file beside the hour's main file
    assert pending_days(data_dir, NOW) == [DAY]
    assert merge_day(data_dir, DAY).rows == len(expected(data_dir, hours[:2]))
    assert as_truth(day_rows(folder)) == expected(data_dir, hours[:2])


def test_the_daily_view_answers_as_the_hourly_lake(fleet):  # noqa: F811
    data_dir, hours = fleet
    for hour in hours[:2]:
        compact_hour(data_dir, hour)
    sql = (
        "SELECT vehicle_id, count(*), round(sum(battery_voltage), 6), min(day), max(hour) FROM {} GROUP BY 1 ORDER BY 1"
    )
    empty = query.run(data_dir, "SELECT count(*) FROM daily")[1]
    merge_day(data_dir, DAY)
    assert empty == [(0,)]
    assert query.run(data_dir, sql.format("daily"))[1] == query.run(data_dir, sql.format("parquet"))[1]


def test_canpipe_compact_merges_closed_days_locally_and_over_s3(fleet, s3_bucket, tmp_path_factory):  # noqa: F811
    data_dir, _ = fleet
    bucket, client = s3_bucket.name, s3_bucket.client
    for path in sorted((data_dir / "raw").rglob("*.jsonl")):
        client.put_object(Bucket=bucket, Key=f"fleet/{path.relative_to(data_dir).as_posix()}", Body=path.read_bytes())

    def canpipe(env: dict[str, str]) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "engine", "compact"],
            env=os.environ | {"CANPIPE_LOG_FORMAT": "text"} | env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    local = canpipe({"CANPIPE_DATA_DIR": str(data_dir)})
    assert "merged day 2025-10-19: 3 hours" in local.stdout

    def over_s3() -> subprocess.CompletedProcess:  # each run a host of its own: an empty cache
        scratch = str(tmp_path_factory.mktemp("jobs"))
        return canpipe({"CANPIPE_STORAGE_URL": f"s3://{bucket}/fleet", "CANPIPE_DATA_DIR": scratch})

    remote = over_s3()
    assert "merged day 2025-10-19: 3 hours" in remote.stdout, remote.stdout + remote.stderr
    key = "fleet/parquet-daily/year=2025/month=10/day=19/part-0.parquet"
    got = tmp_path_factory.mktemp("got") / "part-0.parquet"
    got.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert day_rows(got.parent) == day_rows(daily_folder(data_dir, DAY))  # the same rows as the local lake's
    again = over_s3()
    assert "nothing to compact" in again.stdout  # compacting twice changes nothing, from another host too
