"""The aggregate document of one hour (DESIGN.md "Aggregates"), its bytes, and the atomic write.

The same totals give the same bytes: vehicles sorted by id, keys in a fixed order, times in the one
canonical form of ``engine.schema.format_timestamp``, NaN (no sample) as ``null``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import secrets
from pathlib import Path

import msgspec

from engine.aggregator.partitions import InputReport
from engine.aggregator.rollup import STAT, Totals
from engine.schema import SIGNALS, UTC, format_timestamp

EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def micros_timestamp(us: int) -> str:
    """Microseconds since the Unix epoch -> the canonical UTC timestamp text."""
    return format_timestamp(EPOCH + dt.timedelta(microseconds=int(us)))


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def document(hour: dt.datetime, vehicles: dict[str, int], totals: Totals, info: InputReport) -> dict:
    """The hour's aggregate: ``vehicles`` maps each vehicle id to its index in ``totals``."""
    stats = totals.stats
    minimum, maximum, mean = stats.minimum, stats.maximum, stats.mean()
    rows = []
    for vehicle_id, k in sorted(vehicles.items()):
        count = int(stats.records[k]) if k < stats.groups else 0
        if count == 0:
            continue
        entry: dict[str, object] = {"vehicle_id": vehicle_id, "message_count": count}
        for name in SIGNALS:
            s = STAT[name]
            entry[name] = {"min": _number(minimum[s, k]), "max": _number(maximum[s, k]), "avg": _number(mean[s, k])}
        entry["duplicates_dropped"] = int(totals.duplicates[k])
        entry["first_timestamp"] = micros_timestamp(int(minimum[STAT["timestamp_us"], k]))
        entry["last_timestamp"] = micros_timestamp(int(maximum[STAT["timestamp_us"], k]))
        entry["cell_voltage_spread_max"] = _number(maximum[STAT["cell_voltage_spread"], k])
        entry["cell_temp_spread_max"] = _number(maximum[STAT["cell_temp_spread"], k])
        entry["soc_change"] = _number(totals.soc_last[k] - totals.soc_first[k])
        entry["charge_throughput_ah"] = float(totals.charge_ah[k])
        entry["energy_throughput_kwh"] = float(totals.energy_kwh[k])
        rows.append(entry)
    latest = totals.latest_ingest_us
    return {
        # the ingest time of the newest record aggregated: "as of", and the same on every re-run
        "aggregation_timestamp": micros_timestamp(latest) if latest >= 0 else None,
        "time_range": {
            "start": hour.strftime("%Y-%m-%dT%H:00:00Z"),
            "end": (hour + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:00:00Z"),
        },
        "vehicles": rows,
        "input": {
            "files": info.files,
            "records": info.records,
            "duplicates_dropped": int(totals.duplicates.sum()),
            "torn_tail_bytes": info.torn_tail_bytes,
            "corrupt_lines": info.corrupt_count,
            "corrupt_line_locations": info.corrupt,
        },
    }


def encode(doc: dict) -> bytes:
    """The document's bytes: indented JSON and a final newline."""
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: readers see old or new, never half.

    Mode 0644 less the umask, as the raw files (storage.local): whoever may read the raw data may read its
    aggregates (mkstemp's fixed 0600 made them unreadable to the readers of the raw files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
