"""Late data for a compacted hour: a small late file beside the main file, merged later; the lake (main + late
files) stays the deduplicated raw rows, and ``canpipe aggregate`` from it stays byte-identical to the JSONL path.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import shutil

import pyarrow.parquet as pq
import pytest
from test_lake import (
    HOUR,
    NEXT,
    TORN_TAIL,
    aggregates,
    fleet,  # noqa: F401 - the fixture
    fleet_records,
    from_lake,
    parquet_rows,
    record,
    stored,
    truth_rows,
    write_raw,
)

from engine.aggregator import aggregate_hour, output_path
from engine.errors import ConfigError
from engine.lake import compact, query
from engine.lake.compact import compact_hour, parquet_path, pending_hours

LATER = NEXT + dt.timedelta(minutes=20)


def lake_rows(data_dir, hour=HOUR) -> list[tuple]:
    """Every row of the hour's Parquet files (main and late), sorted as the main file is."""
    rows = [row for path in sorted(parquet_path(data_dir, hour).parent.glob("*.parquet")) for row in parquet_rows(path)]
    return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def from_raw(data_dir, hour=HOUR) -> bytes:
    """The hour's aggregate from its raw files alone (the Parquet folder out of the way meanwhile)."""
    lake = data_dir / "parquet"
    lake.rename(data_dir / "parquet.off")
    try:
        return aggregates(data_dir, [hour])[hour]
    finally:
        (data_dir / "parquet.off").rename(lake)


def late_files(data_dir, hour=HOUR) -> list[str]:
    return sorted(p.name for p in parquet_path(data_dir, hour).parent.glob("late-*.parquet"))


def test_late_files_keep_the_lake_exact_and_the_aggregate_byte_identical(fleet, caplog):  # noqa: F811
    """Late raw files whose names sort before, between and after the compacted ones (the aggregator adds a
    vehicle's values in the order of all the files), with copies of records the lake holds, a corrupt line
    and a torn tail: the late files hold only the new records, and the aggregate from main + late files is
    the JSONL aggregate to the byte."""
    data_dir, _ = fleet
    caplog.set_level(logging.INFO, logger="canpipe.lake")
    compact_hour(data_dir, HOUR)
    main = parquet_path(data_dir, HOUR)
    main_stat = main.stat()
    rng = random.Random(21)
    early = fleet_records(HOUR, rng, 5)
    write_raw(data_dir, "batch-0-early.jsonl", stored(early, LATER))  # sorts before every compacted file
    first = compact_hour(data_dir, HOUR)
    assert first.late and first.rows == len(early) and first.duplicates == 0

    lake_copies = [
        json.loads(line)
        for line in (data_dir / "raw").rglob("batch-1-a.jsonl").__next__().read_bytes().splitlines()[:4]
    ]
    for r in lake_copies:
        r.pop("ingest_received_at")
        r["payload"]["battery_soc"] = 1.0  # a later copy with another value: the first copy (in the lake) counts
    late = fleet_records(HOUR, rng, 6)
    lines = stored([*late, *lake_copies], LATER).splitlines(keepends=True)
    body = b"".join(lines[:2]) + b"not json\n" + b"".join(lines[2:]) + TORN_TAIL
    write_raw(data_dir, "batch-3-late.jsonl", body)  # sorts after every compacted file
    second = compact_hour(data_dir, HOUR)
    assert second.late and second.duplicates >= len(lake_copies)
    assert main.stat().st_mtime_ns == main_stat.st_mtime_ns  # the main file was not rewritten
    assert len(late_files(data_dir)) == 2 and lake_rows(data_dir) == truth_rows(data_dir)
    assert compact_hour(data_dir, HOUR).skipped and late_files(data_dir) == sorted([first.path.name, second.path.name])

    expected = from_raw(data_dir)
    caplog.clear()
    assert aggregates(data_dir, [HOUR])[HOUR] == expected and from_lake(caplog) == {"2025-10-19T17"}
    doc = json.loads(expected)
    assert doc["input"]["files"] == 4 and doc["input"]["corrupt_lines"] == 2
    assert doc["input"]["torn_tail_bytes"] == 2 * len(TORN_TAIL)

    # the query's parquet view holds the late rows, each record once
    (count,) = query.run(data_dir, "SELECT count(*) FROM parquet")[1][0]
    assert count == len(truth_rows(data_dir))


def test_the_lake_alone_with_late_files_aggregates_as_the_raw_files_did(fleet):  # noqa: F811
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    write_raw(data_dir, "batch-0-early.jsonl", stored(fleet_records(HOUR, random.Random(3), 10), LATER))
    assert compact_hour(data_dir, HOUR).late
    expected = aggregates(data_dir, [HOUR])[HOUR]
    shutil.rmtree(data_dir / "raw" / "year=2025/month=10/day=19/hour=17")
    output_path(data_dir, HOUR).unlink()

    aggregate_hour(data_dir, HOUR)
    assert output_path(data_dir, HOUR).read_bytes() == expected


def test_a_late_copy_that_comes_first_in_file_order_merges_the_hour(fleet):  # noqa: F811
    """A late file whose name sorts before the file holding the lake's copy of a record: the raw files keep
    the late copy (first in file order), so the lake must too: the hour is compacted whole."""
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    raw = next((data_dir / "raw").rglob("batch-2-b.jsonl")).read_bytes().splitlines()
    copy = json.loads(raw[0])
    copy.pop("ingest_received_at")
    copy["payload"]["battery_soc"] = 2.5
    write_raw(data_dir, "batch-1-0.jsonl", stored([copy], LATER))  # sorts before batch-2-b.jsonl

    result = compact_hour(data_dir, HOUR)
    assert not result.late and not result.skipped and late_files(data_dir) == []
    assert parquet_rows(parquet_path(data_dir, HOUR)) == truth_rows(data_dir)
    assert 2.5 in [row[3] for row in parquet_rows(parquet_path(data_dir, HOUR))]
    assert aggregates(data_dir, [HOUR])[HOUR] == from_raw(data_dir)


def test_late_files_are_merged_past_the_count_or_share_of_the_hour(fleet, monkeypatch):  # noqa: F811
    data_dir, _ = fleet
    monkeypatch.setattr(compact, "LATE_MAX_FILES", 2)
    compact_hour(data_dir, HOUR)
    rng = random.Random(5)
    for n in range(2):
        write_raw(data_dir, f"batch-5{n}-x.jsonl", stored(fleet_records(HOUR, rng, 3), LATER))
        assert compact_hour(data_dir, HOUR).late
    write_raw(data_dir, "batch-59-x.jsonl", stored(fleet_records(HOUR, rng, 3), LATER))
    third = compact_hour(data_dir, HOUR)  # a third late file would pass LATE_MAX_FILES: merged instead
    assert third.merged == 2 and not third.late and late_files(data_dir) == []
    assert parquet_rows(parquet_path(data_dir, HOUR)) == truth_rows(data_dir)

    rows = pq.ParquetFile(parquet_path(data_dir, HOUR)).metadata.num_rows
    write_raw(
        data_dir, "batch-60-big.jsonl", stored(fleet_records(HOUR, rng, int(rows * compact.LATE_MAX_FRACTION)), LATER)
    )
    big = compact_hour(data_dir, HOUR)  # more than LATE_MAX_FRACTION of the hour: merged at once
    assert not big.late and late_files(data_dir) == [] and lake_rows(data_dir) == truth_rows(data_dir)


def test_a_late_file_left_beside_a_merged_main_file_is_not_counted_twice(fleet, caplog):  # noqa: F811
    """A merge writes the main file, then deletes the late files; interrupted between the two (or a reader
    of S3 listing while the job uploads), main and late file hold the same rows: neither the aggregate nor the
    query's parquet view combines them, and the next compaction removes the late file."""
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    write_raw(data_dir, "batch-0-early.jsonl", stored(fleet_records(HOUR, random.Random(9), 10), LATER))
    late = compact_hour(data_dir, HOUR).path
    kept = late.read_bytes()
    compact_hour(data_dir, HOUR, force=True)
    main_rows = len(parquet_rows(parquet_path(data_dir, HOUR)))
    late.write_bytes(kept)  # as an interrupted merge leaves it
    caplog.set_level(logging.INFO, logger="canpipe.lake")

    assert aggregates(data_dir, [HOUR])[HOUR] == from_raw(data_dir) and not from_lake(caplog)
    # the query's parquet view leaves the merged late file out: each record once
    assert query.run(data_dir, "SELECT count(*) FROM parquet")[1][0] == (main_rows,)
    assert pending_hours(data_dir, NEXT + dt.timedelta(minutes=10)) == [HOUR]
    assert compact_hour(data_dir, HOUR).merged == 1 and late_files(data_dir) == []
    caplog.clear()
    assert aggregates(data_dir, [HOUR])[HOUR] == from_raw(data_dir)
    assert from_lake(caplog) == {"2025-10-19T17"}


def test_a_grown_compacted_file_compacts_the_hour_whole(fleet):  # noqa: F811
    """A raw file that grew since it was compacted (a local writer still appending): not a late file, the
    hour is compacted again from its raw files."""
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    path = next((data_dir / "raw").rglob("batch-1-a.jsonl"))
    with open(path, "ab") as f:
        f.write(stored(fleet_records(HOUR, random.Random(11), 4), LATER))
    result = compact_hour(data_dir, HOUR)
    assert not result.late and not result.skipped and late_files(data_dir) == []
    assert parquet_rows(parquet_path(data_dir, HOUR)) == truth_rows(data_dir)


@pytest.mark.parametrize("damage", ["main", "late"])
def test_a_damaged_piece_is_compacted_again_from_the_raw_files(fleet, damage):  # noqa: F811
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    write_raw(data_dir, "batch-0-early.jsonl", stored(fleet_records(HOUR, random.Random(4), 10), LATER))
    late = compact_hour(data_dir, HOUR).path
    target = parquet_path(data_dir, HOUR) if damage == "main" else late
    target.write_bytes(target.read_bytes()[:-100])

    assert aggregates(data_dir, [HOUR])[HOUR] == from_raw(data_dir)
    result = compact_hour(data_dir, HOUR)
    assert not result.skipped and not result.late and late_files(data_dir) == []
    assert parquet_rows(parquet_path(data_dir, HOUR)) == truth_rows(data_dir)


def test_a_large_hour_is_split_into_parts_at_the_size_target(fleet, monkeypatch, caplog):  # noqa: F811
    """Past ``CANPIPE_LAKE_FILE_BYTES`` the main file is several parts, sorted on from one to the next, with
    vehicles running on across them: the rows, the query and the aggregate are as with one file; fewer
    parts later delete the extra ones, and a missing part is never read as the hour."""
    data_dir, _ = fleet
    monkeypatch.setattr(compact, "ROW_GROUP_ROWS", 20)
    monkeypatch.setattr(compact, "file_bytes", lambda: 20_000)
    result = compact_hour(data_dir, HOUR)
    folder = parquet_path(data_dir, HOUR).parent
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) >= 2 and result.parquet_bytes == sum(p.stat().st_size for p in parts)
    sizes = [p.stat().st_size for p in parts]
    assert max(sizes) < 2 * min(sizes)  # even shares, no sliver at the end
    rows = [row for k in range(len(parts)) for row in parquet_rows(folder / f"part-{k}.parquet")]
    assert rows == truth_rows(data_dir)  # part after part: one sorted run
    (count,) = query.run(data_dir, "SELECT count(*) FROM parquet")[1][0]
    assert count == len(truth_rows(data_dir))
    caplog.set_level(logging.INFO, logger="canpipe.lake")
    assert aggregates(data_dir, [HOUR])[HOUR] == from_raw(data_dir) and from_lake(caplog) == {"2025-10-19T17"}
    assert compact_hour(data_dir, HOUR).skipped

    (folder / "part-1.parquet").unlink()  # a part lost: the hour is read from the raw files and compacted again
    caplog.clear()
    assert aggregates(data_dir, [HOUR])[HOUR] == from_raw(data_dir) and not from_lake(caplog)
    assert pending_hours(data_dir, NEXT + dt.timedelta(minutes=10)) == [HOUR]
    monkeypatch.setattr(compact, "file_bytes", lambda: 1 << 30)
    assert not compact_hour(data_dir, HOUR).skipped
    assert [p.name for p in folder.glob("*.parquet")] == ["part-0.parquet"]  # the extra parts are gone
    assert parquet_rows(folder / "part-0.parquet") == truth_rows(data_dir)


def test_the_file_size_target_is_a_setting(monkeypatch):
    monkeypatch.setenv("CANPIPE_LAKE_FILE_BYTES", str(256 << 20))
    assert compact.file_bytes() == 256 << 20
    monkeypatch.delenv("CANPIPE_LAKE_FILE_BYTES")
    assert compact.file_bytes() == 512 << 20
    for bad in ("1000", "lots"):
        monkeypatch.setenv("CANPIPE_LAKE_FILE_BYTES", bad)
        with pytest.raises(ConfigError, match="CANPIPE_LAKE_FILE_BYTES"):
            compact.file_bytes()


def test_late_rows_of_vehicles_the_main_file_does_not_hold(fleet, caplog):  # noqa: F811
    """Vehicles first seen in a late file, sorting before, among and after the main file's: each rolled up
    with all its rows, the aggregate byte-identical."""
    data_dir, _ = fleet
    compact_hour(data_dir, HOUR)
    late = [record(i, vehicle, battery_soc=40 + i / 7) for i in range(3) for vehicle in ("AA-1", "EV-15", "ZZ-9")]
    write_raw(data_dir, "batch-7-new.jsonl", stored(late, LATER))
    assert compact_hour(data_dir, HOUR).late
    caplog.set_level(logging.INFO, logger="canpipe.lake")
    doc = aggregates(data_dir, [HOUR])[HOUR]
    assert from_lake(caplog) == {"2025-10-19T17"} and doc == from_raw(data_dir)
    assert {"AA-1", "EV-15", "ZZ-9"} <= {v["vehicle_id"] for v in json.loads(doc)["vehicles"]}
