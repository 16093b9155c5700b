"""A consumer process: receive -> batch -> append to the hour's file -> fsync -> delete (at-least-once).

Batches flush at ``batch_records`` records or ``batch_seconds`` after the first record arrived, whichever
comes first; the time trigger is a deadline on the long poll, so it fires with no new arrivals. The
delivery rule: a message is deleted only after every record in it is fsynced. Record bytes go to disk
exactly as the receiver encoded them, after every line was validated with the stored-record schema; a
message that fails is poison: never written, made visible again soon so that it reaches the dead-letter
queue after the max receive count instead of after that many visibility timeouts.

A storage failure (disk full, read-only, I/O error) does not spend the messages' receive budget: the
consumer keeps the batch it holds (the heartbeat keeps it invisible), stops receiving, retries the write
with capped exponential backoff and goes on when the disk is back. A queue that is broken
(``QueueBroken``), a file that could not be cut back, or any unexpected error in a background task ends
the process non-zero, for the supervisor to restart it; nothing unwritten is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from engine import instruments as m
from engine.config import Settings
from engine.errors import QueueBroken, QueueError, StorageError
from engine.kernels import jsonl
from engine.metrics import Metrics, write_snapshot
from engine.queues import MAX_BATCH_ENTRIES, Queue, Received
from engine.schema import SIGNALS, Payload, StoredRecord, stored_decoder
from engine.storage import Hour, PartitionWriter, UnsafeFileState, fault_point

if TYPE_CHECKING:
    from engine.storage.s3 import S3Writer

log = logging.getLogger("canpipe.consumer")

MAX_HELD_RECORDS = 50_000  # received but not yet flushed; past this the receive loop waits for the writer
S3_MAX_HELD_RECORDS = 250_000  # the same for an S3 consumer, which holds a whole object's worth (8 MiB)
# SQS refuses receives past 120,000 in-flight messages per queue: an S3 consumer holding single-record
# messages puts at this many, so that six consumers stay under the limit (docs/adr/0002-s3-storage.md)
S3_MAX_HELD_MESSAGES = 20_000
POISON_RETRY_S = 1  # a message that fails validation is visible again after this (SQS takes whole seconds)
STORAGE_RETRY_FIRST_S = 0.5  # a failed write is retried after this, doubling ...
STORAGE_RETRY_MAX_S = 10.0  # ... up to this: how soon writing resumes once the disk has room again
_NEWLINE = memoryview(b"\n")


@dataclass
class _Held:
    """A received message, parsed: its bytes per hour and its records' timestamps (epoch seconds)."""

    message: Received
    received_s: float
    parts: dict[Hour, list[memoryview]]
    client_s: np.ndarray
    ingest_s: np.ndarray
    records: int = field(init=False)
    visible_since_s: float = field(init=False)  # last receive or visibility extension

    def __post_init__(self) -> None:
        self.records = len(self.client_s)
        self.visible_since_s = self.received_s


class PoisonMessage(ValueError):
    """A queue message that is not canpipe NDJSON (one stored record per line)."""


class StoredLines:
    """The fast path of the stored-line check: a body whose every line is a valid stored record, validated
    without a Python object per record.

    ``ext/jsonl`` (compiled) reads the lines into columns, refusing any line that is not a stored record's
    exact shape (unknown or missing fields, a bad CAN id, a non-finite number, invalid UTF-8, a naive
    timestamp); the rules it does not apply are applied here to whole columns, read from the schema: the
    signals' ranges, min <= max, at least one signal, the vehicle id pattern (once per distinct id). A body
    that passes is exactly one that ``StoredRecord`` accepts (tests/test_consumer.py holds the two equal on
    mutated lines); anything else (a refused line, a blank line, a missing final newline, a field the
    kernel reads but does not check, such as ``dbc``) returns None and the caller decides with ``StoredRecord``.
    """

    MAX_VEHICLES = 100_000  # distinct ids remembered with their verdict; past it the memory starts over

    def __init__(self) -> None:
        payload = {f.name: f.type for f in _struct_fields(Payload)}
        bounds = [_float_bounds(payload[name]) for name in SIGNALS]
        self.low = np.array([b[0] for b in bounds])[:, None]
        self.high = np.array([b[1] for b in bounds])[:, None]
        self.volt = SIGNALS.index("cell_voltage_min"), SIGNALS.index("cell_voltage_max")
        self.temp = SIGNALS.index("cell_temp_min"), SIGNALS.index("cell_temp_max")
        fields = {f.name: f.type for f in _struct_fields(StoredRecord)}
        vehicle = fields["vehicle_id"]
        vehicle = vehicle.type if isinstance(vehicle, msgspec.inspect.Metadata) else vehicle
        assert isinstance(vehicle, msgspec.inspect.StrType) and vehicle.pattern
        assert vehicle.min_length is None and vehicle.max_length is None, "StoredLines: vehicle_id rules changed"
        self.vehicle_pattern = re.compile(vehicle.pattern)
        self.vehicles: dict[str, int] = {}
        self.vehicle_ok = np.zeros(0, dtype=bool)

    def columns(self, body: bytes) -> jsonl.Columns | None:
        """The columns of ``body`` when every line is a valid stored record; None: not decided here."""
        if not body.endswith(b"\n") or b'"dbc"' in body:  # the kernel skips a dbc value; its pattern is checked
            return None  # by StoredRecord (a key can hold no quote: '"dbc"' is that key or nothing)
        if len(self.vehicles) > self.MAX_VEHICLES:
            self.vehicles, self.vehicle_ok = {}, np.zeros(0, dtype=bool)
        cols = jsonl.parse_lines(body, self.vehicles)
        rows = len(cols.ingest_us)
        if cols.bad_lines or not rows or rows != cols.lines:
            return None
        known = len(self.vehicle_ok)
        if len(self.vehicles) > known:  # new ids: checked against the schema's pattern once each
            fresh = [
                self.vehicle_pattern.search(name) is not None for name in itertools.islice(self.vehicles, known, None)
            ]
            self.vehicle_ok = np.concatenate([self.vehicle_ok, np.array(fresh, dtype=bool)])
        values = cols.values
        (vmin, vmax), (tmin, tmax) = self.volt, self.temp
        bad = (
            ((values < self.low) | (values > self.high)).any()  # NaN (absent) compares false: allowed
            or (values[vmin] > values[vmax]).any()
            or (values[tmin] > values[tmax]).any()
            or np.isnan(values).all(axis=0).any()  # a payload without any signal
            or not self.vehicle_ok[cols.vehicle].all()
        )
        return None if bad else cols


def _struct_fields(struct: type) -> tuple[msgspec.inspect.Field, ...]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return info.fields


def _float_bounds(field_type: msgspec.inspect.Type) -> tuple[float, float]:
    """(ge, le) of an optional float signal; a rule StoredLines cannot apply fails at import."""
    (number,) = [t for t in getattr(field_type, "types", ()) if not isinstance(t, msgspec.inspect.NoneType)]
    number = number.type if isinstance(number, msgspec.inspect.Metadata) else number
    assert isinstance(number, msgspec.inspect.FloatType), f"StoredLines: a signal of type {number}"
    assert number.gt is None and number.lt is None and number.multiple_of is None, "StoredLines: signal rules changed"
    return (-np.inf if number.ge is None else number.ge), (np.inf if number.le is None else number.le)


_FAST = StoredLines() if jsonl.IMPLEMENTATION == "c" else None  # the twin is slower than msgspec: not used


def parse_message(message: Received, received_s: float) -> _Held:
    """Validate every line of a message body (NDJSON) and split it by the UTC hour of ``ingest_received_at``;
    no copy of the record bytes. Raises PoisonMessage, msgspec.DecodeError / ValidationError or
    UnicodeDecodeError for a body that is not one valid stored record per line."""
    body = message.body
    cols = None if _FAST is None else _FAST.columns(body)
    if cols is not None:  # every line valid, checked in C and on whole columns
        client_s = cols.timestamp_us / 1e6
        ingest_s = cols.ingest_us / 1e6
        hours = cols.ingest_us // 3_600_000_000
        terminated = True
    else:  # the exact check, one msgspec decode per message: its error names the bad line
        records = stored_decoder.decode_lines(body)
        terminated = body.endswith(b"\n")
        if not records or len(records) != body.count(b"\n") + (not terminated):
            raise PoisonMessage("blank lines: not one record per line")
        client_s = np.fromiter((r.timestamp.timestamp() for r in records), np.float64, len(records))
        ingest_s = np.fromiter((r.ingest_received_at.timestamp() for r in records), np.float64, len(records))
        hours = (ingest_s // 3600).astype(np.int64)  # epoch hours: UTC whatever offset the line was written with
    view = memoryview(body)
    tail = [] if terminated else [_NEWLINE]  # a last line without its newline must not glue onto the next
    parts: dict[Hour, list[memoryview]]
    if (hours == hours[0]).all():
        parts = {Hour.from_epoch_hour(int(hours[0])): [view, *tail]}
    else:  # a batch that straddles an hour is split line by line
        by_index: dict[int, list[memoryview]] = {}
        start = 0
        for index in hours.tolist():
            end = body.find(b"\n", start) + 1 or len(body)
            by_index.setdefault(index, []).append(view[start:end])
            start = end
        by_index[int(hours[-1])].extend(tail)
        parts = {Hour.from_epoch_hour(index): lines for index, lines in by_index.items()}
    return _Held(message, received_s, parts, client_s, ingest_s)


def writer_id() -> str:
    """Unique across processes and machines: host, pid and a random tag."""
    host = socket.gethostname().split(".")[0].replace("-", "") or "host"
    return f"{host}-{os.getpid()}-{os.urandom(3).hex()}"


def _first_ms_by_hour(batch: list[_Held]) -> dict[Hour, int]:
    """The earliest ``ingest_received_at`` (epoch ms) of each hour in ``batch``: the S3 object's name."""
    ingest_s = np.concatenate([h.ingest_s for h in batch])
    hours = (ingest_s // 3600).astype(np.int64)
    first: dict[Hour, int] = {}
    for index in np.unique(hours).tolist():
        first[Hour.from_epoch_hour(index)] = int(ingest_s[hours == index].min() * 1000)
    return first


class Consumer:
    def __init__(
        self, settings: Settings, queue: Queue, writer: PartitionWriter | S3Writer, *, snapshot: Path | None = None
    ):
        self.settings = settings
        self.queue = queue
        self.writer = writer
        # when a batch is written: a local file takes small batches (fsync is cheap); an S3 object is held to
        # CANPIPE_S3_OBJECT_BYTES or CANPIPE_S3_OBJECT_SECONDS (each PUT is billed, small objects slow readers)
        self.local = isinstance(writer, PartitionWriter)
        if self.local:
            self.flush_records, self.flush_bytes = settings.batch_records, None
            self.flush_seconds, self.max_held = settings.batch_seconds, MAX_HELD_RECORDS
        else:
            self.flush_records, self.flush_bytes = S3_MAX_HELD_RECORDS, settings.s3_object_bytes
            self.flush_seconds, self.max_held = settings.s3_object_seconds, S3_MAX_HELD_RECORDS
        self.held_bytes = 0
        self.metrics = Metrics()
        self.snapshot = snapshot
        self.held: list[_Held] = []
        self.held_records = 0
        self.first_at: float | None = None
        self._flushing: list[_Held] = []
        self._files: dict[Hour, Path] = {}  # the file each hour was last appended to
        for family in (m.BYTES_WRITTEN, m.FILES_WRITTEN):  # counted in the writer thread: keys exist before
            self.metrics.inc(family, 0)  # it runs, so a snapshot never iterates a dict that grows meanwhile
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._storage_ok = asyncio.Event()
        self._storage_ok.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then flush what is held and return.

        A receive loop long-polls in the background and hands messages over; this loop flushes when the
        batch is full or its timer runs out, so a slow long poll never delays the timer, and receiving
        goes on while a batch is being written.
        """
        loop = asyncio.get_running_loop()
        receiving = loop.create_task(self._receive_forever())
        heartbeat = loop.create_task(self._heartbeat())
        stop_wait = loop.create_task(stop.wait())
        failed = False
        try:
            while not stop.is_set():
                timeout = None if self.first_at is None else self.first_at + self.flush_seconds - time.monotonic()
                arrived = loop.create_task(self._arrived.wait())
                await asyncio.wait(
                    {arrived, stop_wait, receiving, heartbeat},
                    timeout=None if timeout is None else max(0.0, timeout),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                arrived.cancel()
                self._arrived.clear()
                for task in (receiving, heartbeat):
                    if task.done():  # they loop forever: an end is a failure, never something to idle through
                        raise task.exception() or RuntimeError(f"{task.get_coro()!r} ended")
                if self.held and (
                    self.held_records >= self.flush_records
                    or len(self.held) >= S3_MAX_HELD_MESSAGES
                    or (self.flush_bytes is not None and self.held_bytes >= self.flush_bytes)
                    or time.monotonic() >= (self.first_at or 0) + self.flush_seconds
                ):
                    await self.flush(stop)
        except BaseException:
            failed = True  # what is held is not flushed: it comes back after the visibility timeout
            raise
        finally:
            # stopping: a receive in flight is abandoned; what it fetched becomes visible again after the
            # visibility timeout (redelivered, never lost)
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving
            if not failed:
                await self.flush()
            heartbeat.cancel()
            stop_wait.cancel()
            self.write_snapshot()

    async def _receive_forever(self) -> None:
        # SQS bills every call: poll less often and gather more per call (unless a receive came back full)
        pace = self.queue.profile.with_overrides(
            send_linger_ms=None, receive_interval_ms=self.settings.receive_interval_ms
        ).receive_interval_s
        backoff = 0.5
        while True:
            while self.held_records >= self.max_held:  # the writer is behind: stop fetching until it flushed
                self._room.clear()
                await self._room.wait()
            await self._storage_ok.wait()  # the disk refuses writes: receiving more would only hold more
            started = time.monotonic()
            try:
                messages = await self.queue.receive(MAX_BATCH_ENTRIES, 20.0)
            except QueueBroken as exc:
                log.error("queue broken: %s; exiting for the supervisor to restart", exc, extra={"stage": "receive"})
                raise
            except QueueError as exc:
                self.metrics.inc(m.CONSUMER_ERRORS, stage="receive")
                log.warning("receive failed: %s; retrying in %.1f s", exc, backoff, extra={"stage": "receive"})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            if messages:
                fault_point("while_receiving")
                poison = self._hold(messages)
                if poison:  # soon visible again: it reaches the dead-letter queue after max receives, not max timeouts
                    with contextlib.suppress(QueueError):
                        await self.queue.change_visibility(poison, POISON_RETRY_S)
                self._arrived.set()
            if len(messages) < MAX_BATCH_ENTRIES and pace:
                await asyncio.sleep(max(0.0, started + pace - time.monotonic()))

    def _hold(self, messages: list[Received]) -> list[str]:
        """Parse and hold ``messages``; return the receipts of those that are poison."""
        now = time.time()
        poison = []
        for message in messages:
            try:
                held = parse_message(message, now)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:  # UnicodeDecodeError too
                # Not ours to drop: leave it; after max receives it lands in the dead-letter queue.
                self.metrics.inc(m.CONSUMER_ERRORS, stage="parse")
                log.error(
                    "message %s is not canpipe NDJSON (receive %d): %s",
                    message.message_id,
                    message.receive_count,
                    exc,
                    extra={"stage": "parse", "message_id": message.message_id, "receive_count": message.receive_count},
                )
                poison.append(message.receipt)
                continue
            if message.receive_count > 1:
                self.metrics.inc(m.REDELIVERED)
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.held.append(held)
            self.held_records += held.records
            self.held_bytes += len(message.body)
        return poison

    async def flush(self, stop: asyncio.Event | None = None) -> None:
        """Write every held message durably, then delete it from the queue.

        A failed write is retried with backoff until it succeeds or ``stop`` is set (without ``stop``: one
        attempt); meanwhile receiving pauses and the batch stays held. Raises UnsafeFileState.
        """
        batch, self.held, self.held_records, self.held_bytes, self.first_at = self.held, [], 0, 0, None
        self._room.set()
        if not batch:
            return
        self._flushing = batch
        try:
            by_hour: dict[Hour, list[memoryview]] = {}
            for held in batch:
                for hour, parts in held.parts.items():
                    by_hour.setdefault(hour, []).extend(parts)
            retry_s = STORAGE_RETRY_FIRST_S
            while True:
                try:
                    if self.local:
                        await asyncio.to_thread(self._write, by_hour)
                    else:
                        await self._put(by_hour, batch)
                    break
                except UnsafeFileState:
                    raise
                except StorageError as exc:
                    self.metrics.inc(m.CONSUMER_ERRORS, stage="storage")
                    if stop is None or stop.is_set():
                        log.error(
                            "write failed: %s; %d messages left for redelivery",
                            exc,
                            len(batch),
                            extra={"stage": "storage"},
                        )
                        return
                    self._storage_ok.clear()
                    log.error(
                        "write failed: %s; holding %d messages, receiving paused, retry in %.1f s",
                        exc,
                        len(batch),
                        retry_s,
                        extra={"stage": "storage"},
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), retry_s)
                    retry_s = min(retry_s * 2, STORAGE_RETRY_MAX_S)
            if not self._storage_ok.is_set():
                log.info("write succeeded again: receiving resumed", extra={"stage": "storage"})
                self._storage_ok.set()
            fault_point("after_fsync")
            # counted (and the snapshot written) once durable, before the deletes: a crash in between makes a
            # redelivery that is written and counted again, never a written record that was not counted
            self._record(batch, time.time())
            receipts = [held.message.receipt for held in batch]
            undeleted = 0
            for i in range(0, len(receipts), MAX_BATCH_ENTRIES):
                try:
                    failed = await self.queue.delete_batch(receipts[i : i + MAX_BATCH_ENTRIES])
                except QueueError as exc:
                    failed = receipts[i : i + MAX_BATCH_ENTRIES]
                    log.warning("delete failed: %s", exc, extra={"stage": "delete"})
                if failed:  # written but not deleted: they come back and become duplicates, never loss
                    self.metrics.inc(m.CONSUMER_ERRORS, len(failed), stage="delete")
                    undeleted += len(failed)
            self.metrics.inc(m.MESSAGES_DELETED, len(receipts) - undeleted)
            fault_point("after_delete")
            records = sum(held.records for held in batch)
            log.info(
                "wrote %d records from %d messages durably, deleted %d of them from the queue",
                records,
                len(batch),
                len(receipts) - undeleted,
                extra={"records": records, "messages": len(batch), "undeleted": undeleted},
            )
        finally:
            self._flushing = []

    def _write(self, by_hour: dict[Hour, list[memoryview]]) -> None:
        """Append each hour's lines; an hour written is removed from ``by_hour``, so a retry after a
        failure writes only the rest (no duplicates of our own making)."""
        assert isinstance(self.writer, PartitionWriter)
        for hour in sorted(by_hour):
            path = self.writer.append(hour, by_hour[hour])
            self.metrics.inc(m.BYTES_WRITTEN, sum(len(part) for part in by_hour[hour]))
            if self._files.get(hour) != path:  # a new or rotated hour file
                self._files[hour] = path
                self.metrics.inc(m.FILES_WRITTEN)
            del by_hour[hour]

    async def _put(self, by_hour: dict[Hour, list[memoryview]], batch: list[_Held]) -> None:
        """Put each hour's lines as one S3 object; an hour put is removed from ``by_hour`` (as ``_write``)."""
        from engine.storage.s3 import S3Writer

        assert isinstance(self.writer, S3Writer)
        first_ms = _first_ms_by_hour(batch)
        for hour in sorted(by_hour):
            name, size = await self.writer.write(hour, by_hour[hour], first_ms[hour])
            self.metrics.inc(m.BYTES_WRITTEN, size)
            self.metrics.inc(m.FILES_WRITTEN)
            log.debug("put %s (%d bytes)", name, size, extra={"stage": "storage"})
            del by_hour[hour]

    def _record(self, batch: list[_Held], durable_s: float) -> None:
        """Latencies and counters once per batch, in arrays (no per-record Python loop)."""
        client_s = np.concatenate([h.client_s for h in batch])
        counts = [h.records for h in batch]
        queue_ms = np.repeat([h.message.first_receive_ms - h.message.sent_at_ms for h in batch], counts)
        received_s = np.repeat([h.received_s for h in batch], counts)
        latency = self.metrics.latency  # the ingest stage is the receiver's: recorded once, when accepted
        latency["queue"].record_many(queue_ms.astype(np.float64))
        latency["processing"].record_many((durable_s - received_s) * 1000.0)
        latency["end_to_end"].record_many((durable_s - client_s) * 1000.0)
        self.metrics.inc(m.RECORDS_WRITTEN, len(client_s))
        self.metrics.inc(m.BATCHES)
        self.write_snapshot()  # now, not at the next tick: a consumer killed -9 has its written records counted

    async def _heartbeat(self) -> None:
        """Keep held messages invisible while a batch is held long, and publish metrics snapshots."""
        timeout = self.settings.visibility_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 3))
            self.write_snapshot()
            now = time.time()
            old = [h for h in self.held + self._flushing if now - h.visible_since_s > timeout / 2]
            if old:
                receipts = [h.message.receipt for h in old]
                with contextlib.suppress(QueueError):
                    for i in range(0, len(receipts), MAX_BATCH_ENTRIES):
                        await self.queue.change_visibility(receipts[i : i + MAX_BATCH_ENTRIES], timeout)
                    for h in old:
                        h.visible_since_s = now

    def write_snapshot(self) -> None:
        self.metrics.use_queue_usage(self.queue.usage())
        if self.snapshot is not None:
            with contextlib.suppress(OSError):
                write_snapshot(self.snapshot, self.metrics)
