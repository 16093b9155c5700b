"""The aggregator against plain arithmetic: its row order, and the ground truth of tests/canpipe_truth.py
on random hours where vehicles interleave CAN ids, with duplicates, retries, torn tails and corrupt lines."""

from __future__ import annotations

import datetime as dt
import json
import random
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
from canpipe_truth import assert_aggregate_matches, expected_aggregate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aggregator import HOUR, KEY, iso, record

from engine import aggregator
from engine.aggregator import partitions, rollup
from engine.kernels import _jsonl_py, jsonl
from engine.kernels.groupby import PyGroupStats
from engine.storage import hour_path


def test_ground_truth_by_hand():
    # the example, worked out on paper: 3 s at 100 A = 1/12 Ah; SOC 80 -> 77
    ids = ["0x292", "0x132"]
    lines = [
        record("EV-1", HOUR + dt.timedelta(seconds=k), ids[k % 2], battery_soc=80.0 - k, battery_current=100.0)
        for k in range(4)
    ]
    lines += [lines[2], b"not json\n", b"\n"]  # a copy, a corrupt line, a blank one
    lines.append(record("EV-1", HOUR + dt.timedelta(seconds=70), "0x132", battery_current=50.0, battery_voltage=400.0))
    truth = expected_aggregate(lines)
    (v,) = truth["vehicles"]
    assert (truth["records"], truth["duplicates_dropped"], truth["corrupt_lines"]) == (6, 1, 1)
    assert v["message_count"] == 5 and v["soc_change"] == -3.0
    assert v["charge_throughput_ah"] == 100.0 * 3 / 3600  # the 67 s step to the last frame is a gap
    assert v["energy_throughput_kwh"] == 0.0  # one frame carries a voltage: nothing to integrate
    assert v["battery_current"] == {"min": 50.0, "max": 100.0, "avg": 90.0, "count": 5}
    assert v["battery_voltage"]["count"] == 1 and v["cell_temp_min"]["avg"] is None
    assert v["first_timestamp"] == "2025-10-19T17:00:00.000000Z" and v["last_timestamp"].endswith("17:01:10.000000Z")


@pytest.mark.parametrize("case", ["packed", "extended ids ranked", "lexsort"])
def test_row_order_is_vehicle_then_time_then_can_id(case):
    rng = np.random.default_rng(7)
    n = 5_000
    vehicle = rng.integers(0, 40, n)
    ts = 1_760_893_200_000_000 + rng.integers(0, 3_600_000_000, n) // 250_000 * 250_000  # collisions
    ids = {"packed": [0x132, 0x292, 0x7FF], "extended ids ranked": [0x18FF50E5, 0x0CF00400, 0x132]}
    ids["lexsort"] = [0x18FF50E5, 0x132]
    can = rng.choice(np.array(ids[case], dtype=np.int64), n)
    if case == "lexsort":  # a range of times no pack can hold
        ts[::7] = rng.integers(0, 2**60, len(ts[::7]))
    order = rollup.order(vehicle, can, ts)
    assert np.array_equal(order, np.lexsort((np.arange(n), can, ts, vehicle)))  # stable: file order on ties


def _interleaved_hour(rng: random.Random, vehicles: int, rows: int, ids: list[str]) -> list[list[bytes]]:
    """Files of one hour: vehicles sending on several CAN ids in one time line (same-instant frames, gaps
    over a minute, signals present on some ids only), copies of records (redeliveries, and client
    retries with a later ingest time), a corrupt line and a torn tail now and then."""
    records = []
    for k in range(vehicles):
        t_ms = rng.randrange(0, 60_000)
        for _ in range(rows):
            t_ms += rng.choice([0, 0, 100, 250, 1000, 1000, 5000, 61_000, 300_000])
            ts = HOUR + dt.timedelta(milliseconds=min(t_ms, 3_599_999))
            payload = {}
            for name in jsonl.SIGNALS:
                if rng.random() < 0.6:
                    payload[name] = round(rng.uniform(-300.0, 450.0), rng.choice([0, 1, 3]))
            records.append(record(f"EV-{k}", ts, rng.choice(ids), **payload))
    lines = list(records)
    for line in rng.sample(records, k=rng.randrange(0, len(records) // 2 + 1)):
        if rng.random() < 0.3:  # a client retry: same record, received again later
            body = json.loads(line)
            body["ingest_received_at"] = iso(
                dt.datetime.fromisoformat(body["ingest_received_at"]) + dt.timedelta(seconds=3)
            )
            line = msgspec.json.encode(body) + b"\n"
        lines.append(line)
    rng.shuffle(lines)
    if rng.random() < 0.3:
        lines.insert(rng.randrange(len(lines) + 1), b'{"timestamp":"2025-10-19T17:00:00Z","can_id":"0x1_0"}\n')
    cuts = sorted(rng.sample(range(1, len(lines)), k=min(2, len(lines) - 1))) if len(lines) > 1 else []
    files = [lines[a:b] for a, b in zip([0, *cuts], [*cuts, len(lines)])]
    if rng.random() < 0.3:
        files[-1] = [*files[-1], records[0][:25]]  # a crash mid-write: a torn tail
    return files


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    vehicles=st.integers(1, 4),
    rows=st.integers(1, 40),
    ids=st.sampled_from([["0x132", "0x292"], ["0x132", "0x292", "0x7ff"], ["0x18FF50E5", "0x132"], ["0x1"]]),
)
def test_aggregates_equal_the_ground_truth_on_both_paths(seed, vehicles, rows, ids):
    files = _interleaved_hour(random.Random(seed), vehicles, rows, ids)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        for n, lines in enumerate(files):
            path = hour_path(data_dir / "raw", KEY) / f"batch-{n:04d}-w.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(lines))
        for path_name in ("c", "py"):
            if path_name == "c" and jsonl.IMPLEMENTATION != "c":
                continue
            with pytest.MonkeyPatch.context() as mp:
                if path_name == "py":  # both pure-Python twins: the scanner and the group-by
                    mp.setattr(partitions, "parse_lines", _jsonl_py.parse_lines)
                    mp.setattr(rollup, "GroupStats", PyGroupStats)
                aggregator.aggregate_hour(data_dir, HOUR)
                try:
                    assert_aggregate_matches(data_dir, HOUR)
                except AssertionError as exc:
                    raise AssertionError(
                        f"seed {seed}, {vehicles} vehicles x {rows} rows, ids {ids}, {path_name}"
                    ) from exc


def test_the_ground_truth_check_catches_a_wrong_aggregate(tmp_path):
    from canpipe_truth import assert_every_hour_matches
    from test_aggregator import fleet, write

    write(tmp_path, fleet(vehicles=2, per_vehicle=30))
    later = HOUR + dt.timedelta(hours=1)
    write(tmp_path, [record("EV-9", later, battery_current=3.0)], hour=(2025, 10, 19, 18))
    for hour in (HOUR, later):
        aggregator.aggregate_hour(tmp_path, hour)
    assert assert_every_hour_matches(tmp_path) == 2
    out = aggregator.output_path(tmp_path, HOUR)
    doc = json.loads(out.read_bytes())
    doc["vehicles"][1]["charge_throughput_ah"] *= 1 + 1e-6
    doc["vehicles"][0]["battery_soc"]["max"] += 0.01
    out.write_bytes(json.dumps(doc).encode())
    with pytest.raises(AssertionError) as failure:
        assert_every_hour_matches(tmp_path)
    assert "EV-001 charge_throughput_ah" in str(failure.value) and "EV-000 battery_soc.max" in str(failure.value)


def test_the_ground_truth_and_the_scanners_agree_on_what_a_record_is():
    from canpipe_truth import parse_record
    from test_kernels import CORPUS, EXTRA_FIELD_CASES, SKIPPED

    # the aggregator's scanners ignore unknown fields (extra="skip"): SKIPPED holds their verdicts on those
    for case, line, expected in [(c, line, SKIPPED.get(c, want)) for c, line, want in CORPUS] + EXTRA_FIELD_CASES:
        record_ = parse_record(line)
        assert (record_ is None) == (expected is None), case
        if record_ is not None:
            assert record_["can"] == expected[0] and record_["payload"].get("battery_soc") == expected[1], case


@pytest.mark.parametrize("no_extensions", ["1", "0"])
def test_canpipe_aggregate_equals_the_ground_truth_with_and_without_extensions(tmp_path, no_extensions):
    import os
    import subprocess
    import sys

    seed = 20261128
    for n, lines in enumerate(_interleaved_hour(random.Random(seed), 6, 300, ["0x132", "0x292", "0x18FF50E5"])):
        path = hour_path(tmp_path / "raw", KEY) / f"batch-{n:04d}-w.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(lines))
    env = os.environ | {"CANPIPE_NO_EXTENSIONS": no_extensions, "CANPIPE_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "aggregate", "--hour", "2025-10-19T17"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        assert_aggregate_matches(tmp_path, HOUR)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}, CANPIPE_NO_EXTENSIONS={no_extensions}") from exc
