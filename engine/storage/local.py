"""The local backend: hour-partitioned JSONL files, appended batch by batch with vectored writes and fsync,
and read back (the hours, an hour's files, complete lines).

Layout (``engine.storage.layout``): ``raw/year=YYYY/month=MM/day=DD/hour=HH/batch-<unix_ms>-<writer>.jsonl``.
One writer per file (the writer id is unique per process and the file is created with O_EXCL and held
under flock), a file is rotated at ``rotate_bytes``, and a new writer never appends to an old file, so a
torn tail left by a crash is never glued onto. A new file is written as ``batch-...partial`` and takes its
``.jsonl`` name (``rename``, folder fsynced) only once its first batch is fsynced: a raw file never shows
empty, and readers never list a first batch that was not acknowledged. ``repair_torn_tails`` (run by the
supervisor before its workers start and when one dies) removes a dead writer's partial file and cuts torn tails.
Storage knows nothing of the queue.

A failed append leaves nothing behind: a file created by the attempt is removed (and folders it created,
if empty); an older file is cut back to its last good size and closed. A file whose write or fsync failed
is never written or fsynced again (the fsyncgate lesson: after a failed fsync the page cache may already
have dropped the dirty pages, so a second fsync "succeeds" on lost data); the caller writes the batch again
and it goes to a new file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.errors import StorageError
from engine.storage.layout import (
    HOUR_FOLDER_GLOB,
    PARTIAL_FILE_GLOB,
    PARTIAL_SUFFIX,
    RAW_FILE_GLOB,
    Hour,
    hour_of_folder,
    hour_path,
)

log = logging.getLogger("canpipe.storage")

Buffer = bytes | memoryview
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MAX_OPEN_HOURS = 4


class UnsafeFileState(StorageError):
    """A failed write could not be cut back, so a file may hold a partial batch: stop writing and exit
    non-zero (nothing of the batch is deleted from the queue)."""


def fault_point(name: str) -> None:
    """Test-only fault injection, off unless ``CANPIPE_FAULT_KILL_AT=<point>`` is set: SIGKILL this process
    the Nth time (``CANPIPE_FAULT_AT_BATCH``, default 1) it passes ``<point>``; with
    ``CANPIPE_FAULT_ONCE=<path>`` only the first process to create ``<path>`` dies (restarted workers go
    on). Read once at import; a string comparison when unset."""
    global _fault_countdown
    if name == _FAULT_KILL_AT:
        _fault_countdown -= 1
        if _fault_countdown == 0:
            if _FAULT_ONCE:
                try:
                    os.close(os.open(_FAULT_ONCE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                except FileExistsError:
                    return
            log.warning("fault injection: SIGKILL at %s", name)
            os.kill(os.getpid(), signal.SIGKILL)


_FAULT_KILL_AT = os.environ.get("CANPIPE_FAULT_KILL_AT", "")
_FAULT_ONCE = os.environ.get("CANPIPE_FAULT_ONCE", "")
_fault_countdown = int(os.environ.get("CANPIPE_FAULT_AT_BATCH", "1") or 1)
_fsync_countdown = int(os.environ.get("CANPIPE_FAULT_FSYNC_EIO", "") or 0)  # "N": the Nth data fsync fails


def _fsync_data(fd: int) -> None:
    global _fsync_countdown
    if _fsync_countdown:
        _fsync_countdown -= 1
        if _fsync_countdown == 0:
            raise OSError(errno.EIO, "Input/output error (CANPIPE_FAULT_FSYNC_EIO)")
    os.fsync(fd)


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
    """``path`` is the file's name once its first batch is in; until then it is written as ``partial``."""

    __slots__ = ("fd", "path", "partial", "size")

    def __init__(self, fd: int, path: Path, partial: Path | None) -> None:
        self.fd, self.path, self.partial, self.size = fd, path, partial, 0


class PartitionWriter:
    """Appends record bytes to the hour's current file, fsyncs, rotates. One per consumer process."""

    def __init__(self, data_dir: Path, writer_id: str, *, rotate_bytes: int = 5 * 1024 * 1024) -> None:
        self.raw_dir = Path(data_dir) / "raw"
        self.writer_id = writer_id
        self.rotate_bytes = rotate_bytes
        self._files: dict[Hour, _OpenFile] = {}

    def _open(self, hour: Hour, created_dirs: list[Path]) -> _OpenFile:
        directory = hour_path(self.raw_dir, hour)
        if not directory.is_dir():
            levels = (directory, *list(directory.parents)[:4])  # hour, day, month, year, raw
            created_dirs.extend(d for d in levels if not d.is_dir())  # to remove again if this attempt fails
            directory.mkdir(parents=True, exist_ok=True)
            for level in levels:
                _fsync_dir(level)  # the new folders themselves must survive a crash
        stamp = time.time_ns() // 1_000_000
        while True:
            path = directory / f"batch-{stamp}-{self.writer_id}.jsonl"
            partial = path.with_suffix(PARTIAL_SUFFIX)
            if path.exists():  # two rotations within one millisecond (the writer id is this process's own)
                stamp += 1
                continue
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                stamp += 1
                continue
            try:
                # Blocking: between the create and this lock, a repair (another worker's start-up, or the
                # supervisor's after a death) may hold the new file for a moment and remove it as a dead
                # writer's partial file.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink:
                    break
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                raise
            os.close(fd)  # removed under us: what went into it would be on no path; take a new name
            stamp += 1
        if len(self._files) >= MAX_OPEN_HOURS:
            self._close_hour(min(self._files))
        handle = self._files[hour] = _OpenFile(fd, path, partial)
        return handle

    def _close_hour(self, hour: Hour) -> None:
        handle = self._files.pop(hour)
        os.close(handle.fd)

    def append(self, hour: Hour, buffers: Sequence[Buffer]) -> Path:
        """Append ``buffers`` (whole ``\\n``-terminated lines) to the hour's file and fsync it.

        On failure nothing of the batch stays visible (see the module docstring) and StorageError is
        raised; the next append of this hour goes to a new file. UnsafeFileState if the cut itself failed.
        """
        size = sum(len(b) for b in buffers)
        handle = self._files.get(hour)
        if handle is not None and handle.size and handle.size + size > self.rotate_bytes:
            self._close_hour(hour)
            handle = None
        new = handle is None
        created_dirs: list[Path] = []
        try:
            if handle is None:
                handle = self._open(hour, created_dirs)
            _writev_all(handle.fd, buffers)
            fault_point("after_writev")
            _fsync_data(handle.fd)
            if handle.partial is not None:  # the first batch is in: the file takes its name, durably
                os.rename(handle.partial, handle.path)
                handle.partial = None
                _fsync_dir(handle.path.parent)
        except OSError as exc:
            self._discard(hour, handle, new, created_dirs)
            raise StorageError(f"append to {hour_path(self.raw_dir, hour)} failed: {exc}") from exc
        handle.size += size
        return handle.path

    def _discard(self, hour: Hour, handle: _OpenFile | None, new: bool, created_dirs: list[Path]) -> None:
        """Undo a failed append: remove what it created, cut an older file back, never reuse the file."""
        if handle is not None:
            self._files.pop(hour, None)
            try:
                if new:
                    try:
                        os.unlink(handle.partial or handle.path)
                    except OSError:
                        os.ftruncate(handle.fd, 0)  # cannot remove it: an empty file at least holds no partial batch
                    else:
                        with contextlib.suppress(OSError):
                            _fsync_dir(handle.path.parent)
                else:
                    os.ftruncate(handle.fd, handle.size)  # back to the last fsynced batch
            except OSError as exc:
                raise UnsafeFileState(f"{handle.path} may hold a partial batch and could not be cut: {exc}") from exc
            finally:
                os.close(handle.fd)
        for directory in created_dirs:  # deepest first; only empty ones go
            with contextlib.suppress(OSError):
                directory.rmdir()

    def close(self) -> None:
        for hour in list(self._files):
            self._close_hour(hour)


def iter_raw_files(raw_dir: Path) -> Iterator[Path]:
    """Every raw file under ``raw_dir``, hour by hour, by name."""
    yield from sorted(Path(raw_dir).glob(f"{HOUR_FOLDER_GLOB}/{RAW_FILE_GLOB}"))


def raw_hours(raw_dir: Path) -> list[Hour]:
    """The hours that have a folder under ``raw_dir``, oldest first (folders not named by ``hour_path`` are
    not hours and are left out)."""
    hours = (hour_of_folder(folder) for folder in Path(raw_dir).glob(HOUR_FOLDER_GLOB))
    return sorted(hour for hour in hours if hour is not None)


def raw_files(raw_dir: Path, hour: Hour, warn: bool = False) -> list[Path]:
    """The hour's raw files, sorted by name: regular files only, since a directory (or a FIFO, which would
    block the open) named ``*.jsonl`` holds no records; ``warn`` logs each one skipped."""
    folder = hour_path(raw_dir, hour)
    files = []
    for path in sorted(folder.glob(RAW_FILE_GLOB)) if folder.is_dir() else []:
        if path.is_file():
            files.append(path)
        elif warn:
            log.warning("%s: not a regular file, skipped", path, extra={"stage": "storage"})
    return files


def read_complete_lines(path: Path) -> bytes:
    """The file's bytes up to and including its last newline: a torn tail (a crash mid-write) is never
    read as a record. The whole file in memory: to read a large file in bounded memory, map it and cut its
    chunks with ``complete_end``."""
    data = Path(path).read_bytes()
    return data[: complete_end(data)]


def complete_end(data: bytes | mmap.mmap, start: int = 0, stop: int | None = None) -> int:
    """The offset just past the last newline in ``data[start:stop]``, ``start`` when there is none: where
    the complete lines end. Takes a mapping as well, without copying it."""
    cut = data.rfind(b"\n", start, len(data) if stop is None else stop)
    return start if cut < 0 else cut + 1


@contextlib.contextmanager
def _unheld(path: Path) -> Iterator[int | None]:
    """``path`` opened and locked when no live writer holds it (None when one does, or it is gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield None  # a live writer owns it
                return
            raise
        yield fd if os.fstat(fd).st_nlink else None  # or another repair removed it while we opened it
    finally:
        os.close(fd)


def repair_torn_tails(raw_dir: Path) -> list[tuple[Path, int]]:
    """Repair what dead writers left, leaving alone every file a live writer holds (under flock): remove each
    partial file (a first batch that was never named, so never acknowledged: its messages are still in the
    queue), and cut the incomplete last line of every raw file. Return (path, bytes removed or cut)."""
    repaired = []
    for path in sorted(Path(raw_dir).glob(f"{HOUR_FOLDER_GLOB}/{PARTIAL_FILE_GLOB}")):
        with _unheld(path) as fd:
            if fd is None:
                continue
            size = os.fstat(fd).st_size
            os.unlink(path)
            _fsync_dir(path.parent)
            repaired.append((path, size))
            log.warning(
                "removed %s, a dead writer's unnamed first batch (%d bytes)", path, size, extra={"stage": "storage"}
            )
    for path in iter_raw_files(raw_dir):
        with _unheld(path) as fd:
            if fd is None:
                continue
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                continue
            keep = _last_newline_end(fd, size)
            os.ftruncate(fd, keep)
            os.fsync(fd)
            repaired.append((path, size - keep))
            log.warning("repaired torn tail of %s: cut %d bytes", path, size - keep, extra={"stage": "storage"})
    return repaired


def _last_newline_end(fd: int, size: int, block: int = 64 * 1024) -> int:
    end = size
    while end > 0:
        start = max(0, end - block)
        cut = complete_end(os.pread(fd, end - start, start))
        if cut:
            return start + cut
        end = start
    return 0
