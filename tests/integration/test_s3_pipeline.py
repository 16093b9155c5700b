"""The whole pipeline on SQS and S3, both on moto's server: the Granian receiver publishing to SQS, two
consumer "hosts" putting one hour into one bucket, and compact, aggregate and query over the bucket, each
compared with the local run of the same records."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from canpipe_testing import (
    RAW_KEY,
    ROOT,
    Bucket,
    key,
    make_record,
    on_disk,
    post_json,
    queue_counts,
    queue_empty,
    wait_for,
)
from integration.conftest import can_name_hosts
from test_lake import truth_rows

pytestmark = pytest.mark.slow


def canpipe(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def requests(count: int, size: int, start: int = 0) -> list[list[dict]]:
    """``count`` requests of ``size`` distinct records over six vehicles."""
    return [
        [make_record(start + i * size + j, vehicle_id=f"EV-{(i * size + j) % 6:05d}") for j in range(size)]
        for i in range(count)
    ]


def post_all(url: str, batches: list[list[dict]]) -> list[dict]:
    for batch in batches:
        status, _, body = post_json(url, batch)
        assert status == 202, body
    return [r for batch in batches for r in batch]


def in_bucket(bucket: Bucket, sent: list[dict]) -> bool:
    return {key(r) for r in sent} <= {key(r) for r in bucket.records()}


def label(hour: dt.datetime) -> str:
    return f"{hour:%Y-%m-%dT%H}"


def payloads(records: list[dict]) -> dict[tuple, dict]:
    """The deduplicated records: dedup key -> (can id, payload), the first copy of each."""
    out: dict[tuple, dict] = {}
    for r in records:
        out.setdefault(key(r), r["payload"])
    return out


def test_two_hosts_put_one_hour_into_one_bucket_as_the_local_run_writes_it(
    serve, start, host, s3_env, s3_bucket, env, tmp_path
):
    url = serve(s3_env)
    plain = host(s3_env, "host-a")
    batches = requests(24, 40)
    resent = batches[3]  # a client retry of an accepted request: its records twice in the queue
    sent = post_all(url, batches[:8])  # host a alone: plain .jsonl objects
    wait_for(lambda: in_bucket(s3_bucket, sent), 30, "host a's objects")
    zipped = host(s3_env, "host-b", CANPIPE_RAW_COMPRESSION="zstd")
    sent += post_all(url, [*batches[8:16], resent])  # both hosts at once
    wait_for(lambda: in_bucket(s3_bucket, sent), 30, "both hosts' objects")
    assert plain.stop() == 0, plain.output()
    sent += post_all(url, batches[16:])  # host b alone: .jsonl.zst objects
    wait_for(lambda: in_bucket(s3_bucket, sent) and queue_empty(s3_env["CANPIPE_QUEUE_URL"]), 30, "every record")
    assert zipped.stop() == 0, zipped.output()
    if can_name_hosts():  # two hosts by name too: each consumer's writer id starts with its host's name
        assert "consumer hosta-" in plain.output() and "consumer hostb-" in zipped.output()

    objects = s3_bucket.raw_objects()
    stored = [json.loads(line) for body in objects.values() for line in body.splitlines()]
    assert payloads(stored) == payloads(sent)  # every accepted record, unchanged
    assert len(stored) >= len(sent) == 24 * 40 + 40  # copies only of what was sent twice (or redelivered)
    copies = [key(r) for r in stored]
    assert all(copies.count(key(r)) >= 2 for r in resent)  # accepted twice: stored twice, as locally
    suffixes = set()
    for name, body in objects.items():
        match = RAW_KEY.fullmatch(name.removeprefix(s3_bucket.prefix + "/"))
        assert match, f"{name} is not <prefix>/raw/year=…/hour=HH/batch-<unix_ms>-<digest>.jsonl[.zst]"
        *_, first_ms, digest, zst = match.groups()
        assert digest == hashlib.sha256(body).hexdigest()[:16], name  # named by the uncompressed content
        received = [dt.datetime.fromisoformat(json.loads(line)["ingest_received_at"]) for line in body.splitlines()]
        assert int(first_ms) == min(int(t.timestamp() * 1000) for t in received), name
        suffixes.add(zst or ".jsonl")
    assert suffixes == {".jsonl", ".zst"}  # host b wrote zstd, host a plain: both read back the same

    # the same requests through the local pipeline (embedded queue, files on disk): the same records
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    local_env = env | {"CANPIPE_DATA_DIR": str(local_dir), "CANPIPE_QUEUE_URL": f"sqlite:///{local_dir / 'queue.db'}"}
    local_url = serve(local_env)
    local_consumer = start(["consume", "--workers", "1"], local_env)
    post_all(local_url, [*batches, resent])
    wait_for(lambda: queue_counts(local_dir) == (0, 0) and len(on_disk(local_dir)) >= len(sent), 30, "local run")
    assert local_consumer.stop() == 0
    assert payloads(on_disk(local_dir)) == payloads(stored)

    # compact over S3: the Parquet rows are the deduplicated raw rows
    mirror = s3_bucket.mirror_raw(tmp_path / "mirror")
    hours = s3_bucket.hours()
    assert 1 <= len(hours) <= 2  # one hour, or two when the test ran across an hour's end
    s3_cli = s3_env | {"CANPIPE_DATA_DIR": str(tmp_path / "jobs"), "CANPIPE_LOG_FORMAT": "text"}
    for hour in hours:
        done = canpipe(s3_cli, "compact", "--hour", label(hour))
        assert done.returncode == 0, done.stdout + done.stderr
        folder = f"parquet/year={hour:%Y}/month={hour:%m}/day={hour:%d}/hour={hour:%H}/"
        parquet = [k for k in s3_bucket.keys(folder) if k.endswith(".parquet")]
        assert parquet, f"no Parquet object under {folder}: {s3_bucket.keys('parquet/')}"
        rows = []
        for name in parquet:
            (tmp_path / "p.parquet").write_bytes(s3_bucket.get(name))
            rows += _parquet_rows(tmp_path / "p.parquet")
        assert sorted(rows) == sorted(truth_rows(mirror, hour))

    # aggregate over S3 (from the Parquet now) = the local aggregator on the same lines, byte for byte
    local_cli = env | {"CANPIPE_DATA_DIR": str(mirror), "CANPIPE_LOG_FORMAT": "text"}
    for hour in hours:
        remote = canpipe(s3_cli, "aggregate", "--hour", label(hour))
        assert remote.returncode == 0, remote.stdout + remote.stderr
        local = canpipe(local_cli, "aggregate", "--hour", label(hour))
        assert local.returncode == 0, local.stdout + local.stderr
        name = f"aggregated/aggregated-{label(hour)}.json"
        assert s3_bucket.get(f"{s3_bucket.prefix}/{name}") == (mirror / name).read_bytes()

    # canpipe query over the bucket answers as the aggregate says
    doc = {}
    for hour in hours:
        for v in json.loads(s3_bucket.get(f"{s3_bucket.prefix}/aggregated/aggregated-{label(hour)}.json"))["vehicles"]:
            doc[(label(hour), v["vehicle_id"])] = v
    sql = (
        "SELECT printf('%04d-%02d-%02dT%02d', year, month, day, hour) AS h, vehicle_id, count(*) AS n, "
        "min(battery_soc) AS lo, max(battery_soc) AS hi, avg(battery_soc) AS mean FROM {view} GROUP BY ALL ORDER BY ALL"
    )
    answer = canpipe(s3_cli, "query", "--format", "json", sql.format(view="parquet"))
    assert answer.returncode == 0, answer.stderr
    rows = [json.loads(line) for line in answer.stdout.splitlines()]
    assert {(r["h"], r["vehicle_id"]) for r in rows} == set(doc)
    for r in rows:
        v = doc[(r["h"], r["vehicle_id"])]
        assert r["n"] == v["message_count"]
        assert (r["lo"], r["hi"]) == (v["battery_soc"]["min"], v["battery_soc"]["max"])
        assert math.isclose(r["mean"], v["battery_soc"]["avg"], rel_tol=1e-9)
    distinct = canpipe(
        s3_cli,
        "query",
        "--format",
        "csv",
        "SELECT count(*) FROM (SELECT DISTINCT vehicle_id, can_id, timestamp FROM raw)",
    )
    assert distinct.returncode == 0, distinct.stderr
    assert int(distinct.stdout.splitlines()[1]) == len(payloads(sent))


def _parquet_rows(path: Path) -> list[tuple]:
    """(vehicle, timestamp µs, can id, signals..., ingest µs) as test_lake.truth_rows gives them."""
    from test_lake import parquet_rows

    return parquet_rows(path)


def test_at_low_rates_a_host_puts_one_object_per_hour_per_minute(serve, host, s3_env, s3_bucket):
    env = s3_env | {"CANPIPE_S3_OBJECT_SECONDS": "60"}  # the default
    url = serve(env)
    consumer = host(env, "host-a")
    sent = []
    for batch in requests(10, 5):  # 50 records in 10 requests: far below 8 MiB
        sent += post_all(url, [batch])
    wait_for(lambda: queue_counts_in_flight(env) == 10, 20, "the consumer to hold every message")
    assert s3_bucket.keys("raw/") == []  # held, not put per request
    assert consumer.stop() == 0, consumer.output()  # a clean stop puts what it holds
    assert len(s3_bucket.keys("raw/")) == len(s3_bucket.hours())  # one object per hour
    assert payloads(s3_bucket.records()) == payloads(sent)
    assert queue_empty(env["CANPIPE_QUEUE_URL"])


def queue_counts_in_flight(env: dict[str, str]) -> int:
    from canpipe_testing import queue_stats

    stats = queue_stats(env["CANPIPE_QUEUE_URL"])
    return stats.in_flight if stats.visible == 0 else -1
