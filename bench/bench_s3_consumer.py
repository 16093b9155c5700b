"""One consumer process draining a backlog into S3 (moto's server on 127.0.0.1) against the same backlog
into local files, in the same run: records/s, objects and PUTs per 1,000 records.

The backlog: 100-record messages in the embedded queue (what the receiver makes of batched requests).
moto is a Python server on this same 2-core box, so its PUTs cost CPU the consumer competes for: the S3
figure is a floor for real S3, where a PUT of 8 MiB takes tens of ms of network and no local CPU.

    python bench/bench_s3_consumer.py --messages 2000 --rounds 3
    python -m pytest bench/bench_s3_consumer.py      # CI: a small backlog, every record must land
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from canpipe_testing import AWS_TEST_ENV, free_port, make_record, start_moto, stop_process  # noqa: E402

from engine import instruments as m  # noqa: E402
from engine.config import Settings  # noqa: E402
from engine.consumer import Consumer  # noqa: E402
from engine.queues import open_queue  # noqa: E402
from engine.schema import UTC, decode_records, encode_stored  # noqa: E402
from engine.storage import PartitionWriter  # noqa: E402

RECORDS = 100


def backlog(messages: int) -> list[bytes]:
    now = dt.datetime.now(UTC)
    bodies = []
    for k in range(messages):
        records = [make_record(k * RECORDS + i, vehicle_id=f"EV-{i % 50:05d}") for i in range(RECORDS)]
        bodies.append(encode_stored(decode_records(json.dumps(records).encode(), ndjson=False), now))
    return bodies


async def drain(settings: Settings, bodies: list[bytes], s3: bool) -> dict[str, float]:
    """Fill the queue, then time one consumer until everything is received and what it holds is written."""
    queue = open_queue(settings.queue_url, visibility_timeout_s=60)
    for i in range(0, len(bodies), 10):
        await queue.send_batch(bodies[i : i + 10])
    if s3:
        from engine.storage.s3 import S3Writer

        writer: PartitionWriter | S3Writer = S3Writer(settings.storage_url, compression=settings.raw_compression)
    else:
        writer = PartitionWriter(settings.data_dir, "bench", rotate_bytes=settings.rotate_bytes)
    consumer = Consumer(settings, queue, writer)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run(stop))
    while (await queue.stats()).visible:  # everything received: the stop puts what is held at once, so the
        if task.done():  # tail of the backlog never waits for the object timer
            task.result()
        await asyncio.sleep(0.02)
    stop.set()
    await task
    elapsed = time.perf_counter() - started
    objects = consumer.metrics.value(m.FILES_WRITTEN)
    puts = writer.store.calls.get("PutObject", 0) if not isinstance(writer, PartitionWriter) else 0
    if isinstance(writer, PartitionWriter):
        writer.close()
    else:
        await writer.close()
    await queue.close()
    records = consumer.metrics.value(m.RECORDS_WRITTEN)
    return {
        "records_s": records / elapsed,
        "seconds": elapsed,
        "objects": objects,
        "puts_per_1000": puts * 1000 / records,
    }


def measure(messages: int, rounds: int, endpoint: str, object_s: float = 5.0) -> list[dict[str, dict[str, float]]]:
    import boto3

    os.environ.update(AWS_TEST_ENV | {"AWS_ENDPOINT_URL_S3": endpoint})
    bodies = backlog(messages)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    results = []
    for _ in range(rounds):
        row = {}
        for label, s3, compression in (("local", False, "none"), ("s3", True, "none"), ("s3 zstd", True, "zstd")):
            with tempfile.TemporaryDirectory(prefix="canpipe-bench-") as tmp:
                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                client.create_bucket(Bucket=bucket)
                settings = dataclasses.replace(
                    Settings.from_env({"CANPIPE_DATA_DIR": tmp, "CANPIPE_STORAGE_URL": f"s3://{bucket}/fleet"}),
                    batch_records=10_000,  # the local consumer at its best batch, as the S3 one is at 8 MiB
                    raw_compression=compression,
                    s3_object_seconds=object_s,  # the tail of the backlog goes up after this, not after 60 s
                )
                row[label] = asyncio.run(drain(settings, bodies, s3))
        results.append(row)
    return results


def _moto(tmp: Path) -> tuple[object, str]:
    port = free_port()
    return start_moto(port, tmp / "moto.log"), f"http://127.0.0.1:{port}"


def test_an_s3_consumer_drains_a_backlog_into_few_objects(tmp_path):
    proc, endpoint = _moto(tmp_path)
    try:
        (row,) = measure(200, 1, endpoint, object_s=1.0)  # 20,000 records
    finally:
        stop_process(proc)
    for label, figures in row.items():
        print(f"{label}: {figures['records_s']:,.0f} records/s, {figures['objects']:.0f} objects")
    # 20,000 records of ~230 bytes are ~4.6 MB: under the 8 MiB target, so the backlog goes up as a few
    # objects (the receive loop hands over 10 messages at a time), never one per message
    assert row["s3"]["objects"] <= 10 and row["s3 zstd"]["objects"] <= 10
    assert row["s3"]["puts_per_1000"] <= 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = _moto(Path(tmp))
        try:
            for row in measure(args.messages, args.rounds, endpoint):
                print(
                    "  ".join(
                        f"{label}: {f['records_s']:,.0f} rec/s ({f['objects']:.0f} objects, "
                        f"{f['puts_per_1000']:.3f} PUT/1000)"
                        for label, f in row.items()
                    ),
                    flush=True,
                )
        finally:
            stop_process(proc)


if __name__ == "__main__":
    main()
