"""``canpipe compact``: a closed hour's raw JSONL -> Parquet, deduplicated and sorted; late data -> a late file.

The rows are read with the aggregator's own scanner (``aggregator.partitions.scan_files``), so a line the
aggregator skips (corrupt, torn tail) is not in the lake either, and deduplicated on the dedup key
(vehicle_id, can_id, timestamp in microseconds) keeping the first copy in file order, as the roll-up does:
the lake's rows are exactly the records the aggregates count.

The hour's main file, ``parquet/year=/month=/day=/hour=/part-0.parquet``: zstd, sorted by (vehicle_id,
timestamp, can_id), row groups of ``ROW_GROUP_ROWS``. What it was made from is in its own key-value metadata
(``engine.lake.pieces``: the raw files' names and sizes, the records read from each). A run that finds the
hour's raw files as they were compacted leaves it alone (compacting twice changes nothing). New raw files
beside the compacted ones (late data: a redelivery, a consumer that held a batch past the hour) go to a small
``late-<digest>.parquet`` in the same folder: only their rows, deduplicated among themselves and against the
lake's rows, so main + late files hold each record once. The late files are merged into the main file (the
hour compacted again from its raw files, the late files deleted) when the late rows would exceed
``LATE_MAX_FRACTION`` of the hour or there would be more than ``LATE_MAX_FILES`` of them, or when anything
else changed (a compacted raw file grew or is gone), or with ``--force``: a merge costs a full compaction of
the hour, which at every late batch is what made late data expensive. One rare case also merges: a late copy
of a record already in the lake that comes first in file order (its file's name sorts before the kept
copy's), since the aggregator keeps the first copy and the lake must keep the same one. Every file is written
atomically (temp file, fsync, rename, fsync of the folder); a merge writes the main file before it deletes
the late files, and a reader that meets both (their inputs overlap) does not combine them.

``canpipe aggregate`` reads the pieces instead of the raw files when together they were made from exactly
the hour's raw files now (``engine.lake.read``), and writes the same bytes. Two things make that exact: the
column ``raw_order`` (each row's position in its piece's raw files as read: the group-by sums a vehicle's
values in the order of all the hour's raw files, and floating-point sums depend on it), and
``canpipe.aggregate`` in the key-value metadata, what the rows alone do not tell: the input report (files,
records read, torn tail bytes, corrupt lines) and the copies dropped per vehicle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from engine.aggregator.hours import InputFile, fingerprint, hour_inputs, hour_label
from engine.errors import ConfigError
from engine.lake.pieces import (
    INPUTS_KEY,
    MAIN_NAME,
    PARTS_KEY,
    RECORDS_KEY,
    REPORT_KEY,
    Parts,
    Piece,
    covered,
    file_of,
    late_name,
    part_paths,
    read_piece,
)
from engine.schema import SIGNALS
from engine.storage import Hour

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("canpipe.lake")

PARQUET_DIR = "parquet"
PART_NAME = MAIN_NAME
# rows per row group: large enough for Athena and Spark (a row group is their unit of work and of I/O; 1M rows
# of these 11 columns are ~10 MB compressed, ~90 MB decoded) and many times DuckDB's own 122,880-row unit, so
# DuckDB's threads still split a row group's vectors; an hour at 5,000 records/s (18M rows) is ~18 groups
ROW_GROUP_ROWS = 1 << 20
COMPRESSION = "zstd"
# late files are merged into the main file once they would hold more than this share of the hour's rows, or be
# more than this many: a handful of small files costs a reader little, a merge costs a full compaction
LATE_MAX_FRACTION = 0.1
LATE_MAX_FILES = 8
# an hour's main file is split into parts under this size (CANPIPE_LAKE_FILE_BYTES): issue 13's 128-512 MB, the
# size Athena and Spark split a scan by and DuckDB reads with one thread a row group; zstd Parquet of these rows
# is ~9 bytes a record, so an hour reaches it only past ~16,000 records/s
FILE_BYTES = 512 << 20


@dataclasses.dataclass
class CompactResult:
    hour: str
    path: Path  # the file written (the main file, or the late file)
    rows: int  # records in the file (after dedup)
    duplicates: int  # copies dropped
    raw_records: int  # records read from the raw files
    raw_bytes: int
    parquet_bytes: int
    skipped: bool  # already up to date: nothing written
    late: bool = False  # only the new raw files' rows, written to a late file beside the main file
    merged: int = 0  # late files merged into the main file (and deleted)


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
    records: list[int]  # records read from each raw file, in order: ``raw_order`` counts through them


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


def hour_table(data_dir: Path, hour: dt.datetime, files: list[Path] | None = None) -> HourTable:
    """The deduplicated rows of the hour's raw files (or of ``files``, some of them) as an Arrow table sorted
    by (vehicle_id, timestamp, can_id), and the report of what was read and dropped."""
    import numpy as np

    from engine.aggregator.partitions import InputReport, concatenate, scan_files
    from engine.aggregator.rollup import order

    pa, _ = _pyarrow()
    data_dir = Path(data_dir)
    if files is None:
        files = hour_inputs(data_dir, hour, warn=True)
    # one scan per file: the records each file holds place every row in its file (``pieces.global_order``)
    info, records, memory = InputReport(), [], []
    vehicles: dict[str, int] = {}
    for path in files:
        scan = scan_files([str(path)], str(data_dir / "raw"), 1, None, "compact")
        info.add(scan.info)
        records.append(scan.info.records)
        remap = np.array([vehicles.setdefault(v, len(vehicles)) for v in scan.vehicles], dtype=np.int64)
        for cols in scan.memory:
            cols.vehicle = remap[cols.vehicle]
            memory.append(cols)
    report = HourReport(info.files, info.records, info.torn_tail_bytes, info.corrupt_count, info.corrupt, {})
    if not memory:
        return HourTable(schema().empty_table(), report, records)
    cols = concatenate(memory)
    # vehicle indices are in order of first appearance: rank them by name so the sort is by vehicle_id
    names = np.array(list(vehicles), dtype=object)
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
    return HourTable(pa.Table.from_arrays(arrays, schema=schema()), report, records)


def _writer_options() -> dict[str, Any]:
    return {
        "compression": COMPRESSION,
        "use_dictionary": ["vehicle_id", "can_id"],
        # raw_order rises within a vehicle's time line: deltas pack it in a few bits a row
        "column_encoding": {"raw_order": "DELTA_BINARY_PACKED"},
        "write_statistics": True,
    }


def _write_atomically(table: pa.Table, path: Path) -> None:
    _, pq = _pyarrow()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
    try:
        with open(tmp, "xb") as out:
            pq.write_table(table, out, row_group_size=ROW_GROUP_ROWS, **_writer_options())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_bytes() -> int:
    """``CANPIPE_LAKE_FILE_BYTES``: the size a compacted hour's file is split at (default 512 MiB)."""
    text = os.environ.get("CANPIPE_LAKE_FILE_BYTES", "")
    try:
        value = int(text) if text else FILE_BYTES
    except ValueError:
        value = 0
    if value < 1 << 20:
        raise ConfigError(f"CANPIPE_LAKE_FILE_BYTES={text!r}: a size in bytes, at least 1 MiB (default {FILE_BYTES})")
    return value


def _write_parts(table: pa.Table, folder: Path) -> list[Path]:
    """The hour's rows as ``part-0.parquet`` … in row groups of ``ROW_GROUP_ROWS``, split into as few files
    as keep each under ``file_bytes()`` (even shares: an hour of 1.1 targets is two files of 0.55, not one
    and a sliver), sorted on from one part to the next; each file written and fsynced under a temp name, then
    renamed, part-0 last (it names how many parts there are), and parts beyond the new count deleted."""
    _, pq = _pyarrow()
    folder.mkdir(parents=True, exist_ok=True)
    groups = [table.slice(at, ROW_GROUP_ROWS) for at in range(0, table.num_rows, ROW_GROUP_ROWS)] or [table]
    token = secrets.token_hex(6)
    files: list[tuple[Path, Any, Any]] = []  # (temp path, file, writer)
    written, part_bytes, share = 0, 0, float("inf")
    try:
        for k, group in enumerate(groups):
            if not files or part_bytes >= share:
                tmp = folder / f".part-{len(files)}.parquet.{token}"
                out = open(tmp, "xb")  # noqa: SIM115 - closed below, after every part is written
                files.append((tmp, out, pq.ParquetWriter(out, table.schema, **_writer_options())))
                part_bytes = 0
            files[-1][2].write_table(group, row_group_size=ROW_GROUP_ROWS)
            out.flush()
            size = os.fstat(out.fileno()).st_size
            written, part_bytes = written + size - part_bytes, size
            # the hour's size from the row groups so far; cut where even shares of it stay under the target
            total = written / (k + 1) * len(groups)
            average = written / (k + 1)
            share = total / -(-total // file_bytes()) - average / 2
        parts = msgspec.json.encode(Parts(len(files), token))
        for _, out, writer in files:
            writer.add_key_value_metadata({PARTS_KEY: parts})
            writer.close()
            out.flush()
            os.fsync(out.fileno())
            out.close()
        mode = 0o644 & ~_umask()
        finals = [folder / f"part-{n}.parquet" for n in range(len(files))]
        for (tmp, _, _), final in reversed(list(zip(files, finals))):
            os.chmod(tmp, mode)
            os.replace(tmp, final)
    except BaseException:
        for tmp, out, _ in files:
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    for stale in part_paths(folder)[len(finals) :]:  # from an earlier compaction with more parts
        stale.unlink(missing_ok=True)
    _fsync_dir(folder)
    return finals


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_piece(made: HourTable, inputs: list[InputFile], path: Path) -> tuple[pa.Table, list[Path]]:
    """Write the rows with what they were made from: the main file (split at the size target) when ``path``
    is the hour's ``part-0.parquet``, else one late file."""
    table = made.table.replace_schema_metadata(
        {
            INPUTS_KEY: msgspec.json.encode(inputs),
            RECORDS_KEY: msgspec.json.encode(made.records),
            REPORT_KEY: msgspec.json.encode(made.report),
        }
    )
    if path.name == PART_NAME:
        return table, _write_parts(table, path.parent)
    _write_atomically(table, path)
    return table, [path]


def _pieces(out: Path) -> tuple[Piece | None, list[Piece]]:
    """The hour's main file and late files as they are (None: no main file, or one that cannot be read)."""
    from engine.lake.pieces import late_paths

    main = None
    if out.exists():
        try:
            main = read_piece(out)
        except (OSError, ValueError) as exc:  # damaged: compacted again from the raw files
            log.warning("%s cannot be read (%s): compacting the hour again", out, exc, extra={"stage": "compact"})
    lates = []
    for path in late_paths(out.parent):
        try:
            lates.append(read_piece(path))
        except (OSError, ValueError):
            return main, [Piece(path, None, None, None)]  # unknown content: only a merge makes the hour exact
    return main, lates


def _up_to_date(main: Piece | None, lates: list[Piece], inputs: list[InputFile]) -> bool:
    return main is not None and all(p.exact for p in (main, *lates)) and covered([main, *lates]) == inputs


def compact_hour(data_dir: Path, hour: dt.datetime, *, force: bool = False) -> CompactResult:
    """Compact one hour: skipped (nothing written) when its Parquet files were made from the raw files there
    now; the new raw files' rows only, to a late file, when the rest was compacted; else the whole hour."""
    data_dir = Path(data_dir)
    files = hour_inputs(data_dir, hour)
    inputs = fingerprint(data_dir, files)
    out = parquet_path(data_dir, hour)
    raw_bytes = sum(i.bytes for i in inputs)
    if not inputs:
        raise ConfigError(f"no raw data for hour {hour_label(hour)}: nothing to compact")
    main, lates = _pieces(out)
    if not force and main is not None and _up_to_date(main, lates, inputs):
        size = sum(p.stat().st_size for p in [*(main.parts or []), *(p.path for p in lates)])
        return CompactResult(hour_label(hour), out, -1, -1, -1, raw_bytes, size, True)
    if not force and main is not None:
        late = _late(data_dir, hour, main, lates, files, inputs)
        if late is not None:
            return late
    made = hour_table(data_dir, hour, files)
    table, written = _write_piece(made, inputs, out)
    for piece in lates:  # after the main file holds their rows: a crash between leaves overlap, never a gap
        piece.path.unlink(missing_ok=True)
    report = made.report
    return CompactResult(
        hour_label(hour),
        out,
        table.num_rows,
        sum(report.duplicates.values()),
        report.records,
        raw_bytes,
        sum(p.stat().st_size for p in written),
        False,
        merged=len(lates),
    )


def _late(
    data_dir: Path, hour: dt.datetime, main: Piece, lates: list[Piece], files: list[Path], inputs: list[InputFile]
) -> CompactResult | None:
    """Write the rows of the raw files not compacted yet to a late file; None when the hour must be compacted
    whole instead (something other than new files changed, a late file would tip the merge rule, or a late
    copy comes first in file order)."""
    import numpy as np

    pa, pq = _pyarrow()
    pieces = [main, *lates]
    done = covered(pieces)
    if done is None or not all(p.exact for p in pieces):
        return None
    now = {i.file: i for i in inputs}
    if any(now.get(i.file) != i for i in done):  # a compacted file grew or is gone
        return None
    known = {i.file for i in done}
    new = [i for i in inputs if i.file not in known]
    if len(lates) + 1 > LATE_MAX_FILES:
        return None
    made = hour_table(data_dir, hour, [f for f, i in zip(files, inputs) if i.file not in known])
    late_rows = made.table.num_rows + sum(pq.ParquetFile(p.path).metadata.num_rows for p in lates)
    if late_rows > LATE_MAX_FRACTION * sum(pq.ParquetFile(p).metadata.num_rows for p in main.parts or []):
        return None
    table = made.table
    if table.num_rows:
        import pyarrow.compute as pc

        keys = ["vehicle_id", "can_id", "timestamp"]
        late_order = table.column("raw_order").to_numpy()
        late_at = {key: k for k, key in enumerate(zip(*(_plain(table.column(c)) for c in keys)))}
        instants = pc.unique(table.column("timestamp"))
        this = Piece(main.path, new, made.records, None)
        found = []
        for piece in pieces:
            for part in piece.parts or []:
                # the lake rows at the late rows' instants (a hash lookup in C over the column), then the
                # few of them compared whole: cheaper than a join or a filtered dataset read
                rows = pq.ParquetFile(part, read_dictionary=keys[:2]).read(columns=[*keys, "raw_order"])
                rows = rows.filter(pc.is_in(rows.column("timestamp"), value_set=instants))
                candidates = zip(*(_plain(rows.column(c)) for c in [*keys, "raw_order"]))
                hits = [(late_at[key[:3]], key[3]) for key in candidates if key[:3] in late_at]
                if not hits:
                    continue
                late_rows_hit = np.array([h[0] for h in hits], dtype=np.int64)
                late_files = file_of(this, late_order[late_rows_hit])
                lake_files = file_of(piece, np.array([h[1] for h in hits], dtype=np.int64))
                if any(a < b for a, b in zip(late_files, lake_files)):
                    return None  # the raw files keep the late copy, the lake an older one: merge
                found.append(late_rows_hit)
        if found:  # copies of records the lake holds: dropped here, counted as the aggregator counts them
            copies = np.unique(np.concatenate(found))
            keep = np.ones(table.num_rows, dtype=bool)
            keep[copies] = False
            duplicates = made.report.duplicates
            for name in table.column("vehicle_id").take(pa.array(copies)).to_pylist():
                duplicates[name] = duplicates.get(name, 0) + 1
            made.report.duplicates = dict(sorted(duplicates.items()))
            table = table.filter(pa.array(keep))
    made.table = table
    path = main.path.parent / late_name(new)
    _write_piece(made, new, path)
    report = made.report
    return CompactResult(
        hour_label(hour),
        path,
        table.num_rows,
        sum(report.duplicates.values()),
        report.records,
        sum(i.bytes for i in new),
        path.stat().st_size,
        False,
        late=True,
    )


def _plain(column: pa.ChunkedArray) -> list[Any]:
    """A column as Python values, timestamps as integers (microseconds): fast to build and to hash."""
    pa, _ = _pyarrow()
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    return list(column.to_pylist())


def pending_hours(data_dir: Path, now: dt.datetime) -> list[dt.datetime]:
    """Closed hours whose raw files differ from what their Parquet files were made from (or that have none)."""
    from engine.aggregator.hours import closed_hours

    data_dir = Path(data_dir)
    pending = []
    for hour in closed_hours(data_dir, now):
        inputs = fingerprint(data_dir, hour_inputs(data_dir, hour))
        if inputs and not _up_to_date(*_pieces(parquet_path(data_dir, hour)), inputs):
            pending.append(hour)
    return pending
