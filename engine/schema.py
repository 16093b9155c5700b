"""The telemetry record: msgspec Structs, validation at the door, and codecs built once at import.

The ground floor of canpipe: imports nothing else of the package.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
from typing import Annotated

import msgspec

UTC = dt.UTC

SOC = Annotated[float, msgspec.Meta(ge=0.0, le=100.0, description="state of charge, percent")]
PackVoltage = Annotated[float, msgspec.Meta(ge=0.0, le=1500.0, description="pack voltage, V")]
PackCurrent = Annotated[float, msgspec.Meta(ge=-3000.0, le=3000.0, description="pack current, A (+ discharge)")]
CellVoltage = Annotated[float, msgspec.Meta(ge=0.0, le=5.0, description="cell voltage, V")]
CellTemp = Annotated[float, msgspec.Meta(ge=-50.0, le=150.0, description="cell temperature, degC")]
# ``$(?!\n)``, not ``$``: Python's ``$`` also matches before a final newline ("EV-1\n" would pass); ECMA-262
# (what JSON Schema readers use) has no ``\Z``, and there the lookahead is a no-op, so both agree.
VehicleId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$(?!\n)", description="vehicle id")]
CanId = Annotated[str, msgspec.Meta(pattern=r"^0x[0-9A-Fa-f]{1,8}$(?!\n)", description="CAN arbitration id, hex")]
Timestamp = Annotated[dt.datetime, msgspec.Meta(tz=True, description="ISO 8601 with a UTC offset")]

SIGNALS = (
    "battery_soc",
    "battery_voltage",
    "battery_current",
    "cell_voltage_min",
    "cell_voltage_max",
    "cell_temp_min",
    "cell_temp_max",
)


class Payload(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Decoded battery signals; a single CAN frame may carry only some of them."""

    battery_soc: SOC | None = None
    battery_voltage: PackVoltage | None = None
    battery_current: PackCurrent | None = None
    cell_voltage_min: CellVoltage | None = None
    cell_voltage_max: CellVoltage | None = None
    cell_temp_min: CellTemp | None = None
    cell_temp_max: CellTemp | None = None

    def __post_init__(self) -> None:
        if self.cell_voltage_min is not None and self.cell_voltage_max is not None:
            if self.cell_voltage_min > self.cell_voltage_max:
                raise ValueError("cell_voltage_min must be <= cell_voltage_max")
        if self.cell_temp_min is not None and self.cell_temp_max is not None:
            if self.cell_temp_min > self.cell_temp_max:
                raise ValueError("cell_temp_min must be <= cell_temp_max")
        if msgspec.structs.astuple(self).count(None) == len(SIGNALS):  # in C: this runs for every record
            raise ValueError("payload must carry at least one signal")


class Telemetry(msgspec.Struct, forbid_unknown_fields=True):
    """One telemetry record as a client sends it."""

    timestamp: Timestamp
    vehicle_id: VehicleId
    can_id: CanId
    payload: Payload


class SkewError(ValueError):
    """A record's client timestamp is too far from the server clock; ``path`` names the record."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{message} - at `{path}`")
        self.path = path


_one = msgspec.json.Decoder(Telemetry)
_many = msgspec.json.Decoder(list[Telemetry])
_encoder = msgspec.json.Encoder()
MAX_REPORTED_ERRORS = 50  # per response: a body of 10,000 bad records gets a readable answer


def decode_records(body: bytes, *, ndjson: bool) -> list[Telemetry]:
    """Decode one object, an array, or NDJSON lines; raise ``msgspec.ValidationError`` / ``DecodeError``
    carrying the path of the first bad field (``$[2].payload.battery_soc``).

    Invalid UTF-8 and runaway nesting are ``DecodeError`` too (msgspec raises ``UnicodeDecodeError`` and
    ``RecursionError`` for them), and a record with a duplicate key is a ``ValidationError``.
    """
    try:
        records = _decode(body, ndjson)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None
    check_unique_keys(body, records, ndjson=ndjson)
    return records


def validation_errors(body: bytes, *, ndjson: bool) -> list[dict[str, str]]:
    """Every bad record's error as ``{"path": "$[2].payload.battery_soc", "message": ...}``, at most
    ``MAX_REPORTED_ERRORS``; empty when ``decode_records`` accepts the body. Each record is decoded alone, so
    call it only on the error path. A body that does not split into records gets its first error."""
    try:
        decode_records(body, ndjson=ndjson)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        first = exc
    else:
        return []
    items: list[bytes]
    if ndjson:
        items = [line for line in body.splitlines() if line.strip()]
        prefix = "$[{}]"
    else:
        array = body.lstrip()[:1] == b"["
        try:
            items = [bytes(raw) for raw in _raw_items.decode(body)] if array else [body]
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            return [_located(first)]
        prefix = "$[{}]" if array else "$"
    errors = []
    for index, item in enumerate(items):
        try:
            decode_records(item, ndjson=False)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            error = _located(exc)
            error["path"] = prefix.format(index) + error["path"][1:]
            errors.append(error)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    return errors or [_located(first)]


def _located(exc: Exception) -> dict[str, str]:
    """msgspec's ``message - at `$.path``` as ``{"path", "message"}`` (path ``$`` when it names none)."""
    message, _, path = str(exc).partition(" - at `")
    return {"path": path.rstrip("`") or "$", "message": message}


def _decode(body: bytes, ndjson: bool) -> list[Telemetry]:
    if ndjson:
        out: list[Telemetry] = []
        for number, line in enumerate(body.splitlines(), 1):
            if line.strip():
                index = len(out)  # paths count records; blank lines are not records
                try:
                    out.append(_one.decode(line))
                except msgspec.ValidationError as exc:
                    raise msgspec.ValidationError(_at_index(str(exc), index)) from None
                except msgspec.DecodeError as exc:
                    raise msgspec.DecodeError(f"line {number}: {exc}") from None
        return out
    stripped = body.lstrip()
    if stripped[:1] == b"[":
        return _many.decode(body)
    return [_one.decode(body)]


def _at_index(message: str, index: int) -> str:
    """Prefix the path in a msgspec error message with the record's index."""
    if "`$" in message:
        return message.replace("`$", f"`$[{index}]", 1)
    return f"{message} - at `$[{index}]`"


# Each record holds exactly 7 JSON strings besides its payload keys: 4 keys (timestamp, vehicle_id, can_id,
# payload) and 3 values, all pattern-limited so they hold no quote. Payload values are numbers (or null).
_STRINGS_PER_RECORD = 7
_payload_of = operator.attrgetter("payload")
_count_none = operator.methodcaller("count", None)
_raw_items = msgspec.json.Decoder(list[msgspec.Raw])


def check_unique_keys(body: bytes, records: list[Telemetry], *, ndjson: bool) -> None:
    """Refuse a record that repeats a key: msgspec keeps the last value, other JSON parsers the first, and
    two readers must never disagree on what a record says.

    The fast path counts quotes on the raw bytes (C-level scans, no parse): in a valid body without
    backslashes or nulls every string is a key or one of the 3 pattern-limited values, and every payload
    key is a signal the decoder kept, so the count is known from the decoded records and a repeated key
    adds 2 quotes. Escapes (``"battery\\u005fsoc"``) and nulls (a null then a number under one key
    would cancel out) take the exact path: a parse that sees every key. So does a count that does not
    add up.
    """
    if b"\\" not in body and b"null" not in body:
        # the signals the records carry, counted in C: one astuple and one count(None) per payload, no Python frame
        nones = sum(map(_count_none, map(msgspec.structs.astuple, map(_payload_of, records))))
        signals = len(SIGNALS) * len(records) - nones
        if body.count(b'"') == 2 * (_STRINGS_PER_RECORD * len(records) + signals):
            return
    _find_duplicate_key(body, ndjson)


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _find_duplicate_key(body: bytes, ndjson: bool) -> None:
    """The exact check (error path and escaped bodies only): raise ``ValidationError`` naming the key and record."""
    single = not ndjson and body.lstrip()[:1] != b"["
    items: list[bytes] = (
        [line for line in body.splitlines() if line.strip()]
        if ndjson
        else [body]
        if single
        else [bytes(raw) for raw in _raw_items.decode(body)]
    )
    for index, item in enumerate(items):
        try:
            json.loads(item, object_pairs_hook=_reject_duplicates)
        except _DuplicateKey as exc:
            path = "$" if single else f"$[{index}]"
            raise msgspec.ValidationError(f"Object contains duplicate key `{exc}` - at `{path}`") from None


def check_clock(records: list[Telemetry], now: dt.datetime, *, max_future_s: float, max_age_s: float) -> None:
    """Reject client clocks too far ahead of or behind ``now``; normalise every timestamp to UTC.

    A batch costs no Python loop per record in the common case: min, max and the set of offsets are taken in
    C over the timestamps; the loop that names the first bad record or rewrites offsets runs only when needed
    (and for a few records, where it is cheaper than building the lists)."""
    latest = now + dt.timedelta(seconds=max_future_s)
    earliest = now - dt.timedelta(seconds=max_age_s)
    if len(records) > 4:
        stamps = list(map(_timestamp_of, records))
        if earliest <= min(stamps) and max(stamps) <= latest:
            if set(map(_tzinfo_of, stamps)) != _UTC_ONLY:
                _to_utc(records)
            return
    for index, record in enumerate(records):
        ts = record.timestamp
        if ts > latest:
            raise SkewError(f"timestamp is more than {max_future_s:g} s ahead of server time", f"$[{index}].timestamp")
        if ts < earliest:
            raise SkewError(f"timestamp is more than {max_age_s:g} s old", f"$[{index}].timestamp")
    _to_utc(records)


def _to_utc(records: list[Telemetry]) -> None:
    for record in records:
        if record.timestamp.utcoffset():
            record.timestamp = record.timestamp.astimezone(UTC)


_timestamp_of = operator.attrgetter("timestamp")
_tzinfo_of = operator.attrgetter("tzinfo")
_UTC_ONLY = {UTC}


def format_timestamp(moment: dt.datetime) -> str:
    """Server timestamps: UTC, microseconds, ``Z`` (the same form msgspec writes)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_stored(records: list[Telemetry], received_at: dt.datetime) -> bytes:
    """NDJSON of the records, each with ``ingest_received_at`` appended: the exact bytes stored on disk.

    Done as one C-level encode plus one replace: a line of compact JSON ends in ``}\\n`` and JSON strings
    cannot hold a raw newline, so ``}\\n`` occurs only at line ends.
    """
    moment = received_at if received_at.tzinfo is UTC else received_at.astimezone(UTC)
    # format_timestamp's form, written with one bytes % (strftime is 3x slower, and this runs per request)
    suffix = b',"ingest_received_at":"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ"}\n' % (
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
    )
    return _encoder.encode_lines(records).replace(b"}\n", suffix)


def json_schema() -> dict:
    """JSON Schema of one record (for the OpenAPI document)."""
    return msgspec.json.schema(Telemetry)


class StoredRecord(Telemetry, forbid_unknown_fields=True):
    """One stored line: the record as the door validated it plus the server's ``ingest_received_at``.

    Consumers validate every line they write with it (same field rules as the door), so a queue message
    that is not canpipe NDJSON never reaches a raw file.
    """

    ingest_received_at: Timestamp
    # records decoded from raw CAN frames (/ingest/can): "sha256:<hex>" of the DBC's bytes, to decode them again
    dbc: Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$(?!\n)")] | None = None


stored_decoder = msgspec.json.Decoder(StoredRecord)
