"""Pure-Python (msgspec) reference of the stored-line scanner; ``ext/jsonl.pyx`` is its compiled twin.

``parse_lines(data, vehicles)`` turns complete stored lines (``\\n``-terminated JSON objects) into
columns: client timestamp and ingest time (int64 microseconds since the epoch), vehicle index (from the
``vehicles`` dict, which grows in first-seen order), CAN id (int64), and the seven payload signals
(float64, NaN where absent). Lines that are not valid stored records are returned by number (1-based,
within ``data``) and contribute no row: whatever a line holds, it never raises. A valid CAN id is the
schema's ``0x`` + 1..8 hex digits (not ``10``, ``0x1_0``, ``0X10`` or 17 digits); a non-finite number
(``1e400``) makes the line corrupt, as the door would have refused it. A field the stored-record schema
does not have (at the top or in the payload) makes the line corrupt with ``extra="refuse"`` (the consumer's
check of what it stores) and is ignored with ``extra="skip"`` (the aggregator reading any writer's lines;
the line must still be valid JSON and UTF-8 throughout).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

import msgspec
import numpy as np

# the kernels' copy of engine.schema.SIGNALS (the ground floor imports nothing of canpipe): ext/jsonl.pyx
# builds its key table from it, and tests/test_kernels.py holds it equal to the schema's and the Payload's
SIGNALS = (
    "battery_soc",
    "battery_voltage",
    "battery_current",
    "cell_voltage_min",
    "cell_voltage_max",
    "cell_temp_min",
    "cell_temp_max",
)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROSECOND = dt.timedelta(microseconds=1)
CAN_ID = re.compile(r"0x[0-9A-Fa-f]{1,8}")  # the schema's pattern, matched whole (``int(x, 16)`` takes more)


# no range checks here: stored lines were validated at the door; but the shape is exact (with "refuse", no
# unknown field, which the door refuses; with "skip", an unknown field's value is skipped by msgspec, which
# reads past invalid UTF-8 in it: parse_lines checks that), so that the twins and any other reader agree on
# what a record is; gc=False keeps millions of them cheap
def _payload_type(forbid_unknown_fields: bool) -> Any:
    fields = [(name, float | None, None) for name in SIGNALS]
    return msgspec.defstruct("_Payload", fields, gc=False, forbid_unknown_fields=forbid_unknown_fields)


def _line_type(payload: Any, forbid_unknown_fields: bool) -> Any:
    return msgspec.defstruct(
        "_Line",
        [
            ("timestamp", dt.datetime),
            ("vehicle_id", str),
            ("can_id", str),
            ("payload", payload),
            ("ingest_received_at", dt.datetime),
            ("dbc", str | None, None),  # a record decoded from a CAN frame: its DBC's hash, kept in raw data only
        ],
        gc=False,
        forbid_unknown_fields=forbid_unknown_fields,
    )


_Payload = _payload_type(forbid_unknown_fields=True)
_Line = _line_type(_Payload, forbid_unknown_fields=True)
_LineSkippingExtra = _line_type(_payload_type(forbid_unknown_fields=False), forbid_unknown_fields=False)
EXTRA = ("refuse", "skip")  # what a field the stored record does not have does to its line
_decoders = {"refuse": msgspec.json.Decoder(_Line), "skip": msgspec.json.Decoder(_LineSkippingExtra)}


def skips_extra(extra: str) -> bool:
    """``extra`` checked: True for "skip", False for "refuse"."""
    if extra not in EXTRA:
        raise ValueError(f"extra must be one of {EXTRA}, not {extra!r}")
    return extra == "skip"


class Columns(msgspec.Struct):
    timestamp_us: np.ndarray
    ingest_us: np.ndarray
    vehicle: np.ndarray
    can_id: np.ndarray
    values: np.ndarray  # signals x rows
    bad_lines: list[int]
    lines: int  # newline-terminated lines in the input (blank ones included)


def micros(moment: dt.datetime) -> int:
    """``moment`` (aware) as integer microseconds since the epoch, exactly."""
    return (moment - EPOCH) // MICROSECOND


def parse_lines(data: bytes | memoryview, vehicles: dict[str, int], extra: str = "refuse") -> Columns:
    skip_extra = skips_extra(extra)
    decoder = _decoders[extra]
    data = bytes(data)
    rows = []
    bad = []
    pieces = data.split(b"\n")
    for number, line in enumerate(pieces, 1):
        if not line.strip():
            continue
        try:
            record: Any = decoder.decode(line)  # a defstruct: its fields are not visible to mypy
            if skip_extra and not line.isascii():
                line.decode()  # msgspec skips an unknown field's string unread: its UTF-8 is checked here
            if not CAN_ID.fullmatch(record.can_id):
                raise ValueError("can_id is not 0x + 1..8 hex digits")
            if record.timestamp.tzinfo is None or record.ingest_received_at.tzinfo is None:
                raise ValueError("naive timestamp")
            present = msgspec.structs.astuple(record.payload)
            if not all(math.isfinite(v) for v in present if v is not None):
                raise ValueError("non-finite number")
            signals = [np.nan if v is None else v for v in present]
            can = int(record.can_id, 16)
        # UnicodeDecodeError is a ValueError; RecursionError: 100,000 nested brackets in an unknown field
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
            bad.append(number)
            continue
        index = vehicles.setdefault(record.vehicle_id, len(vehicles))
        rows.append(
            (
                micros(record.timestamp),
                micros(record.ingest_received_at),
                index,
                can,
                signals,
            )
        )
    n = len(rows)
    values = np.array([r[4] for r in rows], dtype=np.float64).reshape(n, len(SIGNALS)).T.copy()
    return Columns(
        timestamp_us=np.array([r[0] for r in rows], dtype=np.int64),
        ingest_us=np.array([r[1] for r in rows], dtype=np.int64),
        vehicle=np.array([r[2] for r in rows], dtype=np.int64),
        can_id=np.array([r[3] for r in rows], dtype=np.int64),
        values=values,
        bad_lines=bad,
        lines=len(pieces) - 1,
    )


# the receiver's per-record checks of a decoded batch (engine.batch_decode): each min right before its max
_PAIRS = tuple((SIGNALS.index(low), SIGNALS.index(low) + 1) for low in ("cell_voltage_min", "cell_temp_min"))
_NO_SIGNAL = (None,) * len(SIGNALS)


def check_records(records: list[Any], stamps_us: np.ndarray) -> tuple[int, bool, int, int] | None:
    """The per-record checks of the receiver's batch path over decoded records (``timestamp``, ``payload`` with
    the signals as attributes, ``ingest_received_at``), without a Python loop per record where C can do it.

    None when a record carries ``ingest_received_at`` (the server's field, sent by a client), a payload has
    no signal, or a cell minimum exceeds its maximum where both are present. Else (signals absent, every
    timestamp in UTC, the earliest and the latest timestamp), with each record's client timestamp written to
    ``stamps_us``: int64 microseconds since the epoch, exact, as ``(timestamp - EPOCH) // MICROSECOND``
    (0, 0 for no records)."""
    count = len(records)
    if [record.ingest_received_at for record in records].count(None) != count:
        return None
    payloads = [msgspec.structs.astuple(record.payload) for record in records]
    if _NO_SIGNAL in payloads:
        return None
    columns = list(zip(*payloads)) if payloads else [() for _ in SIGNALS]
    for low_at, high_at in _PAIRS:
        low, high = columns[low_at], columns[high_at]
        if any(a > b for a, b in zip(low, high) if a is not None and b is not None):
            return None
    stamps = [record.timestamp for record in records]
    exact = list(map(micros, stamps))
    stamps_us[:count] = exact
    utc = {stamp.tzinfo for stamp in stamps} <= {dt.UTC}
    return sum(column.count(None) for column in columns), utc, min(exact, default=0), max(exact, default=0)
