"""Consumer-count tuning: the same load for each consumer count, then a recommendation with its reason."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from loadtest.report import machine
from loadtest.run import Outcome, run_scenario
from loadtest.scenario import Scenario

# a count whose end-to-end P95 is within 10 % or 50 ms of the best one is as good: closer is run-to-run noise
E2E_SLACK = 1.10
E2E_SLACK_MS = 50.0


def recommend(outcomes: dict[int, Outcome]) -> tuple[int, str]:
    """The smallest consumer count that keeps up (achieved rate within 5 % of the best count, zero lost) with
    an end-to-end P95 within 10 % or 50 ms of the best: more processes past that only cost CPU and memory."""
    best_rate = max(o.achieved_rate for o in outcomes.values())
    keeping_up = {c: o for c, o in outcomes.items() if o.achieved_rate >= 0.95 * best_rate and o.lost == 0}
    candidates = keeping_up or outcomes
    best_e2e = min(o.stage_p95("end_to_end") for o in candidates.values())
    good_enough = max(best_e2e * E2E_SLACK, best_e2e + E2E_SLACK_MS)
    count = min(c for c, o in candidates.items() if o.stage_p95("end_to_end") <= good_enough)
    chosen = outcomes[count]
    reason = (
        f"{count} consumer(s) kept up with {chosen.achieved_rate:,.0f} records/s "
        f"(best of all counts: {best_rate:,.0f}), lost {chosen.lost}, with an end-to-end P95 of "
        f"{chosen.stage_p95('end_to_end'):,.0f} ms (best: {best_e2e:,.0f} ms) at "
        f"{chosen.cpu_s.get('consumers', 0):.1f} CPU s of consumers; "
    )
    more = [c for c in outcomes if c > count]
    if more:
        worse = ", ".join(
            f"{c}: P95 {outcomes[c].stage_p95('end_to_end'):,.0f} ms, {outcomes[c].cpu_s.get('consumers', 0):.1f} CPU s"
            for c in sorted(more)
        )
        reason += f"more consumers did not pay for their CPU ({worse})."
    else:
        reason += "it is the largest count tried: try more if the machine has idle cores."
    return count, reason


def render(rate: float, outcomes: dict[int, Outcome], command: str) -> str:
    count, reason = recommend(outcomes)
    first = next(iter(outcomes.values())).scenario
    lines = [
        f"# Consumer-count tuning at {rate:,.0f} records/s",
        "",
        f"- **When**: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; **machine**: {machine()}",
        f"- **Command**: `{command}`",
        f"- **Load**: {first.label}, {first.duration_s:g} s per count, locust at a constant arrival rate",
        "",
        "| consumers | achieved records/s | lost | end-to-end P50 ms | end-to-end P95 ms | ingest P95 ms "
        "| CPU s receiver | CPU s consumers | CPU s locust |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, o in outcomes.items():
        st = o.stages["end_to_end"] if o.stages else {"p50": float("nan"), "p95": float("nan")}
        cpu = o.cpu_s
        lines.append(
            f"| {c} | {o.achieved_rate:,.0f} | {o.lost} | {st['p50']:,.0f} | {st['p95']:,.0f} | "
            f"{o.stage_p95('ingest'):,.1f} | {cpu.get('receiver', 0):.1f} | {cpu.get('consumers', 0):.1f} "
            f"| {cpu.get('locust', 0):.1f} |"
        )
    lines += ["", f"**Recommendation: {count} consumer(s).** {reason}", "", "![tuning](chart.png)", ""]
    return "\n".join(lines)


def chart(outcomes: dict[int, Outcome], path: Path) -> None:
    """Achieved records/s, end-to-end P95 and consumer CPU per consumer count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(outcomes)
    labels = [str(c) for c in counts]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    panels = (
        ("achieved records/s", [o.achieved_rate for o in outcomes.values()]),
        ("end-to-end P95 ms", [o.stage_p95("end_to_end") for o in outcomes.values()]),
        ("consumer CPU s", [o.cpu_s.get("consumers", 0) for o in outcomes.values()]),
    )
    for ax, (title, values) in zip(axes, panels):
        ax.bar(labels, values)
        ax.set_title(title)
        ax.set_xlabel("consumers")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    rate: float
    consumers: tuple[int, ...]
    duration_s: float
    batch: int = 1


def tune(options: TuneOptions, out_dir: Path, command: str, **run_kwargs) -> tuple[dict[int, Outcome], Path]:
    """Run the load once per consumer count, one after the other; write report.md and chart.png."""
    outcomes: dict[int, Outcome] = {}
    for count in options.consumers:
        scenario = Scenario(options.rate, options.duration_s, batch=options.batch, consumers=count)
        outcome = run_scenario(scenario, out_dir / f"consumers-{count}", **run_kwargs)
        outcomes[count] = outcome
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in outcome.cpu_s.items())
        print(
            f"{count} consumer(s): {outcome.achieved_rate:,.0f} records/s, lost {outcome.lost}, end-to-end P95 "
            f"{outcome.stage_p95('end_to_end'):,.0f} ms, CPU s {cpu}",
            flush=True,
        )
    chart(outcomes, out_dir / "chart.png")
    report = out_dir / "report.md"
    report.write_text(render(options.rate, outcomes, command))
    return outcomes, report
