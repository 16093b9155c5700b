"""The SQS cost arithmetic (engine/cost.py) against figures computed by hand.

Month = 30 days = 2,592,000 s; $0.40 per million requests after the first 1,000,000 each month.
"""

from __future__ import annotations

import math

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
