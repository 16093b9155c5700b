# cython: language_level=3
"""Compiled twin of engine/kernels/_groupby_py.py: per-group count/min/max/sum in one pass per signal."""

from libc.math cimport isnan

import numpy as np


def groupby_into(group, values, long long[::1] records, long long[:, ::1] count, double[:, ::1] minimum,
                 double[:, ::1] maximum, double[:, ::1] total):
    """Accumulate ``values`` (signals x rows, NaN = absent) by ``group`` (row -> group index) into the
    (signals x groups) arrays and ``records`` (rows per group), in place. ``minimum`` and ``maximum``
    start at +inf and -inf; a group without a value of a signal keeps them."""
    cdef const long long[::1] g = np.ascontiguousarray(group, dtype=np.int64)
    cdef const double[:, ::1] v = np.ascontiguousarray(values, dtype=np.float64)
    cdef Py_ssize_t i, s, k, rows = g.shape[0], signals = v.shape[0], groups = records.shape[0]
    cdef double x
    cdef long long *c
    cdef double *lo
    cdef double *hi
    cdef double *t
    if v.shape[1] != rows or count.shape[0] != signals or count.shape[1] != groups:
        raise ValueError("shapes do not match: values (signals x rows), accumulators (signals x groups)")
    for i in range(rows):
        if g[i] < 0 or g[i] >= groups:
            raise IndexError(f"group index {g[i]} out of range [0, {groups})")
    with nogil:
        for i in range(rows):
            records[g[i]] += 1
        for s in range(signals):
            c, lo, hi, t = &count[s, 0], &minimum[s, 0], &maximum[s, 0], &total[s, 0]
            for i in range(rows):
                x = v[s, i]
                if isnan(x):
                    continue
                k = g[i]
                c[k] += 1
                t[k] += x
                lo[k] = x if x < lo[k] else lo[k]
                hi[k] = x if x > hi[k] else hi[k]
