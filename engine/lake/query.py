"""``canpipe query "SQL"``: DuckDB over the lake, for ad-hoc questions.

Two views, both with the hour's partition columns (``year``, ``month``, ``day``, ``hour``) for pruning:

- ``raw``: every raw record as written (duplicates included: at-least-once), one column per signal, null
  where a record does not carry it; lines DuckDB cannot read as a record (a torn tail, a corrupt line) are
  skipped, as the aggregator skips them;
- ``parquet``: the compacted hours (``canpipe compact``): deduplicated, sorted by vehicle and time.

Times are ``TIMESTAMPTZ`` in UTC. The connection is in memory and reads the files in place; nothing is
written. Raw files are ``.jsonl`` or ``.jsonl.zst`` (DuckDB inflates zstd by the name); the ``parquet`` view
holds an hour's main file and its late files (``engine.lake.pieces``), each record once: a late file whose raw
files the main file was also made from (left by a merge that stopped between writing the main file and
deleting the late files, until the next ``canpipe compact`` deletes it) is left out of the view.

Over S3 (``CANPIPE_STORAGE_URL=s3://bucket/prefix``) the same views read the objects in place: through
DuckDB's own ``httpfs`` extension when it loads (a secret from the standard credential chain, the endpoint
and region of ``engine.storage.url``), else through s3fs (fsspec on aiobotocore, the SDK the rest of canpipe
uses) registered as DuckDB's ``s3://`` file system. Which one is said on stderr.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.lake.compact import PARQUET_DIR
from engine.lake.daily import DAILY_DIR
from engine.lake.pieces import LATE_PREFIX, MAIN_NAME, footer, input_names
from engine.schema import SIGNALS
from engine.storage.url import StorageURL, s3_endpoint, s3_region

FORMATS = ("table", "csv", "json")
_RAW_COLUMNS = {
    "timestamp": "TIMESTAMPTZ",
    "vehicle_id": "VARCHAR",
    "can_id": "VARCHAR",
    "payload": "STRUCT(" + ", ".join(f"{name} DOUBLE" for name in SIGNALS) + ")",
    "ingest_received_at": "TIMESTAMPTZ",
}
_PARTS = "year=*/month=*/day=*/hour=*"
# the partition columns are integers whatever their values: DuckDB's own inference keeps a value with a leading
# zero ("07") as text, so hour, day and month would be VARCHAR in 00-09 and BIGINT otherwise
_HOUR_TYPES = "hive_types = {'year': BIGINT, 'month': BIGINT, 'day': BIGINT, 'hour': BIGINT}"
_DAY_TYPES = "hive_types = {'year': BIGINT, 'month': BIGINT, 'day': BIGINT}"


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Local:
    """The lake on the local disk: globs answered by pathlib."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, pattern: str) -> str:
        return str(self.root / pattern)

    def any(self, pattern: str) -> bool:
        return any(self.root.glob(pattern))

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p) for p in self.root.glob(pattern))

    def footer(self, path: str) -> dict[bytes, bytes]:
        return footer(Path(path))


class _S3:
    """The lake in a bucket: ``s3://bucket/prefix/…`` globs, answered by the file system DuckDB reads with."""

    def __init__(self, url: StorageURL, con: Any) -> None:
        self.root = f"s3://{url.bucket}/{url.prefix}".rstrip("/")
        self.fs = _attach_s3(con)

    def path(self, pattern: str) -> str:
        return f"{self.root}/{pattern}"

    def any(self, pattern: str) -> bool:
        if self.fs is None:  # httpfs: DuckDB's own glob
            return False
        return bool(self.fs.glob(self.path(pattern)[len("s3://") :]))

    def glob(self, pattern: str) -> list[str]:
        if self.fs is None:  # pragma: no cover - httpfs: no listing here, DuckDB globs itself
            return []
        return sorted(f"s3://{key}" for key in self.fs.glob(self.path(pattern)[len("s3://") :]))

    def footer(self, path: str) -> dict[bytes, bytes]:
        with self.fs.open(path[len("s3://") :], "rb") as file:
            return footer(file)


def _merged_late_files(lake: _Local | _S3, files: list[str]) -> set[str]:
    """The late files among ``files`` whose raw files their hour's main file was also made from: their rows are
    in the main file (a merge wrote it, then stopped before deleting them). Only the footers of hours with late
    files are read."""

    @functools.cache  # an hour's main file once, however many late files it has
    def inputs(path: str) -> set[str]:
        try:
            return input_names(lake.footer(path))
        except (OSError, ValueError):  # unreadable: left in the view, where DuckDB says what is wrong with it
            return set()

    merged: set[str] = set()
    present = set(files)
    for late in files:
        folder, _, name = late.rpartition("/")
        main = f"{folder}/{MAIN_NAME}"
        if name.startswith(LATE_PREFIX) and main in present and inputs(late) & inputs(main):
            merged.add(late)
    return merged


def _attach_s3(con: Any) -> Any:
    """Let ``con`` read ``s3://``: DuckDB's httpfs when it loads (None returned), else an s3fs file system
    (returned, for the globs). Either way with the standard credential chain and canpipe's endpoint and region."""
    import duckdb

    endpoint, region = s3_endpoint(), s3_region()
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error as exc:
        why = str(exc).splitlines()[0]
    else:  # pragma: no cover - httpfs cannot be installed on the machine the tests run on (no extension download)
        _httpfs_secret(con, endpoint, region)
        print("query: reading S3 through DuckDB's httpfs", file=sys.stderr)
        return None
    try:
        import s3fs
    except ImportError:  # pragma: no cover - the [lake] extra installs s3fs
        raise ConfigError(
            f"canpipe query over S3 needs DuckDB's httpfs ({why}) or s3fs: pip install 'canpipe[lake]'"
        ) from None
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        client_kwargs={"region_name": region},
        config_kwargs={"s3": {"addressing_style": "path"}} if endpoint else {},
        skip_instance_cache=True,
    )
    con.register_filesystem(fs)
    print(f"query: reading S3 through s3fs (DuckDB's httpfs is not available: {why})", file=sys.stderr)
    return fs


def _httpfs_secret(con: Any, endpoint: str | None, region: str) -> None:  # pragma: no cover - see above
    """An httpfs secret: the standard credential chain, canpipe's region, and its endpoint when one is set."""
    options = [f"REGION {_sql_string(region)}", "PROVIDER credential_chain"]
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options += [f"ENDPOINT {_sql_string(host.rstrip('/'))}", "URL_STYLE 'path'"]
        options.append(f"USE_SSL {'true' if scheme == 'https' else 'false'}")
    con.execute(f"CREATE SECRET canpipe_s3 (TYPE s3, {', '.join(options)})")


def connect(data_dir: Path, storage: StorageURL | None = None) -> Any:
    """An in-memory DuckDB connection with the ``raw`` and ``parquet`` views over the lake: ``data_dir``, or
    ``storage`` when it is an S3 URL."""
    try:
        import duckdb
    except ImportError:  # pragma: no cover - the [lake] extra is installed with [test]
        raise ConfigError("canpipe query needs duckdb: pip install 'canpipe[lake]'") from None
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    lake: _Local | _S3 = _S3(storage, con) if storage is not None and storage.is_s3 else _Local(Path(data_dir))
    signals = ", ".join(f"payload.{name} AS {name}" for name in SIGNALS)
    parts = "NULL::BIGINT AS year, NULL::BIGINT AS month, NULL::BIGINT AS day, NULL::BIGINT AS hour"
    raw_globs = [
        lake.path(f"raw/{_PARTS}/{ext}") for ext in ("*.jsonl", "*.jsonl.zst") if lake.any(f"raw/{_PARTS}/{ext}")
    ]
    if raw_globs or isinstance(lake, _S3) and lake.fs is None:
        if not raw_globs:  # httpfs globs itself: both kinds, a missing one is no error for a list of one
            raw_globs = [lake.path(f"raw/{_PARTS}/*.jsonl*")]
        columns = "{" + ", ".join(f"{_sql_string(k)}: {_sql_string(v)}" for k, v in _RAW_COLUMNS.items()) + "}"
        files = "[" + ", ".join(_sql_string(g) for g in raw_globs) + "]"
        con.execute(
            f"CREATE VIEW raw AS SELECT timestamp, vehicle_id, can_id, {signals}, ingest_received_at, "
            "year, month, day, hour "
            f"FROM read_json({files}, format = 'newline_delimited', columns = {columns}, compression = 'auto', "
            f"ignore_errors = true, hive_partitioning = true, {_HOUR_TYPES}) WHERE vehicle_id IS NOT NULL"
        )
    else:  # no raw data yet: the same columns, no rows (a query still runs and says 0)
        nulls = ", ".join(f"NULL::DOUBLE AS {name}" for name in SIGNALS)
        con.execute(
            f"CREATE VIEW raw AS SELECT NULL::TIMESTAMPTZ AS timestamp, NULL::VARCHAR AS vehicle_id, "
            f"NULL::VARCHAR AS can_id, {nulls}, NULL::TIMESTAMPTZ AS ingest_received_at, {parts} WHERE false"
        )
    parquet_glob = f"{PARQUET_DIR}/{_PARTS}/*.parquet"
    if lake.any(parquet_glob) or isinstance(lake, _S3) and lake.fs is None:
        hour_files = lake.glob(parquet_glob)
        merged = _merged_late_files(lake, hour_files)
        source = _sql_string(lake.path(parquet_glob))
        if merged:  # the hours' files named one by one, without the late files a merged main file holds
            source = "[" + ", ".join(_sql_string(f) for f in hour_files if f not in merged) + "]"
        con.execute(
            f"CREATE VIEW parquet AS SELECT * FROM read_parquet({source}, hive_partitioning = true, {_HOUR_TYPES})"
        )
    else:
        con.execute("CREATE VIEW parquet AS SELECT * FROM raw WHERE false")
    daily_glob = f"{DAILY_DIR}/year=*/month=*/day=*/*.parquet"
    if lake.any(daily_glob):  # closed days merged into few files (engine.lake.daily): the same rows, for scans
        con.execute(
            f"CREATE VIEW daily AS SELECT * FROM read_parquet({_sql_string(lake.path(daily_glob))}, "
            f"hive_partitioning = true, {_DAY_TYPES})"
        )
    else:
        con.execute("CREATE VIEW daily AS SELECT * FROM parquet WHERE false")
    return con


def run(data_dir: Path, sql: str, storage: StorageURL | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and rows of ``sql`` over the lake (``data_dir``, or ``storage`` when it is S3); a
    ``ConfigError`` with DuckDB's message when the SQL is wrong."""
    import duckdb

    con = connect(data_dir, storage)
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
