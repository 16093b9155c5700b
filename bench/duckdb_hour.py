"""The same hour's per-vehicle statistics computed by DuckDB SQL from the same raw files (reference).

As a process, the way the one-shot benchmark times it against ``canpipe aggregate``:

    python bench/duckdb_hour.py DATA_DIR battery_soc,battery_voltage,...

(the signal names come from the caller, so that DuckDB's process imports duckdb alone, not canpipe).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import duckdb


def _schema_signals() -> tuple[str, ...]:
    from engine.schema import SIGNALS

    return SIGNALS


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "SIGNALS":  # the schema's list, imported when asked for (the process mode does without)
        return _schema_signals()
    raise AttributeError(f"module 'duckdb_hour' has no attribute {name!r}")


def columns(signals: Sequence[str]) -> str:
    return (
        "{timestamp: 'TIMESTAMPTZ', vehicle_id: 'VARCHAR', can_id: 'VARCHAR', payload: 'STRUCT("
        + ", ".join(f"{s} DOUBLE" for s in signals)
        + ")', ingest_received_at: 'TIMESTAMPTZ'}"
    )


def query(glob: str, signals: Sequence[str] | None = None) -> str:
    signals = signals or _schema_signals()
    stats = ", ".join(f"min({s}) AS {s}_min, max({s}) AS {s}_max, avg({s}) AS {s}_avg" for s in signals)
    unpack = ", ".join(f"payload.{s} AS {s}" for s in signals)
    return f"""
    WITH raw AS (
        SELECT timestamp, vehicle_id, can_id, {unpack}
        FROM read_json('{glob}', format = 'newline_delimited', columns = {columns(signals)}, ignore_errors = true)
    ),
    dedup AS (SELECT DISTINCT ON (vehicle_id, can_id, timestamp) * FROM raw),
    counts AS (SELECT vehicle_id, count(*) AS total FROM raw GROUP BY vehicle_id)
    SELECT d.vehicle_id, count(*) AS message_count, any_value(c.total) - count(*) AS duplicates_dropped,
           min(timestamp) AS first_timestamp, max(timestamp) AS last_timestamp,
           max(cell_voltage_max - cell_voltage_min) AS cell_voltage_spread_max,
           max(cell_temp_max - cell_temp_min) AS cell_temp_spread_max, {stats}
    FROM dedup d JOIN counts c USING (vehicle_id)
    GROUP BY d.vehicle_id ORDER BY d.vehicle_id
    """


def run(glob: str, threads: int | None = None, signals: Sequence[str] | None = None) -> list[dict]:
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    if threads:
        con.execute(f"SET threads = {threads}")
    cursor = con.execute(query(glob, signals))
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    con.close()
    return rows


if __name__ == "__main__":
    rows = run(sys.argv[1] + "/raw/*/*/*/*/*.jsonl", signals=sys.argv[2].split(","))
    print(f"{len(rows)} vehicles")
