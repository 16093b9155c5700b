"""Closed days merged into few large files: ``parquet-daily/year=/month=/day=/part-N.parquet``.

An hour's Parquet is ~9 bytes a record, so an hour reaches issue 13's 128 MB only past ~4,000 records/s:
a smaller fleet's lake would be 24 small files a day. Once a day is closed (its last hour closed, 5 min
after midnight UTC), ``canpipe compact`` writes the day's rows, every hour's main and late files together,
as one file (split into even parts under ``CANPIPE_LAKE_FILE_BYTES``, 512 MiB), sorted by (vehicle_id,
timestamp, can_id), with the ``hour`` as a column and no ``raw_order`` (an hour's scan position, which
means nothing across hours). The footer keeps the hourly files it was made from (names and sizes): a day
whose hourly files are as they were is left alone; late data (a late file, a merge) makes the day's file
again on the next run.

Why a tree of its own: DuckDB refuses one glob over files at two depths ("Hive partition mismatch") and an
Athena table partitioned by hour never sees a file at the day level, so a day file cannot sit beside the
hour folders; ``parquet-daily/`` is one more table, partitioned by day (Athena, Glue and Spark prune by
``year``/``month``/``day`` and, within a day, by the ``hour`` column's row-group statistics).
The hourly tree stays complete and is what ``canpipe aggregate`` reads: the daily one is a copy built for
scans (its size is ~4 % of the raw JSONL), and the ``daily`` view of ``canpipe query`` reads it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import msgspec

from engine.aggregator.hours import InputFile
from engine.lake.compact import PARQUET_DIR, _pieces, _pyarrow, _write_parts, parquet_path
from engine.lake.pieces import covered, part_paths
from engine.schema import UTC

log = logging.getLogger("canpipe.lake")

DAILY_DIR = "parquet-daily"
DAILY_INPUTS_KEY = b"canpipe.daily_inputs"  # the hourly files merged: [{"file", "bytes"}] relative to parquet/
CLOSED_AFTER = dt.timedelta(minutes=5)  # as an hour: a day is closed 5 min after it ends


@dataclasses.dataclass
class DayResult:
    day: str
    paths: list[Path]
    rows: int
    hours: int
    parquet_bytes: int
    skipped: bool  # made from the hourly files there now: nothing written
    incomplete: str = ""  # why the day is not merged yet (an hour being merged, unreadable metadata)


def daily_folder(data_dir: Path, day: dt.date) -> Path:
    return Path(data_dir) / DAILY_DIR / f"year={day.year:04d}" / f"month={day.month:02d}" / f"day={day.day:02d}"


def _hour_files(data_dir: Path, day: dt.date) -> tuple[list[tuple[int, list[Path]]], str]:
    """Each compacted hour of ``day`` with its files (main parts, then late files); a reason instead when an
    hour's pieces cannot be combined exactly (a merge was interrupted: its rows would count twice)."""
    hours = []
    for hh in range(24):
        out = parquet_path(data_dir, dt.datetime(day.year, day.month, day.day, hh, tzinfo=UTC))
        if not out.parent.is_dir() or not part_paths(out.parent):
            continue
        main, lates = _pieces(out)
        if main is None or main.parts is None or covered([main, *lates]) is None:
            return [], f"hour {hh:02d}: its Parquet files overlap or are incomplete (canpipe compact repairs it)"
        hours.append((hh, [*main.parts, *(p.path for p in lates)]))
    return hours, ""


def merge_day(data_dir: Path, day: dt.date) -> DayResult:
    """Write the day's file from its hours' Parquet files, unless it was made from them as they are now."""
    pa, pq = _pyarrow()
    data_dir = Path(data_dir)
    label = day.isoformat()
    folder = daily_folder(data_dir, day)
    hours, why = _hour_files(data_dir, day)
    if why or not hours:
        return DayResult(label, [], 0, 0, 0, False, why or "no compacted hour")
    root = data_dir / PARQUET_DIR
    inputs = [InputFile(p.relative_to(root).as_posix(), p.stat().st_size) for _, files in hours for p in files]
    made = _made_from(folder)
    if made == inputs:
        existing = part_paths(folder)
        return DayResult(label, existing, -1, len(hours), sum(p.stat().st_size for p in existing), True)
    tables = []
    for hh, files in hours:
        for path in files:
            table = pq.ParquetFile(path).read().drop_columns(["raw_order"]).replace_schema_metadata(None)
            tables.append(table.append_column("hour", pa.array([hh] * table.num_rows, pa.int8())))
    day_table = pa.concat_tables(tables).sort_by(
        [("vehicle_id", "ascending"), ("timestamp", "ascending"), ("can_id", "ascending")]
    )
    day_table = day_table.replace_schema_metadata({DAILY_INPUTS_KEY: msgspec.json.encode(inputs)})
    written = _write_parts(day_table, folder)
    log.info("merged %s: %d hours, %d rows -> %s", label, len(hours), day_table.num_rows, folder)
    return DayResult(label, written, day_table.num_rows, len(hours), sum(p.stat().st_size for p in written), False)


def _made_from(folder: Path) -> list[InputFile] | None:
    """The hourly files the day's file was made from; None when there is none, or its parts are not whole."""
    _, pq = _pyarrow()
    parts = part_paths(folder)
    if not parts:
        return None
    try:
        metadata: dict[bytes, Any] = pq.read_schema(parts[0]).metadata or {}
        from engine.lake.pieces import read_piece

        if read_piece(parts[0]).parts is None:  # a part missing or left from another merge
            return None
        return msgspec.json.decode(metadata[DAILY_INPUTS_KEY], type=list[InputFile])
    except (OSError, ValueError, KeyError, msgspec.DecodeError):
        return None


def closed_days(data_dir: Path, now: dt.datetime) -> list[dt.date]:
    """Every day with a compacted hour that ended at least ``CLOSED_AFTER`` before ``now``."""
    root = Path(data_dir) / PARQUET_DIR
    days = set()
    for folder in root.glob("year=*/month=*/day=*") if root.is_dir() else ():
        try:
            year, month, day = (int(p.name.split("=", 1)[1]) for p in (folder.parent.parent, folder.parent, folder))
            date = dt.date(year, month, day)
        except (IndexError, ValueError):
            continue
        if dt.datetime(date.year, date.month, date.day, tzinfo=UTC) + dt.timedelta(days=1) + CLOSED_AFTER <= now:
            days.add(date)
    return sorted(days)


def pending_days(data_dir: Path, now: dt.datetime) -> list[dt.date]:
    """Closed days whose file is missing or was made from other hourly files than there are now."""
    pending = []
    for day in closed_days(data_dir, now):
        hours, why = _hour_files(data_dir, day)
        root = Path(data_dir) / PARQUET_DIR
        inputs = [InputFile(p.relative_to(root).as_posix(), p.stat().st_size) for _, files in hours for p in files]
        if why or _made_from(daily_folder(data_dir, day)) != inputs:
            pending.append(day)
    return pending
