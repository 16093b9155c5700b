"""Batched ingest, durable on disk: the real receiver and one real consumer under wrk, on this machine.

Starts ``canpipe serve --workers 1`` and ``canpipe consume --workers 1`` on a fresh embedded queue in a
temp dir, drives the receiver with wrk (``-t1 -c16``, a Lua script posting 100-record bodies with fresh
timestamps, NDJSON or a JSON array) for a fixed time, waits until the queue is empty, and counts the
records on disk. Two figures per run:

- accepted records/s: 202 answers x 100 records / wrk's duration;
- durable records/s: records on disk / time from the start of the load until the last one was fsynced
  (the consumer's written counter, polled every 20 ms, stops moving and the queue is empty).

    .venv/bin/python bench/bench_ingest_batched.py --duration 15 --runs 3
    .venv/bin/python bench/bench_ingest_batched.py --body array

``--drain`` also times the consumer alone: the queue filled through the receiver first, then one
consumer process started and timed from its first written batch until the queue is empty.

The CI guard (quick mode) is described at ``test_guard_batched_ingest``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wrk import WRK, run_wrk, tree_cpu_s  # noqa: E402

from engine.launch import free_port, healthy, queue_empty, start_command, stop, wait_until  # noqa: E402
from engine.metrics import read_snapshots  # noqa: E402
from engine.storage import iter_raw_files  # noqa: E402

RECORDS_PER_BODY = 100
WRITTEN = "canpipe_consumer_records_written_total"

# One request body per second of wall clock, rebuilt when the second changes (fresh client timestamps
# without spending wrk's CPU on JSON per request). __RECORDS__, __ARRAY__, __KEY__ are filled in by Python.
LUA = r"""
local records, array, key = __RECORDS__, __ARRAY__, "__KEY__"
local second, request_bytes = -1, nil
local function body(now)
  local stamp = os.date("!%Y-%m-%dT%H:%M:%S", now)
  local lines = {}
  for i = 0, records - 1 do
    lines[#lines + 1] = string.format(
      '{"timestamp":"%s.%06dZ","vehicle_id":"EV-%05d","can_id":"0x%X","payload":{"battery_soc":%.1f,' ..
      '"battery_voltage":%.1f,"battery_current":%.1f,"cell_voltage_min":3.61,"cell_voltage_max":3.74,' ..
      '"cell_temp_min":21.5,"cell_temp_max":27.0}}',
      stamp, i * 1000, i % 50, 256 + i % 8, 20 + i % 80, 350 + i % 50, i % 200 - 100)
  end
  if array then return "[" .. table.concat(lines, ",") .. "]" end
  return table.concat(lines, "\n") .. "\n"
end
request = function()
  local now = os.time()
  if now ~= second then
    second = now
    local headers = {["X-API-Key"] = key,
                     ["Content-Type"] = array and "application/json" or "application/x-ndjson"}
    request_bytes = wrk.format("POST", "/ingest", headers, body(now))
  end
  return request_bytes
end
done = function(summary, latency, requests)
  local s = summary.errors
  io.write(string.format("WRKJSON {\"requests\":%d,\"duration_us\":%d,\"non2xx\":%d,\"socket_errors\":%d," ..
    "\"p50_us\":%d,\"p99_us\":%d}\n", summary.requests, summary.duration, s.status,
    s.connect + s.read + s.write + s.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Result:
    body: str
    records_per_body: int
    seconds: float
    accepted: int  # 202 answers x records per body
    on_disk: int
    durable_s: float  # load start -> the last record fsynced
    http_p50_ms: float
    http_p99_ms: float
    non_2xx: int

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.seconds

    @property
    def durable_per_s(self) -> float:
        return self.on_disk / self.durable_s

    def line(self) -> str:
        return (
            f"{self.body:>6} x{self.records_per_body:<3} accepted {self.accepted_per_s:>9,.0f} rec/s  "
            f"durable {self.durable_per_s:>9,.0f} rec/s  ({self.on_disk:,} on disk in {self.durable_s:.2f} s; "
            f"HTTP P50 {self.http_p50_ms:.1f} ms P99 {self.http_p99_ms:.1f} ms; non-2xx {self.non_2xx})"
        )


def lines_on_disk(data_dir: Path) -> int:
    total = 0
    for path in iter_raw_files(data_dir / "raw"):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += chunk.count(b"\n")
    return total


def written(data_dir: Path) -> int:
    return int(read_snapshots(data_dir / "metrics").counters.get(WRITTEN, 0))


def _fresh(prefix: str, records: int, *, array: bool) -> tuple[Path, int, str, str, dict[str, str], Path]:
    """A fresh data dir with its embedded queue and a wrk script posting ``records``-record bodies under a new
    key: (data dir, port, receiver URL, queue URL, environment of the canpipe commands, script)."""
    if WRK is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk); the batched-ingest benchmark drives with it")
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    key = f"bench:{secrets.token_hex(8)}"
    port = free_port()
    queue_url = f"sqlite:///{data_dir / 'queue.db'}"
    env = os.environ | {"CANPIPE_DATA_DIR": str(data_dir), "CANPIPE_API_KEYS": key, "CANPIPE_QUEUE_URL": queue_url}
    script = data_dir / "post.lua"
    script.write_text(
        LUA.replace("__RECORDS__", str(records))
        .replace("__ARRAY__", "true" if array else "false")
        .replace("__KEY__", key)
    )
    return data_dir, port, f"http://127.0.0.1:{port}", queue_url, env, script


def run_once(*, body: str = "ndjson", records: int = RECORDS_PER_BODY, seconds: float = 10.0) -> Result:
    """One fresh pipeline, one wrk run, drained and counted."""
    data_dir, port, url, queue_url, env, script = _fresh("canpipe-batched-", records, array=body == "array")
    server = start_command(["serve", "--port", str(port), "--workers", "1"], env)
    consumer = start_command(["consume", "--workers", "1"], env)
    try:
        if not wait_until(lambda: healthy(url), 30):
            raise RuntimeError("the receiver did not become healthy within 30 s")
        time.sleep(1.0)  # the consumer worker is a spawned process: let it finish importing before the clock
        start = time.monotonic()
        stats = run_wrk(url + "/ingest", script, seconds, 16)
        # the last record is durable when the queue is empty and the written counter has stopped moving
        last = (-1, start)

        def drained() -> bool:
            nonlocal last
            count = written(data_dir)
            if count != last[0]:
                last = (count, time.monotonic())
                return False
            return queue_empty(queue_url) and written(data_dir) == count

        if not wait_until(drained, 120, 0.02):
            raise RuntimeError(f"not drained within 120 s of the load: {last[0]:,} records written")
        durable_s = last[1] - start
        stop(consumer)
        on_disk = lines_on_disk(data_dir)
    finally:
        stop(consumer)
        stop(server)
    shutil.rmtree(data_dir, ignore_errors=True)
    ok = stats["requests"] - stats["non2xx"]
    return Result(
        body,
        records,
        stats["duration_us"] / 1e6,
        ok * records,
        on_disk,
        durable_s,
        stats["p50_us"] / 1000,
        stats["p99_us"] / 1000,
        stats["non2xx"],
    )


def drain_once(*, seconds: float = 5.0) -> tuple[int, float, float, float]:
    """The consumer alone: fill a fresh queue through the receiver (wrk, 100-record NDJSON, ``seconds``), stop
    the receiver, then time one consumer process from its start until the queue is empty and every record
    is on disk. (records, seconds, receiver-alone accepted records/s, the consumer's CPU seconds): the seconds
    count from the consumer's first written batch (its start-up, ~1 s, left out), the CPU over the same span, of
    the consumer's processes (supervisor and worker); the third figure is the fill, no consumer running."""
    data_dir, port, url, queue_url, env, script = _fresh("canpipe-drain-", RECORDS_PER_BODY, array=False)
    server = start_command(["serve", "--port", str(port), "--workers", "1"], env)
    consumer = None
    try:
        if not wait_until(lambda: healthy(url), 30):
            raise RuntimeError("the receiver did not become healthy within 30 s")
        wrk = subprocess.run(
            [WRK, "-t1", "-c16", f"-d{seconds:g}s", "-s", str(script), url + "/ingest"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        stats = json.loads(re.findall(r"^WRKJSON (.*)$", wrk.stdout, re.M)[-1])
        alone = (stats["requests"] - stats["non2xx"]) * RECORDS_PER_BODY / (stats["duration_us"] / 1e6)
        stop(server)
        consumer = start_command(["consume", "--workers", "1"], env)
        if not wait_until(lambda: written(data_dir) > 0, 60, 0.01):  # the clock starts at the first batch
            raise RuntimeError("the consumer wrote nothing within 60 s")
        start, first, cpu_before = time.monotonic(), written(data_dir), tree_cpu_s(consumer.pid)
        if not wait_until(lambda: queue_empty(queue_url), 120, 0.02):
            raise RuntimeError("the consumer did not drain the queue within 120 s")
        drain_s = time.monotonic() - start
        cpu_s = tree_cpu_s(consumer.pid) - cpu_before
        stop(consumer)
        records = lines_on_disk(data_dir) - first
    finally:
        stop(server)
        if consumer is not None:
            stop(consumer)
    shutil.rmtree(data_dir, ignore_errors=True)
    return records, drain_s, alone, cpu_s


def consumer_parse_speedup(messages: int = 100) -> float:
    """How many times faster the consumer's parse is than its exact StoredRecord path (the per-record
    Python it had before), same process, best of 7 alternated: one ``parse_message`` per message of 100
    records."""
    from timing import ratio

    from engine import consumer
    from engine.queues import Received

    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    line = (
        '{"timestamp":"%s.%06dZ","vehicle_id":"EV-%05d","can_id":"0x132","payload":{"battery_soc":80.5,'
        '"battery_voltage":396.2,"battery_current":42.0,"cell_voltage_min":4.11,"cell_voltage_max":4.13,'
        '"cell_temp_min":24.0,"cell_temp_max":26.5},"ingest_received_at":"%s.500000Z"}\n'
    )
    bodies = [
        "".join(line % (stamp, i * 1000, (m * 100 + i) % 500, stamp) for i in range(RECORDS_PER_BODY)).encode()
        for m in range(messages)
    ]
    batch = [Received(str(m), f"{m}:x", body, 0, 0, 1) for m, body in enumerate(bodies)]
    fast = consumer._FAST

    def parse_all(validator: object) -> None:
        consumer._FAST = validator  # type: ignore[assignment]
        try:
            for message in batch:
                consumer.parse_message(message, now)
        finally:
            consumer._FAST = fast

    _, _, speedup = ratio(lambda: parse_all(None), lambda: parse_all(fast), repeats=7)
    return speedup


def receiver_decode_speedup(bodies: int = 50) -> float:
    """How many times faster the receiver's per-batch path (``engine.batch_decode``: decode and stored lines) is
    than its exact door (``schema.decode_records`` + ``encode_stored``) on 100-record NDJSON bodies, same process,
    best of 7 alternated."""
    import datetime as dt

    from timing import ratio

    from engine.batch_decode import decode_batch, stored_lines
    from engine.schema import decode_records, encode_stored

    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S")
    line = (
        '{"timestamp":"%s.%06dZ","vehicle_id":"EV-%05d","can_id":"0x%X","payload":{"battery_soc":%.1f,'
        '"battery_voltage":396.2,"battery_current":%.1f,"cell_voltage_min":3.61,"cell_voltage_max":3.74,'
        '"cell_temp_min":21.5,"cell_temp_max":27.0}}\n'
    )
    payloads = [
        "".join(line % (stamp, i * 1000, (b * 7 + i) % 50, 256 + i % 8, 20 + i % 80, i % 200 - 100) for i in range(100))
        for b in range(bodies)
    ]
    encoded = [p.encode() for p in payloads]

    def exact() -> None:
        for body in encoded:
            encode_stored(decode_records(body, ndjson=True), now)

    def batched() -> None:
        for body in encoded:
            records = decode_batch(body, ndjson=True)
            assert records is not None, "a plain 100-record body fell to the exact door"
            stored_lines(records, now)

    _, _, speedup = ratio(exact, batched, repeats=7)
    return speedup


def test_guard_batched_ingest():
    """CI guard (quick mode), same run: (1) with 100-record requests the whole pipeline gets >= 8x more
    records per second durably to disk than it accepts with single-record requests (the single-record
    durable figure would carry the 2 s batch timer of the last partial batch; measured 10-25x); (2) the consumer's
    parse is >= 2.5x faster than its exact per-record path (measured 3.6-4.2x with coverage paused, 1x if
    ext/jsonl is not compiled); (3) below.

    (1) catches a receiver or consumer that went per-record Python on the batched path (the single-record
    run is bound by per-request cost, which that barely moves); (2) catches the consumer's C path alone,
    which (1) cannot: in the pipeline the receiver sets the pace and the consumer has 2-3x headroom; (3) the
    receiver's per-batch decode (engine.batch_decode) is >= 1.3x its exact door on 100-record bodies (measured
    1.6-2.1x, 1x record by record), which fails if /ingest's batches went back to record-by-record validation."""
    if WRK is None:
        pytest.fail("wrk is not installed (apt-get install wrk): the batched-ingest guard needs it (.ci/run)")
    single = run_once(records=1, seconds=3)
    batched = run_once(records=RECORDS_PER_BODY, seconds=3)
    speedup = consumer_parse_speedup()
    door = receiver_decode_speedup()
    print(
        f"\n{single.line()}\n{batched.line()}\nbatched durable / single-record accepted "
        f"{batched.durable_per_s / single.accepted_per_s:.1f}x; consumer parse {speedup:.1f}x its exact path; "
        f"receiver's batch path {door:.1f}x its exact door"
    )
    for result in (single, batched):
        assert result.non_2xx == 0, f"{result.non_2xx} requests not accepted"
        assert result.on_disk >= result.accepted, f"accepted {result.accepted:,}, on disk {result.on_disk:,}"
    assert batched.durable_per_s >= 8 * single.accepted_per_s, (
        f"batched {batched.durable_per_s:,.0f} records/s durable, under 8x single-record "
        f"{single.accepted_per_s:,.0f} accepted: a per-record path fell back to Python?"
    )
    assert speedup >= 2.5, f"the consumer's parse is only {speedup:.1f}x its exact path: is ext/jsonl compiled?"
    assert door >= 1.3, f"the receiver's batch path is only {door:.1f}x its exact door: engine.batch_decode lost?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--body", choices=("ndjson", "array", "both"), default="both")
    parser.add_argument("--records", type=int, default=RECORDS_PER_BODY, help="records per request body")
    parser.add_argument("--drain", action="store_true", help="also time the consumer alone on a pre-filled queue")
    args = parser.parse_args()
    if args.drain:
        for _ in range(args.runs):
            records, drain_s, alone, cpu_s = drain_once(seconds=args.duration)
            print(
                f"receiver alone (no consumer) accepted {alone:,.0f} records/s; consumer alone: {records:,} "
                f"records drained and on disk in {drain_s:.2f} s: {records / drain_s:,.0f} records/s, "
                f"CPU {1e6 * cpu_s / max(1, records):.1f} us a record",
                flush=True,
            )
    bodies = ("ndjson", "array") if args.body == "both" else (args.body,)
    results = []
    for _ in range(args.runs):
        for body in bodies:  # alternated, so drift on the shared machine hits both alike
            result = run_once(body=body, records=args.records, seconds=args.duration)
            results.append(result)
            print(result.line(), flush=True)
    for body in bodies:
        durable = sorted(r.durable_per_s for r in results if r.body == body)
        accepted = sorted(r.accepted_per_s for r in results if r.body == body)
        print(
            f"{body}: durable {durable[0]:,.0f}..{durable[-1]:,.0f} rec/s (median {durable[len(durable) // 2]:,.0f}); "
            f"accepted {accepted[0]:,.0f}..{accepted[-1]:,.0f} rec/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
