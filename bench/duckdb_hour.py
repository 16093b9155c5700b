"""The same hour's per-vehicle statistics computed by DuckDB SQL from the same raw files (reference)."""

from __future__ import annotations

import duckdb

from engine.schema import SIGNALS

COLUMNS = (
    "{timestamp: 'TIMESTAMPTZ', vehicle_id: 'VARCHAR', can_id: 'VARCHAR', payload: 'STRUCT("
    + ", ".join(f"{s} DOUBLE" for s in SIGNALS)
    + ")', ingest_received_at: 'TIMESTAMPTZ'}"
)


def query(glob: str) -> str:
    stats = ", ".join(f"min({s}) AS {s}_min, max({s}) AS {s}_max, avg({s}) AS {s}_avg" for s in SIGNALS)
    unpack = ", ".join(f"payload.{s} AS {s}" for s in SIGNALS)
    return f"""
    WITH raw AS (
        SELECT timestamp, vehicle_id, can_id, {unpack}
        FROM read_json('{glob}', format = 'newline_delimited', columns = {COLUMNS}, ignore_errors = true)
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


def run(glob: str, threads: int | None = None) -> list[dict]:
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    if threads:
        con.execute(f"SET threads = {threads}")
    cursor = con.execute(query(glob))
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    con.close()
    return rows
