"""The hourly aggregator: one hour of raw JSONL -> data/aggregated/aggregated-<hour>.json.

One concept per module: ``hours`` (which hours, their files, manifest and schedule), ``partitions`` (reading
the hour's files into vehicle partitions, spilled when large), ``rollup`` (order, dedup, statistics and
integrals), ``document`` (the output and its atomic write), ``driver`` (one hour, the pending hours, the
hourly schedule).
"""

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
