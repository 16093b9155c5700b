"""The embedded queue: one SQLite file with SQS semantics, safe for many processes.

Durability: WAL with ``synchronous=FULL``, so a send is on disk (the WAL is fsynced) before it is
acknowledged. Receives, deletes and visibility changes commit with ``synchronous=NORMAL`` (no fsync of
their own; the next send's or checkpoint's sync covers them): losing one in a power cut only brings a
message back, a duplicate, never a loss, and the write lock the senders wait for is held far shorter.
Long polling sleeps on a Unix datagram socket that every sender pokes after its commit, so an idle
consumer costs no CPU and a new message wakes it at once.

Cost does not grow with the backlog: a receipt is ``<row id>:<token>`` and addresses its row by primary
key; a receive dead-letters only the rows it selected; retention deletes at most ``RETENTION_SWEEP_ROWS``
rows per pass through an index; every write transaction is a handful of index lookups, so a sender
never waits long for the write lock. Depth (messages, bytes) is kept by triggers, so the
``max_bytes`` bound and ``stats`` cost O(1) and O(in flight), not O(backlog).

Times come from ``QueueClock`` (engine/queues/clock.py), which a wall-clock jump does not move.

The file is watched: its identity (st_dev, st_ino) is checked before every operation and before every
send commits, so a queue deleted or replaced under a running process raises QueueBroken instead of
acknowledging messages into an unlinked file; ``PRAGMA quick_check`` runs on every open, and SQLite's
own corruption errors raise QueueBroken too. A file this process has opened once is never recreated
empty: a vanished queue stays broken until it is restored or created again (``canpipe queue create``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from engine.errors import QueueBroken, QueueError, QueueSaturated
from engine.queues import Queue, QueueAttributes, QueueProfile, QueueStats, QueueUsage, Received
from engine.queues.clock import CLOCK_SCHEMA, QueueClock

T = TypeVar("T")
log = logging.getLogger("canpipe.queue")

SCHEMA_VERSION = 2  # PRAGMA user_version; 0: a new file or one written before receipts were indexed
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, "
    "sent_ms INTEGER NOT NULL, visible_ms INTEGER NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0, "
    "first_receive_ms INTEGER, receipt TEXT, retained_ms INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY, body BLOB NOT NULL, sent_ms INTEGER NOT NULL, "
    "receive_count INTEGER NOT NULL, dead_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS attributes (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS depth (id INTEGER PRIMARY KEY CHECK (id = 0), messages INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL)",
    CLOCK_SCHEMA,
)
INDEXES = (
    "CREATE INDEX IF NOT EXISTS messages_visible ON messages (visible_ms, id)",
    "CREATE INDEX IF NOT EXISTS messages_retained ON messages (retained_ms)",
    "CREATE INDEX IF NOT EXISTS dead_letters_dead ON dead_letters (dead_ms)",
    "CREATE TRIGGER IF NOT EXISTS messages_depth_insert AFTER INSERT ON messages BEGIN "
    "UPDATE depth SET messages = messages + 1, bytes = bytes + length(NEW.body) WHERE id = 0; END",
    "CREATE TRIGGER IF NOT EXISTS messages_depth_delete AFTER DELETE ON messages BEGIN "
    "UPDATE depth SET messages = messages - 1, bytes = bytes - length(OLD.body) WHERE id = 0; END",
)

MAX_MESSAGE_BYTES = 1024 * 1024
BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's transaction before QueueError
PING_BUSY_TIMEOUT_MS = 1000  # /health answers within its 2 s budget even when the file is locked
RETENTION_SWEEP_ROWS = 1000  # rows deleted per retention pass: a pass never holds the write lock for long
RETENTION_EVERY_MS = 60_000
REOPEN_AFTER_BROKEN_S = 1.0  # a broken queue is re-examined (quick_check) at most this often
RECOVERY = "see 'A damaged or deleted embedded queue' in docs/operations.md"
_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class SqliteQueue:
    """The ``sqlite:///PATH`` backend. All SQLite work runs on one private thread per instance.

    ``max_bytes``: the most message bytes the queue holds; past it ``send_batch`` raises QueueSaturated
    (0: unbounded). ``create=False``: never create the file (read-only commands such as ``queue stats``); a
    missing queue is a QueueError saying so.
    """

    profile = QueueProfile(max_message_bytes=MAX_MESSAGE_BYTES)  # local calls: no linger, no pacing

    def __init__(
        self, path: str, *, visibility_timeout_s: float | None = None, max_bytes: int = 0, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.create_missing = create
        self._visibility_override = visibility_timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="canpipe-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we opened
        self._broken: QueueBroken | None = None
        self._damaged_stamp: tuple[int, int, int, int] | None = None  # the file quick_check last refused
        self._reopen_at = 0.0
        self._attrs = QueueAttributes()
        self._clock = QueueClock()
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        self._wake_dir = Path(tempfile.gettempdir()) / f"canpipe-wake-{digest}"
        self._wake_sock: socket.socket | None = None
        self._wake_event: asyncio.Event | None = None
        self._last_retention_ms = 0

    # --- plumbing -------------------------------------------------------------------------------

    def _error(self, exc: sqlite3.Error) -> QueueError:
        """A QueueError that says what happened and what to do about it."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in _CORRUPT:
            return QueueBroken(
                f"embedded queue {self.path} is damaged ({exc}): canpipe will neither write to it nor recreate it "
                f"empty; stop the receivers and consumers, move it aside and recover it ({RECOVERY})"
            )
        if code == sqlite3.SQLITE_BUSY:
            return QueueError(
                f"embedded queue {self.path} is locked: another process has held a write transaction for over "
                f"{BUSY_TIMEOUT_MS / 1000:g} s (an sqlite3 shell or a backup? `fuser {self.path}` names it); "
                "canpipe keeps retrying"
            )
        if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_FULL):
            return QueueError(
                f"embedded queue {self.path}: {exc}; check that the file and its directory are writable and the "
                "disk has space; canpipe keeps retrying"
            )
        return QueueError(f"embedded queue {self.path}: {exc}")

    def _check_identity(self) -> None:
        """Raise QueueBroken when the path no longer names the file we opened (a stat: ~1 us)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise QueueBroken(
                f"embedded queue {self.path} was deleted while in use: refusing to accept messages into a file "
                f"nobody will read; restore it, or create a new queue with `canpipe queue create` ({RECOVERY})"
            ) from None
        except OSError as exc:
            raise QueueError(f"embedded queue {self.path}: {exc}") from exc
        if (st.st_dev, st.st_ino) != self._identity:
            raise QueueBroken(
                f"embedded queue {self.path} was replaced by another file while in use; reopening it ({RECOVERY})"
            )

    def _open(self) -> sqlite3.Connection:
        # Once we have had the file, never let SQLite create it again: an empty new queue would hide the loss.
        create = self._identity is None and not self.path.exists()
        if create and Path(f"{self.path}-wal").exists():
            raise QueueBroken(  # deleted under running processes: a new file would pick up their stale log
                f"embedded queue {self.path} is missing but its write-ahead log {self.path}-wal is there: the queue "
                f"was deleted while in use; canpipe will not recreate it empty ({RECOVERY})"
            )
        if create and not self.create_missing:
            raise QueueError(f"embedded queue {self.path} does not exist (nothing has created it yet)")
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise QueueError(f"embedded queue {self.path}: cannot create its directory: {exc}") from exc
            # owner-only: it holds every record in transit (SQLite gives its -wal and -shm files the same mode)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        elif not self.path.exists():
            self._check_identity()  # raises: deleted
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode={'rwc' if create else 'rw'}"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._broken is not None and stamp == self._damaged_stamp:
                raise self._broken  # the same damaged file as last time: not another full quick_check
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # reads the whole file: ~0.3 s for 400,000 messages (110 MB), once per process start (bench/)
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                self._damaged_stamp = stamp
                raise QueueBroken(
                    f"embedded queue {self.path} is damaged (quick_check: {'; '.join(problems)}): canpipe will "
                    f"neither write to it nor recreate it empty; move it aside and recover it ({RECOVERY})"
                )
            self._prepare(conn)
            self._load_attributes(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Create or migrate the schema and agree on the clock, in one short write transaction."""
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            for statement in SCHEMA:
                conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            if "retained_ms" not in columns:  # a file from before redrive restarted the retention clock
                conn.execute("ALTER TABLE messages ADD COLUMN retained_ms INTEGER NOT NULL DEFAULT 0")
                conn.execute("UPDATE messages SET retained_ms = sent_ms")
            # recounted: a file rebuilt by `sqlite3 .recover` (no user_version) may have lost rows
            conn.execute("DELETE FROM depth")
            conn.execute("INSERT INTO depth SELECT 0, COUNT(*), COALESCE(SUM(length(body)), 0) FROM messages")
            for statement in INDEXES:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._clock.bind(conn)
        conn.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if self._broken is not None and time.monotonic() < self._reopen_at:
                raise self._broken
            try:
                self._conn = self._open()
            except sqlite3.Error as exc:
                raise self._fail(self._error(exc)) from exc
            except QueueBroken as exc:
                raise self._fail(exc) from None
            except OSError as exc:
                raise QueueError(f"embedded queue {self.path}: {exc}") from exc
            if self._broken is not None:
                log.warning("embedded queue %s is usable again", self.path, extra={"stage": "queue"})
            self._broken = None
        return self._conn

    def _fail(self, error: QueueError) -> QueueError:
        """Drop the connection after QueueBroken (reopened at most every REOPEN_AFTER_BROKEN_S), and log it."""
        if isinstance(error, QueueBroken):
            if self._broken is None or str(self._broken) != str(error):
                log.error("%s", error, extra={"stage": "queue"})
            self._broken, self._reopen_at = error, time.monotonic() + REOPEN_AFTER_BROKEN_S
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        return error

    def _load_attributes(self, conn: sqlite3.Connection) -> None:
        stored = dict(conn.execute("SELECT name, value FROM attributes").fetchall())
        fields = {f: stored[f] for f in QueueAttributes.__dataclass_fields__ if f in stored}
        if self._visibility_override is not None:
            fields["visibility_timeout_s"] = self._visibility_override
        self._attrs = QueueAttributes(**fields)

    def _resync(self, conn: sqlite3.Connection) -> None:
        """After a failed call: synchronous=FULL again (a failed receive or delete may leave NORMAL behind,
        see ``_begin_unsynced``), or the connection is dropped, so that no send ever commits unsynced."""
        try:
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            if self._conn is conn:
                self._conn = None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            conn = self._connect()
            try:
                self._check_identity()
                return fn(conn)
            except Exception as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                self._resync(conn)
                if isinstance(exc, sqlite3.Error):
                    raise self._fail(self._error(exc)) from exc
                if isinstance(exc, QueueError):
                    raise self._fail(exc) from None
                raise

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except RuntimeError as exc:  # the executor was shut down: this queue object was closed
            if "shutdown" not in str(exc):
                raise
            raise QueueError(f"embedded queue {self.path} is closed") from None

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
        size = 0
        for body in bodies:
            if len(body) > MAX_MESSAGE_BYTES:
                raise QueueError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
            size += len(body)

        def send(conn: sqlite3.Connection) -> list[int]:
            conn.execute("BEGIN IMMEDIATE")
            now = self._clock.now_ms()
            if self.max_bytes:
                held = conn.execute("SELECT bytes FROM depth WHERE id = 0").fetchone()[0]
                if held + size > self.max_bytes:
                    raise QueueSaturated(
                        f"embedded queue {self.path} holds {held} bytes, at its bound of {self.max_bytes} "
                        "(CANPIPE_QUEUE_MAX_BYTES): consumers are stopped or not keeping up; retry later"
                    )
            conn.executemany(
                "INSERT INTO messages (body, sent_ms, visible_ms, retained_ms) VALUES (?, ?, ?, ?)",
                [(body, now, now, now) for body in bodies],
            )
            self._clock.persist(conn, now)
            self._check_identity()  # last moment before the acknowledgement: is this still the queue?
            conn.execute("COMMIT")
            self._wake_waiters()
            return []

        return await self._run(send)

    def _sweep_retention(self, conn: sqlite3.Connection, now: int) -> None:
        """Delete expired messages and dead letters, at most RETENTION_SWEEP_ROWS of each per pass."""
        attrs = self._attrs
        swept = conn.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE retained_ms < ? LIMIT ?)",
            (now - attrs.retention_s * 1000, RETENTION_SWEEP_ROWS),
        ).rowcount
        swept = max(
            swept,
            conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE dead_ms < ? LIMIT ?)",
                (now - attrs.dlq_retention_s * 1000, RETENTION_SWEEP_ROWS),
            ).rowcount,
        )
        # a full pass leaves more behind: the next receive sweeps again instead of a minute later
        self._last_retention_ms = 0 if swept == RETENTION_SWEEP_ROWS else now

    def _receive_now(self, conn: sqlite3.Connection, max_messages: int) -> tuple[list[Received], int | None]:
        attrs = self._attrs
        _begin_unsynced(conn)
        now = self._clock.now_ms()
        if now - self._last_retention_ms > RETENTION_EVERY_MS:
            self._sweep_retention(conn, now)
        rows: list[tuple] = []
        token = secrets.token_hex(8)
        hidden_until = now + int(attrs.visibility_timeout_s * 1000)
        while len(rows) < max_messages:
            picked = conn.execute(
                "SELECT id, receive_count FROM messages WHERE visible_ms <= ? ORDER BY visible_ms, id LIMIT ?",
                (now, max_messages - len(rows)),
            ).fetchall()
            if not picked:
                break
            # As SQS: a message already received max_receive_count times goes to the DLQ on its next receive.
            # Only the rows this receive picked are examined: no sweep over the backlog.
            dead = [row[0] for row in picked if row[1] >= attrs.max_receive_count]
            live = [row[0] for row in picked if row[1] < attrs.max_receive_count]
            if dead:
                marks = ",".join("?" * len(dead))
                conn.execute(
                    "INSERT INTO dead_letters (id, body, sent_ms, receive_count, dead_ms) SELECT id, body, sent_ms, "
                    f"receive_count, ? FROM messages WHERE id IN ({marks})",
                    (now, *dead),
                )
                conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", dead)
            if live:
                rows += conn.execute(
                    "UPDATE messages SET visible_ms = ?, receive_count = receive_count + 1, "
                    "first_receive_ms = COALESCE(first_receive_ms, ?), receipt = id || ':' || ? "
                    f"WHERE id IN ({','.join('?' * len(live))}) "
                    "RETURNING id, receipt, body, sent_ms, first_receive_ms, receive_count",
                    (hidden_until, now, token, *live),
                ).fetchall()
            if not dead:
                break
        next_visible = None
        if not rows:
            next_visible = conn.execute("SELECT MIN(visible_ms) FROM messages").fetchone()[0]
        self._clock.persist(conn, now)
        _commit_unsynced(conn)
        messages = [Received(str(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in sorted(rows)]
        return messages, None if next_visible is None else next_visible - now

    async def receive(self, max_messages: int = 10, wait_s: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + max(0.0, min(wait_s, 20.0))
        event = self._ensure_wake_socket() if wait_s > 0 else None
        while True:
            if event is not None:
                event.clear()  # before the query: a send committed after it will set it again
            messages, next_visible_in_ms = await self._run(lambda conn: self._receive_now(conn, max_messages))
            remaining = deadline - time.monotonic()
            if messages or remaining <= 0 or event is None:
                return messages
            if next_visible_in_ms is not None:  # an in-flight message becomes visible again
                remaining = min(remaining, max(0.001, next_visible_in_ms / 1000))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    @staticmethod
    def _addressed(receipts: Sequence[str]) -> list[tuple[int, str]]:
        """(row id, receipt) pairs; a receipt that is not ``<id>:<token>`` addresses no row."""
        out = []
        for receipt in receipts:
            row_id, sep, _ = receipt.partition(":")
            out.append((int(row_id) if sep and row_id.isdigit() else -1, receipt))
        return out

    async def delete_batch(self, receipts: Sequence[str]) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[str]:
            _begin_unsynced(conn)
            failed = [
                receipt
                for row_id, receipt in self._addressed(receipts)
                if conn.execute("DELETE FROM messages WHERE id = ? AND receipt = ?", (row_id, receipt)).rowcount != 1
            ]
            _commit_unsynced(conn)
            return failed

        return await self._run(delete)

    async def change_visibility(self, receipts: Sequence[str], timeout_s: float) -> None:
        def change(conn: sqlite3.Connection) -> None:
            _begin_unsynced(conn)
            visible = self._clock.now_ms() + int(timeout_s * 1000)
            conn.executemany(
                "UPDATE messages SET visible_ms = ? WHERE id = ? AND receipt = ?",
                [(visible, row_id, receipt) for row_id, receipt in self._addressed(receipts)],
            )
            _commit_unsynced(conn)
            if timeout_s <= 0:
                self._wake_waiters()

        await self._run(change)

    async def stats(self) -> QueueStats:
        def stats(conn: sqlite3.Connection) -> QueueStats:
            now = self._clock.now_ms()
            total, size = conn.execute("SELECT messages, bytes FROM depth WHERE id = 0").fetchone()
            in_flight = conn.execute("SELECT COUNT(*) FROM messages WHERE visible_ms > ?", (now,)).fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            # retained_ms is indexed and equals sent_ms, except that a redriven message starts over (as in SQS)
            oldest_ms = conn.execute("SELECT MIN(retained_ms) FROM messages").fetchone()[0]
            oldest_age_s = None if oldest_ms is None else max(0.0, (now - oldest_ms) / 1000.0)
            return QueueStats(total - in_flight, in_flight, 0, dead, size_bytes=size, oldest_age_s=oldest_age_s)

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
        """Move every dead letter back. As SQS's redrive, a moved message starts a new retention period
        (``retained_ms``: now), or a message dead-lettered more than ``retention_s`` after it was sent would
        be swept before anyone reads it; ``sent_ms`` keeps the original send time for the queue-latency stage."""

        def redrive(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            now = self._clock.now_ms()
            moved = conn.execute(
                "INSERT INTO messages (body, sent_ms, visible_ms, retained_ms) "
                "SELECT body, sent_ms, ?, ? FROM dead_letters ORDER BY id",
                (now, now),
            ).rowcount
            conn.execute("DELETE FROM dead_letters")
            conn.execute("COMMIT")
            self._wake_waiters()
            return moved

        return await self._run(redrive)

    async def ping(self) -> None:
        """Check the file really is the queue and can take a write: its identity (in ``_run``), a read, and the
        write lock (held by another process for over PING_BUSY_TIMEOUT_MS: QueueError)."""

        def ping(conn: sqlite3.Connection) -> None:
            conn.execute(f"PRAGMA busy_timeout = {PING_BUSY_TIMEOUT_MS}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("SELECT messages FROM depth WHERE id = 0").fetchone()
                conn.execute("ROLLBACK")
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

        await self._run(ping)

    def usage(self) -> QueueUsage | None:
        return None  # not billed per request

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

            def close_quietly() -> None:
                with contextlib.suppress(sqlite3.Error):  # a damaged or vanished file: nothing left to save
                    conn.close()

            await asyncio.get_running_loop().run_in_executor(self._executor, close_quietly)
        self._executor.shutdown(wait=False)


def _begin_unsynced(conn: sqlite3.Connection) -> None:
    """Begin a receive, delete or visibility change: a transaction whose loss in a power cut is harmless (the
    message is received again: a duplicate, never a loss), so its commit does not wait for fsync
    (synchronous=NORMAL: the write-ahead log is synced by the next send's FULL commit or the checkpoint, in
    order). The write lock is held for a fraction of the time, which is what the receivers' sends wait for."""
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")


def _commit_unsynced(conn: sqlite3.Connection) -> None:
    """Commit what ``_begin_unsynced`` began; the connection is back to synchronous=FULL for the next send (on
    a failure ``_run`` puts it back)."""
    conn.execute("COMMIT")
    conn.execute("PRAGMA synchronous=FULL")


_: type[Queue] = SqliteQueue  # mypy: the backend offers every member of the protocol
