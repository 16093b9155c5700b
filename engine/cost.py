"""What SQS costs for a measured request count: requests per 1,000 records and a monthly bill.

Price: Amazon SQS standard queues, $0.40 per million requests after the first million each month
(US East, N. Virginia). Every 64 KiB chunk of a request's payload is billed as one request. The price is
a constant here and in docs/benchmarks.md with the date it was taken; check it against AWS's page.
"""

from __future__ import annotations

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
