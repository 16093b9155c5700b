"""Generate one hour of raw files as the consumers write them (for the aggregator benchmark and tests).

Records are seed-shaped and rounded the way decoded CAN signals are (fixed scale factors), every vehicle
reports at a steady period, cycling through the simulator's three CAN ids as a BMS sends its frames:
0x132 the pack (SOC, voltage, current), 0x292 the cell voltages, 0x332 the cell temperatures, so each
signal is present on one id only and the time-ordered integrals skip the other ids' rows. A fraction of
records is duplicated (some in other files, as redelivery does), and files rotate at 5 MB.

    python bench/generate_hour.py DATA_DIR --rate 500 --vehicles 1000 --duplicates 0.01 [--hour 2025-10-19T17]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.schema import UTC, format_timestamp  # noqa: E402
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


def generate(data_dir: Path, hour: dt.datetime, rate: int, vehicles: int, duplicates: float, seed: int = 7) -> int:
    rng = np.random.default_rng(seed)
    total = rate * 3600
    period_us = int(vehicles / rate * 1e6)
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
                "timestamp": format_timestamp(stamp),
                "vehicle_id": ids[vehicle[k]],
                "can_id": CAN_IDS[frame[k]],
                "payload": {name: signals[name] for name in FRAMES[frame[k]]},
                "ingest_received_at": format_timestamp(stamp + dt.timedelta(milliseconds=12)),
            }
            lines.append(_encoder.encode(record) + b"\n")
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
    args = parser.parse_args()
    hour = dt.datetime.strptime(args.hour, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    print(f"{generate(args.data_dir, hour, args.rate, args.vehicles, args.duplicates)} lines written")
