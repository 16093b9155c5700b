"""The consumer's fast stored-line check (C columns + whole-column rules) against the exact one (StoredRecord).

The fast path may say "not decided" (None) for a valid body, never "valid" for a body StoredRecord refuses:
a bad line must never reach a raw file.
"""

from __future__ import annotations

import datetime as dt
import json
import random

import msgspec
import numpy as np
import pytest

from engine import consumer
from engine.consumer import StoredLines, parse_message
from engine.kernels import jsonl
from engine.queues import Received
from engine.schema import SIGNALS, stored_decoder

compiled = pytest.mark.skipif(jsonl.IMPLEMENTATION != "c", reason="the fast path needs the compiled ext/jsonl")

BOUNDS = {
    "battery_soc": (0.0, 100.0),
    "battery_voltage": (0.0, 1500.0),
    "battery_current": (-3000.0, 3000.0),
    "cell_voltage_min": (0.0, 5.0),
    "cell_voltage_max": (0.0, 5.0),
    "cell_temp_min": (-50.0, 150.0),
    "cell_temp_max": (-50.0, 150.0),
}


def record(**changes: object) -> dict:
    payload = {
        "battery_soc": 80.5,
        "battery_voltage": 396.2,
        "battery_current": 42.0,
        "cell_voltage_min": 4.11,
        "cell_voltage_max": 4.13,
        "cell_temp_min": 24.0,
        "cell_temp_max": 26.5,
    }
    out: dict = {
        "timestamp": "2026-11-28T10:15:00.123456Z",
        "vehicle_id": "EV-00001",
        "can_id": "0x132",
        "payload": payload,
        "ingest_received_at": "2026-11-28T10:15:00.200000Z",
    }
    for key, value in changes.items():
        if key in SIGNALS:
            if value is _DROP:
                payload.pop(key)
            else:
                payload[key] = value
        elif value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()


def line(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def exact_accepts(body: bytes) -> bool:
    try:
        records = stored_decoder.decode_lines(body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return False
    return bool(records) and len(records) == body.count(b"\n") + (not body.endswith(b"\n"))


def mutations() -> list[bytes]:
    """Single-line bodies at and past every rule's edge."""
    out = [line(record())]
    for name, (low, high) in BOUNDS.items():
        for value in (low, high, low - 0.001, high + 0.001, int(low), None, _DROP):
            changes: dict = {name: value}
            if name.startswith("cell_") and value not in (None, _DROP):  # keep the pair ordered unless testing it
                other = name.replace("_min", "_max") if name.endswith("_min") else name.replace("_max", "_min")
                changes[other] = value
            out.append(line(record(**changes)))
    out += [
        line(record(cell_voltage_min=4.2, cell_voltage_max=4.1)),
        line(record(cell_temp_min=30.0, cell_temp_max=29.9)),
        line(record(payload={})),
        line(record(payload=dict.fromkeys(SIGNALS))),
        line(record(payload={"battery_soc": 1.0, "extra": 1})),
        line(record(extra=1)),
        line(record(dbc="sha256:" + "a" * 64)),
        line(record(dbc="md5:abc")),
        line(record(ingest_received_at=_DROP)),
        line(record(timestamp="2026-11-28T10:15:00")),  # naive
        line(record(timestamp="2026-11-28T15:45:00+05:30")),
        line(record(timestamp="2026-02-30T10:15:00Z")),
        line(record(ingest_received_at="2026-11-28T24:00:00Z")),
        line(record(can_id="0x")),
        line(record(can_id="0x123456789")),
        line(record(can_id="132")),
        line(record(can_id="0xABCDEF12")),
        line(record(vehicle_id="")),
        line(record(vehicle_id="_EV")),
        line(record(vehicle_id=".hidden")),
        line(record(vehicle_id="EV/1")),
        line(record(vehicle_id="EV-1\n")),
        line(record(vehicle_id="E" * 64)),
        line(record(vehicle_id="E" * 65)),
        line(record(vehicle_id="EV-é")),
        line(record(vehicle_id="a:b.c_d-e")),
        line(record(vehicle_id=1)),
        line(record(battery_soc="50")),
        line(record(battery_soc=True)),
        b'{"timestamp":"2026-11-28T10:15:00Z","vehicle_id":"EV\\u002d1","can_id":"0x1","payload":{"battery_soc":1},'
        b'"ingest_received_at":"2026-11-28T10:15:00Z"}\n',
        b'{"timestamp":"2026-11-28T10:15:00Z","vehicle_id":"EV\\u002f1","can_id":"0x1","payload":{"battery_soc":1},'
        b'"ingest_received_at":"2026-11-28T10:15:00Z"}\n',
        b'{"timestamp":"2026-11-28T10:15:00Z","vehicle_id":"EV","can_id":"0x1","payload":{"battery_soc":1e400},'
        b'"ingest_received_at":"2026-11-28T10:15:00Z"}\n',
        b'{"timestamp":"2026-11-28T10:15:00Z","vehicle_id":"EV\xff","can_id":"0x1","payload":{"battery_soc":1},'
        b'"ingest_received_at":"2026-11-28T10:15:00Z"}\n',
        b"\n",
        b"[]\n",
        b"null\n",
    ]
    return out


@compiled
@pytest.mark.parametrize("body", mutations())
def test_fast_path_never_accepts_what_the_schema_refuses(body):
    valid = line(record())
    for candidate in (body, valid + body, body + valid, valid * 3 + body + valid):
        fast = StoredLines().columns(candidate)
        if fast is not None:
            assert exact_accepts(candidate), candidate
    if exact_accepts(body) and b"dbc" not in body:  # what the kernel knows, it decides: no needless slow path
        assert StoredLines().columns(body) is not None, body


@compiled
def test_fast_path_agrees_with_the_schema_on_random_corruptions():
    rng = random.Random(20261128)
    base = line(record())
    alphabet = b'0123456789.-+eE:xXZTa"{},\\ n'
    fast_taken = 0
    for _ in range(4000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data) - 1)] = rng.choice(alphabet)
        body = bytes(data)
        if StoredLines().columns(body) is not None:
            fast_taken += 1
            assert exact_accepts(body), body
    assert fast_taken > 100  # many corruptions stay valid (digits for digits): the fast path decided them


@compiled
def test_a_bad_vehicle_id_is_remembered_as_bad():
    lines = StoredLines()
    assert lines.columns(line(record(vehicle_id="EV-1"))) is not None
    assert lines.columns(line(record(vehicle_id="EV/1"))) is None
    assert lines.columns(line(record(vehicle_id="EV/1"))) is None  # known now, still bad
    assert lines.columns(line(record(vehicle_id="EV-1"))) is not None


@compiled
def test_the_vehicle_memory_starts_over_past_its_bound(monkeypatch):
    lines = StoredLines()
    monkeypatch.setattr(StoredLines, "MAX_VEHICLES", 3)
    for i in range(10):
        assert lines.columns(line(record(vehicle_id=f"EV-{i}"))) is not None
    assert len(lines.vehicles) <= 4


@compiled
@pytest.mark.parametrize("hours", [1, 2])
def test_fast_and_exact_parse_give_the_same_result(monkeypatch, hours):
    start = dt.datetime(2026, 11, 28, 10, 59, 59, 500000, tzinfo=dt.UTC)
    recs = []
    for i in range(50):
        ingest = start + dt.timedelta(milliseconds=20 * i * (hours - 1))
        recs.append(
            record(
                timestamp=(ingest - dt.timedelta(milliseconds=7)).isoformat().replace("+00:00", "Z"),
                ingest_received_at=ingest.isoformat().replace("+00:00", "Z"),
                vehicle_id=f"EV-{i % 7}",
            )
        )
    body = b"".join(line(r) for r in recs)
    message = Received("1", "1:x", body, 0, 0, 1)
    fast = parse_message(message, 5.0)
    monkeypatch.setattr(consumer, "_FAST", None)
    exact = parse_message(message, 5.0)
    assert len(fast.parts) == hours
    assert {h: [bytes(p) for p in parts] for h, parts in fast.parts.items()} == {
        h: [bytes(p) for p in parts] for h, parts in exact.parts.items()
    }
    np.testing.assert_allclose(fast.client_s, exact.client_s, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast.ingest_s, exact.ingest_s, rtol=0, atol=1e-6)
    assert fast.records == exact.records == 50
