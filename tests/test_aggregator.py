"""The hourly aggregator on real files: exact under duplicates, torn tails, corrupt lines and late data, and
equal to a plain-Python ground truth (tests/canpipe_truth.py) on interleaved CAN ids."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
from canpipe_testing import modules_loaded_by
from canpipe_truth import assert_aggregate_matches

from engine import aggregator
from engine.aggregator import driver, partitions
from engine.errors import ConfigError
from engine.kernels import _jsonl_py, jsonl
from engine.storage import Hour, PartitionWriter, hour_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import duckdb_hour  # noqa: E402

UTC = dt.UTC
HOUR = dt.datetime(2025, 10, 19, 17, tzinfo=UTC)
KEY = Hour.from_datetime(HOUR)
SEED = 1917


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(vehicle: str, ts: dt.datetime, can_id: str = "0x132", **payload: float) -> bytes:
    body = {
        "timestamp": iso(ts),
        "vehicle_id": vehicle,
        "can_id": can_id,
        "payload": payload,
        "ingest_received_at": iso(ts + dt.timedelta(milliseconds=20)),
    }
    return msgspec.json.encode(body) + b"\n"


def fleet(seed: int = SEED, vehicles: int = 5, per_vehicle: int = 200) -> list[bytes]:
    """Records of a few vehicles over the hour, seeded; some carry only some signals."""
    rng = random.Random(seed)
    lines = []
    for k in range(vehicles):
        soc = rng.uniform(40, 90)
        for n in range(per_vehicle):
            ts = HOUR + dt.timedelta(seconds=n * 10 + k * 0.1)
            soc -= rng.uniform(0, 0.05)
            cur = round(rng.uniform(-80, 250), 1)
            vmin = round(rng.uniform(3.6, 4.1), 3)
            payload = {
                "battery_soc": round(soc, 2),
                "battery_voltage": round(380 - cur * 0.07, 1),
                "battery_current": cur,
                "cell_voltage_min": vmin,
                "cell_voltage_max": round(vmin + rng.uniform(0, 0.03), 3),
                "cell_temp_min": round(rng.uniform(20, 30), 1),
            }
            payload["cell_temp_max"] = round(payload["cell_temp_min"] + rng.uniform(0, 3), 1)
            if n % 7 == 3:
                payload = {"battery_soc": payload["battery_soc"]}  # a frame that carries only SOC
            lines.append(record(f"EV-{k:03d}", ts, "0x132" if n % 7 != 3 else "0x292", **payload))
    rng.shuffle(lines)
    return lines


def write(data_dir: Path, lines: list[bytes], writer: str = "w1", hour=KEY) -> Path:
    w = PartitionWriter(data_dir, writer)
    path = w.append(hour, lines)
    w.close()
    return path


def run(data_dir: Path) -> dict:
    aggregator.aggregate_hour(data_dir, HOUR)
    return json.loads(aggregator.output_path(data_dir, HOUR).read_bytes())


@pytest.fixture(params=["c", "py"])
def scanner(request, monkeypatch):
    """Every aggregator test runs on both scanners."""
    if request.param == "c" and jsonl.IMPLEMENTATION != "c":
        pytest.skip("compiled scanner not selected (CANPIPE_NO_EXTENSIONS=1, or not built)")
    if request.param == "py":
        monkeypatch.setattr(partitions, "parse_lines", _jsonl_py.parse_lines)
    return request.param


def test_duplicates_give_the_same_output_as_none(tmp_path, scanner):
    lines = fleet()
    clean, doubled = tmp_path / "clean", tmp_path / "doubled"
    write(clean, lines)
    write(doubled, lines[:500], "a")
    write(doubled, lines[500:] + lines[:300], "b")  # some copies in another file
    write(doubled, lines[300:], "c")
    a, b = run(clean), run(doubled)
    assert_aggregate_matches(doubled, HOUR)
    assert b["input"]["duplicates_dropped"] == len(lines)
    assert sum(v["duplicates_dropped"] for v in b["vehicles"]) == len(lines)
    for doc in (a, b):
        for v in doc["vehicles"]:
            v.pop("duplicates_dropped")
        doc.pop("input")
    assert a == b


def test_statistics_are_right(tmp_path, scanner):
    lines = fleet()
    write(tmp_path, lines)
    doc = run(tmp_path)
    records = [json.loads(line) for line in lines]
    assert doc["time_range"] == {"start": "2025-10-19T17:00:00Z", "end": "2025-10-19T18:00:00Z"}
    assert [v["vehicle_id"] for v in doc["vehicles"]] == sorted({r["vehicle_id"] for r in records})
    for v in doc["vehicles"]:
        mine = sorted((r for r in records if r["vehicle_id"] == v["vehicle_id"]), key=lambda r: r["timestamp"])
        assert v["message_count"] == len(mine)
        for name in ("battery_soc", "battery_current", "cell_temp_max"):
            xs = [r["payload"][name] for r in mine if name in r["payload"]]
            assert v[name]["min"] == min(xs) and v[name]["max"] == max(xs)
            assert v[name]["avg"] == pytest.approx(sum(xs) / len(xs), rel=1e-12)
        spreads = [
            r["payload"]["cell_voltage_max"] - r["payload"]["cell_voltage_min"]
            for r in mine
            if "cell_voltage_max" in r["payload"]
        ]
        assert v["cell_voltage_spread_max"] == pytest.approx(max(spreads))
        socs = [r["payload"]["battery_soc"] for r in mine]
        assert v["soc_change"] == pytest.approx(socs[-1] - socs[0])
        assert v["first_timestamp"] == mine[0]["timestamp"] and v["last_timestamp"] == mine[-1]["timestamp"]
        cur = [
            (dt.datetime.fromisoformat(r["timestamp"]), r["payload"]) for r in mine if "battery_current" in r["payload"]
        ]
        ah = kwh = 0.0
        for (t0, p0), (t1, p1) in zip(cur, cur[1:]):
            seconds = (t1 - t0).total_seconds()
            ah += (abs(p0["battery_current"]) + abs(p1["battery_current"])) / 2 * seconds / 3600
            kwh += (
                (
                    abs(p0["battery_current"] * p0["battery_voltage"])
                    + abs(p1["battery_current"] * p1["battery_voltage"])
                )
                / 2
                * seconds
                / 3.6e6
            )
        assert v["charge_throughput_ah"] == pytest.approx(ah, rel=1e-9)
        assert v["energy_throughput_kwh"] == pytest.approx(kwh, rel=1e-9)
    newest = max(r["ingest_received_at"] for r in records)
    assert doc["aggregation_timestamp"] == newest


def test_rerun_is_byte_identical_and_written_atomically(tmp_path, scanner):
    write(tmp_path, fleet())
    first = (run(tmp_path), aggregator.output_path(tmp_path, HOUR).read_bytes())[1]
    run(tmp_path)
    assert aggregator.output_path(tmp_path, HOUR).read_bytes() == first
    assert not [p for p in (tmp_path / "aggregated").iterdir() if p.name.startswith(".")]  # no temp files left


# sha256 of the aggregate of fleet() as the aggregator wrote it before its split into a package (both
# scanners, both group-by twins): refactors of the aggregator must not move a byte of its output
FLEET_AGGREGATE_SHA256 = "7af9f5924a751419257b11f76b372467a0731368f0790799d7834e107332f9e8"


def test_output_bytes_are_unchanged_across_refactors(tmp_path, scanner):
    lines = fleet()
    write(tmp_path, lines[:600], "a")
    write(tmp_path, lines[500:] + lines[:50], "b")  # copies across files: duplicates dropped
    run(tmp_path)
    body = aggregator.output_path(tmp_path, HOUR).read_bytes()
    assert hashlib.sha256(body).hexdigest() == FLEET_AGGREGATE_SHA256, body.decode()[:2000]


def test_torn_tail_is_skipped_and_counted(tmp_path, scanner):
    lines = fleet()
    path = write(tmp_path, lines)
    clean = run(tmp_path)
    with open(path, "ab") as f:
        f.write(lines[0][:40])  # a crash mid-write
    torn = run(tmp_path)
    assert torn["input"]["torn_tail_bytes"] == 40
    assert torn["vehicles"] == clean["vehicles"]


def test_corrupt_interior_line_is_reported_not_silently_skipped(tmp_path, scanner, caplog):
    lines = fleet()
    lines.insert(10, b'{"timestamp":"2025-10-19T17:00:00Z","vehicle_id":"EV-000","can_id":"0x1",GARBAGE\n')
    lines.insert(20, b"\x00\x01 not json at all\n")
    path = write(tmp_path, lines)
    doc = run(tmp_path)
    rel = path.relative_to(tmp_path / "raw")
    assert doc["input"]["corrupt_lines"] == 2
    assert doc["input"]["corrupt_line_locations"] == [f"{rel}:11", f"{rel}:21"]
    assert f"corrupt line {rel}:11 skipped" in caplog.text
    assert sum(v["message_count"] for v in doc["vehicles"]) == len(lines) - 2


def test_hour_boundaries(tmp_path, scanner):
    before = dt.datetime(2025, 10, 19, 17, 59, 59, 999000, tzinfo=UTC)
    after = dt.datetime(2025, 10, 19, 18, 0, 0, tzinfo=UTC)
    write(tmp_path, [record("EV-1", before, battery_soc=50.0)], hour=KEY)
    write(tmp_path, [record("EV-1", after, battery_soc=49.0)], hour=(2025, 10, 19, 18))
    doc17 = run(tmp_path)
    aggregator.aggregate_hour(tmp_path, HOUR + dt.timedelta(hours=1))
    doc18 = json.loads(aggregator.output_path(tmp_path, HOUR + dt.timedelta(hours=1)).read_bytes())
    assert doc17["vehicles"][0]["last_timestamp"] == "2025-10-19T17:59:59.999000Z"
    assert doc17["vehicles"][0]["message_count"] == doc18["vehicles"][0]["message_count"] == 1
    assert doc18["time_range"]["start"] == "2025-10-19T18:00:00Z"


def test_late_file_triggers_reaggregation(tmp_path, scanner):
    write(tmp_path, fleet(vehicles=2))
    now = HOUR + dt.timedelta(hours=2)
    assert [r.hour for r in aggregator.aggregate_pending(tmp_path, now)] == ["2025-10-19T17"]
    assert aggregator.aggregate_pending(tmp_path, now) == []  # up to date
    write(tmp_path, [record("EV-LATE", HOUR + dt.timedelta(minutes=30), battery_soc=10.0)], writer="late")
    (redo,) = aggregator.aggregate_pending(tmp_path, now)
    assert redo.vehicles == 3
    doc = json.loads(aggregator.output_path(tmp_path, HOUR).read_bytes())
    assert "EV-LATE" in [v["vehicle_id"] for v in doc["vehicles"]]
    manifest = json.loads(aggregator.manifest_path(tmp_path, HOUR).read_bytes())
    assert len(manifest["inputs"]) == 2


def test_open_hours_are_left_alone(tmp_path):
    write(tmp_path, fleet(vehicles=1))
    assert aggregator.aggregate_pending(tmp_path, HOUR + dt.timedelta(minutes=64)) == []  # not closed + 5 min yet
    assert len(aggregator.aggregate_pending(tmp_path, HOUR + dt.timedelta(minutes=65))) == 1


def test_large_hour_spilled_or_parallel_gives_the_same_bytes(tmp_path, monkeypatch, scanner):
    lines = fleet(vehicles=7, per_vehicle=300)
    write(tmp_path, lines[:1000], "a")
    write(tmp_path, lines[900:] + lines[:100], "b")
    write(tmp_path, lines[2000:], "c")
    whole = aggregator.output_path(tmp_path, HOUR)
    run(tmp_path)
    in_memory = whole.read_bytes()
    assert_aggregate_matches(tmp_path, HOUR)  # interleaved CAN ids, copies across files
    monkeypatch.setattr(driver, "PARALLEL_FROM_BYTES", 0)  # "large": partitions on disk
    monkeypatch.setattr(driver, "PARTITION_INPUT_BYTES", 50_000)  # ~20 of them
    monkeypatch.setattr(partitions, "CHUNK_BYTES", 30_000)
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 1)
    run(tmp_path)
    assert whole.read_bytes() == in_memory
    if scanner == "c":  # worker processes use the module's own scanner
        monkeypatch.setattr(driver.os, "cpu_count", lambda: 2)  # two scanning and two aggregating processes
        run(tmp_path)
        assert whole.read_bytes() == in_memory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("canpipe-aggregate-")]  # spill removed


def test_cross_check_with_duckdb(tmp_path, scanner):
    lines = fleet(vehicles=6)
    write(tmp_path, lines[:700], "a")
    write(tmp_path, lines[600:] + lines[:50], "b")  # duplicates across files
    doc = run(tmp_path)
    folder = hour_path(tmp_path / "raw", KEY)
    expected = {r["vehicle_id"]: r for r in duckdb_hour.run(str(folder / "*.jsonl"))}
    assert len(expected) == len(doc["vehicles"])
    for v in doc["vehicles"]:
        ref = expected[v["vehicle_id"]]
        assert v["message_count"] == ref["message_count"]
        assert v["duplicates_dropped"] == ref["duplicates_dropped"]
        assert v["first_timestamp"] == iso(ref["first_timestamp"].astimezone(UTC))
        assert v["last_timestamp"] == iso(ref["last_timestamp"].astimezone(UTC))
        assert v["cell_voltage_spread_max"] == pytest.approx(ref["cell_voltage_spread_max"])
        assert v["cell_temp_spread_max"] == pytest.approx(ref["cell_temp_spread_max"])
        for name in duckdb_hour.SIGNALS:
            for stat in ("min", "max", "avg"):
                assert v[name][stat] == pytest.approx(ref[f"{name}_{stat}"], rel=1e-9), (v["vehicle_id"], name, stat)


def test_bad_hour_names_the_option():
    with pytest.raises(ConfigError, match="--hour"):
        aggregator.parse_hour("2025-10-19 17h")


def test_next_run_is_five_past():
    assert aggregator.next_run(dt.datetime(2025, 1, 1, 10, 4, tzinfo=UTC)) == dt.datetime(2025, 1, 1, 10, 5, tzinfo=UTC)
    assert aggregator.next_run(dt.datetime(2025, 1, 1, 10, 5, tzinfo=UTC)) == dt.datetime(2025, 1, 1, 11, 5, tzinfo=UTC)


# --- the scanner twins -----------------------------------------------------------------------------------

odd_lines = [
    b'{"vehicle_id":"EV-9","timestamp":"2025-10-19T17:00:01Z","can_id":"0x132","payload":{"battery_soc":1},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"}',  # other key order
    b'{"timestamp":"2025-10-19T19:00:01+02:00","vehicle_id":"EV-9","can_id":"0x132","payload":{"battery_soc":1},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"}',  # an offset
    b'{"timestamp":"2025-10-19T17:00:01Z","vehicle_id":"EV\\u0041","can_id":"0X1A","payload":{"battery_soc":1e1},'
    b'"ingest_received_at":"2025-10-19T17:00:02.5Z"}',  # escapes, exponent, upper-case hex
    b'{"timestamp":"2025-02-30T17:00:01Z","vehicle_id":"EV-9","can_id":"0x1","payload":{},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"}',  # no such day
    b'{"timestamp":"2025-10-19T17:00:01Z","vehicle_id":"EV-9","can_id":"0x1","payload":{"battery_soc":01},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"}',  # not JSON
    b'{"timestamp":"2025-10-19T17:00:01.1234567Z","vehicle_id":"EV-9","can_id":"0x1","payload":{"battery_soc":-0.0},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"}',
    b'{"timestamp":"2025-10-19T17:00:01Z","vehicle_id":"EV-9","can_id":"0x1","payload":{"battery_soc":null},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"} ',
    b"   ",
    b'{"timestamp":"2025-10-19T17:00:01Z","vehicle_id":"EV-\xff","can_id":"0x1","payload":{},'
    b'"ingest_received_at":"2025-10-19T17:00:02Z"}',  # not UTF-8
]


@pytest.mark.skipif(
    jsonl.IMPLEMENTATION != "c", reason="compiled scanner not selected (CANPIPE_NO_EXTENSIONS=1, or not built)"
)
@pytest.mark.parametrize("seed", range(5))
def test_scanner_twins_agree(seed):
    rng = random.Random(seed)
    lines = [line.rstrip(b"\n") for line in fleet(seed=seed, vehicles=3, per_vehicle=30)] + odd_lines
    rng.shuffle(lines)
    data = b"\n".join(lines) + b"\n"
    va, vb = {}, {}
    a, b = jsonl.parse_lines(data, va), _jsonl_py.parse_lines(data, vb)
    assert va == vb and a.bad_lines == b.bad_lines and a.lines == b.lines == len(lines), f"seed {seed}"
    for name in ("timestamp_us", "ingest_us", "vehicle", "can_id"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), (name, f"seed {seed}")
    assert np.array_equal(a.values, b.values, equal_nan=True) and math.copysign(1, -0.0) == -1


# --- time order across CAN ids, against plain arithmetic (issue 8, defect 1) ------------------------------


def test_interleaved_can_ids_give_soc_change_and_throughput_in_time_order(tmp_path, scanner):
    # one vehicle, two CAN ids alternating each second: SOC 80 -> 77 and 100 A for three seconds
    ids = ["0x292", "0x132"]
    lines = [
        record("EV-1", HOUR + dt.timedelta(seconds=k), ids[k % 2], battery_soc=80.0 - k, battery_current=100.0)
        for k in range(4)
    ]
    write(tmp_path, lines)
    (v,) = run(tmp_path)["vehicles"]
    assert v["soc_change"] == -3.0
    assert v["charge_throughput_ah"] == pytest.approx(100.0 * 3 / 3600, rel=1e-12)  # 0.0833 Ah, not 0.111


def test_each_signal_integrates_between_its_own_samples(tmp_path, scanner):
    # 0x132 carries current every 2 s, 0x292 only SOC in between: the integral must span the SOC frames
    lines = [record("EV-1", HOUR + dt.timedelta(seconds=2 * k), "0x132", battery_current=60.0) for k in range(6)]
    lines += [record("EV-1", HOUR + dt.timedelta(seconds=2 * k + 1), "0x292", battery_soc=50.0 - k) for k in range(5)]
    write(tmp_path, lines)
    (v,) = run(tmp_path)["vehicles"]
    assert v["charge_throughput_ah"] == pytest.approx(60.0 * 10 / 3600, rel=1e-12)
    assert v["soc_change"] == -4.0 and v["energy_throughput_kwh"] == 0.0  # no frame carries the voltage


# --- one bad line, file or hour stops nothing else (issue 8, defect 7) ------------------------------------

BAD_LINES = [
    record("EV-000", HOUR, "0x" + "f" * 17, battery_soc=1.0),  # overflowed int64 in the Python scanner
    record("EV-000", HOUR, "10", battery_soc=1.0),  # no 0x: read as 0x10 before
    record("EV-000", HOUR, "0x1_0", battery_soc=1.0),  # int() takes underscores
    record("EV-000", HOUR, "0X10", battery_soc=1.0),
    record("EV-000", HOUR).replace(b'"payload":{}', b'"payload":{"battery_soc":1e400}'),  # inf in the compiled one
    record("EV-000", HOUR).replace(b'"payload":{}', b'"payload":{},"x":' + b"[" * 100_000 + b"]" * 100_000),
]


def test_bad_lines_are_reported_and_skipped_and_the_hour_is_aggregated(tmp_path, scanner, caplog):
    lines = fleet(vehicles=2, per_vehicle=50)
    for k, bad in enumerate(BAD_LINES):
        lines.insert(5 + 7 * k, bad)
    path = write(tmp_path, lines)
    doc = run(tmp_path)
    rel = path.relative_to(tmp_path / "raw")
    where = [f"{rel}:{6 + 7 * k}" for k in range(len(BAD_LINES))]
    assert doc["input"]["corrupt_lines"] == len(BAD_LINES) and doc["input"]["corrupt_line_locations"] == where
    assert all(f"corrupt line {w} skipped" in caplog.text for w in where)
    assert sum(v["message_count"] for v in doc["vehicles"]) == 100
    assert_aggregate_matches(tmp_path, HOUR)


def test_a_writer_the_door_would_refuse_is_counted_listed_to_100_and_logged_in_bounded_lines(tmp_path, scanner, caplog):
    # a CAN id the door refuses (0X...) on every line: corrupt, and 250 of them must not mean 250 log lines
    good = fleet(vehicles=2, per_vehicle=10)
    foreign = [line.replace(b'"can_id":"0x', b'"can_id":"0X') for line in fleet(seed=9)[:250]]
    assert all(b'"0X' in line for line in foreign)
    path = write(tmp_path, good + foreign)
    doc = run(tmp_path)
    rel = path.relative_to(tmp_path / "raw")
    assert doc["input"]["corrupt_lines"] == 250 and sum(v["message_count"] for v in doc["vehicles"]) == 20
    assert doc["input"]["corrupt_line_locations"] == [f"{rel}:{n}" for n in range(21, 121)]
    messages = [r.getMessage() for r in caplog.records if r.name == "canpipe.aggregator.partitions"]
    assert len(messages) == 101 and messages[-1].startswith(f"150 more corrupt lines in {rel} skipped (lines 121-270")


def _as_other_writer(line: bytes, style: int) -> bytes:
    """The same record as another tool writes it: key order, separators, ``+00:00`` for ``Z``."""
    obj = json.loads(line)
    for key in ("timestamp", "ingest_received_at"):
        obj[key] = obj[key].replace("Z", "+00:00") if style % 2 else obj[key]
    keys = list(obj)[::-1] if style % 3 else list(obj)
    seps = (", ", ": ") if style % 4 < 2 else (",", ":")
    return json.dumps({k: obj[k] for k in keys}, separators=seps).encode() + b"\n"


def test_other_writers_lines_aggregate_to_the_same_bytes_as_the_receivers(tmp_path, scanner):
    lines = fleet(vehicles=4, per_vehicle=60)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write(ours, lines)
    write(theirs, [_as_other_writer(line, k) for k, line in enumerate(lines)])
    run(ours), run(theirs)
    assert aggregator.output_path(theirs, HOUR).read_bytes() == aggregator.output_path(ours, HOUR).read_bytes()
    assert_aggregate_matches(theirs, HOUR)


EXTRA_VALUES = ['"logger-7"', "17", "-1.5e3", "null", "true", "false", '{"a":[1,{"b":null}]}', "[]", "{}", '"é"']
EXTRA_VALUES += ['"a\\"b"', "1e400", "[" * 80 + "]" * 80]  # an escape, a number past float, deep nesting: the twin


def _with_extra_fields(line: bytes, k: int) -> bytes:
    """``line`` with fields the stored record does not have, at the top and in the payload, as other tools
    add them (a source, a sequence number, a nested object...)."""
    value = EXTRA_VALUES[k % len(EXTRA_VALUES)].encode()
    line = line.replace(b'"payload":{', b'"payload":{"coolant_temp":' + value + b",", 1) if k % 2 else line
    return line.replace(b"}\n", b',"source":' + value + b"}\n") if k % 3 else b'{"seq":' + value + b"," + line[1:]


def test_unknown_fields_are_ignored_and_the_hour_aggregates_to_the_same_bytes(tmp_path, scanner):
    lines = fleet(vehicles=4, per_vehicle=60)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write(ours, lines)
    foreign = [_with_extra_fields(line, k) for k, line in enumerate(lines)]
    assert all(a != b for a, b in zip(lines, foreign))
    write(theirs, foreign)
    run(ours)
    assert run(theirs)["input"]["corrupt_lines"] == 0
    assert aggregator.output_path(theirs, HOUR).read_bytes() == aggregator.output_path(ours, HOUR).read_bytes()
    assert_aggregate_matches(theirs, HOUR)


def test_a_directory_named_like_a_raw_file_is_skipped(tmp_path, scanner, caplog):
    write(tmp_path, fleet(vehicles=2, per_vehicle=20))
    odd = hour_path(tmp_path / "raw", KEY) / "batch-0-odd.jsonl"
    odd.mkdir()
    doc = run(tmp_path)
    assert doc["input"]["files"] == 1 and sum(v["message_count"] for v in doc["vehicles"]) == 40
    assert f"{odd}: not a regular file, skipped" in caplog.text
    assert not aggregator.needs_aggregation(tmp_path, HOUR)


def _three_hours_the_middle_one_failing(data_dir: Path) -> list[dt.datetime]:
    """Hours 15, 16 and 17 with data; 16's output path is taken by a folder, so its aggregation fails
    (a real failure, whatever the user running the tests may read or write)."""
    hours = [HOUR - dt.timedelta(hours=2), HOUR - dt.timedelta(hours=1), HOUR]
    for n, hour in enumerate(hours):
        lines = [record(f"EV-{n}", hour + dt.timedelta(seconds=s), battery_soc=50.0) for s in range(10)]
        write(data_dir, [*lines, *BAD_LINES[:2]], hour=Hour.from_datetime(hour))
    aggregator.output_path(data_dir, hours[1]).mkdir(parents=True)
    return hours


def test_a_failing_hour_is_reported_and_the_others_are_aggregated(tmp_path, caplog):
    hours = _three_hours_the_middle_one_failing(tmp_path)
    now = HOUR + dt.timedelta(hours=2)
    results = aggregator.aggregate_pending(tmp_path, now)
    assert [type(r).__name__ for r in results] == ["HourResult", "HourFailure", "HourResult"]
    assert results[1].hour == "2025-10-19T16" and "Is a directory" in results[1].error
    assert "aggregating 2025-10-19T16 failed, going on with the other hours" in caplog.text
    for hour in (hours[0], hours[2]):
        assert_aggregate_matches(tmp_path, hour)
    # the failed hour is tried again on the next run; the others are up to date
    assert [r.hour for r in aggregator.aggregate_pending(tmp_path, now)] == ["2025-10-19T16"]


def test_canpipe_aggregate_does_every_other_hour_then_exits_non_zero(tmp_path, env):

    data_dir = tmp_path / "data"
    hours = _three_hours_the_middle_one_failing(data_dir)
    done = subprocess.run(
        [sys.executable, "-m", "engine", "aggregate", "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED 2025-10-19T16: IsADirectoryError"), done.stderr
    assert "aggregated 2025-10-19T15" in done.stdout and "aggregated 2025-10-19T17" in done.stdout
    assert "2 corrupt lines skipped" in done.stderr
    for hour in (hours[0], hours[2]):
        assert_aggregate_matches(data_dir, hour)
    one = subprocess.run(
        [sys.executable, "-m", "engine", "aggregate", "--data-dir", str(data_dir), "--hour", "2025-10-19T16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 1 and "FAILED 2025-10-19T16: IsADirectoryError" in one.stderr


def test_schedule_keeps_running_past_a_failing_hour(tmp_path, env, start):
    import signal

    from canpipe_testing import wait_for

    data_dir = tmp_path / "data"
    hours = _three_hours_the_middle_one_failing(data_dir)
    scheduled = start(["aggregate", "--schedule", "--data-dir", str(data_dir)], env)
    wait_for(lambda: "aggregated 2025-10-19T17" in scheduled.output(), 60, "the scheduler's catch-up run")
    assert "FAILED 2025-10-19T16" in scheduled.output() and scheduled.popen.poll() is None
    assert_aggregate_matches(data_dir, hours[2])
    assert scheduled.stop(signal.SIGTERM) == 0


def test_the_aggregator_imports_no_queue_receiver_or_consumer():
    # DESIGN.md: the aggregator reads files, never the queue; a fresh interpreter shows what it pulls in
    # (the package loads its modules on first use: name the ones an aggregation runs)
    modules = modules_loaded_by(
        ", ".join(f"engine.aggregator.{m}" for m in ("driver", "partitions", "rollup", "document"))
    )
    assert not [m for m in modules if m.split(".")[1] in ("queues", "receiver", "consumer", "publisher", "cli")]
    assert "engine.partitions" not in modules and "engine.aggregator.partitions" in modules


LOADED_BY_CLI = """
import sys
from engine.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
finally:
    print("\\nloaded:", " ".join(sys.modules))
"""
HEAVY = ("asyncio", "starlette", "granian", "aiobotocore", "botocore", "uvloop", "cantools")


def _loaded_by_cli(*argv: str) -> set[str]:
    # without coverage's subprocess measurement (CI's --cov): it loads hashlib and more into the child itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")}
    done = subprocess.run(
        [sys.executable, "-c", LOADED_BY_CLI, *argv], capture_output=True, text=True, timeout=60, check=True, env=env
    )
    return set(done.stdout.rsplit("loaded:", 1)[1].split())


def test_canpipe_aggregate_starts_without_numpy_and_never_loads_the_servers_libraries(tmp_path):
    # a cron job's start-up: --help and a run with nothing pending load no numpy; an hour loads numpy and
    # the kernels, but never the receiver's or the queue's libraries (or asyncio)
    for argv in (["aggregate", "--help"], ["aggregate", "--data-dir", str(tmp_path)]):
        modules = _loaded_by_cli(*argv)
        assert "numpy" not in modules and not modules & set(HEAVY), (argv, sorted(modules & {"numpy", *HEAVY}))
    # --help (any command's, from the shared start-up: engine, cli, config, logs) loads neither msgspec (the
    # JSON log encoder is built by the first JSON event) nor OpenSSL's hashlib nor difflib
    modules = _loaded_by_cli("aggregate", "--help")
    assert not modules & {"msgspec", "hashlib", "_hashlib", "difflib"}, sorted(modules)
    write(tmp_path, fleet(vehicles=2, per_vehicle=5))
    modules = _loaded_by_cli("aggregate", "--data-dir", str(tmp_path), "--hour", HOUR.strftime("%Y-%m-%dT%H"))
    assert aggregator.output_path(tmp_path, HOUR).exists()
    assert "numpy" in modules and not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_timestamps_text_is_the_same_vectorised_and_one_by_one_in_and_out_of_four_digit_years():
    from engine.aggregator import document

    inside = np.array([0, 1_760_893_201_500_000, 253_402_300_799_999_999], dtype=np.int64)
    outside = np.append(inside, -62_135_596_800_000_000)  # 0001-01-01: strftime's %Y is not zero-padded
    for us in (inside, outside):
        assert document.micros_timestamps(us) == [document.micros_timestamp(x) for x in us.tolist()]


def test_the_package_names_load_on_first_use_and_unknown_ones_fail():
    assert {"aggregate_hour", "parse_hour", "MAX_GAP_US"} <= set(dir(aggregator))
    assert aggregator.MAX_GAP_US == 60_000_000
    with pytest.raises(AttributeError, match="no attribute 'aggregate_minute'"):
        aggregator.aggregate_minute  # noqa: B018


class _StopAfter:
    """A stop signal that records each wait and is set after ``waits`` of them (no real sleeping)."""

    def __init__(self, waits: int) -> None:
        self.waits, self.waited_s = waits, []

    def is_set(self) -> bool:
        return len(self.waited_s) >= self.waits

    def wait(self, timeout: float | None = None) -> bool:
        self.waited_s.append(timeout)
        return self.is_set()


def test_the_schedule_catches_up_then_waits_for_each_next_five_past(tmp_path):
    write(tmp_path, fleet(vehicles=2, per_vehicle=10))
    # the clock is read once to pick the pending hours and once to plan the wait, each round
    times = iter([HOUR + dt.timedelta(hours=1, minutes=m, seconds=s) for m, s in [(20, 0), (20, 30), (65, 0), (65, 0)]])
    reported = []
    stop = _StopAfter(waits=2)
    aggregator.run_schedule(tmp_path, stop, reported.append, clock=lambda: next(times))
    assert [(r.hour, r.vehicles, r.records) for r in reported] == [("2025-10-19T17", 2, 20)]  # once: then up to date
    assert stop.waited_s == [44 * 60 + 30, 3600]  # 18:20:30 -> 19:05, then 19:05 -> 20:05
    assert aggregator.output_path(tmp_path, HOUR).exists()
