"""Per-vehicle group-by: compiled vs the numpy twin, a numpy sort baseline and DuckDB, same data, same run."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
from timing import ratio

from engine.kernels import groupby
from engine.kernels.groupby import GroupStats, PyGroupStats

SQL = "SELECT g, " + ", ".join(f"count(s{i}), min(s{i}), max(s{i}), sum(s{i})" for i in range(7)) + " FROM t GROUP BY g"


def group_c(group, values):
    GroupStats(values.shape[0], 1000).add(group, values)


def group_py(group, values):
    PyGroupStats(values.shape[0], 1000).add(group, values)


def group_numpy_sort(group, values):
    """What one writes with numpy alone: sort by group, then reduceat per signal (NaN-aware)."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    for row in values[:, order]:
        present = ~np.isnan(row)
        np.add.reduceat(present, starts)
        np.add.reduceat(np.where(present, row, 0.0), starts)
        np.minimum.reduceat(np.where(present, row, np.inf), starts)
        np.maximum.reduceat(np.where(present, row, -np.inf), starts)


@pytest.fixture(scope="module")
def duck(columns):
    """DuckDB at its best: the columns loaded once into its own in-memory table, all cores."""
    group, values = columns
    con = duckdb.connect()
    arrays = {"g": group, **{f"s{i}": values[i] for i in range(values.shape[0])}}  # noqa: F841 (scanned by name)
    con.execute("CREATE TABLE t AS SELECT * FROM arrays")
    yield lambda: con.execute(SQL).fetchnumpy()
    con.close()


def _per_value(benchmark, values):
    benchmark.extra_info["M_values_per_s"] = round(values.size / benchmark.stats.stats.min / 1e6, 1)


@pytest.mark.skipif(groupby.IMPLEMENTATION != "c", reason="compiled kernels not built")
def test_groupby_compiled(benchmark, columns):
    benchmark.group = "groupby: 1.8M rows x 7 signals, 1,000 vehicles"
    benchmark(group_c, *columns)
    _per_value(benchmark, columns[1])


def test_groupby_numpy_twin(benchmark, columns):
    benchmark.group = "groupby: 1.8M rows x 7 signals, 1,000 vehicles"
    benchmark(group_py, *columns)
    _per_value(benchmark, columns[1])


def test_groupby_numpy_sort_baseline(benchmark, columns):
    benchmark.group = "groupby: 1.8M rows x 7 signals, 1,000 vehicles"
    benchmark(group_numpy_sort, *columns)
    _per_value(benchmark, columns[1])


def test_groupby_duckdb(benchmark, columns, duck):
    benchmark.group = "groupby: 1.8M rows x 7 signals, 1,000 vehicles"
    benchmark(duck)
    _per_value(benchmark, columns[1])


@pytest.mark.skipif(groupby.IMPLEMENTATION != "c", reason="compiled kernels not built")
def test_guard_groupby_ratios(columns, duck):
    group, values = columns
    _, c_s, py_ratio = ratio(lambda: group_py(group, values), lambda: group_c(group, values))
    _, _, sort_ratio = ratio(lambda: group_numpy_sort(group, values), lambda: group_c(group, values))
    _, _, duck_ratio = ratio(duck, lambda: group_c(group, values))
    print(
        f"compiled {values.size / c_s / 1e6:.0f} M values/s; vs numpy twin {py_ratio:.1f}x, "
        f"vs numpy sort {sort_ratio:.1f}x, vs DuckDB {duck_ratio:.2f}x"
    )
    assert py_ratio >= 1.5, f"compiled only {py_ratio:.1f}x faster than its numpy twin (guard 1.5x)"
    assert sort_ratio >= 3, f"compiled only {sort_ratio:.1f}x faster than a numpy sort baseline (guard 3x)"
    assert duck_ratio >= 0.5, f"compiled at {duck_ratio:.2f}x of DuckDB's speed (guard 0.5x)"
