"""The pipeline under load: ``canpipe serve`` + ``canpipe consume`` started as child processes on a fresh data
dir (embedded queue, or the given queue URL), or a receiver that is already running.

What it reports after the run reuses ``canpipe run``'s own reading of the results: the consumers' metric
snapshots (``engine.metrics.read_snapshots``) and the raw files (``engine.run.stored_keys``).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.errors import CanpipeError
from engine.launch import free_port, healthy, queue_empty, stop, wait_until
from engine.metrics import STAGES, read_snapshots
from engine.run import stored_keys

WRITTEN = "canpipe_consumer_records_written_total"


def pipeline_stages(metrics_dir: Path) -> dict[str, dict[str, float]]:
    """count, p50, p95, p99, max (ms) of the four latency stages, merged over every consumer's snapshot.

    The one place the load tests read pipeline latencies: the metrics plumbing may change, this may not
    be copied.
    """
    metrics = read_snapshots(metrics_dir)
    return {stage: metrics.summary(stage) for stage in STAGES}


@dataclasses.dataclass
class Pipeline:
    """Started by ``start``; ``url`` is what locust targets, ``data_dir`` where the records land."""

    url: str
    api_key: str
    data_dir: Path | None  # None: a running receiver whose files this run cannot see
    queue_url: str = ""
    processes: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    owns_data_dir: bool = False
    started_ns: int = dataclasses.field(default_factory=time.time_ns)

    @property
    def metrics_dir(self) -> Path | None:
        return self.data_dir / "metrics" if self.data_dir else None

    def written(self) -> int:
        """Records the consumers wrote (duplicates included), from their snapshots."""
        if self.metrics_dir is None or not self.metrics_dir.exists():
            return 0
        return read_snapshots(self.metrics_dir).counters[WRITTEN]

    def drain(self, accepted: int, timeout_s: float) -> bool:
        """Wait until the consumers wrote ``accepted`` records and the queue is empty; False on timeout."""
        if self.data_dir is None:
            return True
        if not wait_until(lambda: self.written() >= accepted, timeout_s, 0.2):
            return False
        if not self.queue_url:
            return True  # a running pipeline's queue: its consumers' count is the evidence
        return wait_until(lambda: queue_empty(self.queue_url), 10, 0.2)

    def unique_on_disk(self) -> int | None:
        """Distinct (vehicle_id, can_id, timestamp) keys in the raw files written since the start."""
        if self.data_dir is None:
            return None
        return len(set(stored_keys(self.data_dir / "raw", self.started_ns - 1)))

    def stages(self) -> dict[str, dict[str, float]] | None:
        return pipeline_stages(self.metrics_dir) if self.metrics_dir else None

    def stop(self) -> dict[str, int]:
        """SIGTERM the consumers, then the receiver (so nothing accepted is left unread); exit codes."""
        codes = {name: stop(self.processes[name]) for name in ("consumers", "receiver") if name in self.processes}
        if self.owns_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return codes


def start(
    *,
    consumers: int,
    receiver_workers: int = 1,
    queue_url: str | None = None,
    url: str | None = None,
    data_dir: Path | None = None,
    log_dir: Path | None = None,
) -> Pipeline:
    """Start receiver and consumers (or, with ``url``, use a running receiver and ``CANPIPE_API_KEY``)."""
    if url:
        key = os.environ.get("CANPIPE_API_KEY", "")
        if not key:
            raise CanpipeError("--url needs CANPIPE_API_KEY (key_id:secret) for the running receiver")
        return Pipeline(url.rstrip("/"), key, data_dir)
    owns = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="canpipe-load-")) if data_dir is None else data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or data_dir
    key = f"load:{secrets.token_hex(16)}"
    port = free_port()
    queue_url = queue_url or f"sqlite:///{data_dir / 'queue.db'}"
    env = os.environ | {"CANPIPE_DATA_DIR": str(data_dir), "CANPIPE_QUEUE_URL": queue_url, "CANPIPE_API_KEYS": key}
    pipeline = Pipeline(f"http://127.0.0.1:{port}", key, data_dir, queue_url, owns_data_dir=owns)
    commands = {
        "receiver": ["serve", "--port", str(port), "--workers", str(receiver_workers)],
        "consumers": ["consume", "--workers", str(consumers)],
    }
    for name, args in commands.items():
        with open(log_dir / f"{name}.log", "ab") as log:
            pipeline.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "engine", *args], env=env, stdout=log, stderr=subprocess.STDOUT
            )
    receiver = pipeline.processes["receiver"]
    if not wait_until(lambda: healthy(pipeline.url) or receiver.poll() is not None, 30) or receiver.poll():
        pipeline.stop()
        raise CanpipeError(f"the receiver did not become healthy within 30 s (log: {log_dir / 'receiver.log'})")
    return pipeline
