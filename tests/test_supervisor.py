"""The supervisor's restart policy."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from canpipe_testing import children, wait_for

from engine.supervisor import RestartBackoff


def test_restart_backoff_doubles_while_crashing_and_starts_over_after_a_healthy_run():
    backoff = RestartBackoff(healthy_s=30.0)
    assert [backoff.delay_s(ran_s=1.0) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay_s(ran_s=3600.0) == 0.5  # a crash after an hour of work is not a crash loop
    assert backoff.delay_s(ran_s=1.0) == 1.0


def sigterm_pending(pid: int) -> bool:
    """Whether a SIGTERM waits to be delivered to ``pid`` (the process-wide pending mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_while_workers_are_still_starting_is_a_clean_stop(start, env):
    consumers = start(["consume", "--workers", "2"], env)
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "two consumer processes spawned")
    workers = children(consumers.pid)
    for pid in workers:  # frozen while starting: their SIGTERM handlers are not installed yet
        os.kill(pid, signal.SIGSTOP)
    consumers.popen.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: all(sigterm_pending(pid) for pid in workers), 10, "the supervisor to forward SIGTERM")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)  # the default action ends them: they held nothing
    assert consumers.stop() == 0, consumers.output()
    assert "exit codes [0, 0]" in consumers.output()
