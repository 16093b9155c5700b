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
from engine.lake.compact import INPUTS_KEY, REPORT_KEY, HourReport, parquet_path
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
    """The hour's vehicles (id -> index), totals and input report from its Parquet file, as the raw files
    ``inputs`` would give them; None when there is no such file or it was not made from ``inputs`` (and
    ``inputs`` is not empty: no raw files left, the Parquet file is all there is)."""
    path = parquet_path(data_dir, hour)
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    from engine.aggregator.partitions import InputReport
    from engine.aggregator.rollup import add_rows, new_totals

    meta = pq.read_schema(path).metadata or {}
    made_from, report = meta.get(INPUTS_KEY), meta.get(REPORT_KEY)
    if report is None or made_from is None:  # made before the report was kept: only the raw files can say
        log.warning("%s has no canpipe.aggregate metadata: not used (compact the hour again)", path)
        return None
    if inputs and msgspec.json.decode(made_from, type=list[InputFile]) != inputs:
        return None  # late data since the compaction: the raw files are newer
    summary = msgspec.json.decode(report, type=HourReport)
    log.info("aggregating %s from %s", hour_label(hour), path, extra={"stage": "aggregate"})
    info = InputReport(
        summary.files,
        summary.records,
        summary.torn_tail_bytes,
        summary.corrupt_line_locations,
        summary.corrupt_lines,
    )
    source = pq.ParquetFile(path)
    # every vehicle id of the file, from the column read as a dictionary (no string a row)
    ids = pq.read_table(path, columns=["vehicle_id"], read_dictionary=["vehicle_id"]).column(0)
    index = {name: k for k, name in enumerate(sorted({n for c in ids.chunks for n in c.dictionary.to_pylist()}))}
    del ids
    totals = new_totals(len(index))
    for rows in _whole_vehicles(source):
        add_rows(_columns(rows, index), totals)  # every row of these vehicles, in the raw files' order
    for name, copies in summary.duplicates.items():  # none left in the file: the compaction's count
        totals.duplicates[index[name]] = copies
    return index, totals, info


def _whole_vehicles(source: pq.ParquetFile) -> Iterator[pa.Table]:
    """The file's rows a row group at a time (bounded memory: ~1M rows), cut so that each piece holds every
    row of its vehicles: the rows of the last vehicle of a group wait for the next group."""
    import pyarrow as pa
    import pyarrow.compute as pc

    carry = None
    for g in range(source.num_row_groups):
        rows = source.read_row_group(g)
        if carry is not None:
            rows = pa.concat_tables([carry, rows])
        if g + 1 < source.num_row_groups and rows.num_rows:
            vehicle = rows.column("vehicle_id")
            cut = pc.index(vehicle, vehicle[-1]).as_py()  # where the group's last vehicle starts
            rows, carry = rows.slice(0, cut), rows.slice(cut)
        else:
            carry = None
        if rows.num_rows:
            yield rows


def _columns(rows: pa.Table, index: dict[str, int]) -> Columns:
    """Rows of whole vehicles as the scanner's columns, back in the order of the raw files (``raw_order``):
    the order the group-by sums a vehicle's values in."""
    import numpy as np
    import pyarrow.compute as pc

    from engine.aggregator.partitions import rows_only

    rows = rows.take(pc.sort_indices(rows, [("raw_order", "ascending")]))
    vehicles = pc.dictionary_encode(rows.column("vehicle_id").combine_chunks())
    vehicle = np.array([index[n] for n in vehicles.dictionary.to_pylist()], dtype=np.int64)
    cans = pc.dictionary_encode(rows.column("can_id").combine_chunks())
    can_id = np.array([int(c, 16) for c in cans.dictionary.to_pylist()], dtype=np.int64)
    values = np.empty((len(SIGNALS), rows.num_rows))
    for k, name in enumerate(SIGNALS):
        values[k] = rows.column(name).to_numpy()  # null (not carried) -> NaN, as the scanner gives it
    return rows_only(
        timestamp_us=_micros(rows, "timestamp"),
        ingest_us=_micros(rows, "ingest_received_at"),
        vehicle=vehicle[vehicles.indices.to_numpy()],
        can_id=can_id[cans.indices.to_numpy()],
        values=values,
    )


def _micros(table: pa.Table, name: str) -> np.ndarray:
    """A timestamp column as int64 microseconds since the epoch, the scanner's unit."""
    import numpy as np
    import pyarrow as pa

    return np.asarray(table.column(name).cast(pa.int64()).to_numpy(), dtype=np.int64)
