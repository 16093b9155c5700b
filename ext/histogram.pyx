# cython: language_level=3
"""Compiled twin of engine/kernels/_histogram_py.py: one pass, no temporaries, no GIL."""

from libc.math cimport frexp, isfinite

import numpy as np

DEF SUB_BUCKETS = 64
DEF MAX_EXPONENT = 34
DEF N_BUCKETS = (MAX_EXPONENT + 1) * SUB_BUCKETS


def record_into(long long[::1] counts, values_ms):
    """Add the finite ``values_ms`` to ``counts``; return (how many, min, max, sum) of them."""
    cdef const double[::1] values = np.ascontiguousarray(values_ms, dtype=np.float64)
    cdef Py_ssize_t i, n = values.shape[0]
    cdef long long recorded = 0
    cdef long long index
    cdef int exponent
    cdef double v, mantissa, lo = float("inf"), hi = float("-inf"), total = 0.0
    if counts.shape[0] != N_BUCKETS:
        raise ValueError("counts must have one slot per bucket")
    with nogil:
        for i in range(n):
            v = values[i]
            if not isfinite(v):
                continue
            recorded += 1
            total += v
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            v = v * 1000.0
            if v < 1.0:
                v = 1.0
            mantissa = frexp(v, &exponent)
            index = <long long>exponent * SUB_BUCKETS + <long long>((mantissa - 0.5) * (2 * SUB_BUCKETS))
            if index >= N_BUCKETS:
                index = N_BUCKETS - 1
            counts[index] += 1
    return recorded, lo, hi, total
