"""Reading an hour's raw files into vehicle partitions, for the aggregator.

Files are mapped (mmap) and parsed in chunks of whole lines by the stored-line scanner; a torn tail is
skipped and counted, a corrupt line reported by file and line. Rows go to partitions by a stable hash of
the vehicle id: kept in memory for a small hour, appended to ``<p>.<tag>.<column>`` files otherwise, so
that memory stays bounded whatever the hour's size. Rows travel as the scanner's named ``Columns``.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.kernels.jsonl import Columns, parse_lines
from engine.schema import SIGNALS
from engine.storage import complete_end

log = logging.getLogger("canpipe.aggregator.partitions")

CHUNK_BYTES = 32 * 1024 * 1024
MAX_REPORTED_CORRUPT = 100
# the per-row fields of ``Columns`` and their dtypes; ``values`` (float64, signals x rows) is the last one
ROW_COLUMNS = {"timestamp_us": np.int64, "ingest_us": np.int64, "vehicle": np.int64, "can_id": np.int64}
ROW_FIELDS = (*ROW_COLUMNS, "values")


def rows_only(**fields: np.ndarray) -> Columns:
    """``Columns`` of rows that no longer stand for one parse (spilled, loaded or joined): no line report."""
    return Columns(**fields, bad_lines=[], lines=0)


def concatenate(pieces: list[Columns]) -> Columns:
    """The rows of ``pieces``, one after the other (order kept: rows of a vehicle stay in file order)."""
    return rows_only(**{name: np.concatenate([getattr(c, name) for c in pieces], axis=-1) for name in ROW_FIELDS})


@dataclasses.dataclass
class InputReport:
    files: int = 0
    records: int = 0
    torn_tail_bytes: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)
    corrupt_count: int = 0

    def add(self, other: InputReport) -> None:
        self.files += other.files
        self.records += other.records
        self.torn_tail_bytes += other.torn_tail_bytes
        self.corrupt += other.corrupt[: MAX_REPORTED_CORRUPT - len(self.corrupt)]
        self.corrupt_count += other.corrupt_count


class Partitions:
    """One scanner's rows spread over partitions by vehicle: in memory (one partition) or in append-only
    files ``<p>.<tag>.<column>`` (rows of a partition stay in file order)."""

    def __init__(self, count: int, spill_dir: Path | None, tag: str) -> None:
        self.count, self.spill_dir, self.tag = count, spill_dir, tag
        self.memory: list[Columns] = []
        self._files: dict[str, BinaryIO] = {}
        self.part_of: np.ndarray = np.zeros(0, dtype=np.int64)  # local vehicle index -> partition

    def vehicles_seen(self, names: list[str]) -> None:
        """Extend the vehicle -> partition map: a stable hash of the id, the same in every process."""
        new = [zlib.crc32(name.encode()) % self.count for name in names[len(self.part_of) :]]
        self.part_of = np.concatenate([self.part_of, np.array(new, dtype=np.int64)])

    def add(self, columns: Columns) -> None:
        if self.spill_dir is None:
            self.memory.append(columns)
            return
        part = self.part_of[columns.vehicle]
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.count + 1))
        for p in range(self.count):
            rows = order[bounds[p] : bounds[p + 1]]
            if len(rows):
                for name in ROW_FIELDS:
                    column = getattr(columns, name)
                    out = self._files.get(f"{p}.{name}")
                    if out is None:
                        out = self._files[f"{p}.{name}"] = open(self.spill_dir / f"{p}.{self.tag}.{name}", "ab")
                    (column[rows] if column.ndim == 1 else column[:, rows].T).tofile(out)

    def close(self) -> None:
        for out in self._files.values():
            out.close()


def load_partition(spill_dir: Path, p: int, tag: str) -> Columns | None:
    """The rows scan ``tag`` spilled to partition ``p``, in file order; None when it had none."""
    if not (spill_dir / f"{p}.{tag}.vehicle").exists():
        return None
    cols = {name: np.fromfile(spill_dir / f"{p}.{tag}.{name}", dtype=dtype) for name, dtype in ROW_COLUMNS.items()}
    values = np.fromfile(spill_dir / f"{p}.{tag}.values", dtype=np.float64).reshape(-1, len(SIGNALS)).T
    return rows_only(**cols, values=np.ascontiguousarray(values))


@dataclasses.dataclass
class Scan:
    vehicles: list[str]  # local vehicle index -> id
    info: InputReport
    memory: list[Columns]  # the rows, when not spilled


def scan_files(paths: list[str], raw_dir: str, partitions: int, spill_dir: str | None, tag: str) -> Scan:
    """Read and parse ``paths`` (whole lines, chunk by chunk) into partitions. Runs in a worker process
    for large hours; vehicle indices are local to the scan and remapped afterwards."""
    vehicles: dict[str, int] = {}
    info = InputReport()
    parts = Partitions(partitions, Path(spill_dir) if spill_dir else None, tag)
    for name in paths:
        path = Path(name)
        info.files += 1
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                end = complete_end(mm)
                if end < size:  # a torn tail: a crash mid-write; never a record
                    info.torn_tail_bytes += size - end
                    log.warning("%s: skipped a torn tail of %d bytes", path, size - end, extra={"stage": "aggregate"})
                view = memoryview(mm)
                try:
                    start, line_base = 0, 0
                    while start < end:  # chunks of whole lines, zero-copy slices of the mapping
                        stop = min(end, start + CHUNK_BYTES)
                        if stop < end:
                            cut = complete_end(mm, start, stop)
                            stop = cut if cut > start else mm.find(b"\n", stop) + 1
                        cols = parse_lines(view[start:stop], vehicles, "skip")  # other writers add fields
                        note_corrupt(cols.bad_lines, info, str(path.relative_to(raw_dir)), line_base)
                        line_base += cols.lines
                        info.records += len(cols.vehicle)
                        if len(cols.vehicle):
                            parts.vehicles_seen(list(vehicles))
                            parts.add(cols)
                        start = stop
                finally:
                    view.release()
    parts.close()
    return Scan(list(vehicles), info, parts.memory)


def note_corrupt(bad_lines: list[int], info: InputReport, name: str, line_base: int) -> None:
    """Count corrupt lines; the first ``MAX_REPORTED_CORRUPT`` of a scan are listed and logged one by one,
    the rest in one line per chunk (a file from a writer the door would refuse can be all corrupt lines:
    400,000 log lines cost more than the scan)."""
    quiet = 0
    for number in bad_lines:
        info.corrupt_count += 1
        if len(info.corrupt) < MAX_REPORTED_CORRUPT:
            info.corrupt.append(f"{name}:{line_base + number}")
            log.error("corrupt line %s:%d skipped", name, line_base + number, extra={"stage": "aggregate"})
        else:
            quiet += 1
    if quiet:
        log.error(
            "%d more corrupt lines in %s skipped (lines %d-%d; the first %d are logged one by one)",
            quiet,
            name,
            line_base + bad_lines[-quiet],
            line_base + bad_lines[-1],
            MAX_REPORTED_CORRUPT,
            extra={"stage": "aggregate"},
        )
