"""Fixtures of the benchmarks (defined in timing.py, next to the timing helpers)."""

from timing import columns, latencies_ms  # noqa: F401
