"""An equivalent-circuit battery pack for the simulator: cells, OCV, RC pair, heat, and what the car asks of it.

Per vehicle: ``series`` groups of ``parallel`` cells; each group has its own capacity, resistance, starting
SOC and cooling drawn at construction, so the cell min/max voltage and temperature spread comes out of the
physics rather than from noise. The pack answers a duty cycle (driving a WLTC-like speed trace through a
vehicle model, idling, CC-CV charging on AC or DC). Equations and parameters: docs/simulator.md.

``step()`` costs a few microseconds (plain floats, table lookups, no numpy), so one core keeps up with tens
of thousands of records a second. Imports nothing else of canpipe.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Literal

GRAVITY = 9.81  # m/s^2
AIR_DENSITY = 1.2  # kg/m^3
MAX_STEP_S = 5.0  # a longer step is split so the explicit thermal update and CC-CV control stay accurate
REFRESH_S = 60.0  # simulated seconds between re-ranking all groups for the cell min/max candidates
RESERVE_SOC = 10.0  # a driver at this SOC stops and charges (DC, to 80 %)
SOC_GRID = 5.0  # the OCV tables have one point every 5 % SOC, from 0 to 100

# Open-circuit voltage per cell (V) at SOC 0, 5, ..., 100 %: typical NMC (21700) and LFP (prismatic) shapes.
NMC_OCV: tuple[float, ...] = (3.00, 3.35, 3.46, 3.53, 3.58, 3.61, 3.64, 3.67, 3.70, 3.73, 3.76)
NMC_OCV += (3.80, 3.84, 3.88, 3.92, 3.96, 4.00, 4.04, 4.08, 4.13, 4.19)
LFP_OCV: tuple[float, ...] = (2.50, 3.05, 3.18, 3.22, 3.25, 3.26, 3.27, 3.28, 3.29, 3.29, 3.30)
LFP_OCV += (3.30, 3.31, 3.31, 3.32, 3.32, 3.33, 3.34, 3.35, 3.40, 3.60)


@dataclasses.dataclass(frozen=True)
class Chemistry:
    """One cell type: its OCV table and its equivalent circuit (R0 in series with one R1 || C1 pair)."""

    name: str
    ocv_v: tuple[float, ...]  # at SOC 0, 5, ..., 100 %
    capacity_ah: float
    r0_ohm: float  # ohmic: the instant drop under load
    r1_ohm: float  # polarisation: the drop that builds and relaxes with time constant tau_s
    tau_s: float
    cv_v: float  # the charger holds a cell here in the CV phase
    max_charge_c: float  # charge current limit, in C (multiples of capacity_ah per hour)
    max_discharge_c: float


NMC = Chemistry("NMC", NMC_OCV, 4.8, 0.022, 0.012, 40.0, 4.18, 2.0, 3.0)
LFP = Chemistry("LFP", LFP_OCV, 161.0, 0.0007, 0.0004, 60.0, 3.58, 1.5, 3.0)


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """A pack: ``series`` x ``parallel`` cells, the spread between groups, and its lumped thermal mass."""

    chemistry: Chemistry = NMC
    series: int = 96
    parallel: int = 46
    capacity_sd: float = 0.015  # relative standard deviation of a group's capacity
    resistance_sd: float = 0.06  # relative standard deviation of a group's resistance
    soc_sd: float = 0.4  # imbalance: standard deviation of a group's starting SOC, percent points
    heat_capacity_j_per_k: float = 450_000.0  # cells, busbars, coolant
    cooling_w_per_k: float = 40.0  # passive convection to ambient
    active_cooling_w_per_k: float = 500.0  # the coolant loop, on above cooling_on_c, off below cooling_off_c
    cooling_on_c: float = 35.0
    cooling_off_c: float = 30.0

    def __post_init__(self) -> None:
        if self.series < 1 or self.parallel < 1:
            raise ValueError("a pack needs at least one cell in series and one in parallel")
        if not all(0.0 <= sd < 0.3 for sd in (self.capacity_sd, self.resistance_sd)):
            raise ValueError("capacity_sd and resistance_sd are relative: 0 to 0.3")

    @property
    def capacity_ah(self) -> float:
        return self.chemistry.capacity_ah * self.parallel

    @property
    def r0_ohm(self) -> float:
        return self.chemistry.r0_ohm * self.series / self.parallel

    @property
    def r1_ohm(self) -> float:
        return self.chemistry.r1_ohm * self.series / self.parallel


NMC_96S46P = PackSpec()  # ~80 kWh, 300-400 V
LFP_106S1P = PackSpec(chemistry=LFP, series=106, parallel=1, heat_capacity_j_per_k=420_000.0)  # ~56 kWh


@dataclasses.dataclass(frozen=True)
class Vehicle:
    """Road loads: what the battery must deliver for a speed and acceleration (W, + discharge)."""

    mass_kg: float = 1900.0
    rolling_resistance: float = 0.009
    drag_area_m2: float = 0.52  # Cd x frontal area
    drivetrain_efficiency: float = 0.90
    regen_efficiency: float = 0.65  # share of the braking power that reaches the pack
    regen_min_speed_mps: float = 1.5  # friction brakes only below this
    max_regen_w: float = 60_000.0
    max_power_w: float = 200_000.0
    aux_w: float = 500.0  # 12 V loads, pumps, a little HVAC

    def battery_power_w(self, speed_mps: float, accel_mps2: float) -> float:
        """Battery power at the wheel's demand: traction / efficiency, or recovered braking, plus auxiliaries."""
        if speed_mps <= 0.0:
            return self.aux_w
        wheel = speed_mps * (
            self.mass_kg * (accel_mps2 + GRAVITY * self.rolling_resistance)
            + 0.5 * AIR_DENSITY * self.drag_area_m2 * speed_mps * speed_mps
        )
        if wheel >= 0.0:
            return min(self.max_power_w, wheel / self.drivetrain_efficiency) + self.aux_w
        if speed_mps < self.regen_min_speed_mps:
            return self.aux_w
        return max(-self.max_regen_w, wheel * self.regen_efficiency) + self.aux_w


# A WLTC-class-3-like trace of linear ramps, in four phases of the WLTC's lengths (589, 433, 455, 323 s) and
# close to its distances (3.1, 4.8, 7.2, 8.3 km) and top speeds (56.5, 76.6, 97.4, 131.3 km/h).
Ramps = tuple[tuple[float, float], ...]  # (seconds, speed at the end in km/h), linear in between
_LOW: Ramps = ()
_LOW += ((11, 0), (6, 12), (8, 22), (10, 25), (7, 18), (8, 0), (35, 0), (10, 20), (12, 35), (20, 42))
_LOW += ((8, 30), (10, 0), (20, 0), (12, 28), (14, 47), (18, 50), (18, 56.5), (30, 44), (12, 30), (14, 0))
_LOW += ((30, 0), (10, 18), (12, 26), (15, 24), (12, 0), (35, 0), (14, 30), (25, 40), (20, 28), (14, 0))
_LOW += ((28, 0), (10, 20), (12, 33), (25, 30), (14, 0), (30, 0))
_MEDIUM: Ramps = ()
_MEDIUM += ((12, 0), (16, 40), (20, 50), (35, 52), (15, 30), (12, 0), (3, 0), (16, 45), (22, 62), (25, 70))
_MEDIUM += ((20, 76.6), (25, 60), (18, 30), (12, 0), (10, 0), (14, 35), (28, 50), (35, 55), (20, 40), (14, 0))
_MEDIUM += ((8, 0), (14, 38), (22, 48), (12, 0), (5, 0))
_HIGH: Ramps = ()
_HIGH += ((10, 0), (18, 50), (20, 70), (20, 80), (30, 72), (20, 60), (15, 35), (12, 0), (18, 0), (16, 55))
_HIGH += ((20, 80), (25, 92), (20, 97.4), (40, 88), (25, 70), (20, 50), (14, 25), (10, 0), (12, 0), (15, 50))
_HIGH += ((20, 75), (15, 80), (20, 60), (20, 0))
_EXTRA_HIGH: Ramps = ()
_EXTRA_HIGH += ((10, 0), (20, 60), (25, 90), (40, 110), (30, 120), (40, 126), (20, 131.3), (25, 125))
_EXTRA_HIGH += ((30, 110), (25, 90), (25, 60), (23, 30), (10, 0))
CYCLE_PHASES = {"low": _LOW, "medium": _MEDIUM, "high": _HIGH, "extra_high": _EXTRA_HIGH}


def _speed_trace(phases: Sequence[Sequence[tuple[float, float]]]) -> tuple[float, ...]:
    """The ramps sampled once a second, in m/s."""
    trace = [0.0]
    for ramps in phases:
        for seconds, end_kmh in ramps:
            start = trace[-1]
            for i in range(1, int(seconds) + 1):
                trace.append(start + (end_kmh / 3.6 - start) * i / seconds)
    return tuple(trace)


SPEED_TRACE_MPS = _speed_trace(tuple(CYCLE_PHASES.values()))  # one value per second, 1800 s
CYCLE_S = len(SPEED_TRACE_MPS) - 1

Mode = Literal["drive", "idle", "charge"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of a duty cycle.

    ``drive``: the speed trace times ``speed_scale``; ``idle``: stationary, ``power_kw`` of auxiliaries
    (HVAC) drawn; ``charge``: a charger of ``power_kw`` (AC ~7-22, DC 50-250), CC then CV, until
    ``target_soc`` or ``duration_s``, whichever comes first.
    """

    mode: Mode
    duration_s: float = math.inf
    power_kw: float = 0.0
    target_soc: float = 100.0
    speed_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("drive", "idle", "charge"):
            raise ValueError(f"a phase is drive, idle or charge, not {self.mode!r}")


class DutyCycle:
    """A sequence of phases the pack goes through, repeated when ``repeat``; stateful, one per pack."""

    def __init__(self, phases: Sequence[Phase], *, repeat: bool = True, cycle_offset_s: float = 0.0) -> None:
        if not phases:
            raise ValueError("a duty cycle needs at least one phase")
        self.phases, self.repeat = tuple(phases), repeat
        self.index, self.elapsed_s = 0, 0.0
        self.cycle_s = cycle_offset_s % CYCLE_S  # where in the speed trace driving resumes
        self.override: Phase | None = None  # a charge stop the pack forced (reserve reached)

    @property
    def phase(self) -> Phase:
        return self.override or self.phases[self.index]

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` pass in the current phase; move to the next one when it is over."""
        self.elapsed_s += dt_s
        if self.phase.mode == "drive":
            self.cycle_s = (self.cycle_s + dt_s) % CYCLE_S
        if self.elapsed_s >= self.phase.duration_s:
            self.next()

    def next(self) -> None:
        """End the current phase now (a charge that reached its target, or a forced stop)."""
        self.elapsed_s = 0.0
        if self.override:
            self.override = None
        elif self.index + 1 < len(self.phases) or self.repeat:
            self.index = (self.index + 1) % len(self.phases)
        else:  # the last phase of a non-repeating cycle goes on for ever
            self.elapsed_s = -math.inf

    def force(self, phase: Phase) -> None:
        """Insert ``phase`` now; once it ends, the phase it interrupted starts again."""
        self.override, self.elapsed_s = phase, 0.0

    @classmethod
    def driving(cls, speed_scale: float = 1.0, cycle_offset_s: float = 0.0) -> DutyCycle:
        return cls([Phase("drive", speed_scale=speed_scale)], cycle_offset_s=cycle_offset_s)

    @classmethod
    def idle(cls, power_kw: float = 0.5) -> DutyCycle:
        return cls([Phase("idle", power_kw=power_kw)])

    @classmethod
    def charging(cls, power_kw: float = 11.0, target_soc: float = 100.0) -> DutyCycle:
        """Charge to ``target_soc``, then stand (no load) for ever."""
        return cls([Phase("charge", power_kw=power_kw, target_soc=target_soc), Phase("idle")], repeat=False)

    @classmethod
    def commuter(cls, rng: random.Random) -> DutyCycle:
        """The default: drive 1-1.5 h, idle, drive, charge (AC, or DC half the time) to 80-95 %, park; repeat.

        Starts driving at a random point of the speed trace, so a fleet's vehicles are not in step."""
        charger_kw = rng.choice((7.4, 11.0)) if rng.random() < 0.5 else rng.uniform(50.0, 150.0)
        phases = [
            Phase("drive", rng.uniform(3600.0, 5400.0), speed_scale=rng.uniform(0.9, 1.1)),
            Phase("idle", rng.uniform(600.0, 2400.0), power_kw=rng.uniform(0.3, 1.5)),
            Phase("drive", rng.uniform(1800.0, 3600.0), speed_scale=rng.uniform(0.9, 1.1)),
            Phase("charge", 6 * 3600.0, power_kw=charger_kw, target_soc=rng.uniform(80.0, 95.0)),
            Phase("idle", rng.uniform(1800.0, 7200.0), power_kw=0.05),
        ]
        return cls(phases, cycle_offset_s=rng.uniform(0.0, CYCLE_S))


def _ocv(table: tuple[float, ...], soc: float) -> float:
    """Open-circuit voltage (V) of a cell at ``soc`` percent, linear between the table's 5 % points."""
    if soc <= 0.0:
        return table[0]
    if soc >= 100.0:
        return table[-1]
    x = soc / SOC_GRID
    i = int(x)
    return table[i] + (table[i + 1] - table[i]) * (x - i)


class PackModel:
    """One vehicle's pack answering its duty cycle; ``step(dt_s)`` returns the 7 canonical signals.

    ``PackModel(rng)`` draws everything from ``rng`` (chemistry, spreads, ambient, starting SOC, schedule):
    the same seed gives the same sequence. Keyword arguments fix any of them. Current is + on discharge.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        spec: PackSpec | None = None,
        vehicle: Vehicle | None = None,
        ambient_c: float | None = None,
        schedule: DutyCycle | None = None,
        soc: float | None = None,
    ) -> None:
        self.rng = rng
        self.spec = spec = spec or (NMC_96S46P if rng.random() < 0.7 else LFP_106S1P)
        self.vehicle = vehicle or Vehicle(mass_kg=rng.uniform(1700.0, 2300.0))
        self.ambient_c = rng.uniform(5.0, 30.0) if ambient_c is None else ambient_c
        self.soc0 = rng.uniform(35.0, 95.0) if soc is None else soc
        self.schedule = schedule or DutyCycle.commuter(rng)
        chem = spec.chemistry
        self.capacity_ah, self.series, self.ocv_table = spec.capacity_ah, spec.series, chem.ocv_v
        self.r0_ohm, self.r1_ohm, self.tau_s = spec.r0_ohm, spec.r1_ohm, chem.tau_s
        self.max_charge_a = chem.max_charge_c * self.capacity_ah
        self.max_discharge_a = chem.max_discharge_c * self.capacity_ah
        self.charge_ah = 0.0  # drawn since the start: the coulomb counter
        self.polarisation_v = 0.0  # across the RC pair, whole pack
        self.current_a = 0.0
        self.cooling_on = False
        self.time_s = 0.0
        # per series group: resistance factor (mean 1), capacity factor, starting SOC (mean soc0), cooling factor
        # triangular deviates (u - u' scaled to the standard deviation): bounded at 2.45 sd, so no absurd outlier
        # group, and a sixth of rng.gauss's cost, which counts when a fleet of thousands starts at once
        n, u, unit = spec.series, rng.random, 2.449489742783178
        resistance = [1.0 + unit * spec.resistance_sd * (u() - u()) for _ in range(n)]
        mean_r = sum(resistance) / n
        self.group_resistance = [r / mean_r for r in resistance]
        self.group_capacity = [1.0 + unit * spec.capacity_sd * (u() - u()) for _ in range(n)]
        offsets = [unit * spec.soc_sd * (u() - u()) for _ in range(n)]
        mean_offset = sum(offsets) / n
        self.group_soc0 = [self.soc0 + o - mean_offset for o in offsets]
        self.group_cooling = [1.0 + unit * 0.08 * (u() - u()) for _ in range(n)]
        self.group_cooling[0] *= 1.3  # the ends of the pack lose heat faster (more surface, near the enclosure)
        self.group_cooling[-1] *= 1.3
        self.thermal_groups = self._thermal_groups()
        start_c = self.ambient_c + rng.uniform(-1.0, 3.0)
        self.group_temp_c = [start_c + 0.5 * (u() - u()) for _ in self.thermal_groups]
        self._soc_per_ah = 100.0 / self.capacity_ah
        self._open_v = self.series * _ocv(self.ocv_table, self.soc0)
        self._cells: list[tuple[float, float, float]] = []  # min/max candidates: (soc0, SOC per Ah, resistance)
        self._refresh_at = 0.0
        self._dt_s, self._decay = -1.0, 0.0

    @property
    def soc(self) -> float:
        """Pack SOC, percent, by coulomb counting against the rated capacity."""
        return min(100.0, max(0.0, self.soc0 - self._soc_per_ah * self.charge_ah))

    def _thermal_groups(self) -> list[int]:
        """Groups whose temperatures bound all others: the extremes of heating over cooling and of cooling.

        A group's rise over ambient tends to resistance / cooling; how fast it gets there, to its cooling."""
        n = range(self.series)
        gain = [self.group_resistance[i] / self.group_cooling[i] for i in n]
        picks = {max(n, key=gain.__getitem__), min(n, key=gain.__getitem__)}
        picks |= {max(n, key=self.group_cooling.__getitem__), min(n, key=self.group_cooling.__getitem__)}
        return sorted(picks)

    def _rank_voltages(self) -> None:
        """Pick the groups that can hold the lowest and highest cell voltage over the next REFRESH_S.

        A group's voltage is its OCV minus its resistance factor times the pack's per-group overpotential: a
        line in the overpotential, so the extremes over the range it takes are held by a few groups."""
        table, drawn = self.ocv_table, self.charge_ah * self._soc_per_ah
        bound = self.max_discharge_a * (self.r0_ohm + self.r1_ohm) / self.series
        lines = [
            (_ocv(table, soc0 - drawn / c), k)
            for soc0, c, k in zip(self.group_soc0, self.group_capacity, self.group_resistance)
        ]
        picks = set()
        for eta in (-bound, 0.0, bound):
            volts = [a - k * eta for a, k in lines]
            picks.add(volts.index(min(volts)))
            picks.add(volts.index(max(volts)))
        self._cells = [
            (self.group_soc0[i], self._soc_per_ah / self.group_capacity[i], self.group_resistance[i]) for i in picks
        ]

    def _current_a(self, phase: Phase, soc: float, decay: float) -> float:
        """The current the phase asks for (A, + discharge), within the pack's limits."""
        r0 = self.r0_ohm
        emf = self._open_v - self.polarisation_v
        mode = phase.mode
        if mode == "drive":
            if soc <= RESERVE_SOC:
                self.schedule.force(Phase("charge", 3 * 3600.0, power_kw=100.0, target_soc=80.0))
                return 0.0
            t = self.schedule.cycle_s
            i = int(t)
            speed, accel = SPEED_TRACE_MPS[i], SPEED_TRACE_MPS[i + 1] - SPEED_TRACE_MPS[i]
            scale = phase.speed_scale
            power = self.vehicle.battery_power_w((speed + accel * (t - i)) * scale, accel * scale)
            if power < 0.0 and soc > 95.0:  # a full pack takes little regen
                power *= max(0.0, (100.0 - soc) / 5.0)
        elif mode == "charge":
            if soc >= phase.target_soc:
                self.schedule.next()
                return 0.0
            cc = phase.power_kw * 1000.0 / emf
            # CV as a BMS holds it, on the highest cell: the current that brings each candidate group to the CV
            # voltage at the end of the step (the RC pair's change included); the lowest of them
            cv_v, series, drawn, vp = self.spec.chemistry.cv_v, self.series, self.charge_ah, self.polarisation_v
            ohm = (r0 + self.r1_ohm * (1.0 - decay)) / series
            cv = math.inf
            for soc0, per_ah, k in self._cells:
                cv = min(cv, (cv_v - _ocv(self.ocv_table, soc0 - drawn * per_ah) + k * vp * decay / series) / (k * ohm))
            amps = min(cc, cv, self.max_charge_a)
            if amps < self.capacity_ah / 20.0:  # tapered to C/20: full
                self.schedule.next()
                return 0.0
            return -amps
        else:
            power = phase.power_kw * 1000.0 if soc > 5.0 else 0.0
        # P = I (E - I R0): the smaller root is the operating point
        disc = emf * emf - 4.0 * r0 * power
        amps = (emf - math.sqrt(disc)) / (2.0 * r0) if disc > 0.0 else emf / (2.0 * r0)
        return -self.max_charge_a if amps < -self.max_charge_a else min(amps, self.max_discharge_a)

    def step(self, dt_s: float) -> dict[str, float]:
        """Advance ``dt_s`` seconds; the signals a BMS would report at the end of it."""
        while dt_s > MAX_STEP_S:
            self._advance(MAX_STEP_S)
            dt_s -= MAX_STEP_S
        return self._advance(dt_s)

    def _advance(self, dt_s: float) -> dict[str, float]:
        if self.time_s >= self._refresh_at:
            self._rank_voltages()
            self._refresh_at = self.time_s + REFRESH_S
        self.time_s += dt_s
        if dt_s != self._dt_s:
            self._dt_s, self._decay = dt_s, math.exp(-dt_s / self.tau_s)
        decay, schedule, soc_per_ah = self._decay, self.schedule, self._soc_per_ah
        phase = schedule.override or schedule.phases[schedule.index]
        amps = self._current_a(phase, self.soc0 - soc_per_ah * self.charge_ah, decay)
        self.current_a = amps
        schedule.advance(dt_s)
        # coulomb counting, then the RC pair (exact for a current constant over the step)
        drawn = self.charge_ah = self.charge_ah + amps * dt_s / 3600.0
        soc = self.soc0 - soc_per_ah * drawn
        r0, series, table = self.r0_ohm, self.series, self.ocv_table
        vp = self.polarisation_v = self.polarisation_v * decay + amps * self.r1_ohm * (1.0 - decay)
        open_v = self._open_v = series * _ocv(table, soc)
        pack_v = open_v - amps * r0 - vp
        # cells: a group's OCV at its own SOC, less its share of the overpotential scaled by its resistance
        eta = (amps * r0 + vp) / series
        v_min = v_max = pack_v / series  # the mean cell lies between the extremes whatever the candidates
        for soc0, per_ah, k in self._cells:
            v = _ocv(table, soc0 - drawn * per_ah) - k * eta
            if v < v_min:
                v_min = v
            elif v > v_max:
                v_max = v
        # heat: I^2 R0 and I Vp shared by the groups as their resistance; convection to ambient, more when the
        # coolant loop runs; explicit Euler is stable (the fastest time constant is ~15 min, steps <= 5 s)
        spec, ambient = self.spec, self.ambient_c
        heat_w = (amps * amps * r0 + amps * vp) / series
        cool_w = (spec.cooling_w_per_k + (spec.active_cooling_w_per_k if self.cooling_on else 0.0)) / series
        per_j = series * dt_s / spec.heat_capacity_j_per_k
        temps, k_r, k_c = self.group_temp_c, self.group_resistance, self.group_cooling
        t_min, t_max = 1e9, -1e9
        for j, i in enumerate(self.thermal_groups):
            t = temps[j]
            t += per_j * (k_r[i] * heat_w - k_c[i] * cool_w * (t - ambient))
            temps[j] = t
            if t < t_min:
                t_min = t
            if t > t_max:
                t_max = t
        if t_max > spec.cooling_on_c:
            self.cooling_on = True
        elif t_max < spec.cooling_off_c:
            self.cooling_on = False
        # the schema's ranges hold by design (reserve and target SOC, current limits, CV); guard them anyway
        if not (0.0 <= soc <= 100.0):
            soc = 0.0 if soc < 0.0 else 100.0
        if not (0.0 <= v_min and v_max <= 5.0 and -50.0 <= t_min and t_max <= 150.0 and 0.0 <= pack_v <= 1500.0):
            v_min, v_max = min(5.0, max(0.0, v_min)), min(5.0, max(0.0, v_max))
            t_min, t_max = min(150.0, max(-50.0, t_min)), min(150.0, max(-50.0, t_max))
            pack_v = min(1500.0, max(0.0, pack_v))
        return {
            "battery_soc": round(soc, 3),
            "battery_voltage": round(pack_v, 2),
            "battery_current": round(amps, 2),
            "cell_voltage_min": round(v_min, 4),
            "cell_voltage_max": round(v_max, 4),
            "cell_temp_min": round(t_min, 2),
            "cell_temp_max": round(t_max, 2),
        }
