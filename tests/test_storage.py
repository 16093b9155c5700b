"""Raw storage on real files: partitions, fsync'd appends, rotation, torn tails."""

from __future__ import annotations

import datetime as dt
import fcntl
import os

import pytest
from canpipe_testing import modules_loaded_by

from engine.errors import StorageError
from engine.storage import (
    Hour,
    PartitionWriter,
    hour_path,
    iter_raw_files,
    raw_files,
    raw_hours,
    read_complete_lines,
    repair_torn_tails,
)

HOUR = Hour(2025, 10, 19, 17)


def lines(n: int, start: int = 0, width: int = 0) -> list[bytes]:
    return [b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * width) for i in range(start, start + n)]


def test_append_writes_whole_lines_into_the_hour_folder(tmp_path):
    writer = PartitionWriter(tmp_path, "w1")
    path = writer.append(HOUR, lines(3))
    writer.append(HOUR, [memoryview(b"".join(lines(2, 3)))])
    writer.close()
    assert path.parent == tmp_path / "raw/year=2025/month=10/day=19/hour=17"
    assert path.name.startswith("batch-") and path.name.endswith("-w1.jsonl")
    assert path.read_bytes() == b"".join(lines(5))


def test_two_writers_never_share_a_file(tmp_path):
    a, b = PartitionWriter(tmp_path, "a"), PartitionWriter(tmp_path, "b")
    pa, pb = a.append(HOUR, lines(1)), b.append(HOUR, lines(1, 1))
    assert pa != pb
    a.close(), b.close()


def test_rotates_at_the_size_limit(tmp_path):
    writer = PartitionWriter(tmp_path, "w", rotate_bytes=5 * 1024 * 1024)
    batch = lines(1000, width=1000)  # about 1 MB a batch
    for _ in range(12):
        writer.append(HOUR, batch)
    writer.close()
    files = list(iter_raw_files(tmp_path / "raw"))
    assert len(files) == 3
    assert all(f.stat().st_size <= 5 * 1024 * 1024 for f in files)
    assert sum(f.read_bytes().count(b"\n") for f in files) == 12_000


def test_many_open_hours_are_closed_oldest_first(tmp_path):
    writer = PartitionWriter(tmp_path, "w")
    for hh in range(8):
        writer.append((2025, 10, 19, hh), lines(1))
    writer.append((2025, 10, 19, 0), lines(1, 1))  # reopened: a new file, never the old one
    writer.close()
    assert len(list(hour_path(tmp_path / "raw", (2025, 10, 19, 0)).iterdir())) == 2


def test_failed_write_leaves_no_partial_batch(tmp_path, monkeypatch):
    writer = PartitionWriter(tmp_path, "w")
    path = writer.append(HOUR, lines(2))

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="Input/output error"):
        writer.append(HOUR, lines(5, 2))
    monkeypatch.undo()
    assert path.read_bytes() == b"".join(lines(2))  # cut back to where it was
    writer.append(HOUR, lines(1, 7))  # the writer goes on, in a new file
    writer.close()
    assert sum(len(p.read_bytes().splitlines()) for p in iter_raw_files(tmp_path / "raw")) == 3


def test_torn_tail_is_cut_and_live_files_are_left_alone(tmp_path):
    writer = PartitionWriter(tmp_path, "dead")
    dead = writer.append(HOUR, lines(3))
    writer.close()
    with open(dead, "ab") as f:
        f.write(b'{"i":3,"pa')  # a crash mid-write
    live_writer = PartitionWriter(tmp_path, "live")
    live = live_writer.append(HOUR, lines(1))
    with open(live, "ab") as f:  # looks torn, but its writer holds the lock
        f.write(b'{"partial')
    repaired = repair_torn_tails(tmp_path / "raw")
    assert repaired == [(dead, len(b'{"i":3,"pa'))]
    assert dead.read_bytes() == b"".join(lines(3))
    assert live.read_bytes().endswith(b'{"partial')
    live_writer.close()


def test_file_with_no_complete_line_is_emptied(tmp_path):
    directory = hour_path(tmp_path / "raw", HOUR)
    directory.mkdir(parents=True)
    path = directory / "batch-1-x.jsonl"
    path.write_bytes(b"x" * 200_000)
    assert repair_torn_tails(tmp_path / "raw") == [(path, 200_000)]
    assert path.read_bytes() == b""


def test_a_new_file_shows_only_once_its_first_batch_is_fsynced(tmp_path, monkeypatch):
    """Killed between its file's create and its first batch's fsync, a writer leaves no raw file (no empty
    one, none with a batch whose messages are still in the queue), only a partial file the repair removes."""
    writer = PartitionWriter(tmp_path, "w")
    fsynced = []

    def fsync_and_look(fd):
        os.fdatasync(fd)
        if not os.path.isdir(f"/proc/self/fd/{fd}"):  # the first batch's fsync, not a folder's
            fsynced.append(list(iter_raw_files(tmp_path / "raw")))

    monkeypatch.setattr(os, "fsync", fsync_and_look)
    path = writer.append(HOUR, lines(2))
    monkeypatch.undo()
    assert fsynced[0] == []  # at the first batch's fsync, nothing to list yet
    assert list(iter_raw_files(tmp_path / "raw")) == [path] and path.read_bytes() == b"".join(lines(2))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    writer.append(HOUR, lines(1, 2))  # later batches go to the named file
    writer.close()
    assert path.read_bytes() == b"".join(lines(3))


def test_a_dead_writers_partial_file_is_removed_and_a_live_ones_kept(tmp_path):
    directory = hour_path(tmp_path / "raw", HOUR)
    directory.mkdir(parents=True)
    empty, torn = directory / "batch-1-x.partial", directory / "batch-2-y.partial"
    empty.touch()  # killed between the create and the first write
    unacknowledged = b'{"i":0}\n{"i":1,"pa'  # killed before the first batch's fsync: not deleted from the queue
    torn.write_bytes(unacknowledged)
    held = PartitionWriter(tmp_path, "live")._open(HOUR, [])  # a live writer's new file, not yet written
    assert repair_torn_tails(tmp_path / "raw") == [(empty, 0), (torn, len(unacknowledged))]
    assert list(directory.iterdir()) == [held.partial]
    os.close(held.fd)


def test_a_repair_that_removes_a_new_file_before_its_writer_locks_it_loses_nothing(tmp_path, monkeypatch):
    """Another worker's start-up repair can take a new file between its create and its writer's lock, find
    it empty and remove it; the writer must then write to a file on a path, not to the removed one."""
    flock = fcntl.flock
    raced: list[tuple] = []
    repairing = []

    def flock_after_a_repair(fd, operation):
        if not repairing:  # the writer's lock of its new file: a repair gets there first
            repairing.append(fd)
            raced.extend(repair_torn_tails(tmp_path / "raw"))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_repair)
    writer = PartitionWriter(tmp_path, "w")
    path = writer.append(HOUR, lines(3))
    writer.close()
    assert len(raced) == 1 and raced[0][0].suffix == ".partial" and not raced[0][0].exists()
    assert path.read_bytes() == b"".join(lines(3))
    assert list(iter_raw_files(tmp_path / "raw")) == [path]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_writer_holds_an_exclusive_lock(tmp_path):
    writer = PartitionWriter(tmp_path, "w")
    path = writer.append(HOUR, lines(1))
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    writer.close()


def test_large_vectored_write_beyond_iov_max(tmp_path):
    writer = PartitionWriter(tmp_path, "w")
    many = lines(5000)  # more buffers than one writev takes
    path = writer.append(HOUR, many)
    writer.close()
    assert path.read_bytes() == b"".join(many)


def failing(error: OSError):
    """A stand-in for an os call that always fails with ``error``."""

    def call(*args):
        raise error

    return call


def fsynced_paths(monkeypatch, fail_on: int | None = None) -> list[str]:
    """Record the path of every file fsync'd (folders too); the ``fail_on``-th call fails with EIO."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(seen) == fail_on:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_failed_fsync_is_never_retried_on_the_same_file(tmp_path, monkeypatch):
    writer = PartitionWriter(tmp_path, "w")
    old = writer.append(HOUR, lines(2))
    seen = fsynced_paths(monkeypatch, fail_on=1)  # the next data fsync fails
    with pytest.raises(StorageError, match="Input/output error"):
        writer.append(HOUR, lines(5, 2))
    again = writer.append(HOUR, lines(5, 2))  # the caller writes the batch again
    writer.close()
    assert again != old
    assert seen.count(str(old)) == 1  # the failed file was never fsynced a second time
    assert old.read_bytes() == b"".join(lines(2))  # cut back to its last good size
    assert again.read_bytes() == b"".join(lines(5, 2))


def test_failed_first_write_removes_the_file_and_the_folders_it_created(tmp_path, monkeypatch):
    writer = PartitionWriter(tmp_path, "w")
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", failing(OSError(28, "No space left on device")))
    with pytest.raises(StorageError, match="No space left"):
        writer.append(HOUR, lines(3))
    assert list(tmp_path.rglob("*.jsonl")) == [] and not (tmp_path / "raw").exists()
    monkeypatch.setattr(os, "writev", real_writev)
    path = writer.append(HOUR, lines(3))
    writer.close()
    assert path.read_bytes() == b"".join(lines(3))


def test_failed_fsync_of_a_new_file_leaves_no_file(tmp_path, monkeypatch):
    writer = PartitionWriter(tmp_path, "w")
    writer.append((2025, 10, 19, 16), lines(1))  # the day folder exists; the hour folder will be new
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith((".jsonl", ".partial")):  # data files fail, folders do not
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError):
        writer.append(HOUR, lines(3))
    writer.close()
    assert not hour_path(tmp_path / "raw", HOUR).exists()
    assert [p.parent.name for p in iter_raw_files(tmp_path / "raw")] == ["hour=16"]


def test_a_cut_that_fails_stops_the_writer(tmp_path, monkeypatch):
    from engine.storage import UnsafeFileState

    writer = PartitionWriter(tmp_path, "w")
    writer.append(HOUR, lines(2))
    fsynced_paths(monkeypatch, fail_on=1)
    monkeypatch.setattr(os, "ftruncate", failing(OSError(5, "Input/output error")))
    with pytest.raises(UnsafeFileState, match="partial batch"):
        writer.append(HOUR, lines(5, 2))
    writer.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (needs root); unmounted at the end."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_leaves_no_empty_files_and_whole_batches_only(tiny_tmpfs):
    writer = PartitionWriter(tiny_tmpfs, "w")
    written = failed = 0
    for i in range(40):  # about 400 KiB into 256 KiB
        try:
            writer.append((2025, 10, 19, i % 3), lines(10, i * 10, width=1000))
            written += 10
        except StorageError:
            failed += 1
    writer.close()
    files = list(iter_raw_files(tiny_tmpfs / "raw"))
    assert failed and written
    assert all(f.stat().st_size > 0 for f in files), "an empty file was left behind"
    assert not list((tiny_tmpfs / "raw").glob("*/*/*/*/*.partial")), "a partial file was left behind"
    assert sum(f.read_bytes().count(b"\n") for f in files) == written
    assert all(f.read_bytes().endswith(b"\n") for f in files)


def test_an_hour_is_named_the_same_from_a_datetime_an_epoch_and_its_folder(tmp_path):
    moment = dt.datetime(2025, 10, 19, 19, 59, 59, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    epoch_us = int(moment.timestamp()) * 1_000_000 + moment.microsecond
    assert Hour.from_datetime(moment) == Hour.from_epoch_us(epoch_us) == Hour.from_epoch_hour(epoch_us // 3_600_000_000)
    assert Hour.from_datetime(moment) == HOUR == (2025, 10, 19, 17)  # UTC, whatever the offset it came with
    assert HOUR.start == dt.datetime(2025, 10, 19, 17, tzinfo=dt.UTC)
    writer = PartitionWriter(tmp_path, "w1")
    writer.append(HOUR, lines(1))
    writer.close()
    assert raw_hours(tmp_path / "raw") == [HOUR]


def test_storage_lists_the_hours_and_each_hours_files_it_wrote(tmp_path, caplog):
    later, earlier = Hour(2025, 10, 20, 0), Hour(2025, 10, 19, 9)
    writer = PartitionWriter(tmp_path, "w1", rotate_bytes=1)
    first = [writer.append(later, lines(1)), writer.append(later, lines(1, 1))]  # rotated: two files
    other = writer.append(earlier, lines(1))
    writer.close()
    (tmp_path / "raw/year=2025/month=13/day=01/hour=00").mkdir(parents=True)  # not an hour: left out
    (hour_path(tmp_path / "raw", later) / "batch-9-odd.jsonl").mkdir()  # not a file: skipped, said so
    raw = tmp_path / "raw"
    assert raw_hours(raw) == [earlier, later]
    assert raw_files(raw, later, warn=True) == sorted(first) and raw_files(raw, earlier) == [other]
    assert "batch-9-odd.jsonl: not a regular file, skipped" in caplog.text
    assert raw_files(raw, Hour(2025, 1, 1, 0)) == []


def test_a_torn_tail_is_never_read_as_a_record(tmp_path):
    writer = PartitionWriter(tmp_path, "w1")
    path = writer.append(HOUR, lines(2))
    writer.close()
    with open(path, "ab") as f:
        f.write(b'{"i":2,"pa')  # a crash mid-write
    assert read_complete_lines(path) == b"".join(lines(2))
    path.write_bytes(b'{"torn')
    assert read_complete_lines(path) == b""


def test_storage_imports_nothing_of_delivery():
    # DESIGN.md: storage knows nothing of delivery; the S3 backend to come must keep it that way
    modules = modules_loaded_by("engine.storage")
    delivery = ("queues", "receiver", "publisher", "consumer", "supervisor", "server", "aggregator", "cli", "run")
    assert not [m for m in modules if m.split(".")[1] in delivery], sorted(modules)
    assert {"engine.storage.layout", "engine.storage.local"} <= modules
