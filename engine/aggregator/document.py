"""The aggregate document of one hour (DESIGN.md "Aggregates"), its bytes, and the atomic write.

The same totals give the same bytes: vehicles sorted by id, keys in a fixed order, times in the one
canonical form of ``engine.schema.format_timestamp``, NaN (no sample) as ``null``.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path

import msgspec
import numpy as np

from engine.aggregator.partitions import InputReport
from engine.aggregator.rollup import STAT, Totals
from engine.schema import SIGNALS, UTC, format_timestamp

EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def micros_timestamp(us: int) -> str:
    """Microseconds since the Unix epoch -> the canonical UTC timestamp text."""
    return format_timestamp(EPOCH + dt.timedelta(microseconds=int(us)))


# years 1000-9999: where numpy's ISO text and strftime's %Y (not zero-padded below 1000) are the same
_FOUR_DIGIT_YEARS = (-30_610_224_000_000_000, 253_402_300_800_000_000)


def micros_timestamps(us: np.ndarray) -> list[str]:
    """``micros_timestamp`` of every element, in one numpy call where the text is the same."""
    if len(us) and (int(us.min()) < _FOUR_DIGIT_YEARS[0] or int(us.max()) >= _FOUR_DIGIT_YEARS[1]):
        return [micros_timestamp(x) for x in us.tolist()]
    return [text + "Z" for text in np.datetime_as_string(us.astype("datetime64[us]"), unit="us").tolist()]


def _numbers(x: np.ndarray) -> list[float | None]:
    """Floats as JSON numbers, NaN (no sample) as null."""
    return [None if v != v else v for v in x.tolist()]


def document(hour: dt.datetime, vehicles: dict[str, int], totals: Totals, info: InputReport) -> dict:
    """The hour's aggregate: ``vehicles`` maps each vehicle id to its index in ``totals``. Built column by
    column (one numpy call per statistic, not one per vehicle): an hour of 10,000 vehicles is 240,000
    numbers."""
    stats = totals.stats
    ids = sorted(vehicles)
    index = np.array([vehicles[v] for v in ids], dtype=np.int64)
    inside = index < stats.groups
    counts = np.zeros(len(ids), dtype=np.int64)
    counts[inside] = stats.records[index[inside]]
    keep = counts > 0
    ids = [v for v, kept in zip(ids, keep.tolist()) if kept]
    index, counts = index[keep], counts[keep]
    minimum, maximum, mean = stats.minimum[:, index], stats.maximum[:, index], stats.mean()[:, index]
    signals = [
        (name, _numbers(minimum[STAT[name]]), _numbers(maximum[STAT[name]]), _numbers(mean[STAT[name]]))
        for name in SIGNALS
    ]
    columns = zip(
        ids,
        counts.tolist(),
        totals.duplicates[index].tolist(),
        micros_timestamps(minimum[STAT["timestamp_us"]].astype(np.int64)),
        micros_timestamps(maximum[STAT["timestamp_us"]].astype(np.int64)),
        _numbers(maximum[STAT["cell_voltage_spread"]]),
        _numbers(maximum[STAT["cell_temp_spread"]]),
        _numbers(totals.soc_last[index] - totals.soc_first[index]),
        totals.charge_ah[index].tolist(),
        totals.energy_kwh[index].tolist(),
    )
    rows = []
    for k, (vehicle_id, count, duplicates, first, last, cv_spread, ct_spread, soc, charge, energy) in enumerate(
        columns
    ):
        entry: dict[str, object] = {"vehicle_id": vehicle_id, "message_count": count}
        for name, low, high, avg in signals:
            entry[name] = {"min": low[k], "max": high[k], "avg": avg[k]}
        entry["duplicates_dropped"] = duplicates
        entry["first_timestamp"] = first
        entry["last_timestamp"] = last
        entry["cell_voltage_spread_max"] = cv_spread
        entry["cell_temp_spread_max"] = ct_spread
        entry["soc_change"] = soc
        entry["charge_throughput_ah"] = charge
        entry["energy_throughput_kwh"] = energy
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
