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
from engine.errors import QueueBroken, StorageError
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
                if self.task.done():
                    self.task.result()  # raises what ended the consumer, if anything did
                    raise AssertionError("the consumer stopped before the condition held")
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
        if self.task and not self.task.done():
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
    # the written records are counted before the deletes, the deleted messages after them: wait for those
    h.run_until(lambda: h.consumer.metrics.counters["canpipe_consumer_messages_deleted_total"] == 2)
    assert h.consumer.metrics.counters["canpipe_consumer_records_written_total"] == 120
    assert h.stats() == (0, 0, 0)


def test_timer_trigger_fires_with_no_new_arrivals(harness, data_dir):
    h = harness(batch_seconds=0.8)
    h.send(stored(5, dt.datetime.now(UTC)))
    took = h.run_until(lambda: len(on_disk(data_dir)) == 5)
    assert 0.7 <= took < 5  # held for the timer, then written though nothing else arrived
    h.run_until(lambda: h.consumer.metrics.counters["canpipe_consumer_messages_deleted_total"] == 1)
    assert h.consumer.metrics.counters["canpipe_consumer_records_written_total"] == 5
    assert h.stats() == (0, 0, 0)
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


def test_storage_failure_holds_the_batch_without_spending_receives(harness, data_dir, monkeypatch):
    """Disk full for longer than max_receive_count visibility timeouts: nothing dead-lettered, nothing
    redelivered, receiving paused, everything written once the disk is back."""
    h = harness(batch_seconds=0.2, visibility_timeout_s=1.0)
    h.loop.run_until_complete(h.queue.create(QueueAttributes(max_receive_count=2, visibility_timeout_s=1)))
    disk_full = True
    real_append = h.writer.append

    def append(hour, parts):
        if disk_full:
            raise StorageError("No space left on device")
        return real_append(hour, parts)

    monkeypatch.setattr(h.writer, "append", append)
    h.send(stored(4, dt.datetime.now(UTC)))
    failures = 'canpipe_consumer_errors_total{stage="storage"}'
    h.run_until(lambda: h.consumer.metrics.counters[failures] >= 1)
    h.send(stored(3, dt.datetime.now(UTC), 4))  # the long poll already in flight takes this one
    h.run_until(lambda: h.stats().in_flight == 2, timeout=10)
    h.send(stored(2, dt.datetime.now(UTC), 7))  # but no new receive starts while the disk is full

    def nothing_moves() -> bool:
        # checked on every poll for four visibility timeouts (twice the receive budget): an absence
        # cannot be waited for, so the window is a duration, and the invariant must hold all along it
        counts = h.stats()
        assert counts.dead_letter == 0 and counts.visible >= 1 and on_disk(data_dir) == [], counts
        return time.monotonic() - t0 > 4.0

    t0 = time.monotonic()
    h.run_until(nothing_moves)
    assert h.stats() == QueueCounts(visible=1, in_flight=2, dead_letter=0)
    assert on_disk(data_dir) == []
    disk_full = False
    h.run_until(lambda: len(on_disk(data_dir)) == 9 and h.stats() == (0, 0, 0), timeout=30)
    assert h.consumer.metrics.counters["canpipe_consumer_redelivered_messages_total"] == 0


def test_a_file_that_cannot_be_cut_back_stops_the_consumer_and_deletes_nothing(harness, data_dir, monkeypatch):
    from engine.storage import UnsafeFileState

    h = harness(batch_seconds=0.2)

    def append(hour, parts):
        raise UnsafeFileState("batch-x.jsonl may hold a partial batch and could not be cut")

    monkeypatch.setattr(h.writer, "append", append)
    h.send(stored(2, dt.datetime.now(UTC)))
    with pytest.raises(UnsafeFileState):
        h.run_until(lambda: False)
    assert h.stats().in_flight == 1 and h.stats().dead_letter == 0


@pytest.mark.parametrize("error", [RuntimeError("bug in receive"), QueueBroken("queue.db was replaced")])
def test_a_dead_receive_task_ends_the_consumer_instead_of_idling(harness, monkeypatch, error):
    h = harness(batch_seconds=0.2)

    async def receive(*args, **kwargs):
        raise error

    monkeypatch.setattr(h.queue, "receive", receive)
    t0 = time.monotonic()
    with pytest.raises(type(error)):
        h.run_until(lambda: False, timeout=10)
    assert time.monotonic() - t0 < 5


def test_poison_reaches_the_dead_letter_queue_without_waiting_visibility_timeouts(harness, data_dir):
    h = harness(batch_seconds=0.2, visibility_timeout_s=30)
    h.loop.run_until_complete(h.queue.create(QueueAttributes(max_receive_count=3, visibility_timeout_s=30)))
    h.send(stored(3, dt.datetime.now(UTC)), b'{"oops": 1}\n', stored(2, dt.datetime.now(UTC), 3))
    took = h.run_until(lambda: h.stats().dead_letter == 1, timeout=25)
    assert took < 20  # not 3 x 30 s
    assert len(on_disk(data_dir)) == 5  # the rest of the batch was written
    assert h.stats() == QueueCounts(0, 0, 1)


def record_line(index: int, received: str) -> bytes:
    body = stored(1, dt.datetime.now(UTC), index)
    return body.replace(
        body[body.index(b',"ingest_received_at"') :], b',"ingest_received_at":"%s"}\n' % received.encode()
    )


@pytest.mark.parametrize("straddles", [False, True], ids=["one-hour", "two-hours"])
def test_a_body_without_its_final_newline_is_not_glued_onto_the_next(harness, data_dir, straddles):
    h = harness(batch_seconds=0.5, batch_records=1000)
    first = record_line(0, "2025-10-19T17:59:59.000000Z") + record_line(1, "2025-10-19T17:59:59.500000Z")
    if straddles:
        first = record_line(2, "2025-10-19T17:00:01.000000Z") + record_line(3, "2025-10-19T18:00:00.000000Z")
    h.send(first.rstrip(b"\n"), record_line(4, "2025-10-19T17:59:59.900000Z"))
    h.run_until(lambda: h.stats() == (0, 0, 0))
    assert len(on_disk(data_dir)) == 3  # every line parses on its own


@pytest.mark.parametrize(
    "body",
    [
        b'{"timestamp":"2025-10-19T17:00:00Z","ingest_received_at":"2025-10-19T17:00:00Z"}\n',
        b'{"timestamp":"2025-10-19T17:00:00Z","vehicle_id":"EV\xff","can_id":"0x1","payload":{"battery_soc":1},'
        b'"ingest_received_at":"2025-10-19T17:00:00Z"}\n',
        b"\n\n",
    ],
    ids=["stamps-only", "invalid-utf8", "blank-lines"],
)
def test_lines_that_are_not_stored_records_are_never_written(harness, data_dir, body):
    h = harness(batch_seconds=0.2)
    h.loop.run_until_complete(h.queue.create(QueueAttributes(max_receive_count=1)))
    h.send(body)
    h.run_until(lambda: h.stats().dead_letter == 1)
    assert list(iter_raw_files(data_dir / "raw")) == []


def test_hour_folder_comes_from_utc_whatever_the_offset(harness, data_dir):
    h = harness(batch_seconds=0.2)
    h.send(record_line(0, "2025-10-19T23:10:00.000000+05:30"))  # 17:40 UTC
    h.run_until(lambda: h.stats() == (0, 0, 0))
    (path,) = iter_raw_files(data_dir / "raw")
    assert path.parent.relative_to(data_dir / "raw").as_posix() == "year=2025/month=10/day=19/hour=17"


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
