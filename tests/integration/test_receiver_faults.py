"""The receiver under faults, for real: kill -9 of a Granian worker and of the whole server, and SIGTERM,
while a simulated fleet keeps posting. The promise checked every time: every record a client got 202 for
is in the raw files once the consumers drained; a killed receiver costs clients connection errors (they
retry), never a 202 for something that was not queued.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from canpipe_testing import (
    Fleet,
    child_pids,
    free_port,
    key,
    on_disk,
    port_closed,
    process_alive,
    queue_counts,
    queued_records,
    start_server,
    wait_for,
)

from engine.simulator import SimulationResult

pytestmark = pytest.mark.slow


def assert_every_accepted_record_on_disk(result: SimulationResult, data_dir: Path) -> None:
    accepted = {key(r) for r in result.accepted_records}
    assert len(accepted) == result.accepted > 0
    wait_for(lambda: queue_counts(data_dir) == (0, 0), 90, "the consumers to drain the queue")
    stored = {key(r) for r in on_disk(data_dir)}
    missing = accepted - stored
    assert not missing, f"{len(missing)} of {len(accepted)} records got 202 and are not on disk: {sorted(missing)[:3]}"
    assert result.rejected == 0  # no 4xx/5xx other than the retried 503/429


@pytest.fixture
def fault_env(env: dict[str, str]) -> dict[str, str]:
    return env | {"CANPIPE_VISIBILITY_TIMEOUT_S": "5", "CANPIPE_BATCH_SECONDS": "0.3"}


def test_kill_9_of_a_receiver_worker_under_load_loses_no_accepted_record(start, fault_env, data_dir):
    port = free_port()
    server = start_server(start, fault_env, port)
    consumers = start(["consume", "--workers", "1"], fault_env)
    fleet = Fleet(f"http://127.0.0.1:{port}").start()
    wait_for(lambda: fleet.accepted >= 500, 30, "load to be flowing")
    victim = min(child_pids(server.pid))
    os.kill(victim, signal.SIGKILL)
    at_kill = fleet.accepted
    # the server keeps serving on the other worker and replaces the dead one
    wait_for(lambda: fleet.accepted >= at_kill + 500, 30, "records accepted after the kill")
    wait_for(lambda: len(child_pids(server.pid) - {victim}) == 2, 30, "the killed worker replaced")
    result = fleet.join()
    assert_every_accepted_record_on_disk(result, data_dir)
    assert server.popen.poll() is None, server.output()
    assert server.stop() == 0
    assert consumers.stop() == 0


def test_kill_9_of_the_whole_receiver_under_load_loses_no_accepted_record(start, fault_env, data_dir):
    port = free_port()
    server = start_server(start, fault_env, port)
    workers = child_pids(server.pid)
    consumers = start(["consume", "--workers", "1"], fault_env)
    fleet = Fleet(f"http://127.0.0.1:{port}", duration_s=10.0).start()
    wait_for(lambda: fleet.accepted >= 500, 30, "load to be flowing")
    server.stop(signal.SIGKILL)
    # its workers die with it: no orphan keeps answering on the port with nobody to stop it
    # (a zombie is an exited worker: whoever adopted it reaps it when it will)
    wait_for(lambda: not any(process_alive(pid) for pid in workers), 15, "the workers to exit")
    wait_for(lambda: port_closed(port), 15, "nobody to answer on the port")
    at_kill = fleet.accepted
    start_server(start, fault_env, port)  # the operator (or systemd) restarts it; clients retry
    wait_for(lambda: fleet.accepted >= at_kill + 500, 30, "records accepted after the restart")
    result = fleet.join()
    assert result.retries > 0  # the clients did see the outage
    assert_every_accepted_record_on_disk(result, data_dir)
    assert consumers.stop() == 0


def test_sigterm_of_consumers_and_receiver_under_load_loses_nothing_and_exits_0(start, fault_env, data_dir):
    port = free_port()
    server = start_server(start, fault_env, port)
    consumers = start(["consume", "--workers", "2"], fault_env)
    fleet = Fleet(f"http://127.0.0.1:{port}", duration_s=6.0, max_attempts=2).start()
    wait_for(lambda: fleet.accepted >= 500 and on_disk(data_dir), 30, "load flowing and records on disk")
    # consumers first: each flushes the batch it holds, deletes it, and exits 0 while records keep coming
    assert consumers.stop(signal.SIGTERM) == 0, consumers.output()
    summaries = re.findall(r"records written in \d+ batches, (\d+) errors", consumers.output())
    # a worker still starting when SIGTERM came ends without a summary (it held nothing)
    assert summaries and set(summaries) == {"0"}, consumers.output()
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0, server.output()  # in-flight requests finish first
    assert time.monotonic() - started < 30
    assert port_closed(port)
    result = fleet.join()  # the fleet's later requests fail: the receiver is gone
    accepted = {key(r) for r in result.accepted_records}
    # nothing lost at the stop: each accepted record is on disk or still in the queue
    assert accepted <= {key(r) for r in on_disk(data_dir) + queued_records(data_dir)}
    start(["consume", "--workers", "1"], fault_env)  # the next start writes the rest
    assert_every_accepted_record_on_disk(result, data_dir)
