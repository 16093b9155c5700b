"""Soak (long, opt-in): the pipeline at a steady 500 records/s for ``CANPIPE_SOAK_S`` seconds (30 minutes for
the figures in docs/reliability.md). Checks what only time shows: nothing lost, resident memory of every
receiver and consumer process within 10 % of its size after warm-up, open file descriptors flat.

    CANPIPE_SOAK_S=1800 .venv/bin/python -m pytest tests/integration/test_soak.py -s -p no:cacheprovider

Skipped unless CANPIPE_SOAK_S is set; prints a sample every minute and a summary line per process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from canpipe_testing import Fleet, child_pids, children, free_port, key, on_disk, queue_counts, start_server, wait_for

SOAK_S = float(os.environ.get("CANPIPE_SOAK_S", "0"))
RATE_PER_S = 500
VEHICLES = 50

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SOAK_S, reason="opt-in soak: set CANPIPE_SOAK_S=1800 (seconds) to run it"),
    pytest.mark.timeout(int(SOAK_S) + 600 if SOAK_S else 120),
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pids: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {name: (rss_kib(pid), open_fds(pid)) for name, pid in pids.items()}


def test_soak_500_records_per_s_loses_nothing_and_holds_memory_and_descriptors(start, env, data_dir):
    soak_env = env | {"CANPIPE_BATCH_SECONDS": "1.0"}
    port = free_port()
    server = start_server(start, soak_env, port, workers=1)
    consumers = start(["consume", "--workers", "2"], soak_env)
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "two consumer processes")
    pids = {"receiver-main": server.pid, "consume-supervisor": consumers.pid}
    pids |= {f"receiver-worker-{i}": pid for i, pid in enumerate(sorted(child_pids(server.pid)))}
    pids |= {f"consumer-{i}": pid for i, pid in enumerate(sorted(children(consumers.pid)))}

    fleet = Fleet(
        f"http://127.0.0.1:{port}", vehicles=VEHICLES, rate_ms=1000.0 * VEHICLES / RATE_PER_S, duration_s=SOAK_S
    )
    fleet.sim.keep_accepted = False  # 900k records in 30 min: count them, keep their keys on disk only
    fleet.start()
    warmup_s = max(30.0, SOAK_S / 10)
    started = time.monotonic()
    time.sleep(warmup_s)  # a soak measures over wall time; nothing to wait on but the clock
    baseline = sample(pids)
    samples = [(round(time.monotonic() - started), baseline)]
    while time.monotonic() - started < SOAK_S:
        time.sleep(min(60.0, max(0.0, SOAK_S - (time.monotonic() - started))))
        samples.append((round(time.monotonic() - started), sample(pids)))
        print(samples[-1], flush=True)
    result = fleet.join(120)
    final = sample(pids)
    wait_for(lambda: queue_counts(data_dir) == (0, 0), 120, "the consumers to drain the queue")

    stored = {key(r) for r in on_disk(data_dir)}
    print(f"soak {SOAK_S:.0f} s: sent {result.sent}, accepted {result.accepted}, on disk {len(stored)} unique")
    for name in pids:
        (rss0, fd0), (rss1, fd1) = baseline[name], final[name]
        print(f"{name}: RSS {rss0} -> {rss1} KiB ({(rss1 - rss0) / rss0:+.1%}), open fds {fd0} -> {fd1}")
    assert result.failed == result.rejected == 0
    assert len(stored) == result.sent == result.accepted  # every record unique: on disk once or more, none lost
    assert result.accepted >= 0.9 * RATE_PER_S * SOAK_S
    for name in pids:
        (rss0, fd0), (rss1, fd1) = baseline[name], final[name]
        assert rss1 <= rss0 * 1.10, f"{name}: RSS grew from {rss0} to {rss1} KiB"
        assert fd1 <= fd0 + 4, f"{name}: open descriptors grew from {fd0} to {fd1}"
    assert server.stop() == 0 and consumers.stop() == 0
