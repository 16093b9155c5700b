"""``canpipe compact``: a closed hour's raw JSONL -> one Parquet file, deduplicated and sorted.

The rows are read with the aggregator's own scanner (``aggregator.partitions.scan_files``), so a line the
aggregator skips (corrupt, torn tail) is not in the lake either, and deduplicated on the dedup key
(vehicle_id, can_id, timestamp in microseconds) keeping the first copy in file order, as the roll-up does:
the lake's rows are exactly the records the aggregates count.

One file per hour, ``parquet/year=/month=/day=/hour=/part-0.parquet``: zstd, sorted by (vehicle_id,
timestamp, can_id), row groups of ``ROW_GROUP_ROWS``. The raw files it was made from (name and size) are
kept in the file's own key-value metadata: a run finds an hour whose raw files are unchanged up to date and
leaves it alone (compacting twice changes nothing); an hour that got late data since is compacted again as
a whole (raw data is kept, so the new file holds the late rows in their place, not in a side file). The new
file replaces the old one atomically (temp file, fsync, rename, fsync of the folder).

``canpipe aggregate`` reads the file instead of the raw files when its ``canpipe.inputs`` equal the hour's
raw files now (``engine.lake.read``), and writes the same bytes. Two things make that exact: the column
``raw_order`` (each row's position in the raw files as read: the group-by sums a vehicle's values in that
order, and floating-point sums depend on it), and ``canpipe.aggregate`` in the key-value metadata, what the
rows alone do not tell: the input report (files, records read, torn tail bytes, corrupt lines) and the
copies dropped per vehicle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from engine.aggregator.hours import InputFile, fingerprint, hour_inputs, hour_label
from engine.errors import ConfigError
from engine.schema import SIGNALS
from engine.storage import Hour

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET_DIR = "parquet"
PART_NAME = "part-0.parquet"
# rows per row group: large enough for Athena and Spark (a row group is their unit of work and of I/O; 1M rows
# of these 11 columns are ~10 MB compressed, ~90 MB decoded) and many times DuckDB's own 122,880-row unit, so
# DuckDB's threads still split a row group's vectors; an hour at 5,000 records/s (18M rows) is ~18 groups
ROW_GROUP_ROWS = 1 << 20
INPUTS_KEY = b"canpipe.inputs"  # the raw files compacted: [{"file", "bytes"}] as JSON, in the file's metadata
REPORT_KEY = b"canpipe.aggregate"  # ``HourReport`` as JSON: what the aggregate needs beyond the rows
COMPRESSION = "zstd"


@dataclasses.dataclass
class CompactResult:
    hour: str
    path: Path
    rows: int  # records in the file (after dedup)
    duplicates: int  # copies dropped
    raw_records: int  # records read from the raw files
    raw_bytes: int
    parquet_bytes: int
    skipped: bool  # already up to date: nothing written


class HourReport(msgspec.Struct):
    """What an hour's aggregate says about its input that the deduplicated rows cannot: the aggregator's
    ``input`` report of the raw files and the copies it dropped per vehicle (vehicles without copies left
    out)."""

    files: int
    records: int  # records read, copies included
    torn_tail_bytes: int
    corrupt_lines: int
    corrupt_line_locations: list[str]  # the first ``partitions.MAX_REPORTED_CORRUPT``, ``file:line``
    duplicates: dict[str, int]


@dataclasses.dataclass
class HourTable:
    table: pa.Table  # sorted by (vehicle_id, timestamp, can_id), first copy of each record
    report: HourReport


def parquet_path(data_dir: Path, hour: dt.datetime) -> Path:
    h = Hour.from_datetime(hour)
    return (
        Path(data_dir)
        / PARQUET_DIR
        / f"year={h.year:04d}"
        / f"month={h.month:02d}"
        / f"day={h.day:02d}"
        / f"hour={h.hour:02d}"
        / PART_NAME
    )


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - the [lake] extra is installed with [test]
        raise ConfigError("the lake needs pyarrow: pip install 'canpipe[lake]'") from None
    return pa, pq


def schema() -> pa.Schema:
    pa, _ = _pyarrow()
    fields = [
        pa.field("vehicle_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("can_id", pa.string(), nullable=False),
        *(pa.field(name, pa.float64()) for name in SIGNALS),
        pa.field("ingest_received_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # the row's position in the hour's raw files as read (sorted file names, then lines), copies counted
        pa.field("raw_order", pa.int64(), nullable=False),
    ]
    return pa.schema(fields)


def compacted_inputs(path: Path) -> list[InputFile] | None:
    """The raw files a Parquet hour was made from, from its metadata; None when there is no such file."""
    _, pq = _pyarrow()
    if not path.exists():
        return None
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(INPUTS_KEY)
    return msgspec.json.decode(raw, type=list[InputFile]) if raw else None


def hour_table(data_dir: Path, hour: dt.datetime) -> HourTable:
    """The hour's deduplicated rows as an Arrow table sorted by (vehicle_id, timestamp, can_id), and the
    report of what was read and dropped."""
    import numpy as np

    from engine.aggregator.partitions import concatenate, scan_files
    from engine.aggregator.rollup import order

    pa, _ = _pyarrow()
    data_dir = Path(data_dir)
    files = [str(f) for f in hour_inputs(data_dir, hour, warn=True)]
    scan = scan_files(files, str(data_dir / "raw"), 1, None, "compact")
    info = scan.info
    report = HourReport(info.files, info.records, info.torn_tail_bytes, info.corrupt_count, info.corrupt, {})
    if not scan.memory:
        return HourTable(schema().empty_table(), report)
    cols = concatenate(scan.memory)
    # vehicle indices are in order of first appearance: rank them by name so the sort is by vehicle_id
    names = np.array(scan.vehicles, dtype=object)
    by_name = np.argsort(names, kind="stable")
    rank_of = np.empty(len(names), dtype=np.int64)
    rank_of[by_name] = np.arange(len(names))
    vehicle = rank_of[cols.vehicle]
    rows = order(vehicle, cols.can_id, cols.timestamp_us)  # stable: the first copy (file order) comes first
    v, t, c = vehicle[rows], cols.timestamp_us[rows], cols.can_id[rows]
    keep = np.ones(len(rows), dtype=bool)
    keep[1:] = (v[1:] != v[:-1]) | (t[1:] != t[:-1]) | (c[1:] != c[:-1])
    dropped = np.bincount(v[~keep], minlength=len(names))
    sorted_names = names[by_name]
    report.duplicates = {str(sorted_names[k]): int(dropped[k]) for k in np.flatnonzero(dropped).tolist()}
    rows = rows[keep]
    ids, can_index = np.unique(cols.can_id[rows], return_inverse=True)
    can_text = np.array([f"0x{int(i):X}" for i in ids], dtype=object)[can_index]
    arrays = [
        pa.DictionaryArray.from_arrays(
            pa.array(vehicle[rows], pa.int32()),
            pa.array(sorted_names, pa.string()),
        ).cast(pa.string()),
        pa.array(cols.timestamp_us[rows], pa.timestamp("us", tz="UTC")),
        pa.array(can_text, pa.string()),
        *(
            pa.array(cols.values[k, rows], pa.float64(), from_pandas=True) for k in range(len(SIGNALS))
        ),  # from_pandas: NaN (a signal the record does not carry) becomes null
        pa.array(cols.ingest_us[rows], pa.timestamp("us", tz="UTC")),
        pa.array(rows, pa.int64()),  # ``rows`` index the concatenated scan: the position in the raw files
    ]
    return HourTable(pa.Table.from_arrays(arrays, schema=schema()), report)


def _write_atomically(table: pa.Table, path: Path) -> None:
    _, pq = _pyarrow()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
    try:
        with open(tmp, "xb") as out:
            pq.write_table(
                table,
                out,
                compression=COMPRESSION,
                row_group_size=ROW_GROUP_ROWS,
                use_dictionary=["vehicle_id", "can_id"],
                # raw_order rises within a vehicle's time line: deltas pack it in a few bits a row
                column_encoding={"raw_order": "DELTA_BINARY_PACKED"},
                write_statistics=True,
            )
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def compact_hour(data_dir: Path, hour: dt.datetime, *, force: bool = False) -> CompactResult:
    """Compact one hour; skipped (nothing written) when its Parquet file was made from the same raw files."""
    data_dir = Path(data_dir)
    inputs = fingerprint(data_dir, hour_inputs(data_dir, hour))
    out = parquet_path(data_dir, hour)
    raw_bytes = sum(i.bytes for i in inputs)
    if not inputs:
        raise ConfigError(f"no raw data for hour {hour_label(hour)}: nothing to compact")
    if not force and compacted_inputs(out) == inputs:
        return CompactResult(hour_label(hour), out, -1, -1, -1, raw_bytes, out.stat().st_size, True)
    made = hour_table(data_dir, hour)
    report = made.report
    table = made.table.replace_schema_metadata(
        {INPUTS_KEY: msgspec.json.encode(inputs), REPORT_KEY: msgspec.json.encode(report)}
    )
    _write_atomically(table, out)
    dropped = sum(report.duplicates.values())
    return CompactResult(
        hour_label(hour), out, table.num_rows, dropped, report.records, raw_bytes, out.stat().st_size, False
    )


def pending_hours(data_dir: Path, now: dt.datetime) -> list[dt.datetime]:
    """Closed hours whose raw files differ from what their Parquet file was made from (or that have none)."""
    from engine.aggregator.hours import closed_hours

    data_dir = Path(data_dir)
    pending = []
    for hour in closed_hours(data_dir, now):
        inputs = fingerprint(data_dir, hour_inputs(data_dir, hour))
        if inputs and compacted_inputs(parquet_path(data_dir, hour)) != inputs:
            pending.append(hour)
    return pending
