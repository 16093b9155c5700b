"""Per-process metrics, their merge over every process, and the Prometheus text of the merge.

Each process (every Granian worker, every consumer) keeps one ``Metrics`` of the families declared in
``engine.instruments`` and replaces its snapshot file ``<data_dir>/metrics/<role>-<id>.metrics`` now and
then (a consumer after every batch, a receiver worker every second). The worker that answers ``/metrics``
merges every snapshot with its own live values (``read_snapshots``) and renders the merge with
prometheus_client. Why files and not prometheus_client's multi-process mode: latencies are recorded per
batch into compiled log-linear histograms (``LatencyHistogram``), which merge by adding arrays and are
mapped onto the fixed ``le`` bounds only when a scrape renders them; ``canpipe run``, the load tests and the
benchmarks read the same merge with its exact percentiles.

Counters survive restarts as Prometheus expects: a process's file is named for that process and stays
after it dies, so the merged total never goes down. Gauges of a dead process are dropped.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from engine.instruments import BUCKETS_S, FAMILIES, LATENCY, SQS_BILLED, SQS_REQUESTS, STAGES, Family
from engine.kernels import LatencyHistogram
from engine.kernels._histogram_py import N_BUCKETS
from engine.kernels.histogram import bucket_bounds_us

if TYPE_CHECKING:
    from engine.queues import QueueUsage

__all__ = ["STAGES", "Metrics", "read_snapshots", "render", "write_snapshot"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Key = tuple[str, tuple[str, ...]]  # family name, label values in declared order
# upper bound of each log-linear bucket, milliseconds: where a bucket falls among the ``le`` bounds
_BUCKET_HIGH_MS = np.array([bucket_bounds_us(i)[1] / 1000.0 for i in range(N_BUCKETS)])
_LE_INDEX = np.searchsorted(_BUCKET_HIGH_MS, np.array(BUCKETS_S) * 1000.0, side="right")


class _Snapshot(msgspec.Struct):
    pid: int
    values: list[tuple[str, tuple[str, ...], float]]
    histograms: list[tuple[str, tuple[str, ...], bytes]]


def _key(family: Family, labels: dict[str, object]) -> Key:
    try:  # on every request: a list comprehension, not a generator (half the cost)
        values = tuple([str(labels[name]) for name in family.labels])
    except KeyError:
        values = ()
    if len(values) != len(labels) or len(values) != len(family.labels):
        raise ValueError(f"{family.name} takes labels {family.labels}, got {tuple(labels)}")
    return family.name, values


def _series(key: Key) -> str:
    """The sample's identity as Prometheus writes it: ``name{label="value",...}``."""
    name, values = key
    if not values:
        return name
    labels = ",".join(f'{label}="{value}"' for label, value in zip(FAMILIES[name].labels, values, strict=True))
    return f"{name}{{{labels}}}"


class Metrics:
    """Counter and gauge values and latency histograms (milliseconds) of one process, or a merge."""

    def __init__(self) -> None:
        self.values: dict[Key, float] = {}
        self.histograms: dict[Key, LatencyHistogram] = {}
        self.pid = os.getpid()

    def inc(self, family: Family, amount: float = 1, **labels: object) -> None:
        key = _key(family, labels)
        self.values[key] = self.values.get(key, 0) + amount

    def set(self, family: Family, value: float, **labels: object) -> None:
        """A gauge, or a counter that another object keeps (the publisher's send calls, a queue's usage)."""
        self.values[_key(family, labels)] = value

    def value(self, family: Family, **labels: object) -> float:
        return self.values.get(_key(family, labels), 0)

    def histogram(self, family: Family, **labels: object) -> LatencyHistogram:
        """The histogram of ``family`` with ``labels``; record into it with ``record_many`` (milliseconds)."""
        key = _key(family, labels)
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = LatencyHistogram()
        return hist

    @property
    def latency(self) -> dict[str, LatencyHistogram]:
        """The four pipeline stages' histograms (milliseconds)."""
        return {stage: self.histogram(LATENCY, stage=stage) for stage in STAGES}

    @property
    def counters(self) -> collections.Counter[str]:
        """Every value by its series name (``name{label="value"}``), 0 when absent: a read-only view."""
        return collections.Counter({_series(key): value for key, value in self.values.items()})

    def merge(self, other: Metrics, *, gauges: bool = True) -> None:
        for key, value in other.values.items():
            if FAMILIES[key[0]].kind == "counter":
                self.values[key] = self.values.get(key, 0) + value
            elif gauges:
                self.values[key] = self.values.get(key, 0) + value
        for key, hist in other.histograms.items():
            mine = self.histograms.get(key)
            if mine is None:
                mine = self.histograms[key] = LatencyHistogram()
            mine.merge(hist)

    def use_queue_usage(self, usage: QueueUsage | None) -> None:
        """A queue's ``usage()`` (SQS calls by action, billed requests); nothing for SQLite."""
        if usage is None:
            return
        for action, n in usage.requests_by_action.items():
            self.set(SQS_REQUESTS, n, action=action)
        self.set(SQS_BILLED, usage.billed_requests)

    def to_bytes(self) -> bytes:
        values = [(name, labels, value) for (name, labels), value in self.values.items()]
        histograms = [(name, labels, hist.to_bytes()) for (name, labels), hist in self.histograms.items()]
        return msgspec.msgpack.encode(_Snapshot(self.pid, values, histograms))

    @classmethod
    def from_bytes(cls, data: bytes) -> Metrics:
        snapshot = msgspec.msgpack.decode(data, type=_Snapshot)
        metrics = cls()
        metrics.pid = snapshot.pid
        metrics.values = {(name, labels): value for name, labels, value in snapshot.values if name in FAMILIES}
        for name, labels, blob in snapshot.histograms:
            if name in FAMILIES:
                metrics.histograms[name, labels] = LatencyHistogram.from_bytes(blob)
        return metrics

    def summary(self, stage: str) -> dict[str, float]:
        """count, p50, p95, p99, max of one stage, milliseconds (exact to the log-linear bucket)."""
        hist = self.histogram(LATENCY, stage=stage)
        return {
            "count": hist.count,
            "p50": hist.quantile(0.5),
            "p95": hist.quantile(0.95),
            "p99": hist.quantile(0.99),
            "max": hist.max if hist.count else math.nan,
        }


def write_snapshot(path: Path, metrics: Metrics) -> None:
    """Replace ``path`` atomically with the snapshot (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(metrics.to_bytes())
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: Path, *, skip: Path | None = None) -> Metrics:
    """Merge every ``*.metrics`` snapshot in ``directory`` (but ``skip``): counters and histograms of every
    process that ever wrote one, gauges of the live ones only. A file of another format is passed over."""
    total = Metrics()
    for path in sorted(directory.glob("*.metrics")):
        if path == skip:
            continue
        with contextlib.suppress(OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError):
            snapshot = Metrics.from_bytes(path.read_bytes())
            total.merge(snapshot, gauges=_alive(snapshot.pid))
    return total


def _families(metrics: Metrics) -> Iterator[Metric]:
    """Every declared family of ``metrics``, idle label sets as 0, histograms on the ``le`` bounds."""
    by_family: dict[str, dict[tuple[str, ...], float | LatencyHistogram]] = {name: {} for name in FAMILIES}
    for family in FAMILIES.values():
        for labels in family.idle:
            by_family[family.name][labels] = LatencyHistogram() if family.kind == "histogram" else 0.0
    for (name, labels), value in metrics.values.items():
        by_family[name][labels] = value
    for (name, labels), hist in metrics.histograms.items():
        by_family[name][labels] = hist
    for name, series in by_family.items():
        family = FAMILIES[name]
        metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if family.kind == "counter":
            metric = CounterMetricFamily(name, family.help, labels=family.labels)
        elif family.kind == "gauge":
            metric = GaugeMetricFamily(name, family.help, labels=family.labels)
        else:
            metric = HistogramMetricFamily(name, family.help, labels=family.labels)
        for labels, sample in sorted(series.items(), key=lambda item: item[0]):
            if isinstance(sample, LatencyHistogram):
                assert isinstance(metric, HistogramMetricFamily)
                cumulative = np.concatenate([[0], np.cumsum(sample.counts)])[_LE_INDEX]
                buckets = [(repr(le), float(n)) for le, n in zip(BUCKETS_S, cumulative.tolist(), strict=True)]
                buckets.append(("+Inf", float(sample.count)))
                metric.add_metric(list(labels), buckets, sample.total / 1000.0)
            else:
                assert not isinstance(metric, HistogramMetricFamily)
                metric.add_metric(list(labels), float(sample))
        yield metric


class _Fixed:
    """A prometheus_client collector over one merged ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return _families(self.metrics)


def render(metrics: Metrics) -> bytes:
    """Prometheus text (format 0.0.4, ``CONTENT_TYPE``) of every declared family: HELP, TYPE, samples."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))  # type: ignore[arg-type]
    return generate_latest(registry)


def parse_counters(text: str, prefix: str) -> dict[str, float]:
    """The samples of Prometheus ``text`` whose names start with ``prefix`` (for tools that only have the
    text of a remote /metrics; canpipe itself reads the merge)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
