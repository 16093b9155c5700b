"""Hourly aggregation: one hour of raw JSONL -> per-vehicle statistics, exact under duplicates and late data.

Reads the hour's files in chunks (bounded memory), turns stored lines into columns (``engine.kernels``
scanner), spreads the rows over hash partitions by vehicle (spilled to disk when the hour is large), and
per partition drops duplicates exactly on (vehicle_id, can_id, timestamp) with one sort, then computes
statistics with the group-by kernel. The output is written atomically and is byte-identical for the
same input; a manifest of the inputs (file names and sizes) tells when late data calls for a re-run.
The aggregator reads files, never the queue.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import numpy as np

from engine.errors import ConfigError, StorageError
from engine.kernels import GroupStats
from engine.kernels.jsonl import SIGNALS
from engine.partitions import InputReport, load_partition, scan_files
from engine.storage import hour_path

log = logging.getLogger("canpipe.aggregator")

UTC = dt.UTC
PARTITION_INPUT_BYTES = 320 * 1024 * 1024  # JSON per partition: ~1.1M rows, ~100 MB of columns
PARALLEL_FROM_BYTES = 256 * 1024 * 1024  # smaller hours: one process, in memory (~900k rows)
MAX_WORKERS = 8
MAX_GAP_US = 60 * 1_000_000  # no integration across a gap longer than this (vehicle offline)
SOC, VOLTAGE, CURRENT, CV_MIN, CV_MAX, CT_MIN, CT_MAX = range(7)


def parse_hour(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"--hour: expected YYYY-MM-DDTHH (UTC), got {text!r}") from None


def hour_label(hour: dt.datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


def iso_micros(us: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=int(us))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hour_inputs(data_dir: Path, hour: dt.datetime, warn: bool = False) -> list[Path]:
    """The hour's raw files, sorted by name: regular files only, since a directory (or a FIFO, which would
    block the open) named ``*.jsonl`` holds no records; ``warn`` logs each one skipped."""
    folder = hour_path(Path(data_dir) / "raw", (hour.year, hour.month, hour.day, hour.hour))
    files = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if path.is_file():
            files.append(path)
        elif warn:
            log.warning("%s: not a regular file, skipped", path)
    return files


def output_path(data_dir: Path, hour: dt.datetime) -> Path:
    return Path(data_dir) / "aggregated" / f"aggregated-{hour_label(hour)}.json"


def manifest_path(data_dir: Path, hour: dt.datetime) -> Path:
    return Path(data_dir) / "aggregated" / f"aggregated-{hour_label(hour)}.manifest.json"


class InputFile(msgspec.Struct):
    file: str
    bytes: int


class Manifest(msgspec.Struct):
    hour: str
    inputs: list[InputFile]
    output_bytes: int


def fingerprint(data_dir: Path, files: list[Path]) -> list[InputFile]:
    raw = Path(data_dir) / "raw"
    return [InputFile(str(path.relative_to(raw)), path.stat().st_size) for path in files]


def needs_aggregation(data_dir: Path, hour: dt.datetime) -> bool:
    """True when the hour has input and no manifest, or its files or sizes changed since (late data)."""
    files = hour_inputs(data_dir, hour)
    if not files:
        return False
    try:
        manifest = msgspec.json.decode(manifest_path(data_dir, hour).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return True
    return manifest.inputs != fingerprint(data_dir, files) or not output_path(data_dir, hour).exists()


def closed_hours(data_dir: Path, now: dt.datetime, grace: dt.timedelta = dt.timedelta(minutes=5)) -> list[dt.datetime]:
    """Every hour with raw files that ended at least ``grace`` before ``now``."""
    hours = []
    for folder in sorted((Path(data_dir) / "raw").glob("year=*/month=*/day=*/hour=*")):
        parts = [int(p.name.split("=")[1]) for p in (folder.parents[2], folder.parents[1], folder.parent, folder)]
        hour = dt.datetime(parts[0], parts[1], parts[2], parts[3], tzinfo=UTC)
        if hour + dt.timedelta(hours=1) + grace <= now:
            hours.append(hour)
    return hours


@dataclasses.dataclass
class _Totals:
    """Per-vehicle results, dense over vehicle indices."""

    stats: GroupStats
    duplicates: np.ndarray
    soc_first: np.ndarray
    soc_last: np.ndarray
    charge_ah: np.ndarray
    energy_kwh: np.ndarray
    latest_ingest_us: int = -1


def _new_totals(groups: int) -> _Totals:
    return _Totals(
        GroupStats(len(SIGNALS) + 3, groups),
        np.zeros(groups, np.int64),
        np.full(groups, np.nan),
        np.full(groups, np.nan),
        np.zeros(groups),
        np.zeros(groups),
    )


def _merge_totals(into: _Totals, part: _Totals) -> None:
    """Add a partition's totals (partitions hold disjoint vehicles)."""
    into.stats.merge(part.stats)
    into.duplicates += part.duplicates
    for name in ("soc_first", "soc_last"):
        mine, theirs = getattr(into, name), getattr(part, name)
        mine[~np.isnan(theirs)] = theirs[~np.isnan(theirs)]
    into.charge_ah += part.charge_ah
    into.energy_kwh += part.energy_kwh
    into.latest_ingest_us = max(into.latest_ingest_us, part.latest_ingest_us)


def _partition_job(spill_dir: str, p: int, tags: list[str], remaps: list[np.ndarray], groups: int) -> _Totals:
    """Totals of partition ``p``: every scan's rows for it, in file order, with global vehicle indices."""
    pieces = []
    for tag, remap in zip(tags, remaps):
        cols = load_partition(Path(spill_dir), p, tag)
        if cols is not None:
            cols[2] = remap[cols[2]]
            pieces.append(cols)
    totals = _new_totals(groups)
    if pieces:
        _partition_totals([np.concatenate([c[i] for c in pieces], axis=-1) for i in range(5)], totals)
    return totals


def _integrate(vehicle: np.ndarray, ts: np.ndarray, y: np.ndarray, groups: int) -> np.ndarray:
    """Trapezoid of |y| over time per vehicle, y-units x seconds. Rows are in (vehicle, ts, CAN id) order;
    only rows where y is present count (NaN: that frame does not carry the signal), so two CAN ids that
    interleave integrate each signal between its own samples. Two samples at the same instant (two ids
    carrying one signal) add no area; a gap over ``MAX_GAP_US`` (vehicle offline) is not bridged."""
    present = ~np.isnan(y)
    v, t, a = vehicle[present], ts[present], np.abs(y[present])
    if len(v) < 2:
        return np.zeros(groups)
    dt_us = np.diff(t)
    ok = (v[1:] == v[:-1]) & (dt_us > 0) & (dt_us <= MAX_GAP_US)
    area = 0.5 * (a[1:] + a[:-1]) * dt_us / 1e6
    return np.bincount(v[1:][ok], weights=area[ok], minlength=groups)


def _order(vehicle: np.ndarray, can: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Row order by vehicle, then time, then CAN id: the order of time-dependent quantities (SOC first and
    last, integrals), in which copies of a record are also adjacent for dedup. One sort of a packed int64
    key when the three fit in 63 bits (they do for an hour of standard CAN ids); extended ids are packed
    by rank (a few distinct values); else a three-key lexsort."""
    t0 = int(ts.min())
    bits_t = max(1, int(ts.max() - t0).bit_length())
    bits_v = max(1, int(vehicle.max()).bit_length())
    bits_c = max(1, int(can.max()).bit_length()) if int(can.min()) >= 0 else 64
    if bits_v + bits_c + bits_t > 63:
        ids, can = np.unique(can, return_inverse=True)  # same order, dense ranks: 29-bit ids need few bits
        bits_c = max(1, (len(ids) - 1).bit_length())
        if bits_v + bits_c + bits_t > 63:
            return np.lexsort((can, ts, vehicle))
    key = (vehicle << (bits_t + bits_c)) | ((ts - t0) << bits_c) | can
    return np.argsort(key, kind="stable")  # stable: the first copy of a duplicate (in file order) is kept


def _partition_totals(cols: list[np.ndarray], totals: _Totals) -> None:
    ts, ingest, vehicle, can, values = cols
    order = _order(vehicle, can, ts)
    v, t, c = vehicle[order], ts[order], can[order]
    dup = np.zeros(len(order), dtype=bool)
    np.equal(v[1:], v[:-1], out=dup[1:])
    dup[1:] &= t[1:] == t[:-1]
    dup[1:] &= c[1:] == c[:-1]
    groups = totals.stats.groups
    if dup.any():  # keep the first copy of each record, in input order for the group-by
        totals.duplicates += np.bincount(v[dup], minlength=groups)
        fresh = np.ones(len(order), dtype=bool)
        fresh[order[dup]] = False
        order, v, t = order[~dup], v[~dup], t[~dup]
        vehicle, ts, ingest, values = vehicle[fresh], ts[fresh], ingest[fresh], values[:, fresh]
    totals.latest_ingest_us = max(totals.latest_ingest_us, int(ingest.max()))
    # the seven signals, the two spreads and the time as rows of one group-by pass (order does not matter)
    rows = np.empty((len(SIGNALS) + 3, len(vehicle)))
    rows[: len(SIGNALS)] = values
    np.subtract(values[CV_MAX], values[CV_MIN], out=rows[len(SIGNALS)])
    np.subtract(values[CT_MAX], values[CT_MIN], out=rows[len(SIGNALS) + 1])
    rows[len(SIGNALS) + 2] = ts
    part = GroupStats(len(SIGNALS) + 3, groups)
    part.add(vehicle, rows)
    totals.stats.merge(part)
    # what depends on time order: SOC at the first and last sample, integrals over time
    original = cols[4]  # ``order`` indexes the rows as read, before duplicates were dropped
    soc, current, voltage = (np.take(original[k], order) for k in (SOC, CURRENT, VOLTAGE))
    has = ~np.isnan(soc)
    sv, ss = v[has], soc[has]
    if len(sv):
        change = sv[1:] != sv[:-1]
        first, last = np.r_[True, change], np.r_[change, True]
        totals.soc_first[sv[first]] = ss[first]
        totals.soc_last[sv[last]] = ss[last]
    totals.charge_ah += _integrate(v, t, current, groups) / 3600.0
    totals.energy_kwh += _integrate(v, t, voltage * current, groups) / 3.6e6


class HourResult(msgspec.Struct):
    hour: str
    path: str
    vehicles: int
    records: int
    duplicates_dropped: int
    files: int
    torn_tail_bytes: int
    corrupt_lines: int


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _document(hour: dt.datetime, vehicles: dict[str, int], totals: _Totals, info: InputReport) -> dict:
    stats = totals.stats
    minimum, maximum, mean = stats.minimum, stats.maximum, stats.mean()
    rows = []
    for vehicle_id, k in sorted(vehicles.items()):
        count = int(stats.records[k]) if k < stats.groups else 0
        if count == 0:
            continue
        entry: dict[str, object] = {"vehicle_id": vehicle_id, "message_count": count}
        for s, name in enumerate(SIGNALS):
            entry[name] = {"min": _number(minimum[s, k]), "max": _number(maximum[s, k]), "avg": _number(mean[s, k])}
        n = len(SIGNALS)
        entry["duplicates_dropped"] = int(totals.duplicates[k])
        entry["first_timestamp"] = iso_micros(int(minimum[n + 2, k]))
        entry["last_timestamp"] = iso_micros(int(maximum[n + 2, k]))
        entry["cell_voltage_spread_max"] = _number(maximum[n, k])
        entry["cell_temp_spread_max"] = _number(maximum[n + 1, k])
        entry["soc_change"] = _number(totals.soc_last[k] - totals.soc_first[k])
        entry["charge_throughput_ah"] = float(totals.charge_ah[k])
        entry["energy_throughput_kwh"] = float(totals.energy_kwh[k])
        rows.append(entry)
    return {
        # the ingest time of the newest record aggregated: "as of", and the same on every re-run
        "aggregation_timestamp": iso_micros(totals.latest_ingest_us) if totals.latest_ingest_us >= 0 else None,
        "time_range": {
            "start": hour.strftime("%Y-%m-%dT%H:00:00Z"),
            "end": (hour + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:00:00Z"),
        },
        "vehicles": rows,
        "input": {
            "files": info.files,
            "records": info.records,
            "duplicates_dropped": int(totals.duplicates.sum()),
            "torn_tail_bytes": info.torn_tail_bytes,
            "corrupt_lines": info.corrupt_count,
            "corrupt_line_locations": info.corrupt,
        },
    }


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def aggregate_hour(data_dir: Path, hour: dt.datetime) -> HourResult:
    """Aggregate one hour; write ``aggregated/aggregated-<hour>.json`` and its manifest.

    Small hours run in this process, in memory. Large ones are scanned by one process per core, each
    over a contiguous block of the (sorted) files, into partition files; then one process per core
    aggregates partitions. Rows of a vehicle are always summed in file order, so the bytes written do
    not depend on the number of processes or partitions.
    """
    data_dir = Path(data_dir)
    files = hour_inputs(data_dir, hour, warn=True)
    inputs = fingerprint(data_dir, files)
    total_bytes = sum(i.bytes for i in inputs)
    large = total_bytes >= PARALLEL_FROM_BYTES
    count = max(1, math.ceil(total_bytes / PARTITION_INPUT_BYTES)) if large else 1
    workers = min(os.cpu_count() or 1, MAX_WORKERS) if large else 1
    raw = str(data_dir / "raw")
    spill = Path(tempfile.mkdtemp(prefix="canpipe-aggregate-", dir=data_dir)) if count > 1 or workers > 1 else None
    try:
        blocks = _blocks([str(f) for f in files], [i.bytes for i in inputs], workers)
        tags = [f"s{k}" for k in range(len(blocks))]
        jobs = [(block, raw, count, str(spill) if spill else None, tag) for block, tag in zip(blocks, tags)]
        with _pool(workers) as pool:
            scans = list(pool.map(scan_files, *zip(*jobs))) if jobs else []
            names = sorted({name for scan in scans for name in scan.vehicles})
            index = {name: k for k, name in enumerate(names)}
            remaps = [np.array([index[n] for n in scan.vehicles], dtype=np.int64) for scan in scans]
            info = InputReport()
            for scan in scans:
                info.add(scan.info)
            totals = _new_totals(len(names))
            if spill is None:
                pieces = []
                for scan, remap in zip(scans, remaps):
                    for cols in scan.memory:
                        cols[2] = remap[cols[2]]
                        pieces.append(cols)
                    scan.memory = []
                if pieces:
                    columns = [np.concatenate([c[i] for c in pieces], axis=-1) for i in range(5)]
                    del pieces  # the chunks are copied: free them before the sort
                    _partition_totals(columns, totals)
            else:
                parts = pool.map(
                    _partition_job,
                    [str(spill)] * count,
                    range(count),
                    [tags] * count,
                    [remaps] * count,
                    [len(names)] * count,
                )
                for part in parts:
                    _merge_totals(totals, part)
    except OSError as exc:
        raise StorageError(f"aggregating {hour_label(hour)}: {exc}") from exc
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    document = _document(hour, index, totals, info)
    body = msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"
    out = output_path(data_dir, hour)
    write_atomically(out, body)
    write_atomically(manifest_path(data_dir, hour), msgspec.json.encode(Manifest(hour_label(hour), inputs, len(body))))
    return HourResult(
        hour_label(hour),
        str(out),
        len(document["vehicles"]),
        info.records,
        document["input"]["duplicates_dropped"],
        info.files,
        info.torn_tail_bytes,
        info.corrupt_count,
    )


def _blocks(paths: list[str], sizes: list[int], workers: int) -> list[list[str]]:
    """Contiguous blocks of the sorted files, of about equal bytes, one per worker."""
    if workers <= 1 or len(paths) <= 1:
        return [paths] if paths else []
    target = sum(sizes) / workers
    blocks: list[list[str]] = [[]]
    filled = 0
    for path, size in zip(paths, sizes):
        if filled >= target * len(blocks) and len(blocks) < workers:
            blocks.append([])
        blocks[-1].append(path)
        filled += size
    return blocks


class _InProcess:
    """The executor interface, run in this process (small hours: no start-up cost)."""

    def map(self, fn, *iterables):  # noqa: ANN001, ANN201
        return map(fn, *iterables)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _pool(workers: int) -> concurrent.futures.Executor | _InProcess:
    if workers <= 1:
        return _InProcess()
    # fork: the workers start at once with everything imported (the aggregator runs no threads of its own)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


class HourFailure(msgspec.Struct):
    """An hour that could not be aggregated, and why (``aggregate_pending`` went on with the others)."""

    hour: str
    error: str


def aggregate_isolated(data_dir: Path, hour: dt.datetime) -> HourResult | HourFailure:
    """``aggregate_hour``, with any failure logged (traceback included) and returned, not raised."""
    try:
        return aggregate_hour(data_dir, hour)
    except Exception as exc:  # any failure of one hour: the caller goes on with the others
        log.error("aggregating %s failed, going on with the other hours", hour_label(hour), exc_info=True)
        return HourFailure(hour_label(hour), f"{type(exc).__name__}: {exc}")


def aggregate_pending(data_dir: Path, now: dt.datetime | None = None) -> list[HourResult | HourFailure]:
    """Every closed hour not yet aggregated, or whose input changed since. Hours are isolated: one that
    fails (unreadable file, a bug on odd data) is logged and reported as an ``HourFailure``, and the later
    hours are still aggregated; it is tried again on the next run, since it has no manifest."""
    now = now or dt.datetime.now(UTC)
    results: list[HourResult | HourFailure] = []
    for hour in closed_hours(data_dir, now):
        try:
            pending = needs_aggregation(data_dir, hour)
        except OSError as exc:  # the hour's folder cannot be listed or its files stat'ed
            log.error("checking %s failed, going on with the other hours: %s", hour_label(hour), exc)
            results.append(HourFailure(hour_label(hour), f"{type(exc).__name__}: {exc}"))
            continue
        if pending:
            results.append(aggregate_isolated(data_dir, hour))
    return results


def next_run(now: dt.datetime, minute: int = 5) -> dt.datetime:
    """The next HH:05:00 UTC strictly after ``now``."""
    candidate = now.replace(minute=minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + dt.timedelta(hours=1)
