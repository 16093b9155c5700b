"""The latency histogram: one test body on both kernels (compiled and pure-Python)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import engine.kernels
from engine.kernels import histogram
from engine.kernels.histogram import LatencyHistogram, PyLatencyHistogram

IMPLEMENTATIONS = [PyLatencyHistogram]
if histogram.IMPLEMENTATION == "c":
    IMPLEMENTATIONS.append(LatencyHistogram)


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda cls: "py" if cls is PyLatencyHistogram else "c")
def Hist(request):
    return request.param


def test_compiled_kernel_is_built_and_selected():
    # CI builds the extension; a silent fallback would hide a broken build
    assert engine.kernels.IMPLEMENTATION == "c", "ext/histogram.pyx was not built: run pip install -e ."


latencies_ms = arrays(
    np.float64, st.integers(1, 3000), elements=st.floats(0.001, 3.6e6, allow_nan=False, allow_infinity=False)
)


@settings(max_examples=60, deadline=None)
@given(values=latencies_ms, q=st.floats(0.0, 1.0))
def test_quantile_within_one_percent_of_exact(values, q):
    for Hist in IMPLEMENTATIONS:
        hist = Hist()
        hist.record_many(values)
        exact = float(np.quantile(values, q, method="inverted_cdf"))
        assert hist.quantile(q) == pytest.approx(exact, rel=0.01), f"{Hist.__name__} q={q}"


def test_skewed_data_percentiles(Hist):
    rng = np.random.default_rng(20261128)
    values = rng.lognormal(mean=1.0, sigma=2.0, size=200_000)  # heavy right tail
    hist = Hist()
    hist.record_many(values)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        exact = np.quantile(values, q, method="inverted_cdf")
        assert abs(hist.quantile(q) - exact) / exact < 0.01, f"seed 20261128, q={q}"
    assert hist.count == values.size and hist.min == values.min() and hist.max == values.max()
    assert hist.mean == pytest.approx(values.mean())


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(latencies_ms, min_size=1, max_size=5))
def test_merge_of_parts_equals_the_whole(parts):
    for Hist in IMPLEMENTATIONS:
        whole, merged = Hist(), Hist()
        whole.record_many(np.concatenate(parts))
        for part in parts:
            piece = Hist()
            piece.record_many(part)
            merged.merge(piece)
        assert np.array_equal(whole.counts, merged.counts)
        assert (whole.count, whole.min, whole.max) == (merged.count, merged.min, merged.max)


def test_both_kernels_fill_the_same_buckets():
    values = np.random.default_rng(5).exponential(50.0, 100_000)
    results = []
    for Hist in IMPLEMENTATIONS:
        hist = Hist()
        hist.record_many(values)
        results.append(hist.counts)
    assert all(np.array_equal(results[0], r) for r in results)


def test_range_edges_nan_and_single_values(Hist):
    hist = Hist()
    hist.record_many(np.array([np.nan, np.inf, -np.inf]))
    assert hist.count == 0 and math.isnan(hist.quantile(0.5)) and math.isnan(hist.mean)
    hist.record(0.0001)  # below 1 us
    hist.record(5 * 3600 * 1000.0)  # beyond the top bucket
    hist.record(12.5)
    assert hist.count == 3 and hist.quantile(0.0) == 0.0001 and hist.quantile(1.0) == 5 * 3600 * 1000.0
    assert hist.quantile(0.5) == pytest.approx(12.5, rel=0.01)
    with pytest.raises(ValueError):
        hist.quantile(1.5)


def test_serialized_form_round_trips_and_is_compact(Hist):
    hist = Hist()
    hist.record_many(np.random.default_rng(3).gamma(2.0, 20.0, 50_000))
    blob = hist.to_bytes()
    assert len(blob) < 8_000
    back = Hist.from_bytes(blob)
    assert np.array_equal(back.counts, hist.counts) and back.quantile(0.99) == hist.quantile(0.99)
    with pytest.raises(ValueError):
        Hist.from_bytes(b"XXXX" + blob[4:])


def test_no_extensions_selects_every_twin():
    import subprocess
    import sys

    code = (
        "import engine.kernels.histogram as h, engine.kernels.groupby as g, engine.kernels.jsonl as j;"
        "print(h.IMPLEMENTATION, g.IMPLEMENTATION, j.IMPLEMENTATION, j.parse_lines.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "CANPIPE_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["py", "py", "py", "engine.kernels._jsonl_py"]
