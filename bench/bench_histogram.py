"""Latency histogram: bulk record, compiled vs the numpy twin, hdrhistogram and numpy.percentile."""

from __future__ import annotations

import numpy as np
import pytest
from timing import ratio

from engine.kernels import histogram
from engine.kernels.histogram import LatencyHistogram, PyLatencyHistogram

HDR_VALUES = 100_000  # hdrhistogram's per-value Python loop is slow: a tenth of the data, scaled per value


def record_c(values):
    LatencyHistogram().record_many(values)


def record_py(values):
    PyLatencyHistogram().record_many(values)


def record_hdr(values):
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram(1, 3_600_000_000, 2)  # 1 us .. 1 h in us, 2 significant digits (1 %)
    for value in (values * 1000.0).astype(np.int64):
        hist.record_value(value)


def percentiles_numpy(values):
    np.percentile(values, [50, 95, 99])


def _per_value(benchmark, n):
    benchmark.extra_info["ns_per_value"] = round(benchmark.stats.stats.min / n * 1e9, 2)


@pytest.mark.skipif(histogram.IMPLEMENTATION != "c", reason="compiled kernels not built")
def test_record_many_compiled(benchmark, latencies_ms):
    benchmark.group = "histogram: record 1M latencies"
    benchmark(record_c, latencies_ms)
    _per_value(benchmark, latencies_ms.size)


def test_record_many_numpy_twin(benchmark, latencies_ms):
    benchmark.group = "histogram: record 1M latencies"
    benchmark(record_py, latencies_ms)
    _per_value(benchmark, latencies_ms.size)


def test_numpy_percentile_sort(benchmark, latencies_ms):
    benchmark.group = "histogram: record 1M latencies"
    benchmark(percentiles_numpy, latencies_ms)
    _per_value(benchmark, latencies_ms.size)


def test_hdrhistogram_record_value_loop_100k(benchmark, latencies_ms):
    benchmark.group = "histogram: record 1M latencies"
    part = latencies_ms[:HDR_VALUES]
    benchmark.pedantic(record_hdr, args=(part,), rounds=2, iterations=1)
    _per_value(benchmark, part.size)


@pytest.mark.skipif(histogram.IMPLEMENTATION != "c", reason="compiled kernels not built")
def test_guard_histogram_ratios(latencies_ms):
    """CI regression guards on same-run ratios (the targets are checked in docs/benchmarks.md)."""
    part = latencies_ms[:HDR_VALUES]
    hdr_s, c_s, hdr_ratio = ratio(lambda: record_hdr(part), lambda: record_c(part), repeats=2)
    _, _, py_ratio = ratio(lambda: record_py(latencies_ms), lambda: record_c(latencies_ms))
    _, _, np_ratio = ratio(lambda: percentiles_numpy(latencies_ms), lambda: record_c(latencies_ms))
    print(
        f"compiled {c_s / part.size * 1e9:.2f} ns/value; vs hdrhistogram {hdr_ratio:.0f}x, "
        f"vs numpy twin {py_ratio:.1f}x, vs numpy.percentile {np_ratio:.1f}x"
    )
    assert hdr_ratio >= 50, f"compiled record_many only {hdr_ratio:.0f}x faster than hdrhistogram (guard 50x)"
    assert py_ratio >= 3, f"compiled only {py_ratio:.1f}x faster than its numpy twin (guard 3x)"
    assert np_ratio >= 1.5, f"compiled only {np_ratio:.1f}x faster than numpy.percentile (guard 1.5x)"
