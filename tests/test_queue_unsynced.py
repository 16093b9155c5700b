"""The embedded queue's receives, deletes and visibility changes commit without fsync; sends always with it.

A lost receive or delete (a power cut before the next sync) only makes a duplicate; a lost send would be a
lost record. So whatever happens to a receive or a delete, the connection must be back to
synchronous=FULL before the next send.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from engine.errors import QueueError
from engine.queues.sqlite import SqliteQueue

FULL = 2


async def synchronous(queue: SqliteQueue) -> int:
    """The connection's setting, read on the queue's own thread (sqlite3 objects stay on theirs)."""
    return await queue._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])


@pytest.fixture
def queue(tmp_path):
    q = SqliteQueue(str(tmp_path / "queue.db"))
    yield q
    asyncio.run(q.close())


def test_receive_delete_and_visibility_leave_the_connection_synced_for_sends(queue):
    async def go() -> None:
        await queue.send_batch([b"a\n", b"b\n"])
        got = await queue.receive(10, 0)
        assert [m.body for m in got] == [b"a\n", b"b\n"]
        assert await synchronous(queue) == FULL
        await queue.change_visibility([got[1].receipt], 0)
        assert await synchronous(queue) == FULL
        assert await queue.delete_batch([m.receipt for m in got]) == []
        assert await synchronous(queue) == FULL
        assert (await queue.stats()).visible == 0

    asyncio.run(go())


class FailingClock:
    def __init__(self, clock):
        self.clock = clock

    def now_ms(self) -> int:
        return self.clock.now_ms()

    def persist(self, conn, now) -> None:
        raise sqlite3.OperationalError("disk I/O error")


def test_a_receive_that_fails_midway_leaves_the_connection_synced(queue, monkeypatch):
    async def go() -> None:
        await queue.send_batch([b"a\n"])
        monkeypatch.setattr(queue, "_clock", FailingClock(queue._clock))
        with pytest.raises(QueueError):
            await queue.receive(10, 0)
        assert await synchronous(queue) == FULL
        monkeypatch.undo()
        assert [m.body for m in await queue.receive(10, 0)] == [b"a\n"]  # the failed receive took nothing

    asyncio.run(go())


class Unresyncable:
    """A connection whose PRAGMA synchronous=FULL fails (after the call it wraps failed)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.closed = False

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql, *args):
        if sql == "PRAGMA synchronous=FULL":
            raise sqlite3.OperationalError("cannot")
        return self.conn.execute(sql, *args)

    def close(self) -> None:
        self.closed = True
        self.conn.close()


def test_a_connection_that_cannot_be_resynced_is_dropped(queue, monkeypatch):
    async def go() -> None:
        await queue.send_batch([b"a\n"])
        wrapped = Unresyncable(queue._conn)
        queue._conn = wrapped  # type: ignore[assignment]
        with pytest.raises(QueueError):
            await queue.receive(10, 0)  # its commit's PRAGMA fails: the call fails and the connection goes
        assert wrapped.closed and queue._conn is None
        await queue.send_batch([b"b\n"])  # a fresh connection, synced
        assert await synchronous(queue) == FULL
        # the failed call had committed its receive: "a" stays in flight until its visibility timeout
        assert [m.body for m in await queue.receive(10, 0)] == [b"b\n"]
        assert (await queue.stats()).in_flight == 2

    asyncio.run(go())
