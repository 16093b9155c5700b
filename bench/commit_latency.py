"""SQLite commit latency on the disk of a directory: WAL, ``synchronous=FULL``, one 250-byte row a commit.

The floor of a durable 202 (the embedded queue's send commits like this, with the write-ahead log fsynced):

    .venv/bin/python bench/commit_latency.py [DIR] [COMMITS]
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import time


def main() -> None:
    commits = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    with tempfile.TemporaryDirectory(dir=sys.argv[1] if len(sys.argv) > 1 else None) as folder:
        ms = measure(os.path.join(folder, "queue.db"), commits)
    ms.sort()
    print(
        f"{commits} commits in {folder}: P50 {ms[len(ms) // 2]:.2f} ms, P95 {ms[int(len(ms) * 0.95)]:.2f} ms, "
        f"P99 {ms[int(len(ms) * 0.99)]:.2f} ms, mean {statistics.mean(ms):.2f} ms"
    )


def measure(path: str, commits: int) -> list[float]:
    """Milliseconds of each of ``commits`` one-row commits into a new queue-like file at ``path``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB)")
    body = b"x" * 250
    ms = []
    for _ in range(commits):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO messages (body) VALUES (?)", (body,))
        conn.execute("COMMIT")
        ms.append((time.perf_counter() - start) * 1000)
    conn.close()
    return ms


if __name__ == "__main__":
    main()
