"""The consumer loop on the real embedded queue and real files (in one process)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sqlite3
import time
from typing import NamedTuple

import pytest
from canpipe_testing import make_record

from engine.config import Settings
from engine.consumer import Consumer
from engine.errors import StorageError
from engine.queues import QueueAttributes, open_queue
from engine.schema import decode_records, encode_stored
from engine.storage import PartitionWriter, iter_raw_files

UTC = dt.UTC


class QueueCounts(NamedTuple):
    visible: int
    in_flight: int
    dead_letter: int


def stored(n: int, received_at: dt.datetime, start: int = 0) -> bytes:
    records = decode_records(json.dumps([make_record(i) for i in range(start, start + n)]).encode(), ndjson=False)
    return encode_stored(records, received_at)


def on_disk(data_dir) -> list[dict]:
    return [json.loads(line) for p in iter_raw_files(data_dir / "raw") for line in p.read_bytes().splitlines()]


class Harness:
    def __init__(self, data_dir, **overrides):
        self.settings = dataclasses.replace(Settings.from_env({"CANPIPE_DATA_DIR": str(data_dir)}), **overrides)
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.queue = open_queue(self.settings.queue_url, visibility_timeout_s=self.settings.visibility_timeout_s)
        self.writer = PartitionWriter(data_dir, "t")
        self.consumer = Consumer(self.settings, self.queue, self.writer, snapshot=data_dir / "c.metrics")
        self.stop = asyncio.Event()
        self.task = None

    def send(self, *bodies: bytes) -> None:
        self.loop.run_until_complete(self.queue.send_batch(list(bodies)))

    def run_until(self, condition, timeout: float = 15.0) -> float:
        """Run the consumer until ``condition()``; return the seconds it took."""

        async def go():
            self.task = self.task or asyncio.create_task(self.consumer.run(self.stop))
            t0 = time.monotonic()
            while not condition():
                assert time.monotonic() - t0 < timeout, "timed out waiting for the consumer"
                assert not self.task.done() or self.task.result()
                await asyncio.sleep(0.02)
            return time.monotonic() - t0

        return self.loop.run_until_complete(go())

    def stats(self) -> QueueCounts:
        """Read the queue file directly, as an outside observer (works while the loop runs)."""
        with sqlite3.connect(self.data_dir / "queue.db") as conn:
            now = time.time_ns() // 1_000_000
            visible = conn.execute("SELECT COUNT(*) FROM messages WHERE visible_ms <= ?", (now,)).fetchone()[0]
            in_flight = conn.execute("SELECT COUNT(*) FROM messages WHERE visible_ms > ?", (now,)).fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return QueueCounts(visible, in_flight, dead)

    def close(self):
        if self.loop.is_closed():
            return
        self.stop.set()
        if self.task:
            self.loop.run_until_complete(self.task)
        self.loop.run_until_complete(self.queue.close())
        self.writer.close()
        self.loop.close()


@pytest.fixture
def harness(data_dir):
    made = []

    def make(**overrides):
        made.append(Harness(data_dir, **overrides))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_count_trigger_flushes_without_waiting_for_the_timer(harness, data_dir):
    h = harness(batch_seconds=30.0)
    now = dt.datetime.now(UTC)
    h.send(stored(60, now), stored(60, now, 60))
    took = h.run_until(lambda: len(on_disk(data_dir)) == 120)
    assert took < 10
    h.run_until(lambda: h.stats().in_flight == 0)
    assert h.consumer.metrics.counters["canpipe_consumer_records_written_total"] == 120


def test_timer_trigger_fires_with_no_new_arrivals(harness, data_dir):
    h = harness(batch_seconds=0.8)
    h.send(stored(5, dt.datetime.now(UTC)))
    took = h.run_until(lambda: len(on_disk(data_dir)) == 5)
    assert 0.7 <= took < 5  # held for the timer, then written though nothing else arrived
    h.run_until(lambda: h.stats().in_flight == 0 and h.stats().visible == 0)
    summary = h.consumer.metrics.summary("end_to_end")
    assert summary["count"] == 5 and summary["p50"] >= 700


def test_records_are_written_byte_for_byte_and_deleted_after(harness, data_dir):
    h = harness(batch_seconds=0.2)
    body = stored(3, dt.datetime.now(UTC))
    h.send(body)
    h.run_until(lambda: len(on_disk(data_dir)) == 3 and h.stats().in_flight == 0)
    (path,) = iter_raw_files(data_dir / "raw")
    assert path.read_bytes() == body


def test_batch_straddling_an_hour_is_split(harness, data_dir):
    h = harness(batch_seconds=0.2)
    before = dt.datetime(2025, 10, 19, 17, 59, 59, 999000, tzinfo=UTC)
    after = dt.datetime(2025, 10, 19, 18, 0, 0, 0, tzinfo=UTC)
    h.send(stored(2, before) + stored(3, after, 2))  # one queue message, two hours
    h.run_until(lambda: len(on_disk(data_dir)) == 5)
    hours = {p.parent.name: len(p.read_bytes().splitlines()) for p in iter_raw_files(data_dir / "raw")}
    assert hours == {"hour=17": 2, "hour=18": 3}


def test_failed_write_is_retried_once_then_left_for_redelivery(harness, data_dir, monkeypatch):
    h = harness(batch_seconds=0.2, visibility_timeout_s=1.5)
    calls = []
    real_append = h.writer.append

    def failing(hour, parts):
        calls.append(hour)
        if len(calls) <= 2:
            raise StorageError("disk full")
        return real_append(hour, parts)

    monkeypatch.setattr(h.writer, "append", failing)
    h.send(stored(4, dt.datetime.now(UTC)))
    h.run_until(lambda: h.consumer.metrics.counters['canpipe_consumer_errors_total{stage="storage"}'] == 1)
    assert len(calls) == 2 and on_disk(data_dir) == []
    assert h.stats().in_flight == 1  # not deleted: it comes back after the visibility timeout
    h.run_until(lambda: len(on_disk(data_dir)) == 4 and h.stats().in_flight == 0)
    assert h.consumer.metrics.counters["canpipe_consumer_redelivered_messages_total"] == 1


def test_poison_message_is_never_deleted_and_ends_in_the_dead_letter_queue(harness, data_dir):
    h = harness(batch_seconds=0.2, visibility_timeout_s=1)
    h.loop.run_until_complete(h.queue.create(QueueAttributes(max_receive_count=2)))
    h.send(b"this is not telemetry\n")
    h.run_until(lambda: h.stats().dead_letter == 1, timeout=20)
    assert h.consumer.metrics.counters['canpipe_consumer_errors_total{stage="parse"}'] == 2
    assert on_disk(data_dir) == []


def test_long_held_batch_gets_its_visibility_extended(harness, data_dir, monkeypatch):
    h = harness(batch_seconds=0.2, visibility_timeout_s=1.5)
    real_append = h.writer.append

    def slow(hour, parts):
        time.sleep(2.5)  # a stalled disk: longer than the visibility timeout
        return real_append(hour, parts)

    monkeypatch.setattr(h.writer, "append", slow)
    h.send(stored(2, dt.datetime.now(UTC)))
    h.run_until(lambda: len(on_disk(data_dir)) == 2 and h.stats().in_flight == 0)
    assert h.consumer.metrics.counters["canpipe_consumer_redelivered_messages_total"] == 0
    assert len(on_disk(data_dir)) == 2  # no second copy: nobody else got it meanwhile


def test_stop_flushes_what_is_held(harness, data_dir):
    h = harness(batch_seconds=60.0)
    h.send(stored(7, dt.datetime.now(UTC)))
    h.run_until(lambda: h.consumer.held_records == 7)
    h.close()
    assert len(on_disk(data_dir)) == 7
    assert (data_dir / "c.metrics").exists()
