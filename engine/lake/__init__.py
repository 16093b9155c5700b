"""The lake: closed hours of raw JSONL compacted into Parquet (``compact``), and SQL over both (``query``).

``data/parquet/year=YYYY/month=MM/day=DD/hour=HH/part-0.parquet`` (``part-1`` … past the size target): the
hour's records deduplicated on the dedup key, sorted by (vehicle_id, timestamp), one typed column per signal;
raw files that arrive after the hour was compacted go to a small ``late-<digest>.parquet`` beside it, merged
later (``compact``, ``pieces``). The Hive layout of the raw files, so DuckDB, Athena, Spark and Glue read both
as partitions. Needs the ``[lake]`` extra (pyarrow, duckdb, s3fs). ``canpipe aggregate`` reads an hour's
Parquet files instead of its raw files when together they were made from the raw files there now, or when
those were deleted (``read``), and writes the same bytes.
"""
