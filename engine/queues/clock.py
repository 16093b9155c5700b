"""The embedded queue's clock: milliseconds that a wall-clock jump cannot move.

Visibility timeouts and retention are stored as times in one SQLite file that many processes share and
that outlives restarts and reboots, so ``time.monotonic`` (per process, arbitrary origin) cannot be the
basis, and the wall clock cannot either: an NTP step or an operator setting the date moves it by days,
which purged the whole queue (retention) or hid every in-flight message for days (visibility).

The basis is ``CLOCK_BOOTTIME`` plus an offset stored in the queue file for the current boot (identified
by ``/proc/sys/kernel/random/boot_id``). ``CLOCK_BOOTTIME`` is shared by every process of one boot, keeps
counting during suspend, and is never stepped. The offset is chosen once per boot, under the queue's
write lock so that every process agrees on it:

- a new queue starts at the wall time, so its stored times read as epoch milliseconds (old queue files,
  whose times were epoch milliseconds, stay valid);
- after a reboot the clock continues from the last reading persisted in the file (at most
  ``PERSIST_EVERY_MS`` old), plus the downtime as the wall clock measures it, never less than zero.

So a wall-clock jump while the machine runs changes nothing. What is not covered (documented in
docs/operations.md): a wall-clock jump *while the machine is down* counts as downtime (a forward jump of
days while powered off ages the queue by days; a backward one counts as zero downtime).
Where ``CLOCK_BOOTTIME`` or a boot id is missing (not Linux), the wall clock is used as before.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

PERSIST_EVERY_MS = 10_000
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

CLOCK_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS clock (id INTEGER PRIMARY KEY CHECK (id = 0), boot_id TEXT NOT NULL, "
    "offset_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_wall_ms INTEGER NOT NULL)"
)


def wall_ms() -> int:
    """The wall clock in epoch milliseconds (only for the offsets, never compared with stored times)."""
    return time.time_ns() // 1_000_000


def _boot() -> tuple[str, int]:
    """(boot id, milliseconds since boot); ("wall-clock", epoch ms) where the platform has neither."""
    try:
        boot_id = _BOOT_ID.read_text().strip()
        return boot_id, time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000
    except (OSError, AttributeError):
        return "wall-clock", wall_ms()


class QueueClock:
    """``now_ms()``: the queue's time in milliseconds; call ``bind`` inside a write transaction first."""

    def __init__(self) -> None:
        self._boot_id = ""
        self._offset_ms = 0
        self._persisted_ms = 0

    def _since_boot_ms(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000 if self._boot_id != "wall-clock" else wall_ms()

    def bind(self, conn: sqlite3.Connection) -> None:
        """Agree on this boot's offset with every other process of the queue (hold the write lock)."""
        boot_id, since_boot = _boot()
        wall = wall_ms()
        row = conn.execute("SELECT boot_id, offset_ms, last_ms, last_wall_ms FROM clock WHERE id = 0").fetchone()
        if row is not None and row[0] == boot_id:
            offset = row[1]
        elif row is None:
            offset = wall - since_boot
        else:  # rebooted: continue from the last persisted reading plus the downtime, never backwards
            offset = row[2] + max(0, wall - row[3]) - since_boot
        self._boot_id, self._offset_ms = boot_id, offset
        conn.execute(
            "INSERT OR REPLACE INTO clock (id, boot_id, offset_ms, last_ms, last_wall_ms) VALUES (0, ?, ?, ?, ?)",
            (boot_id, offset, since_boot + offset, wall),
        )
        self._persisted_ms = since_boot + offset

    def now_ms(self) -> int:
        return self._since_boot_ms() + self._offset_ms

    def persist(self, conn: sqlite3.Connection, now_ms: int) -> None:
        """Record a reading now and then (inside a write transaction), for the next boot to continue from."""
        if now_ms - self._persisted_ms >= PERSIST_EVERY_MS:
            conn.execute("UPDATE clock SET last_ms = ?, last_wall_ms = ? WHERE id = 0", (now_ms, wall_ms()))
            self._persisted_ms = now_ms
