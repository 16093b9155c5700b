"""An hour's Parquet files as pieces of one dataset: the main file and its late files.

``part-0.parquet`` holds the hour as a compaction found it; a later ``canpipe compact`` that finds new raw
files beside the ones compacted writes only their rows, deduplicated against the lake, to
``late-<digest>.parquet`` in the same folder (``digest``: 16 hex of the SHA-256 of the new files' names and
sizes, so the same late input gets the same name). Every piece keeps in its key-value metadata the raw files
it was made from (``canpipe.inputs``, names and sizes), how many records each held as read
(``canpipe.records``, copies included) and the aggregate's report of them (``canpipe.aggregate``).

Together the pieces are exact when their inputs do not overlap and add up to the hour's raw files: then each
row's ``raw_order`` (its position in its own piece's raw files) maps to its position in a scan of all the
hour's raw files (sorted names, then lines; ``global_order``), the order in which the aggregator adds a
vehicle's values, and the reports add up to the one a scan of every raw file would give (``merged_report``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from engine.aggregator.hours import InputFile

if TYPE_CHECKING:
    import numpy as np

    from engine.lake.compact import HourReport

INPUTS_KEY = b"canpipe.inputs"  # the raw files compacted: [{"file", "bytes"}] as JSON, in the file's metadata
RECORDS_KEY = b"canpipe.records"  # records read from each of those files (copies included), a JSON list
REPORT_KEY = b"canpipe.aggregate"  # ``HourReport`` as JSON: what the aggregate needs beyond the rows
PARTS_KEY = b"canpipe.parts"  # {"count": n, "id": "..."}: the main file's parts, written by one compaction
MAIN_NAME = "part-0.parquet"
PART_PREFIX = "part-"
LATE_PREFIX = "late-"


class Parts(msgspec.Struct):
    count: int
    id: str


@dataclasses.dataclass
class Piece:
    """One Parquet file of an hour and what it was made from (None: metadata missing, an older file)."""

    path: Path
    inputs: list[InputFile] | None
    records: list[int] | None
    report: bytes | None  # ``HourReport`` JSON, decoded by whoever needs it
    # a main file split at the size target: ``part-0`` … ``part-<n-1>``, sorted on from one to the next;
    # None when a part is missing, is left from another compaction, or one too many is there
    parts: list[Path] | None = None

    @property
    def exact(self) -> bool:
        """Its metadata says how its rows sit in the raw files: it can be combined with other pieces."""
        return (
            self.inputs is not None
            and self.records is not None
            and len(self.records) == len(self.inputs)
            and self.parts is not None
        )


def late_name(inputs: list[InputFile]) -> str:
    """The late file of ``inputs``: named by what it holds, so the same late input never makes two files."""
    digest = hashlib.sha256(msgspec.json.encode(inputs)).hexdigest()[:16]
    return f"{LATE_PREFIX}{digest}.parquet"


def read_piece(path: Path) -> Piece:
    """The piece's metadata (its footer only), and for a main file its parts; OSError or ValueError
    (pyarrow's ArrowInvalid) when the file cannot be read."""
    meta = footer(path)
    inputs = meta.get(INPUTS_KEY)
    records = meta.get(RECORDS_KEY)
    parts: list[Path] | None = [path]
    if path.name.startswith(PART_PREFIX) and PARTS_KEY in meta:
        parts = _parts(path, msgspec.json.decode(meta[PARTS_KEY], type=Parts))
    return Piece(
        path,
        msgspec.json.decode(inputs, type=list[InputFile]) if inputs else None,
        msgspec.json.decode(records, type=list[int]) if records else None,
        meta.get(REPORT_KEY),
        parts,
    )


def footer(source: Path | BinaryIO) -> dict[bytes, bytes]:
    """A Parquet file's key-value metadata, from its path or an open file (an S3 object)."""
    import pyarrow.parquet as pq

    return dict(pq.read_metadata(source).metadata or {})


def input_names(meta: dict[bytes, bytes]) -> set[str]:
    """The raw files a piece was made from (its ``INPUTS_KEY``), by name; empty when the footer does not say."""
    inputs = meta.get(INPUTS_KEY)
    return {i.file for i in msgspec.json.decode(inputs, type=list[InputFile])} if inputs else set()


def part_paths(folder: Path) -> list[Path]:
    """The main file's parts in an hour's folder as they are, in part order."""
    found = folder.glob(f"{PART_PREFIX}*.parquet") if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.stem[len(PART_PREFIX) :]) if p.stem[len(PART_PREFIX) :].isdigit() else -1)


def _parts(first: Path, parts: Parts) -> list[Path] | None:
    """Every part of the compaction that wrote ``first`` (part-0), or None when they are not all there, not
    all of it, or more are."""
    paths = part_paths(first.parent)
    if [p.name for p in paths] != [f"{PART_PREFIX}{k}.parquet" for k in range(parts.count)]:
        return None
    for path in paths[1:]:
        other = footer(path).get(PARTS_KEY)
        if other is None or msgspec.json.decode(other, type=Parts) != parts:
            return None
    return paths


def late_paths(folder: Path) -> list[Path]:
    """The late files of an hour's Parquet folder, sorted by name."""
    return sorted(folder.glob(f"{LATE_PREFIX}*.parquet")) if folder.is_dir() else []


def covered(pieces: list[Piece]) -> list[InputFile] | None:
    """The raw files the pieces were made from, sorted by name; None when a piece does not say, or two
    pieces hold the same raw file (a late file left behind by an interrupted merge: rows would count twice)."""
    names: dict[str, InputFile] = {}
    for piece in pieces:
        if piece.inputs is None:
            return None
        for item in piece.inputs:
            if item.file in names:
                return None
            names[item.file] = item
    return [names[name] for name in sorted(names)]


def global_order(pieces: list[Piece]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each piece, the cumulative record counts of its files and the offset of each file in a scan of
    every piece's files in name order: ``position(piece, raw_order)`` is then a row's place in that scan."""
    import numpy as np

    every = sorted((item.file, count) for p in pieces for item, count in zip(p.inputs or [], p.records or []))
    start, at = {}, 0
    for name, count in every:
        start[name] = at
        at += count
    out = []
    for p in pieces:
        counts = np.asarray(p.records or [], dtype=np.int64)
        ends = np.cumsum(counts)
        offsets = np.array([start[i.file] for i in p.inputs or []], dtype=np.int64)
        out.append((ends, offsets - (ends - counts)))  # a row at raw_order r in file f: r + (start_f - begin_f)
    return out


def position(order: tuple[np.ndarray, np.ndarray], raw_order: np.ndarray) -> np.ndarray:
    """Rows' places in the scan of every piece's raw files, from their ``raw_order`` in their own piece."""
    import numpy as np

    ends, shift = order
    return raw_order + shift[np.searchsorted(ends, raw_order, side="right")]


def file_of(piece: Piece, raw_order: np.ndarray) -> list[str]:
    """The raw file each row was read from."""
    import numpy as np

    names = [i.file for i in piece.inputs or []]
    ends = np.cumsum(np.asarray(piece.records or [], dtype=np.int64))
    return [names[k] for k in np.searchsorted(ends, raw_order, side="right").tolist()]


def merged_report(reports: list[HourReport], limit: int) -> HourReport:
    """The report one scan of every piece's raw files would give: counts added, the first ``limit`` corrupt
    line locations in file order (each piece lists its first ``limit``, so the first of all are among them),
    copies dropped added per vehicle."""
    from engine.lake.compact import HourReport

    locations = sorted(
        (loc for r in reports for loc in r.corrupt_line_locations),
        key=lambda loc: (loc.rsplit(":", 1)[0], int(loc.rsplit(":", 1)[1])),
    )
    duplicates: dict[str, int] = {}
    for r in reports:
        for name, copies in r.duplicates.items():
            duplicates[name] = duplicates.get(name, 0) + copies
    return HourReport(
        sum(r.files for r in reports),
        sum(r.records for r in reports),
        sum(r.torn_tail_bytes for r in reports),
        sum(r.corrupt_lines for r in reports),
        locations[:limit],
        dict(sorted(duplicates.items())),
    )
