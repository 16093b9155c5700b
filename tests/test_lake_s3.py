"""`canpipe query` over S3: a lake made locally (compact, a late file) put into a bucket on moto's S3 server,
raw objects as .jsonl and .jsonl.zst, read in place; the answers equal the local query's and the aggregate."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid

import boto3
import pytest
import zstandard
from canpipe_testing import AWS_TEST_ENV, ROOT
from test_lake import (
    HOUR,
    NEXT,
    aggregates,
    fleet,  # noqa: F401 - the fixture
    fleet_records,
    stored,
    truth_rows,
    write_raw,
)

from engine.lake import query
from engine.lake.compact import compact_hour
from engine.storage.url import parse_storage_url

SQL = (
    "SELECT vehicle_id, count(*) AS n, min(battery_soc) AS lo, max(battery_soc) AS hi, "
    "round(sum(battery_voltage), 6) AS v, min(year), max(hour) FROM {view} GROUP BY vehicle_id ORDER BY vehicle_id"
)


@pytest.fixture
def lake_in_bucket(fleet, s3_bucket):  # noqa: F811
    """The fleet's first hour compacted, a late file beside it, and the whole tree put into a fresh bucket
    under a prefix: every other raw file as .jsonl.zst (as CANPIPE_RAW_COMPRESSION=zstd writes them)."""
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    write_raw(data_dir, "batch-0-early.jsonl", stored(fleet_records(HOUR, random.Random(2), 6), NEXT))
    assert compact_hour(data_dir, HOUR).late
    bucket, client = s3_bucket.name, s3_bucket.client
    compressor = zstandard.ZstdCompressor()
    zipped = 0
    for n, path in enumerate(sorted(p for p in data_dir.rglob("*") if p.is_file())):
        relative = path.relative_to(data_dir).as_posix()
        if not relative.startswith(("raw/", "parquet/")):
            continue
        body = path.read_bytes()
        if relative.startswith("raw/") and n % 2:
            relative, body, zipped = relative + ".zst", compressor.compress(body), zipped + 1
        client.put_object(Bucket=bucket, Key=f"fleet/{relative}", Body=body)
    assert zipped
    return data_dir, parse_storage_url(f"s3://{bucket}/fleet", data_dir)


def test_query_over_s3_answers_as_the_local_lake_and_the_aggregate(lake_in_bucket, tmp_path_factory, capsys):
    data_dir, url = lake_in_bucket
    empty = tmp_path_factory.mktemp("scratch")  # nothing local: the views read the bucket
    for view in ("parquet", "raw"):
        local = query.run(data_dir, SQL.format(view=view))
        remote = query.run(empty, SQL.format(view=view), url)
        assert remote == local and len(remote[1]) == 5
    assert "through s3fs" in capsys.readouterr().err
    (count,) = query.run(empty, "SELECT count(*) FROM parquet", url)[1][0]
    assert count == len(truth_rows(data_dir))
    (raw,) = query.run(empty, "SELECT count(*) FROM raw", url)[1][0]
    assert raw > count  # every copy, as written

    doc = json.loads(aggregates(data_dir, [HOUR])[HOUR])
    got = query.run(empty, "SELECT vehicle_id, count(*), max(battery_soc) FROM parquet GROUP BY 1 ORDER BY 1", url)
    assert got[1] == [(v["vehicle_id"], v["message_count"], v["battery_soc"]["max"]) for v in doc["vehicles"]]


def test_query_over_s3_leaves_out_a_late_object_its_merged_main_object_holds(
    lake_in_bucket,
    s3_bucket,
    tmp_path_factory,
):
    """A merge over S3 puts the new main object, then deletes the late objects; stopped between the two, the
    bucket holds both: the parquet view counts each record once, as the local lake after the merge does."""
    data_dir, url = lake_in_bucket
    main = compact_hour(data_dir, HOUR, force=True).path  # the merge, made locally
    key = f"fleet/{main.relative_to(data_dir).as_posix()}"
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=main.read_bytes())  # the late object stays
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix=key.rsplit("/", 1)[0])["Contents"]
    assert any("/late-" in o["Key"] for o in listed)
    empty = tmp_path_factory.mktemp("scratch")
    assert query.run(empty, "SELECT count(*) FROM parquet", url)[1] == [(len(truth_rows(data_dir)),)]
    assert query.run(empty, SQL.format(view="parquet"), url) == query.run(data_dir, SQL.format(view="parquet"))


def test_query_over_an_empty_bucket_answers_zero(moto_endpoint, monkeypatch, tmp_path):
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    bucket = f"canpipe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    url = parse_storage_url(f"s3://{bucket}", tmp_path)
    assert query.run(tmp_path, "SELECT count(*) FROM raw", url)[1] == [(0,)]
    assert query.run(tmp_path, "SELECT count(*) FROM parquet", url)[1] == [(0,)]


def test_canpipe_query_over_s3_from_the_command_line(lake_in_bucket, tmp_path_factory):
    data_dir, url = lake_in_bucket
    scratch = tmp_path_factory.mktemp("scratch")
    sql = "SELECT vehicle_id, count(*) AS n FROM parquet GROUP BY 1 ORDER BY 1"
    env = os.environ | {
        "CANPIPE_DATA_DIR": str(scratch),
        "CANPIPE_STORAGE_URL": str(url),
        "CANPIPE_LOG_FORMAT": "text",
    }
    done = subprocess.run(
        [sys.executable, "-m", "engine", "query", "--format", "csv", sql],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "query: reading S3 through s3fs" in done.stderr
    assert done.stdout == query.render(*query.run(data_dir, sql), "csv")


def test_compact_over_s3_writes_a_late_file_and_aggregate_over_s3_stays_the_local_bytes(
    fleet,  # noqa: F811
    s3_bucket,
    tmp_path_factory,
):
    """``canpipe compact`` over S3 (the hour mirrored, compacted in the cache, the new files put back): a late
    raw object makes a late Parquet object beside the main one, not a new main one; ``aggregate`` over S3
    then reads both and writes what the local aggregator writes from the raw files."""
    data_dir, _ = fleet
    bucket, client = s3_bucket.name, s3_bucket.client

    def put_raw() -> None:
        for path in sorted((data_dir / "raw").rglob("*.jsonl")):
            key = f"fleet/{path.relative_to(data_dir).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

    env = os.environ | {
        "CANPIPE_DATA_DIR": str(tmp_path_factory.mktemp("jobs")),
        "CANPIPE_STORAGE_URL": f"s3://{bucket}/fleet",
        "CANPIPE_LOG_FORMAT": "text",
    }

    def canpipe(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "engine", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def lake() -> dict[str, bytes]:
        found = client.list_objects_v2(Bucket=bucket, Prefix="fleet/parquet/").get("Contents", [])
        return {o["Key"].rsplit("/", 1)[1]: o["ETag"] for o in found}

    put_raw()
    canpipe("compact", "--hour", "2025-10-19T17")
    first = lake()
    assert list(first) == ["part-0.parquet"]
    write_raw(data_dir, "batch-0-early.jsonl", stored(fleet_records(HOUR, random.Random(8), 6), NEXT))
    put_raw()
    assert "compacted 2025-10-19T17" in canpipe("compact", "--hour", "2025-10-19T17").stdout
    second = lake()
    assert second["part-0.parquet"] == first["part-0.parquet"] and len(second) == 2  # the main object untouched
    assert [name for name in second if name.startswith("late-")]

    done = canpipe("aggregate", "--hour", "2025-10-19T17")
    assert "aggregating 2025-10-19T17 from" in done.stderr and "part-0.parquet" in done.stderr  # from the lake
    got = client.get_object(Bucket=bucket, Key="fleet/aggregated/aggregated-2025-10-19T17.json")["Body"].read()
    assert got == aggregates(data_dir, [HOUR])[HOUR]  # the local aggregator on the raw files
