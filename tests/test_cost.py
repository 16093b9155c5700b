"""The SQS cost arithmetic (engine/cost.py) against figures computed by hand.

Month = 30 days = 2,592,000 s; $0.40 per million requests after the first 1,000,000 each month.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine import cost


def test_requests_per_1000_records():
    assert cost.requests_per_1000(30, 10_000) == 3.0
    assert cost.requests_per_1000(1, 400) == 2.5
    assert math.isnan(cost.requests_per_1000(5, 0))  # nothing measured: no figure, not a division error


@pytest.mark.parametrize(
    ("records_per_s", "per_1000", "usd"),
    [
        # 50 * 2,592,000 / 1000 * 3 = 388,800 requests: inside the free million
        (50, 3.0, 0.0),
        # 500 * 2,592,000 / 1000 * 3 = 3,888,000; 2,888,000 billed * $0.40 / 1e6 = $1.1552
        (500, 3.0, 1.1552),
        # 5,000 * 2,592,000 / 1000 * 3 = 38,880,000; 37,880,000 billed = $15.152
        (5_000, 3.0, 15.152),
        # 1000 * 2,592,000 / 1000 * 0.5 = 1,296,000; 296,000 billed = $0.1184
        (1_000, 0.5, 0.1184),
    ],
)
def test_monthly_bill(records_per_s, per_1000, usd):
    assert cost.monthly_bill_usd(records_per_s, per_1000) == pytest.approx(usd, abs=1e-9)


def test_the_free_tier_ends_exactly_at_one_million_requests():
    per_1000_at_free_limit = 1_000_000 / (cost.SECONDS_PER_MONTH / 1000.0)  # 1 record/s for a month
    assert cost.monthly_bill_usd(1, per_1000_at_free_limit) == 0.0
    assert cost.monthly_bill_usd(2, per_1000_at_free_limit) == pytest.approx(0.40)  # the second million


def test_describe_gives_the_ratio_calls_and_bills_in_one_line():
    line = cost.describe(30, 10_000, {"SendMessageBatch": 10, "ReceiveMessage": 12.0, "DeleteMessageBatch": 8})
    assert line == (
        "SQS: 30 billed requests for 10000 records = 3.00 per 1,000 "
        "(DeleteMessageBatch 8, ReceiveMessage 12, SendMessageBatch 10); "
        "monthly at 50 rec/s $0.00, 500 rec/s $1.16, 5,000 rec/s $15.15 ($0.4/million, price of 2026-11)"
    )


# --- the fleet model of docs/scale-out.md ---


def test_s3_requests_per_second_by_hand():
    # 50 records/s, one writer: 14,500 B/s never fills 8 MiB in a minute, so one PUT a minute; per hour
    # 60 objects: one LIST (+1 for the hour's folder) and one PUT of the Parquet file, 60 GETs to compact,
    # the footer and one row group (180,000 rows) for the aggregate
    puts, gets = cost.s3_requests_per_s(50, writers=1)
    assert puts == pytest.approx(1 / 60 + 2 / 3600) and gets == pytest.approx((60 + 1 + 1) / 3600)
    # 50,000 records/s on 2 writers: 7.25 MB/s each, an 8 MiB object every 1.157 s per writer
    puts, _ = cost.s3_requests_per_s(50_000, writers=2)
    objects = 50_000 * 290 / (8 * 1024 * 1024)
    assert puts == pytest.approx(objects + (math.ceil(objects * 3600 / 1000) + 1) / 3600)
    assert cost.s3_requests_per_s(0, 1) == (0.0, 0.0)


def test_sqs_model_against_the_measured_runs():
    """The model of billed SQS calls against the runs in docs/benchmarks.md "SQS" (receiver 1 worker,
    2 consumers): 50-record requests at 4,991/s measured 7.2 per 1,000, single records at 499/s 65.5. The
    model leaves out what lowers the real count (a linger window that ends with fewer sends, receives that
    come back empty are not deleted), so it may be higher, not lower, within a third."""
    batched = 1000 * cost.sqs_requests_per_s(4_991, 1, 2, per_request=50) / 4_991
    single = 1000 * cost.sqs_requests_per_s(499, 1, 2, per_request=1) / 499
    assert 7.2 <= batched <= 7.2 * 1.33 and 65.5 <= single <= 65.5 * 1.33
    assert cost.sqs_requests_per_s(0, 1, 1) == 0.0


def test_sqs_calls_of_more_than_64_kib_are_billed_per_chunk():
    # 50,000/s on one worker: 20 sends/s of 2,500 records, 145,000 compressed bytes each: 3 chunks a send
    calls = cost.sqs_requests_per_s(50_000, 1, 1)
    sends = 20 * 3
    assert calls >= sends + 50_000 * 290 / 5 / 65536  # receives carry the same bytes out


def test_kinesis_shards_follow_the_per_shard_limits():
    assert cost.kinesis_shards(50) == 1 and cost.kinesis_puts_per_s(0, 1) == (0.0, 0.0)
    # 58 compressed bytes a record: 1 MiB/s is 18,078 records/s a shard
    assert cost.kinesis_shards(18_000) == 1 and cost.kinesis_shards(18_200) == 2
    assert cost.kinesis_shards(50_000, receiver_workers=2) == 3
    # one shard for a month: 720 shard-hours at $0.015, plus 0.5 PUT units a second at $0.014 a million
    assert cost.kinesis_monthly_usd(50) == pytest.approx(720 * 0.015 + 0.5 * 2_592_000 / 1e6 * 0.014)


def test_fleet_month_adds_up():
    f = cost.fleet_month(5_000)
    assert (f.receiver_workers, f.consumers) == (1, 1)
    assert f.sqs_usd == pytest.approx((f.sqs_requests_s * 2_592_000 - 1_000_000) / 1e6 * 0.40)
    assert f.s3_requests_usd == pytest.approx((f.s3_puts_s * 0.005 + f.s3_gets_s * 0.0004) * 2_592)
    assert f.s3_storage_gb == pytest.approx(5_000 * 2_592_000 * (290 + 9.1) / 1e9)
    assert f.s3_storage_zst_gb < f.s3_storage_gb / 8
    assert cost.fleet_month(50_000).receiver_workers == 2  # 40,000 records/s a worker, measured


def test_the_scale_out_document_holds_the_computed_table():
    """docs/scale-out.md's figures are this module's, not typed by hand: regenerate with
    ``python -m engine.cost`` when a constant changes."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text()
    assert cost.fleet_table() in doc


def test_one_object_per_batch_would_cost_puts_per_100_records():
    # 5,000 records/s in batches of 100: 50 PUTs/s, 129.6M a month at $0.005 per 1,000
    assert cost.per_batch_objects_usd(5_000) == pytest.approx(648.0)
    assert cost.per_batch_objects_usd(5_000) > 100 * cost.fleet_month(5_000).s3_requests_usd


def test_the_kinesis_adr_holds_the_computed_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "adr" / "0003-kinesis.md").read_text()
    assert cost.kinesis_table() in doc
    # the decision's "cheaper from a few thousand records/s on" and "~3.6x at 50,000, ~3x at 500,000"
    assert cost.fleet_month(500).kinesis_usd > cost.fleet_month(500).sqs_usd * 0.5
    assert cost.fleet_month(5_000).kinesis_usd < cost.fleet_month(5_000).sqs_usd
    assert round(cost.fleet_month(50_000).sqs_usd / cost.fleet_month(50_000).kinesis_usd, 1) == 3.6
    assert round(cost.fleet_month(500_000).sqs_usd / cost.fleet_month(500_000).kinesis_usd) == 3
