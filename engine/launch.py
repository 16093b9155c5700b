"""Starting and stopping canpipe's own processes on this machine: what ``canpipe run``, the load-test runner
(``python -m loadtest``) and the tests share to launch the pipeline and know when it is up or drained.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from engine.queues import open_queue


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``condition`` every ``interval_s`` until it is true or ``timeout_s`` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


def healthy(url: str) -> bool:
    """The receiver at ``url`` answers ``GET /health`` with 200 within 1 s."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def start_command(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``canpipe ARGS`` (as ``python -m engine``) as a child process with ``env``."""
    return subprocess.Popen([sys.executable, "-m", "engine", *args], env=env)


def stop(proc: subprocess.Popen, timeout_s: float = 40.0) -> int:
    """SIGTERM (a drain), then SIGKILL after ``timeout_s``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def queue_empty(url: str) -> bool:
    """No message visible or in flight in the queue at ``url``."""

    async def check() -> bool:
        queue = open_queue(url)
        try:
            stats = await queue.stats()
        finally:
            await queue.close()
        return stats.visible == 0 and stats.in_flight == 0

    return asyncio.run(check())
