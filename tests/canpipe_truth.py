"""Ground truth for the hourly aggregator, in plain Python: what an hour's aggregate must be, from its lines.

Deliberately independent of the aggregator's code path (stdlib ``json`` and ``datetime``, dicts and
loops, no numpy, no msgspec): a test compares the two. The rules are DESIGN.md's and the aggregator's
documented ones:

- a line is a record when it is UTF-8, a JSON object with the five stored fields (and optionally ``dbc``,
  a string or null, on records decoded from CAN frames), ``can_id`` is ``0x`` + 1..8 hex digits, both
  timestamps carry a UTC offset and every signal in the payload is a finite number or null; fields the
  record does not have (at the top or in the payload, any JSON value) are ignored, as other writers add
  them; any other non-blank line is corrupt (counted, no row); a file's last bytes without ``\\n`` are a
  torn tail;
- duplicates are dropped on (vehicle_id, can_id as a number, timestamp as an instant in microseconds),
  the first copy in file order (files sorted by name) kept;
- per vehicle: ``message_count``, ``{min, max, avg}`` of every signal over the records that carry it,
  first and last timestamp, the largest cell voltage and temperature spreads;
- time-dependent quantities walk the vehicle's records in (timestamp, CAN id) order: ``soc_change`` is
  the last SOC minus the first; charge (Ah) and energy (kWh) throughput are trapezoids of ``|current|`` and
  ``|voltage x current|`` between consecutive records that carry the signal, over steps of more than 0
  and at most ``MAX_GAP_US``.

Timestamps are read with ``datetime.fromisoformat``: forms canpipe never writes (more than 6 fraction
digits, which the aggregator's RFC 3339 reader rounds) are outside what this module checks.

Use ``expected_aggregate(lines)`` for a list of stored lines, or ``assert_aggregate_matches(data_dir,
hour)`` after an aggregation run (for example after a kill -9 fault test: ``canpipe aggregate --hour H``
or ``aggregate_hour``, then this): it reads the hour's raw files and the aggregator's output file and
fails with every difference listed. ``assert_every_hour_matches(data_dir)`` does it for every hour
folder (each must have been aggregated: ``canpipe aggregate --hour`` per hour, since ``canpipe
aggregate`` leaves hours that are not closed yet).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

from engine.aggregator import MAX_GAP_US, closed_hours, hour_label, output_path, parse_hour
from engine.schema import SIGNALS  # the names only: the arithmetic below is independent of the engine
from engine.storage import hour_path

FIELDS = {"timestamp", "vehicle_id", "can_id", "payload", "ingest_received_at"}
CAN_ID = re.compile(r"0x[0-9A-Fa-f]{1,8}")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
REL = 1e-9  # sums: the aggregator adds in another order (and pairs area terms differently)


def _micros(text: str) -> int:
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("naive timestamp")
    return (moment - EPOCH) // dt.timedelta(microseconds=1)


def _iso(us: int) -> str:
    return (EPOCH + dt.timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number a record may carry")


def parse_record(line: bytes) -> dict | None:
    """A stored line -> {vehicle, can, ts, ingest, payload}, or None when it is not a valid record."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        if b"\\u" in line:  # an escaped lone surrogate is no text (the door refuses it): UnicodeEncodeError
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        if not isinstance(obj, dict) or not FIELDS <= obj.keys():
            return None
        if not isinstance(obj.get("dbc", ""), str | None):  # a CAN-decoded record's DBC hash: raw data only
            return None
        vehicle, can, payload = obj["vehicle_id"], obj["can_id"], obj["payload"]
        if not (isinstance(vehicle, str) and isinstance(can, str) and CAN_ID.fullmatch(can)):
            return None
        if not isinstance(payload, dict):
            return None
        values = {}
        for name in SIGNALS:
            x = payload.get(name)
            if x is None:
                continue
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
                return None
            values[name] = float(x)
        return {
            "vehicle": vehicle,
            "can": int(can, 16),
            "ts": _micros(obj["timestamp"]),
            "ingest": _micros(obj["ingest_received_at"]),
            "payload": values,
        }
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None


def _integral(rows: list[tuple[int, float]]) -> float:
    """Trapezoid of |y| over (us, y) samples in time order, in y-units x seconds."""
    area = 0.0
    for (t0, y0), (t1, y1) in zip(rows, rows[1:]):
        if 0 < t1 - t0 <= MAX_GAP_US:
            area += (abs(y0) + abs(y1)) / 2 * (t1 - t0) / 1e6
    return area


def _vehicle(vehicle_id: str, records: list[dict], duplicates: int) -> dict:
    records = sorted(records, key=lambda r: (r["ts"], r["can"]))
    entry: dict = {"vehicle_id": vehicle_id, "message_count": len(records)}
    for name in SIGNALS:
        xs = [r["payload"][name] for r in records if name in r["payload"]]
        entry[name] = (
            {"min": min(xs), "max": max(xs), "avg": math.fsum(xs) / len(xs), "count": len(xs)}
            if xs
            else {"min": None, "max": None, "avg": None, "count": 0}
        )
    entry["duplicates_dropped"] = duplicates
    entry["first_timestamp"] = _iso(records[0]["ts"])
    entry["last_timestamp"] = _iso(records[-1]["ts"])
    for out, low, high in (
        ("cell_voltage_spread_max", "cell_voltage_min", "cell_voltage_max"),
        ("cell_temp_spread_max", "cell_temp_min", "cell_temp_max"),
    ):
        spreads = [r["payload"][high] - r["payload"][low] for r in records if {low, high} <= r["payload"].keys()]
        entry[out] = max(spreads) if spreads else None
    socs = [r["payload"]["battery_soc"] for r in records if "battery_soc" in r["payload"]]
    entry["soc_change"] = socs[-1] - socs[0] if socs else None
    current = [(r["ts"], r["payload"]["battery_current"]) for r in records if "battery_current" in r["payload"]]
    power = [
        (r["ts"], r["payload"]["battery_voltage"] * r["payload"]["battery_current"])
        for r in records
        if {"battery_voltage", "battery_current"} <= r["payload"].keys()
    ]
    entry["charge_throughput_ah"] = _integral(current) / 3600.0
    entry["energy_throughput_kwh"] = _integral(power) / 3.6e6
    return entry


def expected_aggregate(lines: list[bytes]) -> dict:
    """The aggregate of these stored lines (in file order, each one line with or without its ``\\n``):
    ``vehicles`` (sorted by id, the output's fields plus a ``count`` per signal), ``records`` (valid lines,
    copies included), ``duplicates_dropped``, ``corrupt_lines`` and ``aggregation_timestamp`` (the newest
    ``ingest_received_at`` among the records kept)."""
    kept: dict[tuple[str, int, int], dict] = {}
    duplicates: dict[str, int] = {}
    records = corrupt = 0
    for line in lines:
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            corrupt += 1
            continue
        records += 1
        key = (record["vehicle"], record["can"], record["ts"])
        if key in kept:
            duplicates[record["vehicle"]] = duplicates.get(record["vehicle"], 0) + 1
        else:
            kept[key] = record
    by_vehicle: dict[str, list[dict]] = {}
    for record in kept.values():
        by_vehicle.setdefault(record["vehicle"], []).append(record)
    return {
        "vehicles": [_vehicle(v, rows, duplicates.get(v, 0)) for v, rows in sorted(by_vehicle.items())],
        "records": records,
        "duplicates_dropped": sum(duplicates.values()),
        "corrupt_lines": corrupt,
        "aggregation_timestamp": _iso(max(r["ingest"] for r in kept.values())) if kept else None,
    }


def hour_lines(data_dir: Path, hour: dt.datetime) -> tuple[list[bytes], int, int]:
    """The complete lines of an hour's raw files (sorted by name), their number of files, and the bytes of
    torn tails (a last line without ``\\n``: never a record)."""
    folder = hour_path(Path(data_dir) / "raw", (hour.year, hour.month, hour.day, hour.hour))
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file()) if folder.is_dir() else []
    lines: list[bytes] = []
    torn = 0
    for path in files:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        torn += len(data) - end
        lines += data[:end].split(b"\n")[:-1]
    return lines, len(files), torn


def _close(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=REL, abs_tol=1e-12)  # type: ignore[arg-type]


def differences(expected: dict, actual: dict) -> list[str]:
    """Every way an aggregator output document differs from ``expected_aggregate``'s result: counts, min,
    max, timestamps and first/last values exactly, sums (avg, throughput, SOC change) within ``REL``."""
    diffs = []
    inputs = actual.get("input", {})
    for name in ("records", "duplicates_dropped", "corrupt_lines"):
        if inputs.get(name) != expected[name]:
            diffs.append(f"input.{name}: {inputs.get(name)} != expected {expected[name]}")
    as_of, want_as_of = actual.get("aggregation_timestamp"), expected["aggregation_timestamp"]
    if as_of != want_as_of:
        diffs.append(f"aggregation_timestamp: {as_of} != expected {want_as_of}")
    mine = {v["vehicle_id"]: v for v in actual.get("vehicles", [])}
    want = {v["vehicle_id"]: v for v in expected["vehicles"]}
    if sorted(mine) != sorted(want):
        diffs.append(f"vehicles: {sorted(mine)} != expected {sorted(want)}")
    for vid in sorted(mine.keys() & want.keys()):
        got, ref = mine[vid], want[vid]
        exact = ["message_count", "duplicates_dropped", "first_timestamp", "last_timestamp"]
        exact += ["cell_voltage_spread_max", "cell_temp_spread_max"]
        for name in exact:
            if got.get(name) != ref[name]:
                diffs.append(f"{vid} {name}: {got.get(name)} != expected {ref[name]}")
        for name in SIGNALS:
            for stat in ("min", "max"):
                if got[name][stat] != ref[name][stat]:
                    diffs.append(f"{vid} {name}.{stat}: {got[name][stat]} != expected {ref[name][stat]}")
            if not _close(got[name]["avg"], ref[name]["avg"]):
                diffs.append(f"{vid} {name}.avg: {got[name]['avg']} != expected {ref[name]['avg']}")
        for name in ("soc_change", "charge_throughput_ah", "energy_throughput_kwh"):
            if not _close(got.get(name), ref[name]):
                diffs.append(f"{vid} {name}: {got.get(name)} != expected {ref[name]}")
    return diffs


def assert_aggregate_matches(data_dir: Path, hour: dt.datetime | str) -> dict:
    """Assert that the aggregator's output file for ``hour`` (a datetime or ``YYYY-MM-DDTHH``) equals the
    ground truth of the hour's raw files; returns the output document. Run the aggregation first."""
    hour = parse_hour(hour) if isinstance(hour, str) else hour
    lines, files, torn = hour_lines(Path(data_dir), hour)
    expected = expected_aggregate(lines)
    out = output_path(Path(data_dir), hour)
    assert out.exists(), f"no aggregate for {hour_label(hour)}: {out} is missing"
    actual = json.loads(out.read_bytes())
    diffs = differences(expected, actual)
    inputs = actual.get("input", {})
    if (inputs.get("files"), inputs.get("torn_tail_bytes")) != (files, torn):
        diffs.append(f"input files/torn tail bytes: {inputs.get('files')}/{inputs.get('torn_tail_bytes')}")
        diffs[-1] += f" != expected {files}/{torn}"
    assert not diffs, f"aggregate of {hour_label(hour)} differs from the ground truth:\n" + "\n".join(diffs[:50])
    return actual


def assert_every_hour_matches(data_dir: Path) -> int:
    """``assert_aggregate_matches`` for every hour folder of ``data_dir`` (each must have been aggregated);
    returns the number of hours checked."""
    hours = closed_hours(Path(data_dir), dt.datetime.max.replace(tzinfo=dt.UTC), grace=dt.timedelta(0))
    for hour in hours:
        assert_aggregate_matches(data_dir, hour)
    return len(hours)
