"""The equivalent-circuit pack (engine/battery.py): what a BMS engineer would check in its telemetry."""

from __future__ import annotations

import random

import msgspec
import pytest

from engine.battery import (
    CYCLE_PHASES,
    LFP_106S1P,
    NMC_96S46P,
    RESERVE_SOC,
    SPEED_TRACE_MPS,
    DutyCycle,
    PackModel,
    PackSpec,
    Phase,
    Vehicle,
)
from engine.schema import SIGNALS, Payload
from engine.simulator import PackModel as SimulatorPackModel

SPECS = pytest.mark.parametrize("spec", [NMC_96S46P, LFP_106S1P], ids=["NMC", "LFP"])


def run(pack: PackModel, seconds: float, dt_s: float = 1.0) -> list[dict[str, float]]:
    return [pack.step(dt_s) for _ in range(int(seconds / dt_s))]


def test_the_simulator_uses_this_model():
    assert SimulatorPackModel is PackModel


def test_same_seed_same_sequence_other_seed_other_sequence():
    def sequence(seed: int) -> list[dict[str, float]]:
        return run(PackModel(random.Random(seed)), 1800, 0.2)

    first = sequence(7)
    assert first == sequence(7), "seed 7 gave two different sequences"
    assert first != sequence(8)
    assert set(first[0]) == set(SIGNALS)


@SPECS
def test_soc_falls_while_driving(spec):
    pack = PackModel(random.Random(1), spec=spec, soc=80.0, ambient_c=20.0, schedule=DutyCycle.driving())
    records = run(pack, 30 * 60)
    socs = [r["battery_soc"] for r in records]
    assert socs[-1] < 80.0 - 2.0, f"{spec.chemistry.name}: 30 min of driving left SOC at {socs[-1]}"
    assert min(r["battery_current"] for r in records) < 0 < max(r["battery_current"] for r in records), "no regen"
    # regenerative braking gives some back while slowing down, but over any five minutes the pack loses charge
    assert all(later < earlier for earlier, later in zip(socs[::300], socs[300::300]))


@SPECS
@pytest.mark.parametrize("charger_kw", [11.0, 120.0], ids=["AC", "DC"])
def test_soc_rises_while_charging(spec, charger_kw):
    pack = PackModel(random.Random(2), spec=spec, soc=30.0, ambient_c=20.0, schedule=DutyCycle.charging(charger_kw))
    records = run(pack, 20 * 60)
    assert all(r["battery_current"] < 0 for r in records[:-1])
    assert all(b["battery_soc"] > a["battery_soc"] for a, b in zip(records, records[1:]))
    gained = records[-1]["battery_soc"] - 30.0
    # the charger's power, less the pack's losses, over 20 minutes
    expected = charger_kw * 1000 / (records[-1]["battery_voltage"]) * (20 / 60) / pack.capacity_ah * 100
    limit = spec.chemistry.max_charge_c * 100 * 20 / 60  # or the pack's charge current limit
    assert 0.8 * min(expected, limit) < gained < 1.1 * min(expected, limit)


@SPECS
def test_cc_cv_tapers_and_stops_at_the_target(spec):
    pack = PackModel(random.Random(3), spec=spec, soc=70.0, ambient_c=20.0, schedule=DutyCycle.charging(50.0, 100.0))
    records = run(pack, 3 * 3600)
    charging = [r for r in records if r["battery_current"] < 0]
    cc_amps = -charging[0]["battery_current"]
    assert -charging[-1]["battery_current"] < cc_amps / 4, "the current never tapered"
    cv = spec.chemistry.cv_v
    assert max(r["battery_voltage"] for r in charging) <= cv * spec.series * 1.002  # the OCV rises within a step
    assert max(r["cell_voltage_max"] for r in charging) < cv + 0.05
    assert records[-1]["battery_current"] == 0.0 and records[-1]["battery_soc"] > 97.0
    partial = PackModel(random.Random(3), spec=spec, soc=40.0, schedule=DutyCycle.charging(50.0, target_soc=80.0))
    assert 80.0 <= run(partial, 2 * 3600)[-1]["battery_soc"] < 80.2


def test_a_driver_at_the_reserve_goes_charging():
    pack = PackModel(random.Random(4), spec=NMC_96S46P, soc=RESERVE_SOC + 2, schedule=DutyCycle.driving(1.1))
    records = run(pack, 4 * 3600)
    assert min(r["battery_soc"] for r in records) > RESERVE_SOC - 0.5
    assert max(r["battery_soc"] for r in records) > 75.0  # charged at a DC stop, then drove on
    assert pack.schedule.phase.mode == "drive"


@SPECS
@pytest.mark.parametrize("ambient_c", [-20.0, 40.0])
def test_a_day_of_driving_idling_and_charging_stays_within_the_schema(spec, ambient_c):
    seed = int(ambient_c) + spec.series
    day = DutyCycle(
        [
            Phase("drive", 5400.0, speed_scale=1.1),
            Phase("idle", 1800.0, power_kw=2.0),
            Phase("drive", 3600.0),
            Phase("charge", 3600.0, power_kw=150.0, target_soc=90.0),
            Phase("idle", 7200.0, power_kw=0.05),
            Phase("drive", 7200.0, speed_scale=1.2),
            Phase("charge", 8 * 3600.0, power_kw=7.4, target_soc=100.0),
        ]
    )
    pack = PackModel(random.Random(seed), spec=spec, ambient_c=ambient_c, soc=60.0, schedule=day)
    modes = set()
    for second in range(24 * 3600):
        record = pack.step(1.0)
        modes.add(pack.schedule.phase.mode)
        try:
            msgspec.convert(record, Payload)  # the receiver's own ranges and min <= max rules
        except (msgspec.ValidationError, ValueError) as exc:
            raise AssertionError(f"seed {seed}, second {second}: {record}: {exc}") from exc
    assert modes == {"drive", "idle", "charge"}


def test_default_fleets_stay_within_the_schema_for_a_day():
    for seed in range(4):
        pack = PackModel(random.Random(seed))
        for second in range(0, 24 * 3600, 10):  # as two 5 s steps; 1 s steps: the test above
            record = pack.step(10.0)
            try:
                msgspec.convert(record, Payload)
            except (msgspec.ValidationError, ValueError) as exc:
                raise AssertionError(f"seed {seed}, second {second}: {record}: {exc}") from exc


@SPECS
def test_coulomb_counted_soc_matches_the_integral_of_current(spec):
    pack = PackModel(random.Random(5), spec=spec, soc=55.0, ambient_c=15.0)
    dt_s = 0.5
    records = run(pack, 6 * 3600, dt_s)
    ah = sum(r["battery_current"] for r in records) * dt_s / 3600.0
    soc_change = records[-1]["battery_soc"] - 55.0
    assert abs(soc_change) > 10.0  # the default schedule did drive or charge
    assert soc_change == pytest.approx(-ah / pack.capacity_ah * 100.0, abs=0.01)


def test_energy_per_distance_is_an_electric_cars():
    pack = PackModel(random.Random(6), spec=NMC_96S46P, soc=90.0, ambient_c=20.0, schedule=DutyCycle.driving())
    records = run(pack, len(SPEED_TRACE_MPS) - 1)
    kwh = sum(r["battery_voltage"] * r["battery_current"] for r in records) / 3600 / 1000
    km = sum(SPEED_TRACE_MPS) / 1000
    assert 10.0 < kwh / km * 100 < 25.0, f"{kwh / km * 100:.1f} kWh/100 km over the WLTC-like cycle"


def test_the_speed_trace_is_wltc_like():
    # the WLTC class 3 phases' published lengths (s), distances (m) and top speeds (km/h)
    wltc = {"low": (589, 3095, 56.5), "medium": (433, 4756, 76.6), "high": (455, 7162, 97.4)}
    wltc["extra_high"] = (323, 8254, 131.3)
    for name, ramps in CYCLE_PHASES.items():
        seconds, metres, top = wltc[name]
        assert sum(d for d, _ in ramps) == seconds, name
        distance = 0.0
        speed = 0.0
        for duration, end in ramps:
            distance += (speed + end) / 2 / 3.6 * duration
            speed = end
        assert distance == pytest.approx(metres, rel=0.05), name
        assert max(end for _, end in ramps) == top, name


def test_voltage_sags_under_load_and_recovers_at_rest():
    spec = NMC_96S46P
    load = DutyCycle(
        [Phase("idle", 600.0, power_kw=0.0), Phase("idle", 300.0, power_kw=80.0), Phase("idle", power_kw=0.0)],
        repeat=False,
    )
    pack = PackModel(random.Random(9), spec=spec, soc=60.0, ambient_c=20.0, schedule=load)
    records = run(pack, 600 + 300 + 1200)
    rest, first, last = records[599], records[600], records[899]
    released, later = records[900], records[-1]
    amps = first["battery_current"]
    assert amps > 150.0
    # the ohmic drop at once, then the polarisation builds while the load lasts
    assert rest["battery_voltage"] - first["battery_voltage"] > 0.9 * amps * spec.r0_ohm
    assert first["battery_voltage"] - last["battery_voltage"] > 0.5 * amps * spec.r1_ohm
    # released: the ohmic part comes back at once, the RC pair's over minutes
    assert released["battery_voltage"] - last["battery_voltage"] > 0.9 * amps * spec.r0_ohm
    assert later["battery_voltage"] - released["battery_voltage"] > 0.5 * amps * spec.r1_ohm
    # and the cells spread apart under load (their resistances differ), closing again at rest
    spread = {k: r["cell_voltage_max"] - r["cell_voltage_min"] for k, r in {"rest": rest, "load": last}.items()}
    assert spread["load"] > spread["rest"] + 0.002


@SPECS
def test_temperature_rises_under_heavy_load_and_relaxes_towards_ambient(spec):
    ambient = 20.0
    schedule = DutyCycle(
        [Phase("charge", 1800.0, power_kw=200.0, target_soc=95.0), Phase("idle", power_kw=0.0)], repeat=False
    )
    pack = PackModel(random.Random(10), spec=spec, soc=10.0, ambient_c=ambient, schedule=schedule)
    start = pack.step(1.0)
    records = run(pack, 1800)
    hot = records[-1]
    assert hot["cell_temp_max"] > start["cell_temp_max"] + 5.0, f"{start} -> {hot}"
    assert hot["cell_temp_max"] - hot["cell_temp_min"] > start["cell_temp_max"] - start["cell_temp_min"]
    rest = run(pack, 4 * 3600)
    excess = [r["cell_temp_max"] - ambient for r in rest]
    assert all(b <= a + 0.01 for a, b in zip(excess, excess[1:])), "cooled unevenly at rest"
    assert 0.0 < excess[-1] < 0.5 * (hot["cell_temp_max"] - ambient)
    assert rest[-1]["cell_temp_min"] > ambient - 0.5


def test_a_long_step_is_the_same_time_in_short_steps():
    short, long = (PackModel(random.Random(12), schedule=DutyCycle.charging(22.0)) for _ in range(2))
    for _ in range(5):
        short.step(5.0)
    assert long.step(30.0) == short.step(5.0)
    assert long.charge_ah == short.charge_ah < 0


def test_the_commuter_schedule_drives_first_then_mixes_phases():
    pack = PackModel(random.Random(13))
    modes = []
    for _ in range(48):
        run(pack, 1800, 5.0)
        modes.append(pack.schedule.phase.mode)
    assert modes[0] == "drive" and {"idle", "charge"} <= set(modes)


def test_vehicle_power():
    car = Vehicle()
    cruise_kw = car.battery_power_w(100 / 3.6, 0.0) / 1000
    assert 10.0 < cruise_kw < 25.0, "steady 100 km/h"
    assert car.battery_power_w(0.0, 0.0) == car.aux_w
    assert -car.max_regen_w + car.aux_w <= car.battery_power_w(25.0, -3.0) < 0
    assert car.battery_power_w(1.0, -1.0) == car.aux_w  # friction brakes at walking pace
    assert car.battery_power_w(40.0, 5.0) == car.max_power_w + car.aux_w


def test_bad_pack_specs_are_refused():
    with pytest.raises(ValueError, match="series"):
        PackSpec(series=0)
    with pytest.raises(ValueError, match="relative"):
        PackSpec(resistance_sd=0.5)
    with pytest.raises(ValueError, match="phase"):
        DutyCycle([])
    with pytest.raises(ValueError, match="drive, idle or charge"):
        Phase("Drive")  # type: ignore[arg-type]


@pytest.mark.parametrize(("soc", "ambient_c"), [(120.0, 200.0), (-10.0, -80.0)])
def test_a_pack_started_outside_the_ranges_still_reports_valid_values(soc, ambient_c):
    pack = PackModel(random.Random(14), soc=soc, ambient_c=ambient_c, schedule=DutyCycle.idle(0.0))
    for record in run(pack, 60):
        msgspec.convert(record, Payload)
    assert record["battery_soc"] == pack.soc == min(100.0, max(0.0, soc))


def test_a_schedule_that_does_not_repeat_stays_in_its_last_phase():
    schedule = DutyCycle([Phase("idle", 10.0, power_kw=1.0), Phase("drive", 10.0)], repeat=False)
    pack = PackModel(random.Random(15), soc=50.0, schedule=schedule)
    run(pack, 600)
    assert schedule.phase.mode == "drive" and schedule.index == 1
