"""Raw storage: hour-partitioned JSONL files, appended batch by batch with vectored writes and fsync.

Layout: ``raw/year=YYYY/month=MM/day=DD/hour=HH/batch-<unix_ms>-<writer>.jsonl``. One writer per file
(the writer id is unique per process and the file is created with O_EXCL and held under flock), a file
is rotated at ``rotate_bytes``, and a new writer never appends to an old file, so a torn tail left by a
crash is never glued onto; ``repair_torn_tails`` cuts such tails at start-up. Storage knows nothing of
the queue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.errors import StorageError

log = logging.getLogger("canpipe.storage")

Buffer = bytes | memoryview
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MAX_OPEN_HOURS = 4


def hour_path(raw_dir: Path, hour: tuple[int, int, int, int]) -> Path:
    year, month, day, hh = hour
    return raw_dir / f"year={year:04d}" / f"month={month:02d}" / f"day={day:02d}" / f"hour={hh:02d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writev_all(fd: int, buffers: Sequence[Buffer]) -> int:
    """Write every buffer with as few writev calls as the kernel allows; no copy of the data."""
    views = [memoryview(b) for b in buffers if len(b)]
    total = first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + IOV_MAX])
        total += written
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:  # a partial write: go on from inside this buffer
            views[first] = views[first][written:]
    return total


class _OpenFile:
    __slots__ = ("fd", "path", "size")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path, self.size = fd, path, 0


class PartitionWriter:
    """Appends record bytes to the hour's current file, fsyncs, rotates. One per consumer process."""

    def __init__(self, data_dir: Path, writer_id: str, *, rotate_bytes: int = 5 * 1024 * 1024) -> None:
        self.raw_dir = Path(data_dir) / "raw"
        self.writer_id = writer_id
        self.rotate_bytes = rotate_bytes
        self._files: dict[tuple[int, int, int, int], _OpenFile] = {}

    def _open(self, hour: tuple[int, int, int, int]) -> _OpenFile:
        directory = hour_path(self.raw_dir, hour)
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            for parent in (directory, *list(directory.parents)[:4]):
                _fsync_dir(parent)  # the new folders themselves must survive a crash
        stamp = time.time_ns() // 1_000_000
        while True:
            path = directory / f"batch-{stamp}-{self.writer_id}.jsonl"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                stamp += 1  # two rotations within one millisecond
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _fsync_dir(directory)
        if len(self._files) >= MAX_OPEN_HOURS:
            self._close_hour(min(self._files))
        handle = self._files[hour] = _OpenFile(fd, path)
        return handle

    def _close_hour(self, hour: tuple[int, int, int, int]) -> None:
        handle = self._files.pop(hour)
        os.close(handle.fd)

    def append(self, hour: tuple[int, int, int, int], buffers: Sequence[Buffer]) -> Path:
        """Append ``buffers`` (whole ``\\n``-terminated lines) to the hour's file and fsync it.

        On failure the file is cut back to where it was, so no partial batch stays behind, and
        StorageError is raised.
        """
        size = sum(len(b) for b in buffers)
        try:
            handle = self._files.get(hour)
            if handle is not None and handle.size and handle.size + size > self.rotate_bytes:
                self._close_hour(hour)
                handle = None
            if handle is None:
                handle = self._open(hour)
            try:
                _writev_all(handle.fd, buffers)
                os.fsync(handle.fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(handle.fd, handle.size)
                self._close_hour(hour)
                raise
        except OSError as exc:
            raise StorageError(f"append to {hour_path(self.raw_dir, hour)} failed: {exc}") from exc
        handle.size += size
        return handle.path

    def close(self) -> None:
        for hour in list(self._files):
            self._close_hour(hour)


def iter_raw_files(raw_dir: Path) -> Iterator[Path]:
    yield from sorted(Path(raw_dir).glob("year=*/month=*/day=*/hour=*/*.jsonl"))


def repair_torn_tails(raw_dir: Path) -> list[tuple[Path, int]]:
    """Cut the incomplete last line of every file no live writer holds; return (path, bytes cut)."""
    repaired = []
    for path in iter_raw_files(raw_dir):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # a live writer owns it
                raise
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                continue
            keep = _last_newline_end(fd, size)
            os.ftruncate(fd, keep)
            os.fsync(fd)
            repaired.append((path, size - keep))
            log.warning("repaired torn tail of %s: cut %d bytes", path, size - keep)
        finally:
            os.close(fd)
    return repaired


def _last_newline_end(fd: int, size: int, block: int = 64 * 1024) -> int:
    end = size
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0
