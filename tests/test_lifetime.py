"""A receiver worker does not outlive the server that started it, even when its drain never ends, and a stop
sent while the workers start is not lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from canpipe_testing import free_port, process_alive, wait_for

from engine.server import WORKERS_KILL_TIMEOUT_S

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

# a parent that starts a worker and then waits to be killed; the worker arms exit_with_parent, reports its pid,
# and then, like a Granian worker hung in its stop, ignores SIGTERM
PARENT = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(600)
"""
WORKER = """
import os, signal, sys, time
from engine.lifetime import exit_with_parent
signal.signal(signal.SIGTERM, signal.SIG_IGN)
assert exit_with_parent()
open(sys.argv[1], "a").write(f"{os.getpid()}\\n")
while True:
    time.sleep(0.05)
"""


def test_a_worker_that_would_not_stop_ends_with_the_server_killed_by_sigkill(tmp_path):
    report = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WORKER, str(report)])
    try:
        wait_for(lambda: report.exists() and report.read_text().strip().isdigit(), 30, "the worker to start")
        worker = int(report.read_text())
        assert process_alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not process_alive(worker), 10, "the orphaned worker to end")
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("moment", ["Spawning worker-2", "Started worker-1"])
def test_sigterm_while_the_workers_start_stops_the_server_at_once(start, env, moment):
    # the workers are forked with the main process's handler, which only sets a flag in their copy: a stop
    # sent while they import the app, or during the app's start-up, was lost and the server ran until killed
    server = start(["serve", "--port", str(free_port()), "--workers", "2"], env)
    wait_for(lambda: moment in server.output(), 30, moment)
    stopping = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=WORKERS_KILL_TIMEOUT_S + 10) == 0, server.output()
    # not the kill timeout's doing: every worker stopped when told
    assert time.monotonic() - stopping < WORKERS_KILL_TIMEOUT_S / 2, server.output()


def test_a_stop_between_two_runs_of_the_event_loop_stops_the_worker_once(monkeypatch):
    # Granian runs a worker's loop once for the app's start-up and again while serving; uvloop hears signals only
    # while it runs, so a SIGTERM in between (as the server starts) was recorded and never acted on
    import asyncio

    import granian._signals as granian_signals
    import uvloop

    from engine.lifetime import keep_stop_between_loop_runs

    stops: list[int] = []

    class StopEvent:  # Granian's WorkerSignal, counted
        def set(self) -> None:
            stops.append(1)

    monkeypatch.setattr(granian_signals, "WorkerSignal", StopEvent)
    monkeypatch.setattr(granian_signals, "set_loop_signals", granian_signals.set_loop_signals)  # undone after
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    loop = uvloop.new_event_loop()

    async def until_stopped(n: int, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while len(stops) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    try:
        assert keep_stop_between_loop_runs()
        granian_signals.set_loop_signals(loop)
        loop.run_until_complete(asyncio.sleep(0))  # the start-up's run
        os.kill(os.getpid(), signal.SIGTERM)  # while the loop is paused: the server is starting
        loop.run_until_complete(until_stopped(1, 5.0))  # serving
        assert stops == [1]
        os.kill(os.getpid(), signal.SIGTERM)  # a second stop while serving: Granian's event is set once only
        loop.run_until_complete(until_stopped(2, 0.5))  # the loop handles a signal in ms
        assert stops == [1]
    finally:
        loop.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
