"""Per-group statistics over columnar arrays, streamed part by part in bounded memory.

``GroupStats`` holds, per signal and group, the count of present (non-NaN) values, min, max and sum, and
the number of rows per group. Parts merge, so an hour of files can be aggregated file by file. The
compiled kernel is used unless ``CANPIPE_NO_EXTENSIONS=1`` or it was not built.
"""

from __future__ import annotations

import numpy as np

from engine.kernels import _groupby_py
from engine.kernels._select import compiled_or_twin

IMPLEMENTATION, _kernel = compiled_or_twin("groupby")


class GroupStats:
    """Accumulators for ``signals`` signals over a growing number of groups.

    ``count``, ``total`` and the raw ``low``/``high`` arrays are (signals x groups); ``minimum``,
    ``maximum`` and ``mean()`` give NaN where a group has no value of a signal.
    """

    _groupby_into = staticmethod(_kernel.groupby_into)

    def __init__(self, signals: int, groups: int = 0) -> None:
        self.signals = signals
        self.records = np.zeros(groups, dtype=np.int64)
        self.count = np.zeros((signals, groups), dtype=np.int64)
        self.low = np.full((signals, groups), np.inf)
        self.high = np.full((signals, groups), -np.inf)
        self.total = np.zeros((signals, groups), dtype=np.float64)

    @property
    def groups(self) -> int:
        return self.records.shape[0]

    @property
    def minimum(self) -> np.ndarray:
        return np.where(self.count > 0, self.low, np.nan)

    @property
    def maximum(self) -> np.ndarray:
        return np.where(self.count > 0, self.high, np.nan)

    def grow(self, groups: int) -> None:
        """Make room for at least ``groups`` groups (new groups start empty)."""
        extra = groups - self.groups
        if extra <= 0:
            return
        extra = max(extra, self.groups)  # double, so growing one at a time stays linear
        self.records = np.pad(self.records, (0, extra))
        self.count = np.pad(self.count, ((0, 0), (0, extra)))
        self.low = np.pad(self.low, ((0, 0), (0, extra)), constant_values=np.inf)
        self.high = np.pad(self.high, ((0, 0), (0, extra)), constant_values=-np.inf)
        self.total = np.pad(self.total, ((0, 0), (0, extra)))

    def add(self, group: np.ndarray, values: np.ndarray) -> None:
        """Add rows: ``group`` (int64 per row), ``values`` (signals x rows float64, NaN where absent)."""
        if len(group):
            self.grow(int(np.max(group)) + 1)
        self._groupby_into(group, values, self.records, self.count, self.low, self.high, self.total)

    def merge(self, other: GroupStats) -> None:
        """Add another part whose group indices mean the same groups."""
        self.grow(other.groups)
        n = other.groups
        self.records[:n] += other.records
        self.count[:, :n] += other.count
        self.total[:, :n] += other.total
        np.minimum(self.low[:, :n], other.low, out=self.low[:, :n])
        np.maximum(self.high[:, :n], other.high, out=self.high[:, :n])

    def mean(self) -> np.ndarray:
        """Per signal and group; NaN where a group has no value of that signal."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


class PyGroupStats(GroupStats):
    """Always the pure-Python kernel (tests and benchmarks compare the two)."""

    _groupby_into = staticmethod(_groupby_py.groupby_into)
