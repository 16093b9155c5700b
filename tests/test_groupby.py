"""The group-by kernel: one test body on both implementations, against a plain-Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels import groupby
from engine.kernels.groupby import GroupStats, PyGroupStats

IMPLEMENTATIONS = [PyGroupStats] + ([GroupStats] if groupby.IMPLEMENTATION == "c" else [])


def reference(group, values, groups):
    """Plain Python: per signal and group, (count, min, max, sum) of the non-NaN values."""
    out = {}
    for s, row in enumerate(values):
        for k in range(groups):
            xs = [x for g, x in zip(group, row) if g == k and not math.isnan(x)]
            out[s, k] = (len(xs), min(xs) if xs else None, max(xs) if xs else None, sum(xs))
    return out


def check(stats, group, values, groups):
    expected = reference(group, values, groups)
    assert list(stats.records[:groups]) == [list(group).count(k) for k in range(groups)]
    for (s, k), (n, lo, hi, total) in expected.items():
        assert stats.count[s, k] == n
        if n:
            assert (stats.minimum[s, k], stats.maximum[s, k]) == (lo, hi)
            assert stats.total[s, k] == pytest.approx(total, rel=1e-9, abs=1e-9)
            assert stats.mean()[s, k] == pytest.approx(total / n, rel=1e-9, abs=1e-9)
        else:
            assert math.isnan(stats.minimum[s, k]) and math.isnan(stats.mean()[s, k])


rows = st.integers(0, 200)
cell = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(float("nan")))


@st.composite
def columns(draw):
    n, signals, groups = draw(rows), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    group = draw(st.lists(st.integers(0, groups - 1), min_size=n, max_size=n))
    values = [draw(st.lists(cell, min_size=n, max_size=n)) for _ in range(signals)]
    return np.array(group, dtype=np.int64), np.array(values, dtype=np.float64).reshape(signals, n), groups


@settings(max_examples=80, deadline=None)
@given(data=columns())
def test_equals_plain_python_including_nan_and_empty_groups(data):
    group, values, groups = data
    for Stats in IMPLEMENTATIONS:
        stats = Stats(values.shape[0], groups)
        stats.add(group, values)
        check(stats, group, values, groups)


@settings(max_examples=40, deadline=None)
@given(data=columns(), cuts=st.lists(st.integers(0, 200), max_size=4))
def test_parts_merge_to_the_whole(data, cuts):
    group, values, groups = data
    bounds = sorted({0, len(group), *[c for c in cuts if c <= len(group)]})
    for Stats in IMPLEMENTATIONS:
        merged = Stats(values.shape[0])
        for lo, hi in zip(bounds, bounds[1:]):
            part = Stats(values.shape[0])
            part.add(group[lo:hi], values[:, lo:hi])
            merged.merge(part)
        merged.grow(groups)
        check(merged, group, values, groups)


def test_streaming_adds_equal_one_add():
    rng = np.random.default_rng(42)
    group = rng.integers(0, 50, 10_000)
    values = rng.normal(0, 1, (3, 10_000))
    values[rng.random(values.shape) < 0.2] = np.nan
    for Stats in IMPLEMENTATIONS:
        whole, streamed = Stats(3), Stats(3)
        whole.add(group, values)
        for start in range(0, 10_000, 999):
            streamed.add(group[start : start + 999], values[:, start : start + 999])
        assert np.array_equal(whole.count, streamed.count) and np.array_equal(whole.minimum, streamed.minimum)
        assert np.allclose(whole.total, streamed.total), "seed 42"


def test_bad_input_is_refused():
    for Stats in IMPLEMENTATIONS:
        stats = Stats(2, 3)
        with pytest.raises(ValueError):
            stats._groupby_into(
                np.zeros(3, np.int64), np.zeros((2, 4)), stats.records, stats.count, stats.low, stats.high, stats.total
            )
        with pytest.raises(IndexError):
            stats._groupby_into(
                np.array([5]), np.zeros((2, 1)), stats.records, stats.count, stats.low, stats.high, stats.total
            )
