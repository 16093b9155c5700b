"""The latency histogram (values in milliseconds) over a selected kernel.

The compiled kernel is used unless ``CANPIPE_NO_EXTENSIONS=1`` or it was not built. Histograms merge by
adding their count arrays; quantiles come from the buckets (nearest rank), never from averaging.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from engine.kernels import _histogram_py
from engine.kernels._histogram_py import N_BUCKETS, SUB_BUCKETS
from engine.kernels._select import compiled_or_twin

IMPLEMENTATION, _kernel = compiled_or_twin("histogram")

_HEADER = struct.Struct("<4sqdddi")
_MAGIC = b"CPH1"


def bucket_bounds_us(index: int) -> tuple[float, float]:
    """The [low, high) range of bucket ``index``, microseconds."""
    exponent, sub = divmod(index, SUB_BUCKETS)
    low = math.ldexp(0.5 + sub / (2 * SUB_BUCKETS), exponent)
    return low, low + math.ldexp(1 / (2 * SUB_BUCKETS), exponent)


class LatencyHistogram:
    """Latency histogram: 1 us to 2.4 h at under 1 % relative error; values in milliseconds."""

    __slots__ = ("counts", "count", "min", "max", "total")
    _record_into = staticmethod(_kernel.record_into)

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.total = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def record(self, value_ms: float) -> None:
        self.record_many(np.array([value_ms], dtype=np.float64))

    def record_many(self, values_ms: np.ndarray) -> None:
        """Record a float64 array in one call (no Python-level loop); NaN and infinities are skipped."""
        n, lo, hi, total = self._record_into(self.counts, values_ms)
        if n:
            self.count += n
            self.min = min(self.min, lo)
            self.max = max(self.max, hi)
            self.total += total

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` in [0, 1] (nearest rank), milliseconds; NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q * self.count))
        if rank == 1:  # the smallest and largest values are known exactly
            return self.min
        if rank >= self.count:
            return self.max
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        low, high = bucket_bounds_us(index)
        return min(max((low + high) / 2000.0, self.min), self.max)

    def to_bytes(self) -> bytes:
        """Compact form: a header and the non-empty buckets as (index, count) pairs."""
        nonzero = np.flatnonzero(self.counts).astype(np.int32)
        header = _HEADER.pack(_MAGIC, self.count, self.min, self.max, self.total, nonzero.size)
        return header + nonzero.tobytes() + self.counts[nonzero].tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencyHistogram:
        magic, count, minimum, maximum, total, n = _HEADER.unpack_from(data)
        if magic != _MAGIC or len(data) != _HEADER.size + 12 * n:
            raise ValueError("not a canpipe latency histogram")
        index = np.frombuffer(data, dtype=np.int32, count=n, offset=_HEADER.size)
        hist = cls()
        hist.counts[index] = np.frombuffer(data, dtype=np.int64, count=n, offset=_HEADER.size + 4 * n)
        hist.count, hist.min, hist.max, hist.total = count, minimum, maximum, total
        return hist


class PyLatencyHistogram(LatencyHistogram):
    """Always the pure-Python kernel (tests and benchmarks compare the two)."""

    __slots__ = ()
    _record_into = staticmethod(_histogram_py.record_into)
