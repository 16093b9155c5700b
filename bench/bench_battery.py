"""PackModel.step (the equivalent-circuit pack) against the random-walk pack it replaced, in the same run.

The simulator steps one pack per record it sends, so a step must stay a few microseconds for one core to
offer the load tests' 5,000 records/s and more. The reference is the old model, kept here verbatim.
"""

from __future__ import annotations

import random

from timing import ratio

from engine.battery import PackModel

PACKS = 50
STEPS = 200
DT_S = 0.2  # the simulator's default sampling period


class RandomWalkPack:
    """The simulator's pack before engine/battery.py: a mean-reverting current, an OCV line, I^2R heating."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.soc = rng.uniform(35.0, 95.0)
        self.current = rng.uniform(10.0, 60.0)
        self.temp = rng.uniform(18.0, 30.0)
        self.resistance = 0.06 + rng.uniform(0.0, 0.02)

    def step(self, dt_s: float) -> dict[str, float]:
        rng = self.rng
        self.current += 0.2 * (35.0 - self.current) + rng.gauss(0.0, 12.0)
        self.current = max(-250.0, min(450.0, self.current))
        self.soc = max(0.0, min(100.0, self.soc - self.current * dt_s / (230.0 * 3600.0) * 100.0))
        self.temp += dt_s * (self.current**2 * self.resistance / 4000.0 - (self.temp - 25.0) / 600.0)
        self.temp = max(-20.0, min(70.0, self.temp))
        cell_ocv = 3.0 + 1.2 * self.soc / 100.0
        pack_v = 96 * cell_ocv - self.current * self.resistance
        cell_v = pack_v / 96
        spread_v = 0.004 + abs(rng.gauss(0.0, 0.004))
        spread_t = 0.5 + abs(rng.gauss(0.0, 1.0))
        return {
            "battery_soc": round(self.soc, 3),
            "battery_voltage": round(pack_v, 2),
            "battery_current": round(self.current, 2),
            "cell_voltage_min": round(cell_v - spread_v / 2, 4),
            "cell_voltage_max": round(cell_v + spread_v / 2, 4),
            "cell_temp_min": round(self.temp - spread_t / 2, 2),
            "cell_temp_max": round(self.temp + spread_t / 2, 2),
        }


def fleet(model: type) -> list:
    packs = [model(random.Random(i)) for i in range(PACKS)]
    for pack in packs:
        pack.step(DT_S)  # the first step ranks the cell groups: not the steady cost
    return packs


def steps(packs: list) -> None:
    for _ in range(STEPS):
        for pack in packs:
            pack.step(DT_S)


def test_step_equivalent_circuit(benchmark):
    benchmark.group = f"battery: {PACKS} packs x {STEPS} steps of {DT_S} s"
    benchmark(steps, fleet(PackModel))


def test_step_random_walk_reference(benchmark):
    benchmark.group = f"battery: {PACKS} packs x {STEPS} steps of {DT_S} s"
    benchmark(steps, fleet(RandomWalkPack))


def test_guard_step_cost():
    """CI regression guard: a step within 4x the random walk's (measured ~1.5x; ranking all groups every step: ~12x)."""
    new, old = fleet(PackModel), fleet(RandomWalkPack)
    old_s, new_s, _ = ratio(lambda: steps(old), lambda: steps(new), repeats=5)
    per_step = PACKS * STEPS
    print(f"step: equivalent circuit {new_s / per_step * 1e6:.2f} us, random walk {old_s / per_step * 1e6:.2f} us")
    assert new_s <= 4 * old_s, f"PackModel.step {new_s / old_s:.1f}x the random walk's cost (guard 4x)"
