"""An hour's aggregate from its Parquet file (``canpipe compact``) instead of its raw JSONL, the same bytes.

``aggregate_hour`` asks ``hour_totals`` first. The Parquet file is used when it was made from exactly the
hour's raw files now (its ``canpipe.inputs`` equal their names and sizes): otherwise the raw files are newer
(late data since the compaction) and the aggregator reads them. An hour whose raw files are all gone (the
lake kept as the long-term form, the raw hour deleted after compaction) is aggregated from the Parquet file
alone, with the input report of the raw files it was made from; ``canpipe aggregate --hour H`` does that,
while ``aggregate`` without ``--hour`` only looks at hours that have raw files.

The rows are put back in the order they were read from the raw files (``raw_order``) and rolled up by the
aggregator's own ``rollup.add_rows``: the group-by sums a vehicle's values in that order, as from the raw
files, so the means come out the same to the last bit. The file is read a row group (~1M rows) at a time, each
piece cut to whole vehicles (the file is sorted by vehicle), so memory stays bounded however large the
hour. The copies the compaction dropped and the input report come from the file's ``canpipe.aggregate``
metadata.

Nothing here imports pyarrow or numpy unless the hour has a Parquet file: ``canpipe aggregate`` over raw
data alone starts as fast as before.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from engine.aggregator.hours import InputFile, hour_label
from engine.lake.compact import HourReport, parquet_path
from engine.lake.pieces import covered, global_order, late_paths, merged_report, position, read_piece
from engine.schema import SIGNALS

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.aggregator.partitions import InputReport
    from engine.aggregator.rollup import Totals
    from engine.kernels.jsonl import Columns

log = logging.getLogger("canpipe.lake")


def hour_totals(
    data_dir: Path, hour: dt.datetime, inputs: list[InputFile]
) -> tuple[dict[str, int], Totals, InputReport] | None:
    """The hour's vehicles (id -> index), totals and input report from its Parquet files, as the raw files
    ``inputs`` would give them; None when there is no such file or they were not made from ``inputs`` (and
    ``inputs`` is not empty: no raw files left, the Parquet files are all there is)."""
    path = parquet_path(data_dir, hour)
    if not path.exists():
        return None
    try:
        return _from_parquet(path, hour, inputs)
    except (ImportError, OSError, ValueError, msgspec.MsgspecError) as exc:  # ArrowInvalid is a ValueError
        if not inputs:  # nothing else to read the hour from
            raise
        log.warning(
            "%s cannot be read (%s: %s): the raw files are read instead",
            path,
            type(exc).__name__,
            exc,
            extra={"stage": "aggregate"},
        )
        return None


def _from_parquet(
    path: Path, hour: dt.datetime, inputs: list[InputFile]
) -> tuple[dict[str, int], Totals, InputReport] | None:
    import pyarrow.parquet as pq

    from engine.aggregator.partitions import MAX_REPORTED_CORRUPT, InputReport
    from engine.aggregator.rollup import add_rows, new_totals

    main = read_piece(path)
    lates = [read_piece(p) for p in late_paths(path.parent)]
    pieces = [main, *lates]
    if main.report is None or main.inputs is None or any(p.report is None for p in lates):
        # made before the report was kept: only the raw files can say
        log.warning("%s has no canpipe.aggregate metadata: not used (compact the hour again)", path)
        return None
    if main.parts is None:  # a part missing or left from another compaction: the rows are not one hour's
        if not inputs:
            raise ValueError(f"{path.parent}: the main file's parts do not match; compact the hour again")
        return None
    if lates and not all(p.exact for p in pieces):
        if not inputs:
            raise ValueError(f"{path}: late files without their raw files' record counts; compact the hour again")
        return None  # the pieces cannot be put back in the raw files' order: the raw files can
    made_from = covered(pieces)
    if made_from is None:  # a late file an interrupted merge left behind beside the main file
        if not inputs:
            raise ValueError(f"{path.parent}: late files overlap the main file; compact the hour again")
        return None
    if inputs and made_from != inputs:
        return None  # late data since the compaction: the raw files are newer
    summary = merged_report(
        [msgspec.json.decode(p.report or b"", type=HourReport) for p in pieces], MAX_REPORTED_CORRUPT
    )
    log.info("aggregating %s from %s", hour_label(hour), path, extra={"stage": "aggregate"})
    info = InputReport(
        summary.files,
        summary.records,
        summary.torn_tail_bytes,
        summary.corrupt_line_locations,
        summary.corrupt_lines,
    )
    # ids and CAN ids read as dictionaries: one string per distinct value, not per row
    sources = [pq.ParquetFile(part, read_dictionary=["vehicle_id", "can_id"]) for part in main.parts]
    late = [pq.read_table(p.path, read_dictionary=["vehicle_id", "can_id"]) for p in lates]
    names = {n for source in sources for n in _names(source.read(columns=["vehicle_id"]), "vehicle_id")}
    for table in late:
        names.update(_names(table, "vehicle_id"))
    index = {name: k for k, name in enumerate(sorted(names))}
    totals = new_totals(len(index))
    if lates:
        orders = global_order(pieces)
        late_rows = _with_order(late, orders[1:], index)
        for rows, vehicle, order in _with_late(_whole_vehicles(sources, index), orders[0], late_rows):
            add_rows(_columns(rows, vehicle, order), totals)
    else:
        for rows, vehicle in _whole_vehicles(sources, index):
            add_rows(_columns(rows, vehicle, rows.column("raw_order").to_numpy()), totals)
    for name, copies in summary.duplicates.items():  # none left in the files: the compactions' count
        totals.duplicates[index[name]] = copies
    return index, totals, info


def _with_order(
    tables: list[pa.Table], orders: list[tuple[np.ndarray, np.ndarray]], index: dict[str, int]
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The late files' rows as one table sorted by vehicle, with each row's vehicle index and place in the
    scan of every raw file of the hour."""
    import numpy as np
    import pyarrow as pa

    table = pa.concat_tables(tables)
    vehicle = _dictionary_codes(table.column("vehicle_id"), [index[n] for n in _names(table, "vehicle_id")])
    order = np.concatenate(
        [position(o, t.column("raw_order").to_numpy()) for o, t in zip(orders, tables)] or [np.zeros(0, np.int64)]
    )
    by_vehicle = np.argsort(vehicle, kind="stable")
    return table.take(pa.array(by_vehicle)), vehicle[by_vehicle], order[by_vehicle]


def _with_late(
    main: Iterator[tuple[pa.Table, np.ndarray]],
    main_order: tuple[np.ndarray, np.ndarray],
    late: tuple[pa.Table, np.ndarray, np.ndarray],
) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray]]:
    """The main file's pieces of whole vehicles, each joined by the late rows of its vehicles and of the
    vehicles between it and the piece before (late rows of vehicles past the last piece come last): every
    vehicle's rows in one piece, with each row's place in the scan of all the hour's raw files."""
    import numpy as np
    import pyarrow as pa

    late_rows, late_vehicle, late_order = late
    taken = 0
    for rows, vehicle in main:
        upto = int(np.searchsorted(late_vehicle, vehicle[-1], side="right"))
        order = position(main_order, rows.column("raw_order").to_numpy())
        if upto > taken:
            rows = pa.concat_tables([rows, late_rows.slice(taken, upto - taken)])
            vehicle = np.concatenate([vehicle, late_vehicle[taken:upto]])
            order = np.concatenate([order, late_order[taken:upto]])
            taken = upto
        yield rows, vehicle, order
    if taken < late_rows.num_rows:
        yield late_rows.slice(taken), late_vehicle[taken:], late_order[taken:]


def _whole_vehicles(sources: list[pq.ParquetFile], index: dict[str, int]) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The main file's rows (its parts one after the other) a row group at a time (bounded memory: ~1M rows),
    cut so that each piece holds every row of its vehicles (the rows of the last vehicle of a group wait for
    the next group, in the next part if need be), with each row's vehicle index."""
    import numpy as np
    import pyarrow as pa

    groups = [(source, g) for source in sources for g in range(source.num_row_groups)]
    carry = None
    for n, (source, g) in enumerate(groups):
        rows = source.read_row_group(g)
        if carry is not None:
            rows = pa.concat_tables([carry, rows])
        vehicle = _dictionary_codes(rows.column("vehicle_id"), [index[v] for v in _names(rows, "vehicle_id")])
        if n + 1 < len(groups) and rows.num_rows:
            cut = int(np.searchsorted(vehicle, vehicle[-1]))  # sorted by vehicle: where the last one starts
            rows, carry, vehicle = rows.slice(0, cut), rows.slice(cut), vehicle[:cut]
        else:
            carry = None
        if rows.num_rows:
            yield rows, vehicle


def _names(rows: pa.Table, column: str) -> list[str]:
    """The distinct values of a dictionary column over all its chunks (each chunk has its own dictionary)."""
    return [n for c in rows.column(column).chunks for n in c.dictionary.to_pylist()]


def _dictionary_codes(column: pa.ChunkedArray, codes: list[int]) -> np.ndarray:
    """Each row's code: ``codes`` lists the code of every dictionary entry, chunk after chunk."""
    import numpy as np

    out, base = [], 0
    table = np.array(codes, dtype=np.int64)
    for chunk in column.chunks:
        out.append(table[base + chunk.indices.to_numpy()])
        base += len(chunk.dictionary)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _columns(rows: pa.Table, vehicle: np.ndarray, order: np.ndarray) -> Columns:
    """Rows of whole vehicles as the scanner's columns, back in the order of the raw files (``order``: each
    row's place in them): the order the group-by sums a vehicle's values in."""
    import numpy as np

    from engine.aggregator.partitions import rows_only

    back = np.argsort(order)
    can_id = _dictionary_codes(rows.column("can_id"), [int(c, 16) for c in _names(rows, "can_id")])
    values = np.empty((len(SIGNALS), rows.num_rows))
    for k, name in enumerate(SIGNALS):
        values[k] = rows.column(name).to_numpy()[back]  # null (not carried) -> NaN, as the scanner gives it
    return rows_only(
        timestamp_us=_micros(rows, "timestamp")[back],
        ingest_us=_micros(rows, "ingest_received_at")[back],
        vehicle=vehicle[back],
        can_id=can_id[back],
        values=values,
    )


def _micros(table: pa.Table, name: str) -> np.ndarray:
    """A timestamp column as int64 microseconds since the epoch, the scanner's unit."""
    import numpy as np
    import pyarrow as pa

    return np.asarray(table.column(name).cast(pa.int64()).to_numpy(), dtype=np.int64)
