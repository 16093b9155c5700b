"""The embedded queue: one SQLite file with SQS semantics, safe for many processes.

Durability: WAL with ``synchronous=FULL``, so a send is on disk (the WAL is fsynced) before it is
acknowledged. Long polling sleeps on a Unix datagram socket that every sender pokes after its commit,
so an idle consumer costs no CPU and a new message wakes it at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import secrets
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from engine.errors import QueueError
from engine.queues import QueueAttributes, QueueStats, Received

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    sent_ms INTEGER NOT NULL,
    visible_ms INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    first_receive_ms INTEGER,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS messages_visible ON messages (visible_ms, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    sent_ms INTEGER NOT NULL,
    receive_count INTEGER NOT NULL,
    dead_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attributes (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

MAX_MESSAGE_BYTES = 1024 * 1024
BUSY_TIMEOUT_MS = 5000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqliteQueue:
    """The ``sqlite:///PATH`` backend. All SQLite work runs on one private thread per instance."""

    max_message_bytes = MAX_MESSAGE_BYTES

    def __init__(self, path: str, *, visibility_timeout_s: float | None = None) -> None:
        self.path = Path(path)
        self._visibility_override = visibility_timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="canpipe-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._attrs = QueueAttributes()
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        self._wake_dir = Path(tempfile.gettempdir()) / f"canpipe-wake-{digest}"
        self._wake_sock: socket.socket | None = None
        self._wake_event: asyncio.Event | None = None
        self._last_retention_ms = 0

    # --- plumbing -------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise QueueError(f"embedded queue {self.path}: {exc}") from exc
            self._conn = conn
            self._load_attributes(conn)
        return self._conn

    def _load_attributes(self, conn: sqlite3.Connection) -> None:
        stored = dict(conn.execute("SELECT name, value FROM attributes").fetchall())
        fields = {f: stored[f] for f in QueueAttributes.__dataclass_fields__ if f in stored}
        if self._visibility_override is not None:
            fields["visibility_timeout_s"] = self._visibility_override
        self._attrs = QueueAttributes(**fields)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            conn = self._connect()
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise QueueError(f"embedded queue {self.path}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _wake_waiters(self) -> None:
        try:
            names = os.listdir(self._wake_dir)
        except FileNotFoundError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for name in names:
                address = str(self._wake_dir / name)
                try:
                    sock.sendto(b"!", address)
                except BlockingIOError:
                    pass  # its buffer is full of wake-ups already
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(address)  # a waiter that died without cleaning up
                except OSError:
                    pass

    def _ensure_wake_socket(self) -> asyncio.Event:
        if self._wake_event is None:
            self._wake_dir.mkdir(mode=0o700, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(str(self._wake_dir / f"{os.getpid()}-{secrets.token_hex(4)}"))
            event = asyncio.Event()

            def drain() -> None:
                with contextlib.suppress(BlockingIOError):
                    while sock.recv(16):
                        pass
                event.set()

            asyncio.get_running_loop().add_reader(sock.fileno(), drain)
            self._wake_sock, self._wake_event = sock, event
        return self._wake_event

    # --- protocol -------------------------------------------------------------------------------

    async def send_batch(self, bodies: Sequence[bytes]) -> list[int]:
        for body in bodies:
            if len(body) > self.max_message_bytes:
                raise QueueError(f"message of {len(body)} bytes exceeds {self.max_message_bytes}")

        def send(conn: sqlite3.Connection) -> list[int]:
            now = _now_ms()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO messages (body, sent_ms, visible_ms) VALUES (?, ?, ?)",
                [(body, now, now) for body in bodies],
            )
            conn.execute("COMMIT")
            self._wake_waiters()
            return []

        return await self._run(send)

    def _receive_now(self, conn: sqlite3.Connection, max_messages: int) -> tuple[list[Received], int | None]:
        now = _now_ms()
        attrs = self._attrs
        conn.execute("BEGIN IMMEDIATE")
        if now - self._last_retention_ms > 60_000:
            conn.execute("DELETE FROM messages WHERE sent_ms < ?", (now - attrs.retention_s * 1000,))
            conn.execute("DELETE FROM dead_letters WHERE dead_ms < ?", (now - attrs.dlq_retention_s * 1000,))
            self._last_retention_ms = now
        # As SQS: a message already received max_receive_count times goes to the DLQ on its next receive.
        conn.execute(
            "INSERT INTO dead_letters (id, body, sent_ms, receive_count, dead_ms) SELECT id, body, sent_ms, "
            "receive_count, ? FROM messages WHERE visible_ms <= ? AND receive_count >= ?",
            (now, now, attrs.max_receive_count),
        )
        conn.execute(
            "DELETE FROM messages WHERE visible_ms <= ? AND receive_count >= ?", (now, attrs.max_receive_count)
        )
        token = secrets.token_hex(8)
        rows = conn.execute(
            "UPDATE messages SET visible_ms = ?, receive_count = receive_count + 1, "
            "first_receive_ms = COALESCE(first_receive_ms, ?), receipt = id || ':' || ? "
            "WHERE id IN (SELECT id FROM messages WHERE visible_ms <= ? ORDER BY visible_ms, id LIMIT ?) "
            "RETURNING id, receipt, body, sent_ms, first_receive_ms, receive_count",
            (now + int(attrs.visibility_timeout_s * 1000), now, token, now, max_messages),
        ).fetchall()
        next_visible = None
        if not rows:
            next_visible = conn.execute("SELECT MIN(visible_ms) FROM messages").fetchone()[0]
        conn.execute("COMMIT")
        messages = [Received(str(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in sorted(rows)]
        return messages, next_visible

    async def receive(self, max_messages: int = 10, wait_s: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + max(0.0, min(wait_s, 20.0))
        event = self._ensure_wake_socket() if wait_s > 0 else None
        while True:
            if event is not None:
                event.clear()  # before the query: a send committed after it will set it again
            messages, next_visible_ms = await self._run(lambda conn: self._receive_now(conn, max_messages))
            remaining = deadline - time.monotonic()
            if messages or remaining <= 0 or event is None:
                return messages
            if next_visible_ms is not None:  # an in-flight message becomes visible again
                remaining = min(remaining, max(0.001, (next_visible_ms - _now_ms()) / 1000))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def delete_batch(self, receipts: Sequence[str]) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")
            failed = [r for r in receipts if conn.execute("DELETE FROM messages WHERE receipt = ?", (r,)).rowcount != 1]
            conn.execute("COMMIT")
            return failed

        return await self._run(delete)

    async def change_visibility(self, receipts: Sequence[str], timeout_s: float) -> None:
        def change(conn: sqlite3.Connection) -> None:
            visible = _now_ms() + int(timeout_s * 1000)
            conn.executemany("UPDATE messages SET visible_ms = ? WHERE receipt = ?", [(visible, r) for r in receipts])
            if timeout_s <= 0:
                self._wake_waiters()

        await self._run(change)

    async def stats(self) -> QueueStats:
        def stats(conn: sqlite3.Connection) -> QueueStats:
            now = _now_ms()
            visible, in_flight = conn.execute(
                "SELECT COALESCE(SUM(visible_ms <= ?), 0), COALESCE(SUM(visible_ms > ?), 0) FROM messages", (now, now)
            ).fetchone()
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            return QueueStats(visible=visible, in_flight=in_flight, delayed=0, dead_letter=dead)

        return await self._run(stats)

    async def create(self, attributes: QueueAttributes = QueueAttributes()) -> None:
        def create(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR REPLACE INTO attributes (name, value) VALUES (?, ?)",
                [(name, getattr(attributes, name)) for name in QueueAttributes.__dataclass_fields__],
            )
            self._load_attributes(conn)

        await self._run(create)

    async def purge(self) -> int:
        return await self._run(lambda conn: conn.execute("DELETE FROM messages").rowcount)

    async def redrive(self) -> int:
        def redrive(conn: sqlite3.Connection) -> int:
            now = _now_ms()
            conn.execute("BEGIN IMMEDIATE")
            moved = conn.execute(
                "INSERT INTO messages (body, sent_ms, visible_ms) "
                "SELECT body, sent_ms, ? FROM dead_letters ORDER BY id",
                (now,),
            ).rowcount
            conn.execute("DELETE FROM dead_letters")
            conn.execute("COMMIT")
            self._wake_waiters()
            return moved

        return await self._run(redrive)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._wake_sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._wake_sock.fileno())
            with contextlib.suppress(OSError):
                os.unlink(self._wake_sock.getsockname())
            self._wake_sock.close()
            self._wake_sock = self._wake_event = None
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)
