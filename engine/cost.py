"""What SQS costs for a measured request count: requests per 1,000 records and a monthly bill.

Price: Amazon SQS standard queues, $0.40 per million requests after the first million each month
(US East, N. Virginia). Every 64 KiB chunk of a request's payload is billed as one request. The price is
a constant here and in docs/benchmarks.md with the date it was taken; check it against AWS's page.
"""

from __future__ import annotations

import math
from typing import NamedTuple

PRICE_PER_MILLION_USD = 0.40
FREE_REQUESTS_PER_MONTH = 1_000_000
SECONDS_PER_MONTH = 30 * 86_400
PRICE_DATE = "2026-11"
RATES_PER_S = (50, 500, 5_000)


def requests_per_1000(billed_requests: int, records: int) -> float:
    return 1000.0 * billed_requests / records if records else float("nan")


def monthly_bill_usd(records_per_s: float, per_1000: float) -> float:
    requests = records_per_s * SECONDS_PER_MONTH / 1000.0 * per_1000
    return max(0.0, requests - FREE_REQUESTS_PER_MONTH) / 1e6 * PRICE_PER_MILLION_USD


def describe(billed_requests: int, records: int, calls: dict[str, float]) -> str:
    per_1000 = requests_per_1000(billed_requests, records)
    bills = ", ".join(f"{rate:,} rec/s ${monthly_bill_usd(rate, per_1000):,.2f}" for rate in RATES_PER_S)
    by_action = ", ".join(f"{action} {int(n)}" for action, n in sorted(calls.items()))
    return (
        f"SQS: {billed_requests} billed requests for {records} records = {per_1000:.2f} per 1,000 "
        f"({by_action}); monthly at {bills} (${PRICE_PER_MILLION_USD}/million, price of {PRICE_DATE})"
    )


# --- the fleet: SQS, S3 and Kinesis per 1,000 records and a month (docs/scale-out.md, docs/adr/0003) ---
#
# Prices: US East (N. Virginia), list prices as published on the AWS pages named, taken 2026-11 from those
# pages' figures (unchanged since 2023); not fetched by canpipe: check them before budgeting.
# https://aws.amazon.com/s3/pricing/ (S3 Standard)
S3_TIER1_PER_1000_USD = 0.005  # PUT, COPY, POST, LIST (and each part of a multipart upload)
S3_TIER2_PER_1000_USD = 0.0004  # GET, SELECT, HEAD and all other requests
S3_GB_MONTH_USD = 0.023  # storage, the first 50 TB a month
# https://aws.amazon.com/kinesis/data-streams/pricing/ (provisioned capacity mode)
KINESIS_SHARD_HOUR_USD = 0.015
KINESIS_PUT_UNITS_PER_MILLION_USD = 0.014
KINESIS_PUT_UNIT_BYTES = 25 * 1024  # a record is billed per started 25 KB of payload
# https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html: per shard
KINESIS_SHARD_IN_BYTES_S = 1024 * 1024
KINESIS_SHARD_IN_RECORDS_S = 1000
KINESIS_SHARD_OUT_BYTES_S = 2 * 1024 * 1024
HOURS_PER_MONTH = SECONDS_PER_MONTH / 3600

FLEET_RATES_PER_S = (50, 500, 5_000, 50_000)
GB = 1e9  # decimal GB, as S3 storage is quoted here (AWS meters binary GB: 7 % fewer, a lower bill)

# What this pipeline does per second and per record (the sources are docs/benchmarks.md and the code):
LINE_BYTES = 290  # a stored line, 7 signals (benchmarks.md "Batched ingest")
ZLIB_RATIO = 5.0  # SQS bodies over 2 KiB are zlib-compressed, telemetry JSON shrinks ~5x (benchmarks.md "SQS")
ZSTD_RATIO = 10.8  # raw objects as .jsonl.zst, level 3 (benchmarks.md "The lake")
PARQUET_BYTES_PER_RECORD = 9.1  # bench_lake: 3,649,358 bytes for 400,000 records, 1,000 vehicles (benchmarks.md)
SQS_BILLING_CHUNK = 64 * 1024  # every 64 KiB of a call's payload is one more billed request
SQS_MESSAGE_BYTES = 256 * 1024
SQS_SENDS_PER_WORKER_S = 20.0  # the publisher lingers 50 ms (CANPIPE_SEND_LINGER_MS): at most 20 calls/s
SQS_RECEIVES_PER_CONSUMER_S = 5.0  # receives paced to one per 200 ms (CANPIPE_RECEIVE_INTERVAL_MS) unless full
S3_OBJECT_BYTES = 8 * 1024 * 1024  # issue 13's raw object target: 8 MiB, or
S3_OBJECT_SECONDS = 60.0  # at most one object per writer per minute at low rates
CONSUMER_BATCH_RECORDS = 100  # a consumer writes a batch at 100 records (or 2 s): were each batch one object
PARQUET_ROW_GROUP_RECORDS = 1 << 20  # engine.lake.compact.ROW_GROUP_ROWS
# measured records/s (benchmarks.md): one receiver worker with 100-record requests (receiver alone, the
# lowest of 41,813 / 40,793 / 44,162) and with single-record requests (4,619-4,980); one consumer process
# draining the embedded queue (the lowest of 72,229 / 79,460 / 73,814)
RECEIVER_WORKER_BATCHED_S = 40_000
RECEIVER_WORKER_SINGLE_S = 4_600
CONSUMER_PROCESS_S = 72_000


class FleetMonth(NamedTuple):
    """One rate's requests per second by kind and its monthly bill in USD."""

    records_per_s: float
    receiver_workers: int
    consumers: int
    sqs_requests_s: float  # billed
    s3_puts_s: float  # tier 1: raw objects, LISTs, Parquet files
    s3_gets_s: float  # tier 2: compaction and aggregation reads
    sqs_usd: float
    s3_requests_usd: float
    s3_storage_gb: float  # one month of data, raw and Parquet
    s3_storage_usd: float
    s3_storage_zst_gb: float  # the same with the raw objects as .jsonl.zst
    s3_storage_zst_usd: float
    kinesis_shards: int
    kinesis_usd: float

    def per_1000(self, per_s: float) -> float:
        return 1000.0 * per_s / self.records_per_s


def sqs_requests_per_s(records_per_s: float, receiver_workers: int, consumers: int, per_request: int = 100) -> float:
    """Billed SQS calls a second: sends (one per linger window and worker, or per HTTP request if fewer),
    receives (paced per consumer, more when full: 10 messages a call) and deletes (one per receive that
    brought messages), each also billed per started 64 KiB of payload."""
    if records_per_s <= 0:
        return 0.0
    sends = min(records_per_s / per_request, SQS_SENDS_PER_WORKER_S * receiver_workers)
    send_bytes = records_per_s * LINE_BYTES / ZLIB_RATIO / sends  # compressed body bytes a call
    billed_sends = sends * math.ceil(send_bytes / SQS_BILLING_CHUNK)
    messages = sends * math.ceil(send_bytes / SQS_MESSAGE_BYTES)
    # a long poll returns with the first message: a receive per message while they trickle in, at most one
    # per consumer per pacing interval, and at least one per 10 messages
    receives = max(messages / 10, min(SQS_RECEIVES_PER_CONSUMER_S * consumers, messages))
    billed_receives = receives + max(0.0, records_per_s * LINE_BYTES / ZLIB_RATIO / SQS_BILLING_CHUNK - receives)
    deletes = min(receives, messages)
    return billed_sends + billed_receives + deletes


def s3_requests_per_s(records_per_s: float, writers: int) -> tuple[float, float]:
    """(tier-1, tier-2) S3 calls a second: raw objects (one PUT each, of ``S3_OBJECT_BYTES`` or
    ``S3_OBJECT_SECONDS`` old, whichever first, per writer), and per closed hour the compaction (a LIST per
    1,000 raw objects, a GET each, one PUT of the Parquet file) and the aggregate (GETs: the footer and
    one per row group)."""
    if records_per_s <= 0:
        return 0.0, 0.0
    per_writer = records_per_s * LINE_BYTES / writers
    objects_s = writers * max(1.0 / S3_OBJECT_SECONDS, per_writer / S3_OBJECT_BYTES)
    objects_hour = objects_s * 3600
    row_groups = math.ceil(records_per_s * 3600 / PARQUET_ROW_GROUP_RECORDS)
    puts = objects_s + (math.ceil(objects_hour / 1000) + 1) / 3600
    gets = (objects_hour + 1 + row_groups) / 3600
    return puts, gets


def kinesis_puts_per_s(records_per_s: float, receiver_workers: int, per_request: int = 100) -> tuple[float, float]:
    """(Kinesis records, PUT payload units) a second when the publisher packs the lines into compressed
    Kinesis records as it packs SQS messages: one PutRecords entry per linger window and worker (or per HTTP
    request if fewer), billed per started 25 KB."""
    if records_per_s <= 0:
        return 0.0, 0.0
    puts = min(records_per_s / per_request, SQS_SENDS_PER_WORKER_S * receiver_workers)
    put_bytes = records_per_s * LINE_BYTES / ZLIB_RATIO / puts
    units = puts * math.ceil(put_bytes / KINESIS_PUT_UNIT_BYTES)
    return units, units  # an entry over 25 KB is split into 25 KB records: one record per unit


def kinesis_shards(records_per_s: float, receiver_workers: int = 1) -> int:
    """Provisioned shards: 1 MB/s and 1,000 records/s in per shard, whichever binds first (2 MB/s out per
    shard is twice the in-rate: one consumer group reading every record fits)."""
    records, _ = kinesis_puts_per_s(records_per_s, receiver_workers)
    bytes_s = records_per_s * LINE_BYTES / ZLIB_RATIO
    return max(1, math.ceil(bytes_s / KINESIS_SHARD_IN_BYTES_S), math.ceil(records / KINESIS_SHARD_IN_RECORDS_S))


def kinesis_monthly_usd(records_per_s: float, receiver_workers: int = 1) -> float:
    """Shard-hours plus PUT payload units; reading (GetRecords) is not billed in provisioned mode."""
    _, units = kinesis_puts_per_s(records_per_s, receiver_workers)
    shards = kinesis_shards(records_per_s, receiver_workers)
    return (
        shards * KINESIS_SHARD_HOUR_USD * HOURS_PER_MONTH
        + units * SECONDS_PER_MONTH / 1e6 * KINESIS_PUT_UNITS_PER_MILLION_USD
    )


def fleet_month(records_per_s: float) -> FleetMonth:
    """The fleet for ``records_per_s`` with 100-record requests: receiver workers and consumer processes at
    the rates measured here, and what SQS, S3 and (instead of SQS) Kinesis cost a month."""
    workers = max(1, math.ceil(records_per_s / RECEIVER_WORKER_BATCHED_S))
    consumers = max(1, math.ceil(records_per_s / CONSUMER_PROCESS_S))
    sqs = sqs_requests_per_s(records_per_s, workers, consumers)
    puts, gets = s3_requests_per_s(records_per_s, consumers)
    month_records = records_per_s * SECONDS_PER_MONTH
    storage_gb = month_records * (LINE_BYTES + PARQUET_BYTES_PER_RECORD) / GB
    zst_gb = month_records * (LINE_BYTES / ZSTD_RATIO + PARQUET_BYTES_PER_RECORD) / GB
    return FleetMonth(
        records_per_s,
        workers,
        consumers,
        sqs,
        puts,
        gets,
        max(0.0, sqs * SECONDS_PER_MONTH - FREE_REQUESTS_PER_MONTH) / 1e6 * PRICE_PER_MILLION_USD,
        (puts * S3_TIER1_PER_1000_USD + gets * S3_TIER2_PER_1000_USD) * SECONDS_PER_MONTH / 1000,
        storage_gb,
        storage_gb * S3_GB_MONTH_USD,
        zst_gb,
        zst_gb * S3_GB_MONTH_USD,
        kinesis_shards(records_per_s, workers),
        kinesis_monthly_usd(records_per_s, workers),
    )


def per_batch_objects_usd(records_per_s: float) -> float:
    """S3 PUTs a month if every consumer batch (``CONSUMER_BATCH_RECORDS``) were its own object: why raw
    objects are held to 8 MiB or a minute."""
    return records_per_s / CONSUMER_BATCH_RECORDS * SECONDS_PER_MONTH / 1000 * S3_TIER1_PER_1000_USD


def fleet_table(rates: tuple[float, ...] = FLEET_RATES_PER_S) -> str:
    """The Markdown table of docs/scale-out.md (a test holds the document equal to it)."""
    rows = [
        "| records/s | receiver workers / consumers | SQS req. per 1,000 | S3 PUT+LIST / GET per 1,000 "
        "| SQS $/month | S3 requests $/month | S3 storage, a month of data (raw .jsonl / .jsonl.zst, + Parquet) "
        "| Kinesis instead of SQS | S3 PUTs $/month at one object per 100-record batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        f = fleet_month(rate)
        rows.append(
            f"| {rate:,} | {f.receiver_workers} / {f.consumers} | {f.per_1000(f.sqs_requests_s):.2f} "
            f"| {f.per_1000(f.s3_puts_s):.4f} / {f.per_1000(f.s3_gets_s):.4f} | ${f.sqs_usd:,.2f} "
            f"| ${f.s3_requests_usd:,.2f} | {f.s3_storage_gb:,.0f} GB ${f.s3_storage_usd:,.2f} "
            f"/ {f.s3_storage_zst_gb:,.0f} GB ${f.s3_storage_zst_usd:,.2f} "
            f"| {f.kinesis_shards} shard{'s' if f.kinesis_shards != 1 else ''}: ${f.kinesis_usd:,.2f} "
            f"| ${per_batch_objects_usd(rate):,.2f} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover - python -m engine.cost prints the table (tested as fleet_table)
    print(fleet_table(), end="")


KINESIS_RATES_PER_S = (50, 500, 5_000, 50_000, 500_000)


def kinesis_table(rates: tuple[float, ...] = KINESIS_RATES_PER_S) -> str:
    """The Markdown table of docs/adr/0003-kinesis.md: SQS against provisioned Kinesis a month, same fleet."""
    rows = [
        "| records/s | receiver workers | SQS billed requests/s | SQS $/month | Kinesis shards (1 MB/s, 1,000 "
        "records/s in each) | PUT payload units/s | Kinesis $/month |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        f = fleet_month(rate)
        _, units = kinesis_puts_per_s(rate, f.receiver_workers)
        rows.append(
            f"| {rate:,} | {f.receiver_workers} | {f.sqs_requests_s:,.1f} | ${f.sqs_usd:,.2f} "
            f"| {f.kinesis_shards} | {units:,.1f} | ${f.kinesis_usd:,.2f} |"
        )
    return "\n".join(rows) + "\n"
