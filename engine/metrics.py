"""Latency histograms for the four stages and counters, rendered as Prometheus text.

Names follow ``canpipe_<noun>_<unit>[_total]``. Consumer processes each keep their own ``Metrics`` and
write a snapshot file now and then; snapshots merge by adding (histograms never average percentiles).
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from engine.kernels import LatencyHistogram

if TYPE_CHECKING:
    from engine.queues import QueueUsage

STAGES = ("ingest", "queue", "processing", "end_to_end")
QUANTILES = (0.5, 0.95, 0.99)


class _Snapshot(msgspec.Struct):
    counters: dict[str, int]
    histograms: dict[str, bytes]


class Metrics:
    """Counters (by name) and one latency histogram per stage, values in milliseconds."""

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self.latency = {stage: LatencyHistogram() for stage in STAGES}

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def merge(self, other: Metrics) -> None:
        self.counters.update(other.counters)
        for stage in STAGES:
            self.latency[stage].merge(other.latency[stage])

    def to_bytes(self) -> bytes:
        histograms = {stage: hist.to_bytes() for stage, hist in self.latency.items()}
        return msgspec.msgpack.encode(_Snapshot(dict(self.counters), histograms))

    @classmethod
    def from_bytes(cls, data: bytes) -> Metrics:
        snapshot = msgspec.msgpack.decode(data, type=_Snapshot)
        metrics = cls()
        metrics.counters.update(snapshot.counters)
        for stage, blob in snapshot.histograms.items():
            metrics.latency[stage] = LatencyHistogram.from_bytes(blob)
        return metrics

    def summary(self, stage: str) -> dict[str, float]:
        """count, p50, p95, p99, max of one stage, milliseconds."""
        hist = self.latency[stage]
        return {
            "count": hist.count,
            "p50": hist.quantile(0.5),
            "p95": hist.quantile(0.95),
            "p99": hist.quantile(0.99),
            "max": hist.max if hist.count else math.nan,
        }

    def render_prometheus(self) -> str:
        lines = [
            "# HELP canpipe_latency_seconds Latency per pipeline stage.",
            "# TYPE canpipe_latency_seconds summary",
        ]
        for stage, hist in self.latency.items():
            if hist.count:
                for q in QUANTILES:
                    lines.append(
                        f'canpipe_latency_seconds{{stage="{stage}",quantile="{q}"}} {hist.quantile(q) / 1000:.6f}'
                    )
            lines.append(f'canpipe_latency_seconds_sum{{stage="{stage}"}} {hist.total / 1000 if hist.count else 0:.6f}')
            lines.append(f'canpipe_latency_seconds_count{{stage="{stage}"}} {hist.count}')
        typed: set[str] = set()
        for name in sorted(self.counters):
            base = name.partition("{")[0]
            if base not in typed:
                typed.add(base)
                lines.append(f"# TYPE {base} counter")
            lines.append(f"{name} {self.counters[name]}")
        return "\n".join(lines) + "\n"


def write_snapshot(path: Path, metrics: Metrics) -> None:
    """Replace ``path`` atomically with the snapshot (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(metrics.to_bytes())
    os.replace(tmp, path)


def read_snapshots(directory: Path) -> Metrics:
    """Merge every ``*.metrics`` snapshot in ``directory``."""
    total = Metrics()
    for path in sorted(directory.glob("*.metrics")):
        total.merge(Metrics.from_bytes(path.read_bytes()))
    return total


def queue_usage(usage: QueueUsage | None) -> dict[str, int]:
    """A queue's ``usage()`` (SQS API calls by action and billed requests) as counter names; empty for a
    backend not billed per request (SQLite)."""
    if usage is None:
        return {}
    counters = {
        f'canpipe_sqs_requests_total{{action="{action}"}}': n for action, n in sorted(usage.requests_by_action.items())
    }
    counters["canpipe_sqs_billed_requests_total"] = usage.billed_requests
    return counters


def render_queue_usage(usage: QueueUsage | None) -> str:
    """``queue_usage`` as Prometheus text with its TYPE lines (empty for SQLite)."""
    counters = queue_usage(usage)
    if not counters:
        return ""
    head = "# TYPE canpipe_sqs_requests_total counter\n# TYPE canpipe_sqs_billed_requests_total counter\n"
    return head + "".join(f"{name} {value}\n" for name, value in counters.items())


def parse_counters(text: str, prefix: str) -> dict[str, float]:
    """The samples of Prometheus ``text`` whose names start with ``prefix``."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
