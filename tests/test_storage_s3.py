"""The S3 backend against moto's S3 server over real HTTP: object names, create-only puts, multipart,
zstd, the lease, mirroring an hour, and a consumer putting objects by size and by age."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
from pathlib import Path

import pytest
import zstandard
from canpipe_testing import AWS_TEST_ENV, make_record

from engine.config import Settings
from engine.consumer import Consumer
from engine.errors import ConfigError, StorageError
from engine.queues import open_queue
from engine.schema import decode_records, encode_stored
from engine.storage import Hour
from engine.storage import s3 as s3mod
from engine.storage.s3 import (
    Lease,
    LeaseHeld,
    S3Store,
    S3Writer,
    decompress,
    materialize,
    raw_hours,
    run_hour_job,
    sync_down,
)
from engine.storage.url import parse_storage_url, s3_client_kwargs

HOUR = Hour(2026, 3, 14, 15)


@pytest.fixture
def bucket(s3_bucket):
    """A fresh bucket on the session's moto server (``s3_bucket``), as (name, boto3 client)."""
    return s3_bucket.name, s3_bucket.client


def keys(client, bucket: str) -> dict[str, bytes]:
    found = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in found}


def run(coro):
    return asyncio.run(coro)


def url_of(bucket: str, prefix: str = "fleet") -> object:
    return parse_storage_url(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", Path("."))


def lines(n: int, received_at: dt.datetime, start: int = 0) -> bytes:
    records = decode_records(json.dumps([make_record(i) for i in range(start, start + n)]).encode(), ndjson=False)
    return encode_stored(records, received_at)


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["gs://bucket", "s3://", "s3://b?x=1", "file://host/x", "file://"])
def test_a_storage_url_that_is_not_one_is_refused_naming_the_setting(text):
    with pytest.raises(ConfigError, match="CANPIPE_STORAGE_URL"):
        parse_storage_url(text, Path("."))


def test_settings_read_the_s3_root_and_a_file_url_is_the_data_dir(tmp_path):
    s = Settings.from_env({"CANPIPE_STORAGE_URL": "s3://b/a/b/", "CANPIPE_RAW_COMPRESSION": "zstd"})
    assert (s.storage_url.bucket, s.storage_url.prefix, s.raw_compression) == ("b", "a/b", "zstd")
    assert s.storage_url.key("raw/x") == "a/b/raw/x" and s.storage_url.relative("a/b/raw/x") == "raw/x"
    local = Settings.from_env({"CANPIPE_STORAGE_URL": f"file://{tmp_path}"})
    assert local.data_dir == tmp_path and not local.storage_url.is_s3
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {
                "CANPIPE_STORAGE_URL": f"file://{tmp_path}",
                "CANPIPE_DATA_DIR": "/elsewhere",
                "CANPIPE_RAW_COMPRESSION": "lz4",
            }
        )
    assert "two roots" in str(info.value) and "CANPIPE_RAW_COMPRESSION" in str(info.value)


def test_the_endpoint_and_region_come_from_the_standard_variables():
    kwargs = s3_client_kwargs({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert kwargs["endpoint_url"] == "http://127.0.0.1:9" and kwargs["region_name"] == "eu-west-1"
    assert "endpoint_url" not in s3_client_kwargs({})  # real AWS: the SDK's own endpoint


# --- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_batch_is_one_object_named_by_its_content_and_a_retry_makes_no_second(bucket, compression):
    name, client = bucket
    data = lines(50, HOUR.start)

    async def go():
        writer = S3Writer(url_of(name), compression=compression)
        try:
            first = await writer.write(HOUR, [memoryview(data[:100]), data[100:]], 1_773_500_400_123)
            again = await writer.write(HOUR, [data], 1_773_500_400_123)  # an answer lost, the put retried
            return first, again, writer.already_there
        finally:
            await writer.close()

    (key, size), (key2, _), already = run(go())
    stored = keys(client, name)
    assert key == key2 and already == 1 and len(stored) == 1
    assert key.startswith("raw/year=2026/month=03/day=14/hour=15/batch-1773500400123-")
    full = f"fleet/{key}"
    assert key.endswith(".jsonl.zst" if compression == "zstd" else ".jsonl") and len(stored[full]) == size
    body = stored[full]
    assert (zstandard.ZstdDecompressor().decompressobj().decompress(body) if compression == "zstd" else body) == data


def test_a_put_that_fails_raises_storage_error_and_leaves_no_object(moto_endpoint, monkeypatch):
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)

    async def go():
        writer = S3Writer(url_of("no-such-bucket-here"))
        try:
            await writer.write(HOUR, [b"{}\n"], 1)
        finally:
            await writer.close()

    with pytest.raises(StorageError, match="no-such-bucket-here"):
        run(go())


def test_a_large_object_goes_up_in_parts_and_appears_whole_or_not_at_all(bucket, monkeypatch):
    name, client = bucket
    monkeypatch.setattr(s3mod, "MULTIPART_ABOVE_BYTES", 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_BYTES", 5 * 1024 * 1024)
    data = bytes(range(256)) * (11 * 4096)  # 11 MiB: three parts

    async def go():
        async with S3Store(url_of(name, "")) as store:
            created = await store.put("big", data)
            taken = await store.put("big", data[:-1])  # create-only: the name is taken, the upload aborted
            return created, taken, dict(store.calls)

    created, taken, calls = run(go())
    assert created and not taken
    assert calls["UploadPart"] == 6 and calls["AbortMultipartUpload"] == 1
    assert keys(client, name)["big"] == data
    assert not client.list_multipart_uploads(Bucket=name).get("Uploads")  # no parts left behind


def test_a_truncated_zstd_object_is_an_error_not_lines():
    body = zstandard.ZstdCompressor().compress(b'{"a": 1}\n' * 1000)
    assert decompress("x.jsonl.zst", body) == b'{"a": 1}\n' * 1000
    with pytest.raises(StorageError, match="x.jsonl.zst"):
        decompress("x.jsonl.zst", b"not zstd at all")
    assert decompress("x.jsonl", b"as is") == b"as is"


def test_an_unknown_compression_is_refused():
    with pytest.raises(ConfigError, match="CANPIPE_RAW_COMPRESSION"):
        S3Writer(url_of("b"), compression="lz4")


# --- reading -------------------------------------------------------------------------------------


def test_an_hour_is_mirrored_into_a_local_tree_that_follows_the_bucket(bucket, tmp_path):
    name, client = bucket
    other = Hour(2026, 3, 14, 16)

    async def go():
        writer = S3Writer(url_of(name), compression="zstd")
        store = writer.store
        try:
            a = await writer.write(HOUR, [lines(3, HOUR.start)], 1)
            await writer.write(other, [lines(2, other.start, 3)], 2)
            await store.put("aggregated/out.json", b"{}")
            await store.put("parquet/year=2026/month=03/day=14/hour=15/part-0.parquet", b"PAR1")
            hours = await raw_hours(store)
            assert await materialize(store, [HOUR], tmp_path) > 0
            await store.delete(a[0])  # gone from the bucket: gone from the mirror
            await writer.write(HOUR, [lines(4, HOUR.start, 10)], 3)
            await sync_down(
                store,
                HOUR,
                tmp_path,
                outputs=["aggregated/out.json", "aggregated/none.json"],
                trees=["parquet/year=2026/month=03/day=14/"],
            )
            return hours
        finally:
            await writer.close()

    hours = run(go())
    assert hours == [HOUR, other]
    folder = tmp_path / "raw/year=2026/month=03/day=14/hour=15"
    files = sorted(folder.iterdir())
    assert [p.suffix for p in files] == [".jsonl"]  # inflated, and the deleted object's file removed
    assert files[0].read_bytes().count(b"\n") == 4  # the object put after the first mirror
    assert (tmp_path / "aggregated/out.json").read_bytes() == b"{}"
    assert not (tmp_path / "aggregated/none.json").exists()
    assert (tmp_path / "parquet/year=2026/month=03/day=14/hour=15/part-0.parquet").read_bytes() == b"PAR1"
    assert not (tmp_path / "raw/year=2026/month=03/day=14/hour=16").exists()


def test_one_job_per_hour_holds_the_lease_and_an_expired_one_is_taken_over(bucket):
    name, client = bucket

    async def go():
        async with S3Store(url_of(name)) as store:
            first = Lease(store, "aggregate", HOUR, ttl_s=1.5, owner="host-a")
            await first.acquire()
            with pytest.raises(LeaseHeld, match=r"aggregate of 2026-03-14T15 is running elsewhere: host-a"):
                await Lease(store, "aggregate", HOUR, owner="host-b").acquire()
            await Lease(store, "compact", HOUR, owner="host-b").acquire()  # another job: its own lease
            deadline = time.monotonic() + 10
            while True:  # until past its expiry
                try:
                    second = Lease(store, "aggregate", HOUR, owner="host-c")
                    await second.acquire()
                    break
                except LeaseHeld:
                    assert time.monotonic() < deadline, "the expired lease was never taken over"
                    await asyncio.sleep(0.2)
            held = json.loads((await store.get(second.name))[0])
            await second.release()
            return held, await store.get(second.name)

    held, after = run(go())
    assert held["owner"] == "host-c" and after is None


def _job(store: S3Store, cache: Path, hold_s: float, lease_s: float):
    """run_hour_job of an aggregate-like job that holds the hour ``hold_s`` and writes one output."""

    def work() -> str:
        time.sleep(hold_s)
        out = cache / "aggregated/out.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"{}")
        return "done"

    return run_hour_job(store, "aggregate", HOUR, cache, ["aggregated/out.json"], work, trees=[], lease_s=lease_s)


def test_a_running_job_renews_its_lease_past_its_lifetime(bucket, tmp_path):
    """A job that takes longer than its lease's lifetime keeps it: another host is refused all along, the
    output is put, and the lease given back."""
    name, client = bucket

    async def go():
        async with S3Store(url_of(name)) as store:
            job = asyncio.ensure_future(_job(store, tmp_path, hold_s=5.0, lease_s=2.0))
            deadline = time.monotonic() + 10
            while await store.get(Lease(store, "aggregate", HOUR).name) is None:  # the job has taken its lease
                assert time.monotonic() < deadline, "the job never took its lease"
                await asyncio.sleep(0.02)
            taken = refused = time.monotonic()
            while not job.done():  # without renewals the lease would be taken over 2 s after it was taken
                other = Lease(store, "aggregate", HOUR, ttl_s=2.0, owner="host-b")
                try:
                    await other.acquire()
                except LeaseHeld as exc:
                    assert "running elsewhere" in str(exc)
                    refused = time.monotonic()
                    await asyncio.sleep(0.2)
                    continue
                await other.release()  # free only once the job gave it back, as it ends (or it raises here)
                break
            return await job, refused - taken

    result, refused_for = run(go())
    assert result == "done" and refused_for > 4.0  # twice the lease's lifetime
    found = keys(client, name)
    assert found["fleet/aggregated/out.json"] == b"{}"
    assert not [k for k in found if "/leases/" in k]  # given back


def test_a_job_whose_lease_was_taken_over_puts_nothing_and_leaves_the_new_holders_lease(bucket, tmp_path):
    """Another job holds the lease by the time this one's work ends (S3 refused its renewals past the lease's
    lifetime; here another owner's lease put over it): the job raises LeaseHeld, puts no output and does not
    delete the new holder's lease."""
    name, client = bucket

    async def go():
        async with S3Store(url_of(name)) as store:
            job = asyncio.ensure_future(_job(store, tmp_path, hold_s=2.0, lease_s=0.9))
            other = Lease(store, "aggregate", HOUR, ttl_s=60, owner="host-b")
            deadline = time.monotonic() + 10
            while await store.get(other.name) is None:  # the job has taken its lease
                assert time.monotonic() < deadline, "the job never took its lease"
                await asyncio.sleep(0.02)
            assert await store.put(other.name, other._body(), create_only=False)  # as a takeover leaves it
            with pytest.raises(LeaseHeld, match="another job took it"):
                await job
            return json.loads((await store.get(other.name))[0])["owner"]

    assert run(go()) == "host-b"
    assert "fleet/aggregated/out.json" not in keys(client, name)


# --- the consumer putting objects ------------------------------------------------------------------


def consume_until(settings: Settings, bodies: list[bytes], client, bucket: str, done, timeout: float = 30.0):
    async def go():
        queue = open_queue(settings.queue_url, visibility_timeout_s=settings.visibility_timeout_s)
        writer = S3Writer(settings.storage_url, compression=settings.raw_compression)
        consumer = Consumer(settings, queue, writer)
        await queue.send_batch(bodies)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        t0 = time.monotonic()
        try:
            while not done(objects := keys(client, bucket)):
                assert time.monotonic() - t0 < timeout, "timed out waiting for the objects"
                assert not task.done(), task.exception() if task.done() else ""
                await asyncio.sleep(0.05)
            return time.monotonic() - t0, objects
        finally:
            stop.set()
            await task
            await writer.close()
            await queue.close()

    return run(go())


def test_a_consumer_holds_records_to_the_object_size_then_puts_and_deletes(bucket, data_dir):
    name, client = bucket
    now = dt.datetime.now(dt.UTC)
    bodies = [lines(20, now, 20 * i) for i in range(30)]
    size = sum(map(len, bodies))
    settings = dataclasses.replace(
        Settings.from_env({"CANPIPE_DATA_DIR": str(data_dir), "CANPIPE_STORAGE_URL": f"s3://{name}/fleet"}),
        s3_object_bytes=size // 2,
        s3_object_seconds=600.0,  # the size decides here, never the timer
    )
    took, objects = consume_until(settings, bodies, client, name, lambda objects: len(objects) >= 1)
    assert took < 20
    written = b"".join(objects.values())
    # put at the size trigger (the timer is 10 min away), as one object: not one per message, not before half
    # the backlog was held (all of it, when the receives outran the flush on a loaded machine)
    assert len(objects) == 1 and size // 2 <= len(written) <= size
    assert set(written.splitlines()) <= set(b"".join(bodies).splitlines())


def test_a_consumer_puts_what_it_holds_when_the_object_age_is_reached(bucket, data_dir):
    name, client = bucket
    now = dt.datetime.now(dt.UTC)
    bodies = [lines(5, now, 5 * i) for i in range(4)]
    settings = Settings.from_env(
        {
            "CANPIPE_DATA_DIR": str(data_dir),
            "CANPIPE_STORAGE_URL": f"s3://{name}",
            "CANPIPE_S3_OBJECT_SECONDS": "1",
            "CANPIPE_RAW_COMPRESSION": "zstd",
        }
    )
    took, objects = consume_until(settings, bodies, client, name, lambda objects: len(objects) >= 1)
    deadline = time.monotonic() + 10
    while True:  # the deletes follow the put
        stats = run(_stats(settings))
        if stats.visible + stats.in_flight == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (body,) = objects.values()
    assert sorted(zstandard.ZstdDecompressor().decompressobj().decompress(body).splitlines()) == sorted(
        b"".join(bodies).splitlines()
    )
    assert stats.visible + stats.in_flight == 0  # deleted once put, not before
    assert 0.5 <= took < 10


async def _stats(settings: Settings):
    queue = open_queue(settings.queue_url)
    try:
        return await queue.stats()
    finally:
        await queue.close()
