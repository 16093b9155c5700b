"""A lean open-loop HTTP/1.1 load generator for canpipe's /ingest (one process, uvloop, keep-alive).

The simulator models vehicles; this only produces load, as cheaply per request as Python allows, so
that on a 2-core machine the generator takes as little CPU from the system under test as possible.
Prints one JSON line: sent, accepted, statuses, and the HTTP latency histogram (serialized).

    python bench/loadgen.py --url http://127.0.0.1:8000 --rate 5000 --duration 20 --batch 1 --key id:secret
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime as dt
import json
import random
import time
from urllib.parse import urlsplit

import uvloop

from engine.kernels import LatencyHistogram

UTC = dt.UTC


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:")
        length = (
            int(head[start + 15 : head.find(b"\r\n", start) if head.find(b"\r\n", start) > 0 else None])
            if start >= 0
            else 0
        )
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        del self.buffer[: end + 4 + length]
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(0)


def record(vehicle: str, seq: int) -> dict:
    now = dt.datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {
        "timestamp": now,
        "vehicle_id": vehicle,
        "can_id": "0x132",
        "payload": {
            "battery_soc": 50.0 + (seq % 500) / 10,
            "battery_voltage": 390.5,
            "battery_current": 40.0 + seq % 50,
            "cell_voltage_min": 4.05,
            "cell_voltage_max": 4.07,
            "cell_temp_min": 25.0,
            "cell_temp_max": 27.5,
        },
    }


async def worker(index: int, args, stats, hist, end: float) -> None:
    url = urlsplit(args.url)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, url.hostname, url.port)
    interval = args.connections * args.batch / args.rate  # seconds between this connection's requests
    next_at = time.monotonic() + random.uniform(0, interval)
    seq = 0
    while next_at < end:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        vehicle = f"EV-{index:03d}-{seq % 10}"
        records = [record(vehicle, seq + i) for i in range(args.batch)]
        seq += args.batch
        body = json.dumps(records if args.batch > 1 else records[0], separators=(",", ":")).encode()
        head = (
            f"POST /ingest HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {args.key}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        conn.waiter = loop.create_future()
        t0 = time.perf_counter()
        conn.transport.write(head + body)
        status = await conn.waiter
        hist.record((time.perf_counter() - t0) * 1000.0)
        stats["sent"] += args.batch
        stats[f"status_{status}"] += 1
        if status == 202:
            stats["accepted"] += args.batch
        elif status == 0:
            _, conn = await loop.create_connection(Connection, url.hostname, url.port)
        next_at += interval
        if next_at < time.monotonic() - 1.0:  # more than a second behind: we are the bottleneck
            stats["behind"] += 1
            next_at = time.monotonic()
    conn.transport.close()


async def main(args) -> dict:
    stats: collections.Counter[str] = collections.Counter()
    hist = LatencyHistogram()
    start = time.monotonic()
    end = start + args.duration
    await asyncio.gather(*(worker(i, args, stats, hist, end) for i in range(args.connections)))
    elapsed = time.monotonic() - start
    return {
        **stats,
        "elapsed_s": elapsed,
        "http_p50_ms": hist.quantile(0.5),
        "http_p99_ms": hist.quantile(0.99),
        "http_hist": base64.b64encode(hist.to_bytes()).decode(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--rate", type=float, default=5000, help="records per second in all")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--batch", type=int, default=1, help="records per request")
    parser.add_argument("--connections", type=int, default=64)
    arguments = parser.parse_args()
    print(json.dumps(uvloop.run(main(arguments))))
