"""POST /ingest/can beside POST /ingest: the same receiver, the same run, 100 per request, under wrk.

Starts ``canpipe serve --workers 1`` with the project's own DBC (``CANPIPE_DBC``) on a fresh embedded queue
and drives it with wrk (``-t1 -c16``) in alternation: a Lua script posting JSON arrays of 100 decoded
records to ``/ingest``, then 100 raw frames (the own DBC's four pages in turn: a big-endian signal, a
29-bit id, both multiplexer pages) to ``/ingest/can``, each with fresh timestamps. The figure is accepted
records (frames) per second: 202 answers x 100 / wrk's duration. No consumer runs: this measures the
door (decode, DBC decode, validation, group commit into the queue), which is where the two routes differ.

    flock /tmp/canpipe-bench.lock .venv/bin/python bench/bench_ingest_can.py --duration 10 --runs 3

The CI guard (quick mode, 3 s per route) asks that /ingest/can takes at least 0.3x /ingest's records per
second in the same run (measured 0.59-0.74 on this shared 2-core machine, wrk included). It catches a door
that became several times slower per frame (the DBC loaded per request, a decode or validation per frame
in Python growing with the frame count); it is no guard of the decoder's own speed, which the per-request
costs of HTTP, Starlette and the group commit hide at 100 frames a request: bench/bench_can_decode.py
guards that.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wrk import WRK, run_wrk  # noqa: E402

from engine.can.codec import DEFAULT_DBC, CanCodec  # noqa: E402
from engine.can.simulate import FrameEncoder  # noqa: E402
from engine.launch import free_port, healthy, start_command, stop, wait_until  # noqa: E402

PER_REQUEST = 100
GUARD_RATIO = 0.3

# The body is rebuilt once per second of wall clock (fresh client timestamps inside the receiver's clock
# window, without spending wrk's CPU on JSON per request).
LUA = r"""
local per, key, can, pages = __PER__, "__KEY__", __CAN__, {__PAGES__}
local second, request_bytes = -1, nil
local function body(now)
  local stamp = os.date("!%Y-%m-%dT%H:%M:%S", now)
  local items = {}
  for i = 0, per - 1 do
    if can then
      local page = pages[i % #pages + 1]
      items[#items + 1] = string.format(
        '{"timestamp":"%s.%06dZ","vehicle_id":"EV-%05d","can_id":"%s","data":"%s"}',
        stamp, i * 1000, i % 50, page[1], page[2])
    else
      items[#items + 1] = string.format(
        '{"timestamp":"%s.%06dZ","vehicle_id":"EV-%05d","can_id":"0x%X","payload":{"battery_soc":%.1f,' ..
        '"battery_voltage":%.1f,"battery_current":%.1f,"cell_voltage_min":3.61,"cell_voltage_max":3.74,' ..
        '"cell_temp_min":21.5,"cell_temp_max":27.0}}',
        stamp, i * 1000, i % 50, 256 + i % 8, 20 + i % 80, 350 + i % 50, i % 200 - 100)
    end
  end
  return "[" .. table.concat(items, ",") .. "]"
end
request = function()
  local now = os.time()
  if now ~= second then
    second = now
    request_bytes = wrk.format("POST", nil, {["X-API-Key"] = key, ["Content-Type"] = "application/json"}, body(now))
  end
  return request_bytes
end
done = function(summary, latency, requests)
  io.write(string.format("WRKJSON {\"requests\":%d,\"duration_us\":%d,\"non2xx\":%d,\"p50_us\":%d,\"p99_us\":%d}\n",
    summary.requests, summary.duration, summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


def _pages() -> list[tuple[str, str]]:
    """The own DBC's frames of one simulated tick: (can_id, hex data)."""
    values = {
        "battery_soc": 64.5,
        "battery_voltage": 388.4,
        "battery_current": 55.5,
        "cell_voltage_min": 3.801,
        "cell_voltage_max": 3.8123,
        "cell_temp_min": 21.5,
        "cell_temp_max": 24.25,
    }
    frames = FrameEncoder(CanCodec.load(DEFAULT_DBC)).frames(values)
    return [(f"0x{frame_id:X}", data.hex()) for frame_id, data in frames]


def drive(url: str, route: str, key: str, seconds: float, workdir: Path) -> dict:
    """One wrk run against ``url + route``; its counts and latency (wrk's JSON line)."""
    script = workdir / f"post{route.replace('/', '-')}.lua"
    script.write_text(
        LUA.replace("__PER__", str(PER_REQUEST))
        .replace("__KEY__", key)
        .replace("__CAN__", "true" if route == "/ingest/can" else "false")
        .replace("__PAGES__", ", ".join(f'{{"{can_id}", "{data}"}}' for can_id, data in _pages()))
    )
    stats = run_wrk(url + route, script, seconds, 16)
    stats["per_s"] = (stats["requests"] - stats["non2xx"]) * PER_REQUEST / (stats["duration_us"] / 1e6)
    return stats


def measure(seconds: float, runs: int) -> list[tuple[str, dict]]:
    """``runs`` alternations of /ingest and /ingest/can against one receiver."""
    if WRK is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="canpipe-ingest-can-"))
    key = f"bench:{secrets.token_hex(8)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "CANPIPE_DATA_DIR": str(workdir),
        "CANPIPE_API_KEYS": key,
        "CANPIPE_QUEUE_URL": f"sqlite:///{workdir / 'queue.db'}",
        "CANPIPE_DBC": str(DEFAULT_DBC),
        "CANPIPE_LOG_LEVEL": "WARNING",
    }
    server = start_command(["serve", "--port", str(port), "--workers", "1"], env)
    results = []
    try:
        if not wait_until(lambda: healthy(url), 30):
            raise RuntimeError("the receiver did not become healthy within 30 s")
        for _ in range(runs):
            for route in ("/ingest", "/ingest/can"):
                stats = drive(url, route, key, seconds, workdir)
                results.append((route, stats))
                print(
                    f"{route:<12} {stats['per_s']:>9,.0f} records/s  HTTP P50 {stats['p50_us'] / 1000:.1f} ms "
                    f"P99 {stats['p99_us'] / 1000:.1f} ms  non-2xx {stats['non2xx']}",
                    flush=True,
                )
    finally:
        stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def test_guard_ingest_can():
    """CI guard (quick mode): /ingest/can accepts >= 0.3x /ingest's records/s, same receiver, same run."""
    if WRK is None:
        pytest.fail("wrk is not installed (apt-get install wrk): the /ingest/can guard needs it (.ci/run)")
    (_, plain), (_, can) = measure(3.0, 1)
    assert plain["non2xx"] == 0 and can["non2xx"] == 0
    assert can["per_s"] >= GUARD_RATIO * plain["per_s"], (
        f"/ingest/can {can['per_s']:,.0f} frames/s under {GUARD_RATIO:g} x /ingest's {plain['per_s']:,.0f} records/s: "
        "did the frame decode fall back to per-frame Python?"
    )


def door_costs(rounds: int = 3, repeat: int = 300) -> dict[str, list[float]]:
    """In process, without HTTP: microseconds a frame (record) of the door's work on a 100-item body, per
    round: /ingest/can with the batch decoder, the same with cantools decoding frame by frame, /ingest."""
    import datetime as dt
    import time

    import numpy as np

    from engine.can.frame import decode_frames, format_frame_id
    from engine.can.ingest import decode_payloads, encode_can_records
    from engine.schema import decode_records, encode_stored

    class PerFrameCantools:  # the reference: cantools' decode of each frame, NaN where it gives no value
        def __init__(self, database):
            self.database = database

        def decode(self, frame_id, datas):
            message = self.database.get_message_by_frame_id(frame_id)
            out = {s.name: np.full(len(datas), np.nan) for s in message.signals}
            for index, data in enumerate(datas):
                for name, value in message.decode(data, decode_choices=False).items():
                    out[name][index] = value
            return out

    fast = CanCodec.load(DEFAULT_DBC)
    slow = CanCodec.load(DEFAULT_DBC)
    slow.decoder = PerFrameCantools(slow.database)  # type: ignore[assignment]
    now = dt.datetime.now(dt.UTC)
    stamp = now.isoformat().replace("+00:00", "Z")
    pages = _pages()
    frames = [
        {"timestamp": stamp, "vehicle_id": f"EV-{i % 50:05d}", "can_id": pages[i % 4][0], "data": pages[i % 4][1]}
        for i in range(PER_REQUEST)
    ]
    records = [
        {"timestamp": stamp, "vehicle_id": f"EV-{i % 50:05d}", "can_id": "0x132", "payload": {"battery_soc": 50.0}}
        for i in range(PER_REQUEST)
    ]
    can_body, plain_body = json.dumps(frames).encode(), json.dumps(records).encode()

    def door(codec: CanCodec) -> bytes:
        decoded = decode_frames(can_body, ndjson=False)
        ids, payloads = decode_payloads(codec, decoded)
        rows = [
            {"timestamp": f.timestamp, "vehicle_id": f.vehicle_id, "can_id": format_frame_id(n), "payload": p}
            for f, n, p in zip(decoded, ids, payloads)
        ]
        return encode_can_records(rows, now, codec.dbc_ref)

    ways = {
        "/ingest/can": lambda: door(fast),
        "/ingest/can, cantools per frame": lambda: door(slow),
        "/ingest": lambda: encode_stored(decode_records(plain_body, ndjson=False), now),
    }
    costs: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():  # alternated: drift on the shared machine hits every way alike
            way()
            started = time.perf_counter()
            for _ in range(repeat):
                way()
            costs[name].append((time.perf_counter() - started) / repeat / PER_REQUEST * 1e6)
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load per route and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-process", action="store_true", help="the door's cost a frame without HTTP")
    args = parser.parse_args()
    if args.in_process:
        for name, costs in door_costs(args.runs).items():
            print(f"{name:<32} " + "  ".join(f"{c:5.1f}" for c in costs) + " us a frame (record)")
        return 0
    results = measure(args.duration, args.runs)
    for route in ("/ingest", "/ingest/can"):
        rates = sorted(stats["per_s"] for r, stats in results if r == route)
        print(f"{route}: {rates[0]:,.0f}..{rates[-1]:,.0f} records/s (median {rates[len(rates) // 2]:,.0f})")
    ratios = [can["per_s"] / plain["per_s"] for (_, plain), (_, can) in zip(results[::2], results[1::2])]
    print("ratio /ingest/can : /ingest per run: " + ", ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
