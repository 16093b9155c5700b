"""The roll-up maths of one partition's rows: time order, exact dedup, per-vehicle statistics and integrals.

Rows are ordered by (vehicle, timestamp, CAN id) with one sort; copies of a record, equal on the dedup key
(vehicle_id, can_id, timestamp in microseconds), are then adjacent and all but the first (in file order)
are dropped. Count/min/max/mean of every signal, the two cell spreads and the time span come from one
group-by pass; SOC at the first and last sample and the charge and energy throughput follow time order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.kernels import GroupStats
from engine.kernels.jsonl import Columns
from engine.schema import SIGNALS

MAX_GAP_US = 60 * 1_000_000  # no integration across a gap longer than this (vehicle offline)
# rows of ``Columns.values``, looked up once in the one signal list
SOC, VOLTAGE, CURRENT = (SIGNALS.index(name) for name in ("battery_soc", "battery_voltage", "battery_current"))
CV_MIN, CV_MAX = SIGNALS.index("cell_voltage_min"), SIGNALS.index("cell_voltage_max")
CT_MIN, CT_MAX = SIGNALS.index("cell_temp_min"), SIGNALS.index("cell_temp_max")
# rows of the group-by: every signal, then the two spreads (V, degC) and the time (us since the epoch)
STAT_ROWS = (*SIGNALS, "cell_voltage_spread", "cell_temp_spread", "timestamp_us")
STAT = {name: row for row, name in enumerate(STAT_ROWS)}


@dataclasses.dataclass
class Totals:
    """Per-vehicle results, dense over vehicle indices."""

    stats: GroupStats  # over STAT_ROWS
    duplicates: np.ndarray  # copies dropped, per vehicle
    soc_first: np.ndarray  # percent, NaN: no SOC sample
    soc_last: np.ndarray
    charge_ah: np.ndarray  # integral of |current|, A h
    energy_kwh: np.ndarray  # integral of |voltage x current|, kW h
    latest_ingest_us: int = -1  # newest ingest_received_at aggregated, us since the epoch; -1: none


def new_totals(groups: int) -> Totals:
    return Totals(
        GroupStats(len(STAT_ROWS), groups),
        np.zeros(groups, np.int64),
        np.full(groups, np.nan),
        np.full(groups, np.nan),
        np.zeros(groups),
        np.zeros(groups),
    )


def merge_totals(into: Totals, part: Totals) -> None:
    """Add a partition's totals (partitions hold disjoint vehicles)."""
    into.stats.merge(part.stats)
    into.duplicates += part.duplicates
    for name in ("soc_first", "soc_last"):
        mine, theirs = getattr(into, name), getattr(part, name)
        mine[~np.isnan(theirs)] = theirs[~np.isnan(theirs)]
    into.charge_ah += part.charge_ah
    into.energy_kwh += part.energy_kwh
    into.latest_ingest_us = max(into.latest_ingest_us, part.latest_ingest_us)


def integrate(vehicle: np.ndarray, ts: np.ndarray, y: np.ndarray, groups: int) -> np.ndarray:
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


def order(vehicle: np.ndarray, can: np.ndarray, ts: np.ndarray) -> np.ndarray:
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


def add_rows(cols: Columns, totals: Totals) -> None:
    """Add rows (every vehicle's rows all here, in file order, global vehicle indices) to ``totals``."""
    rank = order(cols.vehicle, cols.can_id, cols.timestamp_us)
    v, t, c = cols.vehicle[rank], cols.timestamp_us[rank], cols.can_id[rank]
    dup = np.zeros(len(rank), dtype=bool)
    np.equal(v[1:], v[:-1], out=dup[1:])
    dup[1:] &= t[1:] == t[:-1]
    dup[1:] &= c[1:] == c[:-1]
    groups = totals.stats.groups
    vehicle, ts, ingest, values = cols.vehicle, cols.timestamp_us, cols.ingest_us, cols.values
    if dup.any():  # keep the first copy of each record, in input order for the group-by
        totals.duplicates += np.bincount(v[dup], minlength=groups)
        fresh = np.ones(len(rank), dtype=bool)
        fresh[rank[dup]] = False
        rank, v, t = rank[~dup], v[~dup], t[~dup]
        vehicle, ts, ingest, values = vehicle[fresh], ts[fresh], ingest[fresh], values[:, fresh]
    totals.latest_ingest_us = max(totals.latest_ingest_us, int(ingest.max()))
    # the signals, the two spreads and the time as rows of one group-by pass (order does not matter)
    rows = np.empty((len(STAT_ROWS), len(vehicle)))
    rows[: len(SIGNALS)] = values
    np.subtract(values[CV_MAX], values[CV_MIN], out=rows[STAT["cell_voltage_spread"]])
    np.subtract(values[CT_MAX], values[CT_MIN], out=rows[STAT["cell_temp_spread"]])
    rows[STAT["timestamp_us"]] = ts
    part = GroupStats(len(STAT_ROWS), groups)
    part.add(vehicle, rows)
    totals.stats.merge(part)
    # what depends on time order: SOC at the first and last sample, integrals over time; ``rank`` indexes
    # the rows as read, before duplicates were dropped
    soc, current, voltage = (np.take(cols.values[k], rank) for k in (SOC, CURRENT, VOLTAGE))
    has = ~np.isnan(soc)
    sv, ss = v[has], soc[has]
    if len(sv):
        change = sv[1:] != sv[:-1]
        first, last = np.r_[True, change], np.r_[change, True]
        totals.soc_first[sv[first]] = ss[first]
        totals.soc_last[sv[last]] = ss[last]
    totals.charge_ah += integrate(v, t, current, groups) / 3600.0
    totals.energy_kwh += integrate(v, t, voltage * current, groups) / 3.6e6
