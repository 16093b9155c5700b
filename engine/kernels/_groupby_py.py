"""Pure-Python (numpy) reference of the group-by kernel; ``ext/groupby.pyx`` is its compiled twin."""

from __future__ import annotations

import numpy as np


def groupby_into(group, values, records, count, minimum, maximum, total) -> None:
    """Accumulate ``values`` (signals x rows, NaN = absent) by ``group`` (row -> group index) into the
    (signals x groups) arrays and ``records`` (rows per group), in place. ``minimum`` and ``maximum``
    start at +inf and -inf; a group without a value of a signal keeps them."""
    group = np.asarray(group, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    groups = records.shape[0]
    if values.shape[1] != group.shape[0] or count.shape != (values.shape[0], groups):
        raise ValueError("shapes do not match: values (signals x rows), accumulators (signals x groups)")
    if group.size and (group.min() < 0 or group.max() >= groups):
        raise IndexError(f"group index out of range [0, {groups})")
    records += np.bincount(group, minlength=groups)
    for s in range(values.shape[0]):
        present = ~np.isnan(values[s])
        g, x = group[present], values[s][present]
        count[s] += np.bincount(g, minlength=groups)
        total[s] += np.bincount(g, weights=x, minlength=groups)
        np.minimum.at(minimum[s], g, x)
        np.maximum.at(maximum[s], g, x)
