"""Same-run ratio timing and shared data for the kernel benchmarks.

Benchmarks compare ours with references measured in the same process, interleaved, taking the best of
several repeats: this machine is shared and noisy, so only ratios within one run mean anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

SEED = 20261128


@contextmanager
def untraced() -> Iterator[None]:
    """Coverage paused while timing.

    CI runs the benchmarks under ``--cov=engine``, which traces engine/ line by line but not the
    references kept in bench/: a pure-Python step of ours measured 2.9-4.2x the reference with it on
    and 1.3x with it off. A guard must measure the code, not the tracer.
    """
    try:
        import coverage
    except ImportError:  # pragma: no cover - coverage is in the test extra
        yield
        return
    cov = coverage.Coverage.current()
    if cov is None:
        yield
        return
    cov.stop()
    try:
        yield
    finally:
        cov.start()


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    with untraced():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def ratio(slow: Callable[[], object], fast: Callable[[], object], repeats: int = 5) -> tuple[float, float, float]:
    """(slow seconds, fast seconds, slow/fast), each the best of ``repeats``, measured alternately."""
    slow_s, fast_s = float("inf"), float("inf")
    for _ in range(repeats):
        slow_s = min(slow_s, best_seconds(slow, 1))
        fast_s = min(fast_s, best_seconds(fast, 1))
    return slow_s, fast_s, slow_s / fast_s


@pytest.fixture(scope="session")
def latencies_ms() -> np.ndarray:
    """One million skewed latencies (lognormal, median ~7 ms, long tail)."""
    return np.random.default_rng(SEED).lognormal(mean=2.0, sigma=1.5, size=1_000_000)


@pytest.fixture(scope="session")
def columns() -> tuple[np.ndarray, np.ndarray]:
    """An hour at 500 records/s: 1.8 million rows, 1,000 vehicles, 7 signals, 5 % absent values."""
    rng = np.random.default_rng(SEED)
    rows = 1_800_000
    group = rng.integers(0, 1000, rows)
    values = rng.normal(50.0, 10.0, (7, rows))
    values[rng.random(values.shape) < 0.05] = np.nan
    return group, values
