"""``POST /ingest/can``: raw CAN frames decoded with the DBC of ``CANPIPE_DBC`` into ``/ingest``'s records.

The same door as ``/ingest`` (the receiver's key check, body limits and deadline, record count, clock window,
rate limit, publisher and error body), then per CAN id one batch decode (``engine.can.decode``) and the
signal map: a stored record carries the canonical fields its frame holds (a multiplexed frame: the ones its
multiplexer selects), rounded to the signal's resolution, and ``"dbc": "sha256:<hex>"`` of the DBC's bytes.
A request is all-or-nothing: an id not in the DBC, a wrong data length, bad hex, a frame with none of the
mapped signals or a decoded value outside the schema's physical ranges is a 422 naming the frame's path,
and nothing is enqueued. Without a DBC the route answers 503.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any, cast

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import instruments as m
from engine.body import READ_ERRORS, read_body
from engine.can.frame import CanFrame, decode_frames, format_frame_id, frame_errors, frame_id, located
from engine.door import JSON_TYPES, NDJSON_TYPES, body_refusal, refuse
from engine.schema import MAX_REPORTED_ERRORS, UTC, Payload, SkewError, check_clock, format_timestamp

if TYPE_CHECKING:
    from engine.can.codec import CanCodec
    from engine.receiver import Receiver

log = logging.getLogger("canpipe.receiver")

_encoder = msgspec.json.Encoder()


def _bounds() -> dict[str, tuple[float, float]]:
    """Each payload field's allowed range, read from the schema (``engine.schema.Payload``'s constraints)."""
    inspect = msgspec.inspect
    bounds = {}
    info = inspect.type_info(Payload)
    assert isinstance(info, inspect.StructType)
    for field in info.fields:
        assert isinstance(field.type, inspect.UnionType)
        (number,) = [t.type for t in field.type.types if isinstance(t, inspect.Metadata)]
        assert isinstance(number, inspect.FloatType)
        low = number.ge if number.ge is not None else -np.inf if number.gt is None else np.nextafter(number.gt, np.inf)
        high = number.le if number.le is not None else np.inf if number.lt is None else np.nextafter(number.lt, -np.inf)
        bounds[field.name] = (float(low), float(high))
    return bounds


BOUNDS = _bounds()
ORDERED = (("cell_voltage_min", "cell_voltage_max"), ("cell_temp_min", "cell_temp_max"))  # Payload's min <= max


class FrameRejected(Exception):
    """Frames of a request that cannot become records: ``errors`` is the 422 detail list, in frame order."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__(f"{errors[0]['message']} - at `{errors[0]['path']}`")
        self.errors = errors


def decode_payloads(codec: CanCodec, frames: list[CanFrame]) -> tuple[list[int], list[dict[str, float]]]:
    """Each frame's numeric id and payload (its canonical fields, checked against the schema's ranges and
    rules); ``FrameRejected`` with every bad frame's path.

    Frames are grouped by id; each group is decoded in one call of the fast decoder and checked with one
    numpy pass per field."""
    from engine.can.decode import BadLength, UnknownFrame

    errors: list[tuple[int, str, str]] = []  # (frame index, path suffix, message)
    ids = [0] * len(frames)
    groups: dict[int, list[int]] = {}
    parsed: dict[int | str, int] = {}  # a request holds few distinct ids: parse each form once
    for index, frame in enumerate(frames):
        number = parsed.get(frame.can_id)
        if number is None:
            try:
                number = parsed[frame.can_id] = frame_id(frame.can_id)
            except ValueError as exc:
                errors.append((index, ".can_id", str(exc)))
                continue
        ids[index] = number
        groups.setdefault(number, []).append(index)
    rows: list[dict[str, float]] = [{} for _ in frames]
    suspects: list[int] = []  # frames the vectorised checks flag: the schema names what is wrong
    for number, indices in groups.items():
        datas = [bytes.fromhex(frames[i].data) for i in indices]
        try:
            columns = codec.columns(number, datas)
        except UnknownFrame:
            name = codec.dbc_path.name
            errors += [(i, ".can_id", f"CAN id {format_frame_id(number)} is not in the DBC {name}") for i in indices]
            continue
        except BadLength as exc:
            message = codec.message(number)
            errors += [
                (i, ".data", f"{len(data)} data bytes; {message.name} ({format_frame_id(number)}) has {exc.expected}")
                for i, data in zip(indices, datas)
                if len(data) != exc.expected
            ]
            continue
        carried, flagged = _check(columns, len(indices))
        lists = {name: values.tolist() for name, values in columns.items()}
        for j, i in enumerate(indices):
            if not carried[j]:
                errors.append((i, ".data", f"the frame carries none of the mapped signals ({_mapped(codec, number)})"))
                continue
            rows[i] = {name: v[j] for name, v in lists.items() if v[j] == v[j]}  # NaN: not on this frame's page
            if flagged[j]:
                suspects.append(i)
    errors += _range_errors(rows, suspects)
    if errors:
        errors.sort(key=lambda error: error[0])
        raise FrameRejected(
            [{"path": f"$[{i}]{suffix}", "message": text} for i, suffix, text in errors[:MAX_REPORTED_ERRORS]]
        )
    return ids, rows


def _check(columns: dict[str, np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: whether it carries any mapped field, and whether a field breaks the schema's ranges or its
    min <= max rules (one numpy pass per field instead of a Payload validated per frame)."""
    carried = np.zeros(count, dtype=bool)
    flagged = np.zeros(count, dtype=bool)
    for name, values in columns.items():
        present = ~np.isnan(values)
        carried |= present
        low, high = BOUNDS[name]
        flagged |= present & ~((values >= low) & (values <= high))  # +-inf fail too
    for low_name, high_name in ORDERED:
        if low_name in columns and high_name in columns:
            flagged |= columns[low_name] > columns[high_name]  # NaN compares False: one absent, no rule
    return carried, flagged


def _mapped(codec: CanCodec, number: int) -> str:
    signals = codec.by_frame.get(number, ())
    if not signals:
        return f"the signal map maps no signal of {codec.message(number).name}"
    return ", ".join(f"{s.canonical} = {s.message}.{s.signal}" for s in signals)


def _range_errors(rows: list[dict[str, float]], indices: list[int]) -> list[tuple[int, str, str]]:
    """The error path only: the flagged payloads validated by the schema, the message naming the decoded value."""
    errors = []
    for index in indices:
        row = rows[index]
        try:
            msgspec.convert(row, Payload)
        except msgspec.ValidationError as exc:
            error = located(exc)
            field = error["path"].lstrip("$.")
            value = f" (decoded {field} = {row[field]:g})" if field in row else f" (decoded {row})"
            errors.append((index, ".data", f"{error['message']}{value}"))
    return errors


def encode_can_records(records: list[dict[str, Any]], received_at: dt.datetime, dbc_ref: str) -> bytes:
    """The stored lines: ``/ingest``'s shape (keys in the schema's order) plus ``"dbc"``, in one encode and one
    replace (``}\\n`` occurs only at line ends of compact JSON)."""
    suffix = f',"ingest_received_at":"{format_timestamp(received_at)}","dbc":"{dbc_ref}"}}\n'.encode()
    return _encoder.encode_lines(records).replace(b"}\n", suffix)


class CanIngest:
    """The ``/ingest/can`` handler of one receiver worker; ``codec`` is None when no DBC is configured."""

    def __init__(self, receiver: Receiver, codec: CanCodec | None) -> None:
        self.receiver = receiver
        self.codec = codec
        self.max_records = receiver.max_records

    async def __call__(self, request: Request) -> Response:
        response = await self._ingest(request)
        if response.status_code != 202:
            self.receiver.metrics.inc(m.REJECTED_REQUESTS, reason=getattr(response, "reason", "http"))
        return response

    async def _ingest(self, request: Request) -> Response:

        receiver, settings = self.receiver, self.receiver.settings
        key_id = receiver.auth.key_id(request.headers.get("x-api-key")) if receiver.auth.enabled else ""
        if key_id is None:
            receiver._auth_failed(request.headers.get("x-api-key"))
            return refuse(401, "unauthorized", "missing or invalid X-API-Key")
        if self.codec is None:
            return refuse(503, "no_dbc", "CANPIPE_DBC is not configured: this receiver cannot decode CAN frames")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        ndjson = content_type in NDJSON_TYPES
        if not ndjson and content_type not in JSON_TYPES:
            return refuse(415, "unsupported_media_type", "send application/json or application/x-ndjson")
        try:  # /ingest's body rules: size limit (also decompressed), deadline, gzip or deflate
            body = await read_body(
                request.receive, request.scope["headers"], settings.max_body_bytes, settings.body_timeout_s
            )
        except READ_ERRORS as exc:
            return body_refusal(exc, settings)
        # a valid frame holds exactly one '{' (its strings are pattern-limited): bounds the work before decoding
        if body.count(b"{") > self.max_records:
            return refuse(413, "too_many_records", f"more than {self.max_records} frames in one request; split it")
        received_at = dt.datetime.now(UTC)
        try:
            frames = decode_frames(body, ndjson=ndjson)
            if not frames:
                return refuse(422, "validation", "no frames in the request", errors=[{"path": "$", "message": "empty"}])
            check_clock(
                cast(list[Any], frames),
                received_at,
                max_future_s=settings.max_future_skew_s,
                max_age_s=settings.max_age_s,
            )
            ids, payloads = decode_payloads(self.codec, frames)
        except SkewError as exc:
            return refuse(422, "validation", str(exc), errors=[{"path": exc.path, "message": str(exc).split(" - ")[0]}])
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return refuse(422, "validation", str(exc), errors=frame_errors(body, ndjson=ndjson))
        except FrameRejected as exc:
            return refuse(422, "validation", str(exc), errors=exc.errors)
        count = len(frames)
        names = {number: format_frame_id(number) for number in set(ids)}
        records = [
            {"timestamp": frame.timestamp, "vehicle_id": frame.vehicle_id, "can_id": names[number], "payload": payload}
            for frame, number, payload in zip(frames, ids, payloads)
        ]
        codec = self.codec
        refused = await receiver.admit(key_id, count, lambda: encode_can_records(records, received_at, codec.dbc_ref))
        if refused is not None:
            return refused
        receiver.metrics.inc(m.INGEST_RECORDS, count)
        received_s = received_at.timestamp()
        receiver.metrics.histogram(m.LATENCY, stage="ingest").record_many(
            np.fromiter(((received_s - f.timestamp.timestamp()) * 1000.0 for f in frames), np.float64, count)
        )
        return JSONResponse({"accepted": count}, status_code=202)


def can_route(receiver: Receiver) -> CanIngest:
    """The handler for a receiver: the codec loaded from its settings (``CANPIPE_DBC``, ``CANPIPE_SIGNAL_MAP``),
    or none when no DBC is configured (the route then answers 503)."""
    settings = receiver.settings
    if not settings.dbc:
        return CanIngest(receiver, None)
    from engine.can.codec import CanCodec

    return CanIngest(receiver, CanCodec.load(settings.dbc, settings.signal_map or None))
