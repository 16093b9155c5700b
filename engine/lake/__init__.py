"""The lake: closed hours of raw JSONL compacted into Parquet (``compact``), and SQL over both (``query``).

``data/parquet/year=YYYY/month=MM/day=DD/hour=HH/part-0.parquet``: the hour's records deduplicated on the
dedup key, sorted by (vehicle_id, timestamp), one typed column per signal; the Hive layout of the raw files,
so DuckDB, Athena, Spark and Glue read both as partitions. Needs the ``[lake]`` extra (pyarrow, duckdb).
``canpipe aggregate`` reads an hour's Parquet file instead of its raw files when it was made from the raw
files there now, or when they were deleted (``read``), and writes the same bytes.
"""
