"""Validation at the door and the stored line."""

from __future__ import annotations

import datetime as dt
import json

import msgspec
import pytest
from canpipe_testing import make_record

from engine.schema import (
    MAX_REPORTED_ERRORS,
    UTC,
    SkewError,
    check_clock,
    decode_records,
    encode_stored,
    json_schema,
    validation_errors,
)


def body(*records: dict) -> bytes:
    return json.dumps(list(records)).encode()


def test_stored_line_is_the_input_plus_server_stamp():
    record = make_record(battery_soc=12.25)
    received = dt.datetime(2025, 10, 19, 17, 0, 0, 1234, tzinfo=UTC)
    line = encode_stored(decode_records(json.dumps(record).encode(), ndjson=False), received)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    stored = json.loads(line)
    assert stored.pop("ingest_received_at") == "2025-10-19T17:00:00.001234Z"
    assert stored["payload"] == record["payload"]
    assert dt.datetime.fromisoformat(stored["timestamp"]) == dt.datetime.fromisoformat(record["timestamp"])


def test_partial_payload_is_stored_without_nulls():
    record = make_record()
    record["payload"] = {"battery_soc": 50.0}
    line = encode_stored(decode_records(body(record), ndjson=False), dt.datetime.now(UTC))
    assert json.loads(line)["payload"] == {"battery_soc": 50.0}


def test_non_utc_offsets_are_normalised_to_utc():
    record = make_record()
    record["timestamp"] = "2026-11-28T03:00:00.5+02:00"
    records = decode_records(body(record), ndjson=False)
    check_clock(records, dt.datetime(2026, 11, 28, 1, 0, tzinfo=UTC), max_future_s=300, max_age_s=3600)
    assert records[0].timestamp == dt.datetime(2026, 11, 28, 1, 0, 0, 500000, tzinfo=UTC)
    assert records[0].timestamp.utcoffset() == dt.timedelta(0)


def test_clock_skew_bounds():
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    records = decode_records(body(make_record()), ndjson=False)
    records[0].timestamp = now + dt.timedelta(seconds=301)
    with pytest.raises(SkewError) as info:
        check_clock(records, now, max_future_s=300, max_age_s=60)
    assert info.value.path == "$[0].timestamp"
    records[0].timestamp = now - dt.timedelta(seconds=61)
    with pytest.raises(SkewError, match="old"):
        check_clock(records, now, max_future_s=300, max_age_s=60)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"battery_soc": -0.1}, ">= 0.0"),
        ({"battery_soc": 100.01}, "<= 100.0"),
        ({"cell_voltage_min": 4.2, "cell_voltage_max": 4.1}, "cell_voltage_min must be <= cell_voltage_max"),
        ({"cell_temp_min": 40, "cell_temp_max": 30}, "cell_temp_min must be <= cell_temp_max"),
        ({"cell_temp_max": 151}, "<= 150.0"),
        ({"battery_current": 3001}, "<= 3000.0"),
        ({"battery_soc": "50"}, "Expected `float | null`, got `str`"),
        ({"soc": 50}, "unknown field"),
    ],
)
def test_physical_limits(payload, message):
    record = make_record()
    record["payload"] = payload
    with pytest.raises(msgspec.ValidationError, match=message):
        decode_records(body(record), ndjson=False)


def test_ndjson_errors_carry_the_line_index():
    lines = json.dumps(make_record()).encode() + b"\n\n" + json.dumps(make_record(battery_soc=-5)).encode()
    with pytest.raises(msgspec.ValidationError, match=r"\$\[1\]\.payload\.battery_soc"):
        decode_records(lines, ndjson=True)
    with pytest.raises(msgspec.DecodeError, match="line 1"):
        decode_records(b"{nope", ndjson=True)
    with pytest.raises(msgspec.ValidationError, match=r"`\$\[0\]`"):
        decode_records(b'{"x": 1}', ndjson=True)


def test_schema_lists_every_signal():
    schema = json.dumps(json_schema())
    for name in ("battery_soc", "battery_voltage", "battery_current", "cell_voltage_min", "cell_temp_max"):
        assert name in schema


@pytest.mark.parametrize(("field", "value"), [("vehicle_id", "EV-00001\n"), ("can_id", "0x132\n")])
def test_a_trailing_newline_is_not_part_of_an_id(field, value):
    record = make_record()
    record[field] = value
    with pytest.raises(msgspec.ValidationError, match=field):
        decode_records(body(record), ndjson=False)


def _with(text: str, old: str, new: str) -> bytes:
    assert old in text
    return text.replace(old, new, 1).encode()


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('"vehicle_id": "EV-00001"', '"vehicle_id": "EV-00001", "vehicle_id": "EV-00002"', "vehicle_id"),
        ('"battery_soc": 80.5', '"battery_soc": 80.5, "battery_soc": 10', "battery_soc"),
        ('"battery_soc": 80.5', '"battery_soc": 80.5, "battery_soc": null', "battery_soc"),
        ('"battery_soc": 80.5', '"battery_soc": null, "battery_soc": 80.5', "battery_soc"),  # null, then a value
        ('"battery_soc": 80.5', '"battery_soc": 80.5, "battery\\u005fsoc": 10', "battery_soc"),  # escaped key
        ('"battery_soc": 80.5', '"battery_soc" : 80.5 , "battery_soc"  :null', "battery_soc"),
        ('"payload": {', '"payload": {"battery_soc": 1}, "payload": {', "payload"),
    ],
)
def test_a_duplicate_key_is_refused_with_its_name_and_record(old, new, key):
    text = json.dumps(make_record())
    with pytest.raises(msgspec.ValidationError, match=rf"duplicate key `{key}` - at `\$`"):
        decode_records(_with(text, old, new), ndjson=False)
    array = json.dumps([make_record(1), make_record(2)])
    at_second = array[: array.index("}}") + 2] + _with(array[array.index("}}") + 2 :], old, new).decode()
    with pytest.raises(msgspec.ValidationError, match=rf"duplicate key `{key}` - at `\$\[1\]`"):
        decode_records(at_second.encode(), ndjson=False)
    lines = json.dumps(make_record()) + "\n" + _with(text, old, new).decode()
    with pytest.raises(msgspec.ValidationError, match=rf"duplicate key `{key}` - at `\$\[1\]`"):
        decode_records(lines.encode(), ndjson=True)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"battery_soc": 80.5', '"battery_soc": null'),  # explicit null, counted apart
        ('"EV-00001"', '"EV\\u002d00001"'),  # escapes take the exact path
        ('"EV-00001"', '"null:null"'),  # "null" inside a value
        ('"battery_soc": 80.5', '"battery_soc"\t:\n80.5'),
    ],
)
def test_records_without_duplicates_pass_the_key_check(old, new):
    records = decode_records(_with(json.dumps(make_record()), old, new), ndjson=False)
    assert len(records) == 1
    compact = msgspec.json.encode([make_record(i) for i in range(3)])
    assert len(decode_records(compact, ndjson=False)) == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (json.dumps(make_record()).replace("EV-00001", "EV-\udcff").encode("utf-8", "surrogateescape"), "UTF-8"),
        (b'{"timestamp\xff": 1}', "UTF-8"),
        (b"[" * 500_000, "Expected `object`"),
        (b"{" * 500_000, "malformed|deep"),
    ],
)
def test_invalid_utf8_and_deep_nesting_are_decode_errors(raw, message):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError), match=message):
        decode_records(raw, ndjson=False)
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError), match=message):
        decode_records(raw, ndjson=True)


def test_validation_errors_name_every_bad_record_of_an_array_and_ndjson():
    """The receiver's 422 detail: each bad record by its path, from the same decoder that accepts records."""
    good, soc, voltage = make_record(0), make_record(1, battery_soc=101.0), make_record(2, battery_voltage=-1.0)
    assert validation_errors(body(good, good), ndjson=False) == []
    errors = validation_errors(body(good, soc, good, voltage), ndjson=False)
    assert [e["path"] for e in errors] == ["$[1].payload.battery_soc", "$[3].payload.battery_voltage"]
    assert errors[0]["message"] == "Expected `float` <= 100.0"
    lines = b"\n".join(json.dumps(r).encode() for r in (good, soc)) + b"\n\n" + json.dumps(voltage).encode()
    paths = [e["path"] for e in validation_errors(lines, ndjson=True)]
    assert paths == ["$[1].payload.battery_soc", "$[2].payload.battery_voltage"]  # blank lines are not records
    assert [e["path"] for e in validation_errors(json.dumps(soc).encode(), ndjson=False)] == ["$.payload.battery_soc"]


def test_validation_errors_report_duplicate_keys_and_are_capped():
    duplicate = _with(json.dumps(make_record(0)), '"can_id"', '"vehicle_id": "EV-2", "can_id"')
    errors = validation_errors(b"[" + json.dumps(make_record(1)).encode() + b"," + duplicate + b"]", ndjson=False)
    assert errors == [{"path": "$[1]", "message": "Object contains duplicate key `vehicle_id`"}]
    many = body(*[make_record(i, battery_soc=200.0) for i in range(MAX_REPORTED_ERRORS + 10)])
    assert len(validation_errors(many, ndjson=False)) == MAX_REPORTED_ERRORS


def test_a_body_that_does_not_split_into_records_gets_its_first_error():
    """A broken array cannot be cut into records: the whole body's first error stands for all."""
    assert validation_errors(b'[{"timestamp": 1}, {oops', ndjson=False) == [
        {"path": "$[0].timestamp", "message": "Expected `datetime`, got `int`"}
    ]


@pytest.mark.parametrize("count", [1, 4, 5, 100])
def test_check_clock_names_the_first_record_out_of_the_window_and_normalises_offsets_at_any_batch_size(count):
    from engine.schema import SkewError, check_clock, decode_records

    now = dt.datetime.now(dt.UTC)
    stamps = [now - dt.timedelta(seconds=i) for i in range(count)]

    def records(bad: dict[int, dt.datetime] | None = None, offset: bool = False) -> list:
        lines = []
        for i, stamp in enumerate(stamps):
            stamp = (bad or {}).get(i, stamp)
            if offset and i == count - 1:
                stamp = stamp.astimezone(dt.timezone(dt.timedelta(hours=2)))
            lines.append(json.dumps(make_record(i) | {"timestamp": stamp.isoformat()}))
        return decode_records("\n".join(lines).encode(), ndjson=True)

    window = {"max_future_s": 300, "max_age_s": 3600}
    batch = records(offset=True)
    check_clock(batch, now, **window)
    assert [r.timestamp for r in batch] == stamps and all(r.timestamp.tzinfo is dt.UTC for r in batch)
    last = count - 1
    with pytest.raises(SkewError, match="ahead") as ahead:
        check_clock(records({last: now + dt.timedelta(seconds=301)}), now, **window)
    assert ahead.value.path == f"$[{last}].timestamp"
    with pytest.raises(SkewError, match="old") as old:
        check_clock(records({last: now - dt.timedelta(seconds=3601), 0: now - dt.timedelta(hours=2)}), now, **window)
    assert old.value.path == "$[0].timestamp"
