"""The supervisor's restart policy."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from canpipe_testing import children, wait_for

from engine.supervisor import RestartBackoff


def test_restart_backoff_doubles_while_crashing_and_starts_over_after_a_healthy_run():
    backoff = RestartBackoff(healthy_s=30.0)
    assert [backoff.delay_s(ran_s=1.0) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay_s(ran_s=3600.0) == 0.5  # a crash after an hour of work is not a crash loop
    assert backoff.delay_s(ran_s=1.0) == 1.0


def dead(pid: int) -> bool:
    """Whether ``pid`` has died (a zombie waiting for its parent, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


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


def test_a_worker_crashing_three_times_in_a_row_is_restarted_after_growing_delays(start, env):
    """kill -9 of one slot's worker, three times as soon as it is back: the log names each exit and a
    doubling delay, each replacement waits at least that long, and the other slot's worker is untouched."""
    consumers = start(["consume", "--workers", "2"], env)
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "two consumer processes spawned")
    bystander, victim = sorted(children(consumers.pid))
    waited_s = []
    for crash in range(3):
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        known = {bystander, victim}
        wait_for(lambda known=known: len(children(consumers.pid) - known) == 1, 30, f"restart {crash + 1}")
        waited_s.append(time.monotonic() - killed_at)
        (victim,) = children(consumers.pid) - {bystander}
    assert children(consumers.pid) == {bystander, victim}
    assert consumers.stop() == 0, consumers.output()
    delays = [float(s) for s in re.findall(r"exited with -9; restarting in ([0-9.]+) s", consumers.output())]
    assert delays == [0.5, 1.0, 2.0], consumers.output()
    assert all(waited >= delay for waited, delay in zip(waited_s, delays)), (waited_s, delays)
    assert "3 restarts" in consumers.output()


def test_a_dead_workers_files_are_repaired_even_when_the_stop_comes_before_its_restart(start, env, data_dir):
    """kill -9 leaves a torn tail or a partial file; the supervisor repairs them when it reaps the dead
    worker, not only at the next worker's start, which a stop during the restart's backoff never comes to."""
    consumers = start(["consume", "--workers", "1"], env)
    wait_for(lambda: len(children(consumers.pid)) == 1, 30, "a consumer process spawned")
    wait_for((data_dir / "metrics").is_dir, 30, "a worker started, so past the supervisor's start-up repair")
    hour = data_dir / "raw/year=2026/month=01/day=02/hour=03"
    hour.mkdir(parents=True)
    torn, partial = hour / "batch-1-dead.jsonl", hour / "batch-2-dead.partial"
    torn.write_bytes(b'{"whole":1}\n{"to')  # as a killed writer leaves them
    partial.touch()
    (worker,) = children(consumers.pid)
    consumers.popen.send_signal(signal.SIGSTOP)  # so that the stop surely comes before the restart
    try:
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: dead(worker), 10, "the worker dead")
        consumers.popen.send_signal(signal.SIGTERM)
    finally:
        consumers.popen.send_signal(signal.SIGCONT)
    assert consumers.stop() == 0, consumers.output()
    assert "1 restarts pending" in consumers.output()  # no worker started after the kill
    assert torn.read_bytes() == b'{"whole":1}\n' and not partial.exists(), consumers.output()


def test_what_a_crashed_supervisor_left_is_repaired_before_any_worker_starts(start, env, data_dir):
    hour = data_dir / "raw/year=2026/month=01/day=02/hour=03"
    hour.mkdir(parents=True)
    torn, partial = hour / "batch-1-dead.jsonl", hour / "batch-2-dead.partial"
    torn.write_bytes(b'{"whole":1}\n{"to')  # the host or the whole consume tree killed mid-write
    partial.write_bytes(b'{"never":"acknowledged"}\n')
    consumers = start(["consume", "--workers", "1"], env)
    wait_for(lambda: len(children(consumers.pid)) == 1, 30, "a consumer process spawned")
    assert torn.read_bytes() == b'{"whole":1}\n' and not partial.exists(), consumers.output()
    assert consumers.stop() == 0, consumers.output()
    assert "repaired torn tail" in consumers.output() and "unnamed first batch" in consumers.output()
