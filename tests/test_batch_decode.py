"""engine.batch_decode: the receiver's per-batch path accepts only what the exact door accepts, stores the same
bytes, and is taken by the bodies clients really send."""

from __future__ import annotations

import datetime as dt
import json
import random
import typing

import msgspec
import pytest

from engine import batch_decode, schema
from engine.batch_decode import decode_batch, stored_lines

NOW = dt.datetime(2026, 11, 28, 16, 0, 0, 123456, tzinfo=dt.UTC)


def record(i: int, **payload: object) -> dict:
    signals = {
        "battery_soc": 80.5,
        "battery_voltage": 396.2,
        "battery_current": -42.0 + i,
        "cell_voltage_min": 3.61,
        "cell_voltage_max": 3.74,
        "cell_temp_min": 21.5,
        "cell_temp_max": 27.0,
    }
    signals.update(payload)
    return {
        "timestamp": (NOW - dt.timedelta(seconds=i)).isoformat(),
        "vehicle_id": f"EV-{i % 7:05d}",
        "can_id": "0x1A",
        "payload": {k: v for k, v in signals.items() if v is not ...},
    }


def ndjson(records: list[dict], separators: tuple[str, str] = (",", ":")) -> bytes:
    return "".join(json.dumps(r, separators=separators) + "\n" for r in records).encode()


def exact(body: bytes, *, ndjson: bool) -> list[schema.Telemetry] | None:
    try:
        return schema.decode_records(body, ndjson=ndjson)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


@pytest.mark.parametrize(
    ("body", "is_ndjson"),
    [
        (ndjson([record(i) for i in range(100)]), True),
        (json.dumps([record(i) for i in range(100)]).encode(), False),  # spaces after separators
        (json.dumps(record(0)).encode(), False),
        (b"  \n" + ndjson([record(0), record(1)]) + b"\n\n", True),
        # frames carrying some signals only; a min without its max
        (ndjson([record(0, battery_soc=..., cell_temp_max=...), record(1, cell_voltage_max=...)]), True),
        (b" [] ", False),
        (ndjson([{**record(0), "vehicle_id": "null-4"}, record(1)]), True),  # "null" in a value is no null
    ],
)
def test_common_bodies_take_the_batch_path_and_store_the_exact_bytes(body: bytes, is_ndjson: bool) -> None:
    fast = decode_batch(body, ndjson=is_ndjson)
    assert fast is not None, "a body clients send fell to the exact path: the receiver's per-record cost triples"
    records = exact(body, ndjson=is_ndjson)
    assert records is not None
    assert stored_lines(fast, NOW) == schema.encode_stored(records, NOW)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (ndjson([record(0, cell_voltage_min=3.9, cell_voltage_max=3.8)]), "cell voltage min > max"),
        (ndjson([record(0, cell_temp_min=30.0, cell_temp_max=20.0, battery_soc=...)]), "temp min > max"),
        (ndjson([record(0, cell_temp_min=30.0, cell_temp_max=20.0, cell_voltage_max=...)]), "min > max, partial"),
        (ndjson([record(1), {**record(0), "payload": {}}]), "a record without a signal"),
        (ndjson([{**record(0), "vehicle_id": "-EV"}]), "vehicle id pattern"),
        (ndjson([{**record(0), "vehicle_id": "EV\n1"}]), "a newline inside a vehicle id"),
        (ndjson([{**record(0), "can_id": "0x1G"}]), "CAN id pattern"),
        (ndjson([{**record(0), "ingest_received_at": ""}]), "the server's field sent by a client"),
        (ndjson([record(0)]).replace(b'"can_id"', b'"can_id":"0x2","can_id"'), "a repeated key"),
        (ndjson([record(0)]).replace(b'"battery_soc":80.5', b'"battery_soc":80.5,"battery_soc":81'), "repeated signal"),
        (ndjson([record(0, battery_soc=None)]), "an explicit null"),
        (ndjson([record(0), record(1)]).replace(b"\n", b"\r", 1), "a carriage return"),
        (ndjson([record(0)]).replace(b'"timestamp":"', b'"timestamp":"x'), "a bad timestamp"),
        (b'{"timestamp":', "truncated JSON"),
        (b"\xff", "invalid UTF-8"),
    ],
)
def test_doubtful_bodies_go_to_the_exact_door(body: bytes, why: str) -> None:
    assert decode_batch(body, ndjson=True) is None, why


def test_random_bodies_never_accepted_by_the_batch_path_alone() -> None:
    """Seeded fuzz: bodies of 1-5 records, some mutated; whatever the batch path accepts the exact door accepts,
    and both store the same bytes."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    mutations = [
        ('"0x1A"', '"0x1g1"'),
        ('"EV-', '"_EV'),
        ('"payload":{', '"payload":{"battery_soc":5,'),
        ('"payload":{', '"payload":{"x":1,'),
        ('"payload":{', '"payload":{},"p":{'),
        ('"cell_temp_max":', '"cell_temp_max":-'),
        ('"cell_voltage_min":', '"cell_voltage_min":9'),
        ('"vehicle_id"', '"vehicle_id":"A","vehicle_id"'),
        ('"EV-', '"EV\\u000a'),
        ("+00:00", ""),
        ("}", "}\r"),
        ('"battery_soc":', '"battery_soc":null,"battery_soc":'),
        ('"battery_voltage":', '"battery_voltage":5,"battery_voltage":'),
        ('"cell_temp_min":', '"cell_temp_max":null,"cell_temp_min":'),
    ]
    fast_count = 0
    for _ in range(1500):
        records = [record(i) for i in range(rng.randint(1, 5))]
        for r in records:
            for signal in schema.SIGNALS:
                if rng.random() < 0.2:
                    del r["payload"][signal]
        mode = rng.choice(["ndjson", "array", "one"])
        text = (
            ndjson(records).decode()
            if mode == "ndjson"
            else json.dumps(records if mode == "array" else records[0], separators=(",", ":"))
        )
        if rng.random() < 0.6:
            old, new = rng.choice(mutations)
            text = text.replace(old, new, 1)
        if rng.random() < 0.2:
            text = text.replace(":", ": ").replace(",", ", ")
        body = text.encode()
        fast = decode_batch(body, ndjson=mode == "ndjson")
        if fast is None:
            continue
        fast_count += 1
        decoded = exact(body, ndjson=mode == "ndjson")
        assert decoded is not None, f"seed {seed}: the batch path accepted what the door refuses: {text!r}"
        assert stored_lines(fast, NOW) == schema.encode_stored(decoded, NOW), f"seed {seed}: {text!r}"
    assert fast_count > 300, f"seed {seed}: only {fast_count} bodies took the batch path"


def test_a_schema_pattern_of_another_form_is_refused_at_import() -> None:
    with pytest.raises(RuntimeError, match="not \\^CORE"):
        batch_decode._batch_pattern(typing.Annotated[str, msgspec.Meta(pattern="^a|b$")])
    with pytest.raises(RuntimeError, match="excludes newlines"):
        batch_decode._batch_pattern(typing.Annotated[str, msgspec.Meta(pattern=r"^\s+$(?!\n)")])


@pytest.mark.parametrize("bound", ["ahead", "behind"])
@pytest.mark.parametrize("nudge_us", [-1, 0, 1])
def test_the_batch_clock_check_decides_exactly_where_check_clock_does(bound: str, nudge_us: int) -> None:
    """To the microsecond at both bounds, with bounds given in fractional seconds."""
    ahead_s, behind_s = 300.0000015, 86400.25
    edge = NOW + dt.timedelta(seconds=ahead_s) if bound == "ahead" else NOW - dt.timedelta(seconds=behind_s)
    records = [record(i) for i in range(5)]
    records[2]["timestamp"] = (edge + dt.timedelta(microseconds=nudge_us)).isoformat()
    batch = batch_decode.decode_checked(ndjson(records), ndjson=True)
    assert batch is not None
    try:
        schema.check_clock(exact(ndjson(records), ndjson=True), NOW, max_future_s=ahead_s, max_age_s=behind_s)
    except schema.SkewError:
        accepted = False
    else:
        accepted = True
    assert batch.within(NOW, max_future_s=ahead_s, max_age_s=behind_s) is accepted
    assert accepted is ((nudge_us <= 0) if bound == "ahead" else (nudge_us >= 0))
