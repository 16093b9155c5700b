"""Compiled hot path with pure-Python twins.

The compiled kernels (built from ``ext/``) are used unless ``CANPIPE_NO_EXTENSIONS=1`` or they were not
built; ``IMPLEMENTATION`` says which: ``"c"`` or ``"py"``. Both pass the same tests. The ground floor of
canpipe: imports nothing else of the package.
"""

from engine.kernels.groupby import GroupStats
from engine.kernels.histogram import IMPLEMENTATION, LatencyHistogram

__all__ = ["IMPLEMENTATION", "GroupStats", "LatencyHistogram"]
