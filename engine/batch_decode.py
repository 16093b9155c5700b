"""A request's records decoded in C and checked per batch: the receiver's fast path to the stored lines.

``engine.schema.decode_records`` is the exact door: every record's patterns and payload rules are checked
as msgspec decodes it, which costs a Python regex call per string and a Python ``__post_init__`` per
record (with the duplicate-key count, ~5 us a record). Here msgspec decodes structs that carry only the
checks msgspec does in C (types, ranges, the timestamp's offset, unknown fields), and the rest runs once
per request: one regex over the joined vehicle ids and one over the CAN ids, the payload rules (and the
client timestamps, read for the clock check and the ingest latency) in one C loop over the records
(``engine.kernels.jsonl.check_records``), the duplicate-key quote count. ``decode_batch`` returns None
whenever it is not sure (anything it does not check, or any check that fails); the caller then takes the
exact path, which accepts or names the first bad field as before. So the fast path accepts exactly a
subset of what the exact door accepts, and every refusal and its message comes from the exact door.

``stored_lines`` writes the same bytes as ``engine.schema.encode_stored``: the record struct carries
``ingest_received_at`` as its last field, so one ``encode_lines`` writes the stored line.
"""

from __future__ import annotations

import datetime as dt
import operator
import re
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import numpy as np

from engine import schema
from engine.kernels.jsonl import MICROSECOND, check_records, micros
from engine.schema import UTC, Timestamp

# ``schema.Payload`` without its ``__post_init__`` (min <= max, at least one signal: checked per batch); made
# from Payload's own fields, so the two can never disagree on a signal, its range or its default
if TYPE_CHECKING:  # the same fields, for the type checker
    BatchPayload = schema.Payload
else:
    BatchPayload = msgspec.defstruct(
        "BatchPayload",
        [(f.name, f.type, f.default) for f in msgspec.structs.fields(schema.Payload)],
        module=__name__,
        forbid_unknown_fields=True,
        omit_defaults=True,
    )


class BatchRecord(msgspec.Struct, forbid_unknown_fields=True):
    """``schema.Telemetry`` without its string patterns (checked per batch), plus the server's receive time as
    the last field, so that the record encodes to its stored line. A client may not send that field: a
    decoded record holding anything but None there sends the request to the exact path, which refuses it."""

    timestamp: Timestamp
    vehicle_id: str
    can_id: str
    payload: BatchPayload
    ingest_received_at: str | None = None


def _batch_pattern(annotated: object) -> re.Pattern[str]:
    """``(?:CORE\\n)*`` for a schema pattern ``^CORE$(?!\\n)``: matched against the values joined by newlines
    (a value holding a newline is caught by counting them), one regex call for all of a request's values."""
    pattern = annotated.__metadata__[0].pattern  # type: ignore[attr-defined]
    core = pattern.removeprefix("^").removesuffix(r"$(?!\n)")
    if "^" + core + r"$(?!\n)" != pattern or re.search(core, "\n") is not None:
        raise RuntimeError(f"schema pattern {pattern!r} is not ^CORE$(?!\\n) with a CORE that excludes newlines")
    return re.compile(f"(?:{core}\n)*")


# where the batch path starts to pay: one record costs ~9 us here against ~5 us through the exact door, the
# checks' fixed cost is made up from about four records on (docs/benchmarks.md, "Receiver per record")
BATCH_MIN_RECORDS = 4
_VEHICLE_IDS = _batch_pattern(schema.VehicleId)
_CAN_IDS = _batch_pattern(schema.CanId)
_one = msgspec.json.Decoder(BatchRecord)
_many = msgspec.json.Decoder(list[BatchRecord])
_encoder = msgspec.json.Encoder()
_vehicle_id_of = operator.attrgetter("vehicle_id")
_can_id_of = operator.attrgetter("can_id")
_UNSURE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


class Batch(NamedTuple):
    """A request's records as the batch path decoded and checked them."""

    records: list[BatchRecord]
    stamps_us: np.ndarray  # each record's client timestamp, int64 microseconds since the epoch (exact)
    utc: bool  # every timestamp in UTC; else ``schema.check_clock`` normalises them before they are stored
    earliest_us: int  # the earliest and the latest of them (0 for no records)
    latest_us: int

    def within(self, now: dt.datetime, *, max_future_s: float, max_age_s: float) -> bool:
        """True when every timestamp is in UTC and within ``schema.check_clock``'s bounds around ``now``, decided
        on the integer microseconds, so exactly where check_clock decides; else check_clock names the first
        record out of bounds or normalises the offsets."""
        if not self.utc:
            return False
        now_us = micros(now)
        # timedelta rounds the seconds to microseconds as check_clock's bounds do
        ahead = dt.timedelta(seconds=max_future_s) // MICROSECOND
        behind = dt.timedelta(seconds=max_age_s) // MICROSECOND
        return now_us - behind <= self.earliest_us and self.latest_us <= now_us + ahead


def decode_batch(body: bytes, *, ndjson: bool) -> list[BatchRecord] | None:
    """The records of ``body`` (one object, an array, or NDJSON lines) when the exact door
    (``schema.decode_records``) would accept them, decoded in C and checked per batch; None when this path
    cannot tell (escapes, carriage returns, any failed check): the caller takes the exact path then."""
    batch = decode_checked(body, ndjson=ndjson)
    return None if batch is None else batch.records


def decode_checked(body: bytes, *, ndjson: bool) -> Batch | None:
    """``decode_batch`` with the records' client timestamps, read in the same pass (the receiver's clock check
    and its ingest-stage latency use them without a Python call per record)."""
    # a backslash could hide a quote from the count below; \r splits NDJSON lines where msgspec does not
    if b"\\" in body or b"\r" in body:
        return None
    try:
        if ndjson:
            records = _one.decode_lines(body)
        elif body.lstrip()[:1] == b"[":
            records = _many.decode(body)
        else:
            records = [_one.decode(body)]
    except _UNSURE:
        return None
    count = len(records)
    if not count:
        return Batch(records, np.empty(0, np.int64), True, 0, 0)
    for values, pattern in ((map(_vehicle_id_of, records), _VEHICLE_IDS), (map(_can_id_of, records), _CAN_IDS)):
        joined = "\n".join(values) + "\n"
        if joined.count("\n") != count or pattern.fullmatch(joined) is None:
            return None
    # in one C loop (engine.kernels.jsonl): no client-sent ingest_received_at, a signal in every payload, each
    # cell min <= its max where both are present; the absent signals counted, the timestamps read
    stamps_us = np.empty(count, np.int64)
    checked = check_records(records, stamps_us)
    if checked is None:
        return None
    nones, utc, earliest_us, latest_us = checked
    # as schema.check_unique_keys: 7 strings a record besides its payload's keys. Every key in the body adds two
    # quotes, every signal decoded as a number stands for one key: a repeated key or an explicit null (which
    # check_unique_keys sends to its exact path) leaves more quotes than that, never fewer (no escapes here)
    if count_byte(body, b'"') != 2 * (7 * count + len(schema.SIGNALS) * count - nones):
        return None
    return Batch(records, stamps_us, utc, earliest_us, latest_us)


def count_byte(data: bytes, byte: bytes) -> int:
    """``data.count(byte)`` for one byte: vectorised by numpy past a few KB (``bytes.count`` compares a byte at a
    time, ~20 us for a 100-record body; numpy ~4 us)."""
    if len(data) < 4096:
        return data.count(byte)
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == byte[0]))


def stored_lines(records: list[BatchRecord], received_at: dt.datetime) -> bytes:
    """The stored NDJSON of ``records`` with ``ingest_received_at``: the bytes ``schema.encode_stored`` writes."""
    moment = received_at if received_at.tzinfo is UTC else received_at.astimezone(UTC)
    stamp = moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"  # format_timestamp's form
    for record in records:  # an attribute store a record (~30 ns); the encoding stays one C call
        record.ingest_received_at = stamp
    return _encoder.encode_lines(records)
