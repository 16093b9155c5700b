"""``canpipe query "SQL"``: DuckDB over the lake, for ad-hoc questions.

Two views, both with the hour's partition columns (``year``, ``month``, ``day``, ``hour``) for pruning:

- ``raw``: every raw record as written (duplicates included: at-least-once), one column per signal, null
  where a record does not carry it; lines DuckDB cannot read as a record (a torn tail, a corrupt line) are
  skipped, as the aggregator skips them;
- ``parquet``: the compacted hours (``canpipe compact``): deduplicated, sorted by vehicle and time.

Times are ``TIMESTAMPTZ`` in UTC. The connection is in memory and reads the files in place; nothing is
written.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.lake.compact import PARQUET_DIR
from engine.schema import SIGNALS

FORMATS = ("table", "csv", "json")
_RAW_COLUMNS = {
    "timestamp": "TIMESTAMPTZ",
    "vehicle_id": "VARCHAR",
    "can_id": "VARCHAR",
    "payload": "STRUCT(" + ", ".join(f"{name} DOUBLE" for name in SIGNALS) + ")",
    "ingest_received_at": "TIMESTAMPTZ",
}
_PARTS = "year=*/month=*/day=*/hour=*"


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(data_dir: Path) -> Any:
    """An in-memory DuckDB connection with the ``raw`` and ``parquet`` views over ``data_dir``."""
    try:
        import duckdb
    except ImportError:  # pragma: no cover - the [lake] extra is installed with [test]
        raise ConfigError("canpipe query needs duckdb: pip install 'canpipe[lake]'") from None
    data_dir = Path(data_dir).resolve()
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    signals = ", ".join(f"payload.{name} AS {name}" for name in SIGNALS)
    parts = "NULL::BIGINT AS year, NULL::BIGINT AS month, NULL::BIGINT AS day, NULL::BIGINT AS hour"
    raw_glob = data_dir / "raw" / _PARTS / "*.jsonl"
    if any(data_dir.glob(f"raw/{_PARTS}/*.jsonl")):
        columns = "{" + ", ".join(f"{_sql_string(k)}: {_sql_string(v)}" for k, v in _RAW_COLUMNS.items()) + "}"
        con.execute(
            f"CREATE VIEW raw AS SELECT timestamp, vehicle_id, can_id, {signals}, ingest_received_at, "
            "year, month, day, hour "
            f"FROM read_json({_sql_string(str(raw_glob))}, format = 'newline_delimited', columns = {columns}, "
            "ignore_errors = true, hive_partitioning = true) WHERE vehicle_id IS NOT NULL"
        )
    else:  # no raw data yet: the same columns, no rows (a query still runs and says 0)
        nulls = ", ".join(f"NULL::DOUBLE AS {name}" for name in SIGNALS)
        con.execute(
            f"CREATE VIEW raw AS SELECT NULL::TIMESTAMPTZ AS timestamp, NULL::VARCHAR AS vehicle_id, "
            f"NULL::VARCHAR AS can_id, {nulls}, NULL::TIMESTAMPTZ AS ingest_received_at, {parts} WHERE false"
        )
    parquet_glob = data_dir / PARQUET_DIR / _PARTS / "*.parquet"
    if any(data_dir.glob(f"{PARQUET_DIR}/{_PARTS}/*.parquet")):
        con.execute(
            f"CREATE VIEW parquet AS SELECT * FROM read_parquet({_sql_string(str(parquet_glob))}, "
            "hive_partitioning = true)"
        )
    else:
        con.execute("CREATE VIEW parquet AS SELECT * FROM raw WHERE false")
    return con


def run(data_dir: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and rows of ``sql`` over the lake; a ``ConfigError`` with DuckDB's message when the
    SQL is wrong."""
    import duckdb

    con = connect(data_dir)
    try:
        cursor = con.execute(sql)
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
    except duckdb.Error as exc:
        raise ConfigError(f"query: {exc}") from None
    finally:
        con.close()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def render(columns: list[str], rows: list[tuple[Any, ...]], fmt: str) -> str:
    """``table`` (aligned, for a terminal), ``csv`` (RFC 4180 with a header) or ``json`` (one object a row,
    one row a line)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_text(v) for v in row] for row in rows)
        return out.getvalue()
    if fmt == "json":
        plain = [[v if v is None or isinstance(v, int | float | str) else _text(v) for v in row] for row in rows]
        return "".join(json.dumps(dict(zip(columns, row))) + "\n" for row in plain)
    cells = [[_text(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines) + "\n"


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
