"""``canpipe run``: receiver, consumers and simulator on one machine, then a report.

Starts ``canpipe serve`` (Granian) and ``canpipe consume`` as child processes on the embedded queue (or
whatever CANPIPE_QUEUE_URL says), drives them with the simulator over HTTP, waits until every accepted
record is in the raw files, and verifies that by reading the files back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import secrets
import sys
import time
from pathlib import Path

import msgspec

from engine import cost
from engine import instruments as m
from engine.config import Settings
from engine.errors import CanpipeError
from engine.launch import free_port, healthy, queue_empty, start_command, stop, wait_until
from engine.metrics import STAGES, read_snapshots
from engine.progress import simulation_line, with_progress
from engine.simulator import Simulator, describe
from engine.storage import iter_raw_files, read_complete_lines


@dataclasses.dataclass(frozen=True)
class RunOptions:
    vehicles: int = 10
    rate_ms: float = 200.0
    duration_s: float = 10.0
    consumers: int = 2
    batch: int = 1
    receiver_workers: int = 1
    timeout_s: float = 60.0


class _Key(msgspec.Struct):
    vehicle_id: str
    can_id: str
    timestamp: dt.datetime


_key_decoder = msgspec.json.Decoder(_Key)


def stored_keys(raw_dir: Path, since_ns: int = 0) -> list[tuple[str, str, dt.datetime]]:
    """Every record key in the raw files modified after ``since_ns`` (complete lines only)."""
    keys: list[tuple[str, str, dt.datetime]] = []
    for path in iter_raw_files(raw_dir):
        if path.stat().st_mtime_ns < since_ns:
            continue
        lines = read_complete_lines(path)
        keys.extend((k.vehicle_id, k.can_id, k.timestamp) for k in _key_decoder.decode_lines(lines))
    return keys


def stored_keys_s3(settings: Settings, since_ms: int) -> list[tuple[str, str, dt.datetime]]:
    """``stored_keys`` of an S3 root: the raw objects whose earliest record came in at or after ``since_ms``."""
    from engine.storage.s3 import RAW_SUFFIXES, S3Store, decompress

    async def read() -> list[bytes]:
        async with S3Store(settings.storage_url) as store:
            bodies = []
            for name, _ in await store.list("raw/"):
                stamp = name.rsplit("/", 1)[-1].split("-")[1]
                if name.endswith(RAW_SUFFIXES) and stamp.isdigit() and int(stamp) >= since_ms:
                    got = await store.get(name)
                    if got is not None:
                        bodies.append(decompress(name, got[0]))
            return bodies

    keys: list[tuple[str, str, dt.datetime]] = []
    for body in asyncio.run(read()):
        keys.extend((k.vehicle_id, k.can_id, k.timestamp) for k in _key_decoder.decode_lines(body))
    return keys


def run_pipeline(settings: Settings, options: RunOptions) -> int:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir = data_dir / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    for old in metrics_dir.glob("*.metrics"):
        old.unlink()  # the report covers this run only
    started_ns = time.time_ns()
    key = f"run:{secrets.token_urlsafe(16)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "CANPIPE_DATA_DIR": str(data_dir),
        "CANPIPE_QUEUE_URL": settings.queue_url,
        "CANPIPE_API_KEYS": ",".join(filter(None, [os.environ.get("CANPIPE_API_KEYS", ""), key])),
        # an S3 consumer holds a minute's worth by default: a short run puts its objects sooner
        "CANPIPE_S3_OBJECT_SECONDS": os.environ.get("CANPIPE_S3_OBJECT_SECONDS") or "2",
    }
    print(
        f"canpipe run: receiver on {url}, {options.consumers} consumers, queue {settings.queue_url}, "
        f"storage {settings.storage_url}",
        flush=True,
    )
    server = start_command(["serve", "--port", str(port), "--workers", str(options.receiver_workers)], env)
    consumers = start_command(["consume", "--workers", str(options.consumers)], env)
    try:
        if not wait_until(lambda: healthy(url) or server.poll() is not None, 30) or server.poll() is not None:
            raise CanpipeError("the receiver did not become healthy within 30 s")
        sim = Simulator(
            url,
            api_key=key,
            vehicles=options.vehicles,
            rate_ms=options.rate_ms,
            duration_s=options.duration_s,
            batch=options.batch,
            keep_accepted=True,
        )
        result = asyncio.run(
            with_progress(sim.run(), lambda s: simulation_line(sim.result, options.duration_s, s))
        )  # a progress line on a terminal only
        print(f"simulator: {describe(result)}", flush=True)
        accepted = {
            (r["vehicle_id"], r["can_id"], dt.datetime.fromisoformat(r["timestamp"])) for r in result.accepted_records
        }

        def on_disk() -> bool:
            return read_snapshots(metrics_dir).value(m.RECORDS_WRITTEN) >= len(accepted)

        wait_until(on_disk, options.timeout_s, 0.2)
        wait_until(lambda: queue_empty(settings.queue_url), 10, 0.2)
    finally:
        consumer_code = stop(consumers)
        stop(server)
    if settings.storage_url.is_s3:
        keys = stored_keys_s3(settings, started_ns // 1_000_000)
    else:
        keys = stored_keys(data_dir / "raw", started_ns - 1)
    unique = set(keys)
    missing = accepted - unique
    # the merge /metrics serves: every receiver worker's and consumer's snapshot (the last ones written on stop)
    metrics = read_snapshots(metrics_dir)
    written = int(metrics.value(m.RECORDS_WRITTEN))
    print(
        f"records: sent {result.sent}, accepted {len(accepted)}, written {written}, "
        f"unique on disk {len(unique & accepted)}, duplicates {len(keys) - len(unique)}, missing {len(missing)}"
    )
    print(f"{'stage':<12}{'count':>9}{'P50 ms':>10}{'P95 ms':>10}{'P99 ms':>10}{'max ms':>10}")
    for stage in STAGES:
        s = metrics.summary(stage)
        print(f"{stage:<12}{s['count']:>9}{s['p50']:>10.1f}{s['p95']:>10.1f}{s['p99']:>10.1f}{s['max']:>10.1f}")
    calls = {labels[0]: value for (name, labels), value in metrics.values.items() if name == m.SQS_REQUESTS.name}
    if calls:
        print(cost.describe(int(metrics.value(m.SQS_BILLED)), len(accepted), calls))
    raw = f"{settings.storage_url}/raw" if settings.storage_url.is_s3 else data_dir / "raw"
    print(f"files: {raw} (hour-partitioned JSONL), metrics snapshots: {metrics_dir}")
    if missing:
        print(f"FAILED: {len(missing)} accepted records are not on disk", file=sys.stderr)
        return 1
    if consumer_code != 0:
        print(f"FAILED: consumers exited with {consumer_code}", file=sys.stderr)
        return 1
    return 0
