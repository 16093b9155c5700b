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
