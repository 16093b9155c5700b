"""The raw CAN frame a client posts to ``/ingest/can``: its msgspec Struct, the body's decoding, the id's forms.

``{"timestamp", "vehicle_id", "can_id", "data"}`` as one object, a JSON array or NDJSON, with the same rules
as ``/ingest`` records: unknown fields, a key given twice, invalid UTF-8 and runaway nesting are refused
with the path of the bad field. Imports only the schema (and numpy-free): the OpenAPI document uses it.
"""

from __future__ import annotations

import json
from typing import Annotated

import msgspec

from engine.schema import MAX_REPORTED_ERRORS, Timestamp, VehicleId

MAX_STANDARD_ID = 0x7FF
MAX_EXTENDED_ID = 0x1FFFFFFF  # 29 bits
MAX_DATA_BYTES = 64  # CAN FD

FrameIdNumber = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXTENDED_ID, description="CAN id (11 or 29 bits)")]
FrameIdText = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(?:0[xX][0-9A-Fa-f]{1,8}|[0-9]{1,10})$(?!\n)",
        description='CAN id as hex ("0x132", "0x18FF50E5") or decimal ("306")',
    ),
]
HexData = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(?:[0-9A-Fa-f]{2}){0,64}$(?!\n)",
        description="the frame's data bytes as hex, two digits a byte, 0 to 64 bytes (CAN FD)",
    ),
]


class CanFrame(msgspec.Struct, forbid_unknown_fields=True):
    """One raw frame as a gateway sends it; decoded server-side with the DBC of ``CANPIPE_DBC``."""

    timestamp: Timestamp
    vehicle_id: VehicleId
    can_id: FrameIdNumber | FrameIdText
    data: HexData


def frame_id(can_id: int | str) -> int:
    """The numeric id of a ``can_id`` as posted: ``0x132``, ``306`` or 306. ``ValueError`` past 29 bits."""
    number = can_id if isinstance(can_id, int) else int(can_id, 16 if can_id[:2] in ("0x", "0X") else 10)
    if number > MAX_EXTENDED_ID:
        raise ValueError(f"CAN id {can_id!r} is more than 29 bits")
    return number


def format_frame_id(number: int) -> str:
    """The stored ``can_id``: ``0x`` and upper-case hex without padding (``0x132``, ``0x18FF50E5``), one form
    whatever the client sent, so the dedup key (vehicle, can_id, timestamp) matches across clients."""
    return f"0x{number:X}"


_one = msgspec.json.Decoder(CanFrame)
_many = msgspec.json.Decoder(list[CanFrame])
_raw_items = msgspec.json.Decoder(list[msgspec.Raw])
_STRINGS_PER_FRAME = 7  # 4 keys and 3 pattern-limited string values (a string can_id adds one)


def decode_frames(body: bytes, *, ndjson: bool) -> list[CanFrame]:
    """Decode one object, an array or NDJSON; raise ``msgspec.ValidationError`` / ``DecodeError`` with the path
    of the first bad field (``$[2].data``). A key given twice is a ``ValidationError``."""
    try:
        frames = _decode(body, ndjson)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None
    _check_unique_keys(body, frames, ndjson)
    return frames


def _decode(body: bytes, ndjson: bool) -> list[CanFrame]:
    if ndjson:
        out: list[CanFrame] = []
        for number, line in enumerate(body.splitlines(), 1):
            if line.strip():
                index = len(out)
                try:
                    out.append(_one.decode(line))
                except msgspec.ValidationError as exc:
                    message, _, path = str(exc).partition(" - at `$")
                    raise msgspec.ValidationError(f"{message} - at `$[{index}]{path or '`'}") from None
                except msgspec.DecodeError as exc:
                    raise msgspec.DecodeError(f"line {number}: {exc}") from None
        return out
    if body.lstrip()[:1] == b"[":
        return _many.decode(body)
    return [_one.decode(body)]


def _items(body: bytes, ndjson: bool) -> tuple[list[bytes], str]:
    if ndjson:
        return [line for line in body.splitlines() if line.strip()], "$[{}]"
    if body.lstrip()[:1] == b"[":
        return [bytes(raw) for raw in _raw_items.decode(body)], "$[{}]"
    return [body], "$"


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        raise _DuplicateKey(next(key for key in keys if keys.count(key) > 1))
    return result


def _check_unique_keys(body: bytes, frames: list[CanFrame], ndjson: bool) -> None:
    """Refuse a frame that repeats a key (msgspec keeps the last value, other parsers the first). Counting
    quotes decides valid bodies without escapes or nulls; anything else is parsed again, seeing every key."""
    if b"\\" not in body and b"null" not in body:
        strings = _STRINGS_PER_FRAME * len(frames) + sum(isinstance(f.can_id, str) for f in frames)
        if body.count(b'"') == 2 * strings:
            return
    items, prefix = _items(body, ndjson)
    for index, item in enumerate(items):
        try:
            json.loads(item, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as exc:
            raise msgspec.ValidationError(
                f"Object contains duplicate key `{exc}` - at `{prefix.format(index)}`"
            ) from None


def frame_errors(body: bytes, *, ndjson: bool) -> list[dict[str, str]]:
    """Every bad frame's ``{"path", "message"}`` (at most ``MAX_REPORTED_ERRORS``); call on the error path only."""
    try:
        decode_frames(body, ndjson=ndjson)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        first = located(exc)
    else:
        return []
    try:
        items, prefix = _items(body, ndjson)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return [first]
    errors = []
    for index, item in enumerate(items):
        try:
            decode_frames(item, ndjson=False)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            error = located(exc)
            error["path"] = prefix.format(index) + error["path"][1:]
            errors.append(error)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    return errors or [first]


def located(exc: Exception) -> dict[str, str]:
    """msgspec's ``message - at `$.path``` as ``{"path", "message"}`` (path ``$`` when it names none)."""
    message, _, path = str(exc).partition(" - at `")
    return {"path": path.rstrip("`") or "$", "message": message}
