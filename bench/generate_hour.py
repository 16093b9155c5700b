"""Generate one hour of raw files as the consumers write them (for the aggregator benchmark and tests).

Records are seed-shaped and rounded the way decoded CAN signals are (fixed scale factors), every vehicle
reports at a steady period, cycling through the simulator's three CAN ids as a BMS sends its frames:
0x132 the pack (SOC, voltage, current), 0x292 the cell voltages, 0x332 the cell temperatures, so each
signal is present on one id only and the time-ordered integrals skip the other ids' rows. A fraction of
records is duplicated (some in other files, as redelivery does), and files rotate at 5 MB.

``--shape`` writes the lines as another tool would (the aggregator reads any writer's files): ``canpipe``
(the receiver's exact bytes), ``ms`` / ``s`` (timestamps in milliseconds / whole seconds), ``offset``
(``+00:00`` instead of ``Z``), ``keys`` (other key order), ``spaces`` (a space after ``:`` and ``,``),
``absent`` (every signal listed, ``null`` where the frame does not carry it, some carried ones left out),
``extra`` (fields the record does not have on every line, at the top and in the payload: the aggregator
ignores them, as DuckDB's ``read_json`` with explicit columns does; the door would refuse them), or
``mixed`` (each line one of these at random, 1 % with an unknown field).

    python bench/generate_hour.py DATA_DIR --rate 500 --vehicles 1000 --duplicates 0.01 [--hour 2025-10-19T17]
        [--shape canpipe|ms|s|offset|keys|spaces|absent|extra|mixed] [--records N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.schema import SIGNALS, UTC, format_timestamp  # noqa: E402
from engine.simulator import CAN_IDS  # noqa: E402
from engine.storage import Hour, PartitionWriter  # noqa: E402

# the signals each CAN id carries (CAN_IDS order)
FRAMES = (
    ("battery_soc", "battery_voltage", "battery_current"),
    ("cell_voltage_min", "cell_voltage_max"),
    ("cell_temp_min", "cell_temp_max"),
)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_encoder = msgspec.json.Encoder()
SHAPES = ("canpipe", "ms", "s", "offset", "keys", "spaces", "absent", "extra")
MIXED_EXTRA = 0.01  # of a mixed hour's lines carry an unknown field (corrupt lines, rare in practice)


def _stamp(moment: dt.datetime, shape: str) -> str:
    if shape == "ms":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    if shape == "s":
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if shape == "offset":
        return moment.isoformat()  # 2025-10-19T17:00:01.123456+00:00 (no fraction on a whole second)
    return format_timestamp(moment)


def render(record: dict, shape: str, rng: np.random.Generator) -> bytes:
    """One stored line of ``record`` (timestamps as datetimes) the way the writer ``shape`` writes it."""
    ts, ingest = record["timestamp"], record["ingest_received_at"]
    out = {**record, "timestamp": _stamp(ts, shape), "ingest_received_at": _stamp(ingest, shape)}
    if shape == "keys":  # another writer's order: ingest time first, payload before the ids, signals reversed
        payload = dict(reversed(list(out["payload"].items())))
        order = ("ingest_received_at", "payload", "can_id", "timestamp", "vehicle_id")
        out = {k: (payload if k == "payload" else out[k]) for k in order}
    elif shape == "spaces":
        return json.dumps(out).encode() + b"\n"  # ", " and ": " separators
    elif shape == "absent":
        carried = out["payload"]
        dropped = rng.random(len(carried)) < 0.1
        out["payload"] = {
            name: carried.get(name) for name in SIGNALS if not (name in carried and dropped[list(carried).index(name)])
        }
    elif shape == "extra":
        out["source"] = "logger-7"
        out["payload"] = {**out["payload"], "coolant_temp": 21.5}
    return _encoder.encode(out) + b"\n"


def generate(
    data_dir: Path,
    hour: dt.datetime,
    rate: int,
    vehicles: int,
    duplicates: float,
    seed: int = 7,
    shape: str = "canpipe",
    records: int | None = None,
) -> int:
    """Write the hour; ``records`` (default ``rate`` x 3600) lines before duplicates. Returns lines written."""
    if shape not in (*SHAPES, "mixed"):
        raise ValueError(f"shape: one of {', '.join(SHAPES)}, mixed; got {shape!r}")
    rng = np.random.default_rng(seed)
    total = records if records is not None else rate * 3600
    period_us = int(vehicles / rate * 1e6) if records is None else int(vehicles * 3600e6 / total)
    ids = [f"EV-{i:05d}" for i in range(vehicles)]
    soc = rng.uniform(30, 95, vehicles)
    temp = rng.uniform(15, 35, vehicles)
    start_us = int(hour.timestamp() * 1e6)
    writers = [PartitionWriter(data_dir, f"bench{w}") for w in range(2)]
    key = Hour.from_datetime(hour)
    written = 0
    chunk = 50_000
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        index = np.arange(first, first + n)
        vehicle = index % vehicles
        tick = index // vehicles
        ts = start_us + tick * period_us + vehicle * (period_us // max(1, vehicles))
        current = np.round(rng.normal(40, 60, n), 1)
        soc_now = np.clip(soc[vehicle] - tick * 0.0005, 0, 100)
        voltage = np.round(96 * (3.0 + 1.2 * soc_now / 100) - current * 0.07, 1)
        cell = voltage / 96
        spread = np.round(np.abs(rng.normal(0.008, 0.004, n)), 3)
        t = temp[vehicle] + tick * 0.0003
        tspread = np.round(np.abs(rng.normal(1.5, 0.8, n)), 1)
        frame = tick % len(CAN_IDS)
        lines = []
        if shape == "mixed":  # one writer per line, an unknown field now and then
            shapes = rng.choice(SHAPES[:-1], n)
            shapes[rng.random(n) < MIXED_EXTRA] = "extra"
        else:
            shapes = np.full(n, shape)
        for k in range(n):
            stamp = EPOCH + dt.timedelta(microseconds=int(ts[k]))
            signals = {
                "battery_soc": round(float(soc_now[k]), 1),
                "battery_voltage": float(voltage[k]),
                "battery_current": float(current[k]),
                "cell_voltage_min": round(float(cell[k] - spread[k] / 2), 3),
                "cell_voltage_max": round(float(cell[k] + spread[k] / 2), 3),
                "cell_temp_min": round(float(t[k] - tspread[k] / 2), 1),
                "cell_temp_max": round(float(t[k] + tspread[k] / 2), 1),
            }
            record = {
                "timestamp": stamp,
                "vehicle_id": ids[vehicle[k]],
                "can_id": CAN_IDS[frame[k]],
                "payload": {name: signals[name] for name in FRAMES[frame[k]]},
                "ingest_received_at": stamp + dt.timedelta(milliseconds=12),
            }
            lines.append(render(record, str(shapes[k]), rng))
        dup = [lines[k] for k in np.flatnonzero(rng.random(n) < duplicates)]
        writers[0].append(key, lines)
        if dup:
            writers[1].append(key, dup)  # redelivered copies land in another consumer's file
        written += n + len(dup)
    for w in writers:
        w.close()
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--duplicates", type=float, default=0.01)
    parser.add_argument("--hour", default="2025-10-19T17")
    parser.add_argument("--shape", default="canpipe", choices=(*SHAPES, "mixed"))
    parser.add_argument("--records", type=int, help="lines before duplicates (default: rate x 3600)")
    args = parser.parse_args()
    hour = dt.datetime.strptime(args.hour, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    written = generate(
        args.data_dir, hour, args.rate, args.vehicles, args.duplicates, shape=args.shape, records=args.records
    )
    print(f"{written} lines written")
