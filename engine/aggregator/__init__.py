"""The hourly aggregator: one hour of raw JSONL -> data/aggregated/aggregated-<hour>.json.

One concept per module: ``hours`` (which hours, their files, manifest and schedule), ``partitions`` (reading
the hour's files into vehicle partitions, spilled when large), ``rollup`` (order, dedup, statistics and
integrals), ``document`` (the output and its atomic write), ``driver`` (one hour, the pending hours, the
hourly schedule).

The names below are loaded on first use (PEP 562): ``canpipe aggregate --hour H`` parses its arguments
with ``hours`` alone, and numpy and the kernels are imported only when an hour is actually aggregated (a
cron job that finds nothing to do starts in the time of the interpreter and the command line).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.aggregator.driver import (
        HourFailure,
        HourResult,
        aggregate_hour,
        aggregate_isolated,
        aggregate_pending,
        run_schedule,
    )
    from engine.aggregator.hours import (
        InputFile,
        Manifest,
        closed_hours,
        hour_inputs,
        hour_label,
        manifest_path,
        needs_aggregation,
        next_run,
        output_path,
        parse_hour,
    )
    from engine.aggregator.rollup import MAX_GAP_US

__all__ = [
    "MAX_GAP_US",
    "HourFailure",
    "HourResult",
    "InputFile",
    "Manifest",
    "aggregate_hour",
    "aggregate_isolated",
    "aggregate_pending",
    "closed_hours",
    "hour_inputs",
    "hour_label",
    "manifest_path",
    "needs_aggregation",
    "next_run",
    "output_path",
    "parse_hour",
    "run_schedule",
]
_DRIVER = {"HourFailure", "HourResult", "aggregate_hour", "aggregate_isolated", "aggregate_pending", "run_schedule"}
# the module each name lives in
_HOME = {name: "rollup" if name == "MAX_GAP_US" else "driver" if name in _DRIVER else "hours" for name in __all__}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'engine.aggregator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"engine.aggregator.{home}"), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
