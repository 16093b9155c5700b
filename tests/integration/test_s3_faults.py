"""Faults between the consumers and S3 (moto behind tests/s3_proxy.py): failing and dropped puts, a lost
answer, a consumer killed between its put and its delete, and two aggregations of one hour at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import subprocess
import sys

import pytest
from canpipe_testing import ROOT, Bucket, key, make_record, post_json, queue_empty, queue_stats, wait_for
from integration.conftest import can_name_hosts
from s3_proxy import S3FaultProxy

from engine.errors import StorageError
from engine.schema import decode_records, encode_stored
from engine.storage import Hour
from engine.storage import s3 as s3mod
from engine.storage.s3 import S3Writer
from engine.storage.url import parse_storage_url

pytestmark = pytest.mark.slow


def canpipe(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def post_requests(url: str, count: int, size: int) -> list[dict]:
    sent = []
    for i in range(count):
        batch = [make_record(i * size + j, vehicle_id=f"EV-{(i * size + j) % 4:05d}") for j in range(size)]
        status, _, body = post_json(url, batch)
        assert status == 202, body
        sent += batch
    return sent


def landed(bucket: Bucket, sent: list[dict], queue_url: str) -> bool:
    return {key(r) for r in sent} <= {key(r) for r in bucket.records()} and queue_empty(queue_url)


def messages_left(queue_url: str) -> int:
    stats = queue_stats(queue_url)
    return stats.visible + stats.in_flight


def test_a_failing_put_keeps_the_messages_in_the_queue_and_no_object_until_s3_heals(
    serve, host, s3_env, s3_bucket, moto_endpoint
):
    queue_url = s3_env["CANPIPE_QUEUE_URL"]
    with S3FaultProxy(moto_endpoint) as proxy:
        env = s3_env | {"AWS_ENDPOINT_URL_S3": proxy.url}
        url = serve(env)
        proxy.fail_puts = math.inf  # every raw put answers 503 SlowDown, the SDK's retries too
        consumer = host(env, "host-a")
        sent = post_requests(url, 5, 20)
        wait_for(lambda: proxy.count("PutObject", 503) >= 8, 30, "two failed attempts at the put")
        assert s3_bucket.keys("raw/") == [] and s3_bucket.open_uploads() == []
        assert messages_left(queue_url) == 5  # not one deleted
        # then connections dropped halfway through the body: no object either
        proxy.fail_puts, proxy.drop_puts = 0, 1_000_000
        wait_for(lambda: proxy.count("PutObject", 0) >= 4, 30, "puts cut off mid-body")
        assert s3_bucket.keys("raw/") == [] and s3_bucket.open_uploads() == []
        assert messages_left(queue_url) == 5
        proxy.drop_puts = 0  # S3 is back: every record lands, the queue drains
        wait_for(lambda: landed(s3_bucket, sent, queue_url), 40, "every record in the bucket after the heal")
        assert consumer.stop() == 0, consumer.output()
    assert "write failed" in consumer.output()
    records = s3_bucket.records()
    assert {key(r) for r in records} == {key(r) for r in sent} and len(records) == len(sent)  # each once
    assert all(body.endswith(b"\n") for body in s3_bucket.raw_objects().values())  # whole objects only


def test_a_put_whose_answer_is_lost_is_retried_into_the_same_single_object(
    serve, host, s3_env, s3_bucket, moto_endpoint
):
    queue_url = s3_env["CANPIPE_QUEUE_URL"]
    with S3FaultProxy(moto_endpoint) as proxy:
        env = s3_env | {"AWS_ENDPOINT_URL_S3": proxy.url}
        url = serve(env)
        proxy.lose_answers = 1  # stored by moto, then the connection closed before the 200 reaches the client
        consumer = host(env, "host-a")
        sent = post_requests(url, 1, 30)
        wait_for(lambda: landed(s3_bucket, sent, queue_url), 30, "the batch in the bucket")
        assert consumer.stop() == 0, consumer.output()
        puts = [(c.key, c.status) for c in proxy.calls if c.operation == "PutObject"]
    ((name,),) = [s3_bucket.keys("raw/")]
    assert puts == [(f"{s3_bucket.name}/{name}", 0), (f"{s3_bucket.name}/{name}", 412)]  # the retry: name taken
    assert sorted(map(key, s3_bucket.records())) == sorted(map(key, sent))  # one object, every record once


def test_a_consumer_killed_between_put_and_delete_makes_at_most_a_duplicate_and_exact_aggregates(
    serve, host, s3_env, s3_bucket, tmp_path, env
):
    queue_url = s3_env["CANPIPE_QUEUE_URL"]
    url = serve(s3_env)
    marker = tmp_path / "killed"
    fault = {"CANPIPE_FAULT_KILL_AT": "after_put", "CANPIPE_FAULT_ONCE": str(marker)}
    consumer = host(s3_env, "host-a", **fault)
    sent = post_requests(url, 6, 25)
    wait_for(marker.exists, 30, "the consumer killed right after a put")
    wait_for(lambda: landed(s3_bucket, sent, queue_url), 40, "the redelivery put and deleted")
    assert consumer.stop() == 0, consumer.output()
    assert "exited with -9" in consumer.output()  # it died after the put, and the supervisor restarted it

    objects = s3_bucket.raw_objects()
    copies: dict[tuple, int] = {}
    for body in objects.values():
        for line in body.splitlines():
            copies[key(json.loads(line))] = copies.get(key(json.loads(line)), 0) + 1
    assert set(copies) == {key(r) for r in sent}
    assert max(copies.values()) <= 2  # the killed put's records at most twice: a duplicate, never a loss
    # the redelivery grouped as before finds its name taken (412), else it is a second object of those lines
    assert max(copies.values()) == 2 or "was put before" in consumer.output()

    # the aggregate over S3 equals the local aggregate of the deduplicated records
    s3_cli = s3_env | {"CANPIPE_DATA_DIR": str(tmp_path / "jobs"), "CANPIPE_LOG_FORMAT": "text"}
    once = tmp_path / "once"
    first: dict[tuple, bytes] = {}
    for _, body in sorted(objects.items()):
        for line in body.splitlines(keepends=True):
            first.setdefault(key(json.loads(line)), line)
    for hour in s3_bucket.hours():
        h = f"{hour:%Y-%m-%dT%H}"
        folder = once / f"raw/year={hour:%Y}/month={hour:%m}/day={hour:%d}/hour={hour:%H}"
        folder.mkdir(parents=True)
        lines = [line for line in first.values() if _hour_of(line) == hour]
        (folder / "batch-0-once.jsonl").write_bytes(b"".join(lines))
        remote = canpipe(s3_cli, "aggregate", "--hour", h)
        assert remote.returncode == 0, remote.stdout + remote.stderr
        local = canpipe(env | {"CANPIPE_DATA_DIR": str(once)}, "aggregate", "--hour", h)
        assert local.returncode == 0, local.stdout + local.stderr
        got = json.loads(s3_bucket.get(f"{s3_bucket.prefix}/aggregated/aggregated-{h}.json"))
        want = json.loads((once / f"aggregated/aggregated-{h}.json").read_bytes())
        assert _figures(got) == _figures(want)


def _hour_of(line: bytes) -> dt.datetime:
    received = dt.datetime.fromisoformat(json.loads(line)["ingest_received_at"])
    return received.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _figures(doc: dict) -> list[dict]:
    """The per-vehicle figures of an aggregate, without the count of duplicates it dropped on the way."""
    return [{k: v for k, v in vehicle.items() if k != "duplicates_dropped"} for vehicle in doc["vehicles"]]


HOUR = dt.datetime(2026, 3, 14, 15, tzinfo=dt.UTC)


def test_two_aggregations_of_one_hour_at_once_one_runs_and_the_other_is_refused_by_the_lease(
    host, s3_env, s3_bucket, tmp_path, env, moto_endpoint
):
    """The first run reads the hour's objects through a proxy that holds each GET 2 s, so it still holds
    the hour's lease when the second starts."""
    folder = f"raw/year={HOUR:%Y}/month={HOUR:%m}/day={HOUR:%d}/hour={HOUR:%H}"
    for n in range(3):
        records = [make_record(i, vehicle_id=f"EV-{i % 3:05d}") for i in range(n * 40, n * 40 + 40)]
        for i, r in enumerate(records, n * 40):
            r["timestamp"] = (HOUR + dt.timedelta(seconds=i)).isoformat()
        body = encode_stored(decode_records(json.dumps(records).encode(), ndjson=False), HOUR + dt.timedelta(minutes=n))
        s3_bucket.client.put_object(
            Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/{folder}/batch-{n}-x.jsonl", Body=body
        )
    label = f"{HOUR:%Y-%m-%dT%H}"
    lease = f"{s3_bucket.prefix}/leases/aggregate/year={HOUR:%Y}/month={HOUR:%m}/day={HOUR:%d}/hour={HOUR:%H}.json"
    with S3FaultProxy(moto_endpoint) as proxy:
        proxy.delay_gets = 2.0
        slow = host(s3_env | {"AWS_ENDPOINT_URL_S3": proxy.url}, "host-a", "aggregate", "--hour", label)
        wait_for(lambda: s3_bucket.keys("leases/") == [lease], 30, "the first run to take the hour's lease")
        other = canpipe(s3_env | {"CANPIPE_DATA_DIR": str(tmp_path / "host-b")}, "aggregate", "--hour", label)
        assert other.returncode == 1, other.stdout + other.stderr
        assert "BUSY" in other.stderr and "running elsewhere" in other.stderr
        if can_name_hosts():
            assert "host-a-" in other.stderr  # the lease names its holder
        assert slow.popen.wait(60) == 0, slow.output()
    assert s3_bucket.keys("leases/") == []  # given back
    name = f"aggregated/aggregated-{label}.json"
    mirror = s3_bucket.mirror_raw(tmp_path / "mirror")
    local = canpipe(env | {"CANPIPE_DATA_DIR": str(mirror)}, "aggregate", "--hour", label)
    assert local.returncode == 0, local.stdout + local.stderr
    assert s3_bucket.get(f"{s3_bucket.prefix}/{name}") == (mirror / name).read_bytes()
    again = canpipe(s3_env | {"CANPIPE_DATA_DIR": str(tmp_path / "host-b")}, "aggregate", "--hour", label)
    assert again.returncode == 0, again.stdout + again.stderr  # the lease given back: the hour can run again
    assert s3_bucket.get(f"{s3_bucket.prefix}/{name}") == (mirror / name).read_bytes()


@pytest.mark.parametrize(
    ("operation", "budget"),
    [("UploadPart", "fail_puts"), ("UploadPart", "drop_puts"), ("CompleteMultipartUpload", "fail_puts")],
)
def test_a_multipart_put_that_fails_leaves_no_object_and_no_parts(
    s3_bucket, moto_endpoint, monkeypatch, operation, budget
):
    """Above the multipart threshold (lowered here from 64 MiB) a failed part or completion aborts the upload:
    nothing visible, nothing left to bill; the retry after the heal puts the object whole."""
    monkeypatch.setattr(s3mod, "MULTIPART_ABOVE_BYTES", 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_BYTES", 5 * 1024 * 1024)
    lines = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 200) for i in range(50_000))  # 11 MiB: 3 parts
    url = parse_storage_url(s3_bucket.url, ROOT)

    async def put() -> str:
        writer = S3Writer(url)
        try:
            return (await writer.write(Hour(2026, 3, 14, 15), [lines], 1_773_500_400_000))[0]
        finally:
            await writer.close()

    with S3FaultProxy(moto_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        proxy.faulty = {operation}
        setattr(proxy, budget, math.inf)
        with pytest.raises(StorageError, match="raw/year=2026"):
            asyncio.run(put())
        assert proxy.count(operation) >= 2  # the SDK retried before giving up
        assert proxy.count("AbortMultipartUpload") == 1
        assert s3_bucket.keys("raw/") == [] and s3_bucket.open_uploads() == []
        setattr(proxy, budget, 0)
        name = asyncio.run(put())
    assert s3_bucket.get(url.key(name)) == lines and s3_bucket.open_uploads() == []
