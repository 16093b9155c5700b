"""Embedded queue under a backlog: receive and 10-message delete latency with 0 vs N messages waiting.

A consumer draining a backlog must not lock the receiver out: each receive and delete holds SQLite's
write lock, so their cost must not grow with the backlog (O(log n) index lookups, not O(n) scans). The
guard compares the same operations on a near-empty queue and on a queue holding ``BACKLOG`` messages,
in one run. Set ``CANPIPE_BENCH_BACKLOG`` (default 200,000; the figures in docs/benchmarks.md use 400,000).
Each round receives 10 messages, deletes them and sends 10 back, so the backlog stays where it is.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator

import pytest

from engine.queues import open_queue

BACKLOG = int(os.environ.get("CANPIPE_BENCH_BACKLOG", "200000"))
BODY = b'{"vehicle_id":"EV-00001","can_id":"0x132","payload":{"battery_soc":80.5}}\n' * 3
GUARD_RATIO = 5.0  # O(log n): a 200k backlog costs ~1-2x an empty queue; the O(n) scans cost >100x


def load(path, count: int) -> None:
    """``count`` visible messages written straight into the file in one transaction (any schema version)."""
    conn = sqlite3.connect(path)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        names = ["body", "sent_ms", "visible_ms"] + (["retained_ms"] if "retained_ms" in columns else [])
        now = time.time_ns() // 1_000_000
        with conn:
            conn.executemany(
                f"INSERT INTO messages ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                ((BODY, *[now] * (len(names) - 1)) for _ in range(count)),
            )
    finally:
        conn.close()


class Drain:
    """One queue and an event loop; ``receive`` then ``delete`` 10 messages, refilled after each round."""

    def __init__(self, path, backlog: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.queue = open_queue(f"sqlite:///{path}", max_bytes=0)
        self.loop.run_until_complete(self.queue.ping())  # creates the schema
        load(path, backlog)
        self.receipts: list[str] = []

    def receive(self) -> None:
        self.receipts = [m.receipt for m in self.loop.run_until_complete(self.queue.receive(10, 0))]
        assert len(self.receipts) == 10

    def delete(self) -> None:
        assert self.loop.run_until_complete(self.queue.delete_batch(self.receipts)) == []

    def refill(self) -> None:
        self.loop.run_until_complete(self.queue.send_batch([BODY] * 10))

    def seconds(self, step: str, rounds: int = 15) -> float:
        """Best of ``rounds`` timings of ``step`` ('receive' or 'delete'), each in a full round."""
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            self.receive()
            received = time.perf_counter()
            self.delete()
            deleted = time.perf_counter()
            self.refill()
            best = min(best, received - started if step == "receive" else deleted - received)
        return best

    def close(self) -> None:
        self.loop.run_until_complete(self.queue.close())
        self.loop.close()


@pytest.fixture(scope="module")
def queues(tmp_path_factory) -> Iterator[dict[str, Drain]]:
    folder = tmp_path_factory.mktemp("backlog")
    drains = {"empty": Drain(folder / "empty.db", 100), "backlog": Drain(folder / "backlog.db", BACKLOG)}
    yield drains
    for drain in drains.values():
        drain.close()


@pytest.mark.parametrize("which", ["empty", "backlog"])
def test_receive_10(benchmark, queues, which):
    drain = queues[which]
    benchmark.group = f"embedded queue: receive 10 (backlog {BACKLOG:,} vs 100)"

    def round_trip() -> None:
        drain.receive()

    benchmark.pedantic(round_trip, teardown=lambda: (drain.delete(), drain.refill()), rounds=10, iterations=1)


@pytest.mark.parametrize("which", ["empty", "backlog"])
def test_delete_10(benchmark, queues, which):
    drain = queues[which]
    benchmark.group = f"embedded queue: delete 10 (backlog {BACKLOG:,} vs 100)"
    benchmark.pedantic(drain.delete, setup=drain.receive, teardown=drain.refill, rounds=10, iterations=1)


def test_guard_backlog_cost_is_logarithmic(queues):
    """CI guard, same run: receive and delete with a large backlog cost within GUARD_RATIO of a near-empty queue."""
    ratios = {}
    for step in ("receive", "delete"):
        empty_s = queues["empty"].seconds(step)
        backlog_s = queues["backlog"].seconds(step)
        ratios[step] = backlog_s / empty_s
        print(
            f"{step} 10: {empty_s * 1000:.2f} ms empty, {backlog_s * 1000:.2f} ms at {BACKLOG:,} ({ratios[step]:.1f}x)"
        )
    conn = sqlite3.connect(queues["backlog"].queue.path)  # the cost every open pays: PRAGMA quick_check
    try:
        check_started = time.perf_counter()
        assert conn.execute("PRAGMA quick_check(5)").fetchone()[0] == "ok"
        print(f"quick_check at {BACKLOG:,}: {(time.perf_counter() - check_started) * 1000:.0f} ms")
    finally:
        conn.close()
    for step, value in ratios.items():
        assert value < GUARD_RATIO, f"{step} with {BACKLOG:,} waiting costs {value:.1f}x an empty queue's"
