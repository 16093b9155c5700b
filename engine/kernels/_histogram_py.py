"""Pure-Python (numpy) reference of the histogram kernel; ``ext/histogram.pyx`` is its compiled twin.

Log-linear buckets in the spirit of HdrHistogram: values are kept in microseconds and each power of two
is split into 64 linear sub-buckets, so a bucket's midpoint is within 1/128 (0.8 %) of any value in it.
Range: 1 us .. 2**33 us (about 2.4 h); smaller values land in the first bucket, larger in the last.
"""

from __future__ import annotations

import numpy as np

SUB_BUCKETS = 64
MAX_EXPONENT = 34  # frexp exponent of 2**33 us
N_BUCKETS = (MAX_EXPONENT + 1) * SUB_BUCKETS


def record_into(counts: np.ndarray, values_ms: np.ndarray) -> tuple[int, float, float, float]:
    """Add the finite ``values_ms`` to ``counts``; return (how many, min, max, sum) of them."""
    values = np.asarray(values_ms, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0, np.inf, -np.inf, 0.0
    mantissa, exponent = np.frexp(np.maximum(values * 1000.0, 1.0))
    index = exponent.astype(np.int64) * SUB_BUCKETS + ((mantissa - 0.5) * (2 * SUB_BUCKETS)).astype(np.int64)
    counts += np.bincount(np.minimum(index, N_BUCKETS - 1), minlength=N_BUCKETS)
    return int(values.size), float(values.min()), float(values.max()), float(values.sum())
