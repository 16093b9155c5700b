"""Hourly aggregation, the driver: one hour of raw JSONL -> per-vehicle statistics, exact under duplicates
and late data.

Reads the hour's files in chunks (bounded memory) into the scanner's named columns, spreads the rows over
hash partitions by vehicle (``partitions``, spilled to disk when the hour is large), rolls each partition
up (``rollup``) and writes the document (``document``) atomically, byte-identical for the same input,
with a manifest of the inputs (``hours``) that tells when late data calls for a re-run. The aggregator
reads files, never the queue.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from engine.aggregator.hours import (
    Manifest,
    closed_hours,
    fingerprint,
    hour_inputs,
    hour_label,
    manifest_path,
    needs_aggregation,
    next_run,
    output_path,
)
from engine.errors import StorageError
from engine.schema import UTC

if TYPE_CHECKING:
    import concurrent.futures

    import numpy as np

    from engine.aggregator.rollup import Totals

# numpy, the kernels and the process pool are imported where an hour is aggregated, not with this module:
# ``canpipe aggregate`` with nothing pending (a cron job's usual run) never loads them

log = logging.getLogger("canpipe.aggregator")

PARTITION_INPUT_BYTES = 320 * 1024 * 1024  # JSON per partition: ~1.1M rows, ~100 MB of columns
PARALLEL_FROM_BYTES = 256 * 1024 * 1024  # smaller hours: one process, in memory (~900k rows)
MAX_WORKERS = 8


class HourResult(msgspec.Struct):
    hour: str
    path: str
    vehicles: int
    records: int
    duplicates_dropped: int
    files: int
    torn_tail_bytes: int
    corrupt_lines: int


class HourFailure(msgspec.Struct):
    """An hour that could not be aggregated, and why (``aggregate_pending`` went on with the others)."""

    hour: str
    error: str


def _partition_job(spill_dir: str, p: int, tags: list[str], remaps: list[np.ndarray], groups: int) -> Totals:
    """Totals of partition ``p``: every scan's rows for it, in file order, with global vehicle indices."""
    from engine.aggregator.partitions import concatenate, load_partition
    from engine.aggregator.rollup import add_rows, new_totals

    pieces = []
    for tag, remap in zip(tags, remaps):
        cols = load_partition(Path(spill_dir), p, tag)
        if cols is not None:
            cols.vehicle = remap[cols.vehicle]
            pieces.append(cols)
    totals = new_totals(groups)
    if pieces:
        add_rows(concatenate(pieces), totals)
    return totals


def aggregate_hour(data_dir: Path, hour: dt.datetime) -> HourResult:
    """Aggregate one hour; write ``aggregated/aggregated-<hour>.json`` and its manifest.

    Small hours run in this process, in memory. Large ones are scanned by one process per core, each
    over a contiguous block of the (sorted) files, into partition files; then one process per core
    aggregates partitions. Rows of a vehicle are always summed in file order, so the bytes written do
    not depend on the number of processes or partitions.
    """
    import shutil
    import tempfile

    # no BLAS call anywhere in the aggregator: OpenBLAS's thread pool, started by numpy's import, only
    # spins (50-90 ms of CPU per one-shot run, measured). Effective when numpy is not loaded yet, as in
    # ``canpipe aggregate``; an explicit setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy as np

    from engine.aggregator.document import document, encode, write_atomically
    from engine.aggregator.partitions import InputReport, concatenate, scan_files
    from engine.aggregator.rollup import add_rows, merge_totals, new_totals
    from engine.lake.read import hour_totals

    data_dir = Path(data_dir)
    files = hour_inputs(data_dir, hour, warn=True)
    inputs = fingerprint(data_dir, files)
    total_bytes = sum(i.bytes for i in inputs)
    lake = hour_totals(data_dir, hour, inputs)  # from the hour's Parquet file when made from these raw files
    if lake is not None:
        files, total_bytes = [], 0  # nothing to scan
    large = total_bytes >= PARALLEL_FROM_BYTES
    count = max(1, math.ceil(total_bytes / PARTITION_INPUT_BYTES)) if large else 1
    workers = min(os.cpu_count() or 1, MAX_WORKERS) if large else 1
    raw = str(data_dir / "raw")
    spill = Path(tempfile.mkdtemp(prefix="canpipe-aggregate-", dir=data_dir)) if count > 1 or workers > 1 else None
    try:
        blocks = _blocks([str(f) for f in files], [i.bytes for i in inputs], workers)
        tags = [f"s{k}" for k in range(len(blocks))]
        jobs = [(block, raw, count, str(spill) if spill else None, tag) for block, tag in zip(blocks, tags)]
        with _pool(workers) as pool:
            scans = list(pool.map(scan_files, *zip(*jobs))) if jobs else []
            names = sorted({name for scan in scans for name in scan.vehicles})
            index = {name: k for k, name in enumerate(names)}
            remaps = [np.array([index[n] for n in scan.vehicles], dtype=np.int64) for scan in scans]
            info = InputReport()
            for scan in scans:
                info.add(scan.info)
            totals = new_totals(len(names))
            if spill is None:
                pieces = []
                for scan, remap in zip(scans, remaps):
                    for cols in scan.memory:
                        cols.vehicle = remap[cols.vehicle]
                        pieces.append(cols)
                    scan.memory = []
                if pieces:
                    columns = concatenate(pieces)
                    del pieces  # the chunks are copied: free them before the sort
                    add_rows(columns, totals)
            else:
                parts = pool.map(
                    _partition_job,
                    [str(spill)] * count,
                    range(count),
                    [tags] * count,
                    [remaps] * count,
                    [len(names)] * count,
                )
                for part in parts:
                    merge_totals(totals, part)
    except OSError as exc:
        raise StorageError(f"aggregating {hour_label(hour)}: {exc}") from exc
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    if lake is not None:
        index, totals, info = lake
    doc = document(hour, index, totals, info)
    body = encode(doc)
    out = output_path(data_dir, hour)
    write_atomically(out, body)
    write_atomically(manifest_path(data_dir, hour), msgspec.json.encode(Manifest(hour_label(hour), inputs, len(body))))
    return HourResult(
        hour_label(hour),
        str(out),
        len(doc["vehicles"]),
        info.records,
        doc["input"]["duplicates_dropped"],
        info.files,
        info.torn_tail_bytes,
        info.corrupt_count,
    )


def _blocks(paths: list[str], sizes: list[int], workers: int) -> list[list[str]]:
    """Contiguous blocks of the sorted files, of about equal bytes, one per worker."""
    if workers <= 1 or len(paths) <= 1:
        return [paths] if paths else []
    target = sum(sizes) / workers
    blocks: list[list[str]] = [[]]
    filled = 0
    for path, size in zip(paths, sizes):
        if filled >= target * len(blocks) and len(blocks) < workers:
            blocks.append([])
        blocks[-1].append(path)
        filled += size
    return blocks


class _InProcess:
    """The executor interface, run in this process (small hours: no start-up cost)."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        return map(fn, *iterables)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _pool(workers: int) -> concurrent.futures.Executor | _InProcess:
    if workers <= 1:
        return _InProcess()
    import concurrent.futures
    import multiprocessing

    # fork: the workers start at once with everything imported (the aggregator runs no threads of its own)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def aggregate_isolated(data_dir: Path, hour: dt.datetime) -> HourResult | HourFailure:
    """``aggregate_hour``, with any failure logged (traceback included) and returned, not raised."""
    try:
        return aggregate_hour(data_dir, hour)
    except Exception as exc:  # any failure of one hour: the caller goes on with the others
        log.error(
            "aggregating %s failed, going on with the other hours",
            hour_label(hour),
            exc_info=True,
            extra={"stage": "aggregate", "hour": hour_label(hour)},
        )
        return HourFailure(hour_label(hour), f"{type(exc).__name__}: {exc}")


def aggregate_pending(
    data_dir: Path, now: dt.datetime | None = None, on_hour: Callable[[int, int, str], None] | None = None
) -> list[HourResult | HourFailure]:
    """Every closed hour not yet aggregated, or whose input changed since. Hours are isolated: one that
    fails (unreadable file, a bug on odd data) is logged and reported as an ``HourFailure``, and the later
    hours are still aggregated; it is tried again on the next run, since it has no manifest.
    ``on_hour(index, count, label)``: called before each closed hour is looked at (the cli's progress line)."""
    now = now or dt.datetime.now(UTC)
    results: list[HourResult | HourFailure] = []
    hours = closed_hours(data_dir, now)
    for index, hour in enumerate(hours):
        if on_hour is not None:
            on_hour(index, len(hours), hour_label(hour))
        try:
            pending = needs_aggregation(data_dir, hour)
        except OSError as exc:  # the hour's folder cannot be listed or its files stat'ed
            log.error(
                "checking %s failed, going on with the other hours: %s",
                hour_label(hour),
                exc,
                extra={"stage": "aggregate", "hour": hour_label(hour)},
            )
            results.append(HourFailure(hour_label(hour), f"{type(exc).__name__}: {exc}"))
            continue
        if pending:
            results.append(aggregate_isolated(data_dir, hour))
    return results


class Stop(Protocol):
    """What ``run_schedule`` needs of its stop signal (a ``threading.Event`` in the command)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def run_schedule(
    data_dir: Path,
    stop: Stop,
    report: Callable[[HourResult | HourFailure], None],
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(UTC),
) -> None:
    """Aggregate the pending hours now, then every hour at :05 UTC (``next_run``), until ``stop`` is set;
    ``report`` gets each hour's result as it is done. A failed hour does not end the schedule: it has no
    manifest, so the next run tries it again."""
    while not stop.is_set():
        for result in aggregate_pending(data_dir, clock()):
            report(result)
        now = clock()
        stop.wait((next_run(now) - now).total_seconds())
