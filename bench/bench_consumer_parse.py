"""Consumer parse cost: every line validated with StoredRecord vs only the two timestamps decoded (before).

A queue message of 100 stored records (the receiver packs many records per message), parsed as the
consumer does: decode, epoch seconds of both stamps, hour split. Same run, best of several rounds.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import msgspec
from timing import ratio

from engine.consumer import parse_message
from engine.queues import Received
from engine.schema import UTC, decode_records, encode_stored

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from canpipe_testing import make_record  # noqa: E402

RECORDS = 100
MESSAGES = 200  # 20,000 records a round


class Stamps(msgspec.Struct):
    """The "before": only the two timestamps of a stored line decoded (everything else passed through)."""

    timestamp: dt.datetime
    ingest_received_at: dt.datetime


_stamps = msgspec.json.Decoder(Stamps)


def messages() -> list[Received]:
    now = dt.datetime.now(UTC)
    out = []
    for m in range(MESSAGES):
        records = [make_record(m * RECORDS + i, vehicle_id=f"EV-{i % 50:05d}") for i in range(RECORDS)]
        body = encode_stored(decode_records(json.dumps(records).encode(), ndjson=False), now)
        out.append(Received(str(m), str(m), body, 0, 0, 1))
    return out


def parse_validated(batch: list[Received]) -> None:
    for message in batch:
        parse_message(message, 0.0)


def parse_stamps_only(batch: list[Received]) -> None:
    """The consumer's parse before issue 8: only the two timestamps decoded, no validation."""
    import numpy as np

    for message in batch:
        stamps = _stamps.decode_lines(message.body)
        {(s.ingest_received_at.year, s.ingest_received_at.month, s.ingest_received_at.day) for s in stamps}
        np.fromiter((s.timestamp.timestamp() for s in stamps), np.float64, len(stamps))
        np.fromiter((s.ingest_received_at.timestamp() for s in stamps), np.float64, len(stamps))


def test_guard_full_validation_cost():
    """CI guard: validating every stored line costs at most 5x the stamps-only decode (figures in
    docs/benchmarks.md)."""
    batch = messages()
    full_s, stamps_s, cost = ratio(lambda: parse_validated(batch), lambda: parse_stamps_only(batch), repeats=7)
    n = RECORDS * MESSAGES
    print(
        f"\nper record: validated {full_s / n * 1e9:.0f} ns, stamps only {stamps_s / n * 1e9:.0f} ns, "
        f"ratio {cost:.2f}x; validated {n / full_s:,.0f} records/s on one core"
    )
    assert cost <= 5.0, f"full validation {cost:.2f}x the stamps-only decode (guard 5x)"
