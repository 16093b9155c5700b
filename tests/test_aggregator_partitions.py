"""The aggregator's partitions: an hour's raw files scanned into partitions by vehicle, spilled to files
and loaded back unchanged; a vehicle's partition does not depend on the process or the file order."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import multiprocessing

from canpipe_testing import make_record

from engine.aggregator.partitions import concatenate, load_partition, scan_files
from engine.schema import decode_records, encode_stored

VEHICLES = [f"EV-{i:05d}" for i in range(12)]
PARTITIONS = 32  # more partitions than vehicles: some stay empty
TORN_TAIL = b'{"timestamp":"2025-10-19T17:'


def stored(records: list[dict]) -> bytes:
    return encode_stored(decode_records(json.dumps(records).encode(), ndjson=False), dt.datetime.now(dt.UTC))


def write_hour(raw_dir):
    """Two raw files, vehicles interleaved; the second has a corrupt line (its 3rd) and a torn tail."""
    hour_dir = raw_dir / "year=2025/month=10/day=19/hour=17"
    hour_dir.mkdir(parents=True)
    first = [make_record(i, vehicle_id=VEHICLES[i % len(VEHICLES)], battery_soc=i / 2) for i in range(60)]
    second = [make_record(i, vehicle_id=VEHICLES[-1 - i % 5], battery_soc=i + 0.25) for i in range(60, 90)]
    (hour_dir / "a.jsonl").write_bytes(stored(first))
    lines = stored(second).splitlines(keepends=True)
    (hour_dir / "b.jsonl").write_bytes(b"".join(lines[:2]) + b"not json\n" + b"".join(lines[2:]) + TORN_TAIL)
    return [str(hour_dir / "a.jsonl"), str(hour_dir / "b.jsonl")], len(first) + len(second)


def rows(cols, vehicles: list[str]) -> list[tuple]:
    """Each row as (vehicle id, timestamp_us, ingest_us, can_id, values...), in the order held."""
    return [
        (vehicles[v], int(t), int(i), int(c), *cols.values[:, k].tolist())
        for k, (v, t, i, c) in enumerate(zip(cols.vehicle, cols.timestamp_us, cols.ingest_us, cols.can_id))
    ]


def spilled(spill_dir, tag: str, vehicles: list[str]) -> dict[int, list[tuple]]:
    """Partition -> its rows loaded back, for the partitions that have any."""
    out = {}
    for p in range(PARTITIONS):
        cols = load_partition(spill_dir, p, tag)
        if cols is not None:
            out[p] = rows(cols, vehicles)
    return out


def test_spilled_partitions_load_back_every_row_unchanged_grouped_by_vehicle(tmp_path):
    paths, records = write_hour(tmp_path / "raw")
    in_memory = scan_files(paths, str(tmp_path / "raw"), 1, None, "m")
    (tmp_path / "spill").mkdir()
    scan = scan_files(paths, str(tmp_path / "raw"), PARTITIONS, str(tmp_path / "spill"), "t0")

    assert scan.memory == []  # spilled, not held
    assert (scan.info.files, scan.info.records) == (2, records)
    assert scan.info.torn_tail_bytes == len(TORN_TAIL)
    assert scan.info.corrupt == ["year=2025/month=10/day=19/hour=17/b.jsonl:3"]
    expected = rows(concatenate(in_memory.memory), in_memory.vehicles)
    assert len(expected) == records

    parts = spilled(tmp_path / "spill", "t0", scan.vehicles)
    assert 0 < len(parts) < PARTITIONS
    owner = {}
    for p, part_rows in parts.items():
        for row in part_rows:
            assert owner.setdefault(row[0], p) == p, f"{row[0]} in partitions {owner[row[0]]} and {p}"
    assert sorted(owner) == VEHICLES
    for vehicle in VEHICLES:  # every row back, bit for bit, and a vehicle's rows in file order
        assert [r for r in parts[owner[vehicle]] if r[0] == vehicle] == [r for r in expected if r[0] == vehicle]
    assert sum(len(r) for r in parts.values()) == records


def test_a_vehicle_lands_in_the_same_partition_in_another_process_and_file_order(tmp_path):
    paths, _ = write_hour(tmp_path / "raw")
    (tmp_path / "spill").mkdir()
    here = scan_files(paths, str(tmp_path / "raw"), PARTITIONS, str(tmp_path / "spill"), "here")
    # a fresh interpreter (its own string-hash seed), reading the files in the other order
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = pool.submit(scan_files, paths[::-1], str(tmp_path / "raw"), PARTITIONS, str(tmp_path / "spill"), "x")
        there = there.result(timeout=60)
    assert there.vehicles != here.vehicles  # other local indices: the map must not depend on them

    def owners(tag, vehicles):
        return {p: {r[0] for r in part} for p, part in spilled(tmp_path / "spill", tag, vehicles).items()}

    assert owners("x", there.vehicles) == owners("here", here.vehicles)


def test_a_partition_with_no_rows_loads_as_none(tmp_path):
    assert load_partition(tmp_path, 0, "t0") is None
    assert list(tmp_path.iterdir()) == []  # and looking created no files
