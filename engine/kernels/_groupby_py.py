"""Pure-Python (numpy) reference of the group-by kernel; ``ext/groupby.pyx`` is its compiled twin."""

from __future__ import annotations

import numpy as np


def groupby_into(group, values, records, count, minimum, maximum, total) -> None:
    """Accumulate ``values`` (signals x rows, NaN = absent) by ``group`` (row -> group index) into the
    (signals x groups) arrays and ``records`` (rows per group). Arrays are updated in place."""
    group = np.asarray(group, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    groups = records.shape[0]
    if values.shape[1] != group.shape[0] or count.shape != (values.shape[0], groups):
        raise ValueError("shapes do not match: values (signals x rows), accumulators (signals x groups)")
    if group.size and (group.min() < 0 or group.max() >= groups):
        raise IndexError(f"group index out of range [0, {groups})")
    records += np.bincount(group, minlength=groups)
    for s in range(values.shape[0]):
        row = values[s]
        present = ~np.isnan(row)
        g, x = group[present], row[present]
        seen = count[s] > 0
        here = np.bincount(g, minlength=groups)
        count[s] += here
        total[s] += np.bincount(g, weights=x, minlength=groups)
        lo = np.full(groups, np.inf)
        hi = np.full(groups, -np.inf)
        np.minimum.at(lo, g, x)
        np.maximum.at(hi, g, x)
        has = here > 0  # groups without a value here keep what they had (NaN when none yet)
        minimum[s] = np.where(has, np.where(seen, np.minimum(minimum[s], lo), lo), minimum[s])
        maximum[s] = np.where(has, np.where(seen, np.maximum(maximum[s], hi), hi), maximum[s])
