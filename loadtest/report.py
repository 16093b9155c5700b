"""A run's report: report.md (targets, HTTP, pipeline stages, CPU, losses) and chart.png (matplotlib, Agg)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from engine.metrics import STAGES
from loadtest.run import Outcome


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> str:
    """One line: cores, CPU model, Python, canpipe/locust/granian versions."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model or platform.machine()}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, canpipe {_version('canpipe')}, locust {_version('locust')}, "
        f"granian {_version('granian')}"
    )


def command_line() -> str:
    return "python -m loadtest " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("loadtest") else "(library call)"


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:,.1f}"  # NaN: no sample


def render(outcome: Outcome, command: str) -> str:
    """report.md of one run."""
    s, load = outcome.scenario, outcome.load
    lines = [
        f"# Load test {s.name}",
        "",
        f"- **When**: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; **machine**: {machine()}",
        f"- **Command**: `{command}`",
        f"- **Load**: locust {_version('locust')}, {s.users} `{s.user_class}` users x {s.requests_per_user_s:.2f} "
        f"requests/s x {s.batch} record(s) (constant_throughput), {s.processes} locust process(es), "
        f"{s.duration_s:g} s; simulator payloads (PackModel, CAN ids 0x132/0x292/0x332 in turn)",
        f"- **Pipeline**: `canpipe serve --workers {s.receiver_workers}` + `canpipe consume --workers {s.consumers}`",
        "",
        "## Seed targets",
        "",
        "| target | met | measured |",
        "|---|---|---|",
    ]
    for name, (met, value) in outcome.targets().items():
        lines.append(f"| {name} | {'yes' if met else '**NO**'} | {value} |")
    lines += [
        "",
        "## Throughput",
        "",
        f"- target: {s.rate:,.0f} records/s ({s.request_rate:,.0f} requests/s)",
        f"- achieved, all users running: **{outcome.achieved_rate:,.0f} records/s**; "
        f"over the whole run (spawn included): {outcome.average_rate:,.0f} records/s",
        f"- accepted {outcome.accepted:,} records in {load.requests - load.failures:,} requests; "
        f"unique on disk {outcome.unique_on_disk if outcome.unique_on_disk is not None else 'not visible'}; "
        f"**lost {outcome.lost}**; drained {'yes' if outcome.drained else 'NO'} {outcome.drain_s:.1f} s after the load",
        f"- accepted is the sum of every locust process's own count of 202 answers; locust's statistics count "
        f"{(load.requests - load.failures) * s.batch:,} (with several processes the master can miss the "
        "workers' last report)",
        "",
        "## HTTP (locust)",
        "",
        "| requests | failures | P50 ms | P95 ms | P99 ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| {load.requests:,} | {load.failures:,} | {_ms(load.p50_ms)} | {_ms(load.p95_ms)} | {_ms(load.p99_ms)} "
        f"| {_ms(load.max_ms)} |",
    ]
    if load.errors:
        lines += ["", "Errors:", "", *[f"- {e}" for e in load.errors[:10]]]
    lines += ["", "## Pipeline stages (consumers' histograms, as `canpipe run` reports them)", ""]
    if outcome.stages:
        lines += ["| stage | count | P50 ms | P95 ms | P99 ms | max ms |", "|---|---|---|---|---|---|"]
        for stage in STAGES:
            st = outcome.stages[stage]
            lines.append(
                f"| {stage} | {st['count']:,} | {_ms(st['p50'])} | {_ms(st['p95'])} | {_ms(st['p99'])} "
                f"| {_ms(st['max'])} |"
            )
    else:
        lines.append("Not visible: a running receiver was targeted without `--data-dir`.")
    duration = load.elapsed_s or s.duration_s
    lines += [
        "",
        "## CPU (seconds, from /proc/<pid>/stat of each process tree)",
        "",
        "| component | CPU s | cores busy during the load | CPU ms per 1,000 records |",
        "|---|---|---|---|",
    ]
    for name, seconds in outcome.cpu_s.items():
        per_k = seconds * 1000 / outcome.accepted * 1000 if outcome.accepted else float("nan")
        lines.append(f"| {name} | {seconds:.1f} | {seconds / duration:.2f} | {_ms(per_k)} |")
    lines += [
        "",
        "Receiver and consumer CPU count from the start of the load to the end of the drain; locust's from its "
        "start. The machine's other tenants are not in these figures.",
        "",
        "![throughput and latency over time](chart.png)",
        "",
    ]
    return "\n".join(lines)


def chart(outcome: Outcome, path: Path) -> None:
    """Records/s and HTTP latency (P50/P95/P99 over locust's recent window) per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, load, history = outcome.scenario, outcome.load, outcome.load.history
    first = min(load.requests_per_s, default=0)
    seconds = sorted(load.requests_per_s)
    # exact per-second counts from locust's JSON; its CSV history only has a smoothed rate
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([t - first for t in seconds], [load.requests_per_s[t] * s.batch for t in seconds], label="records/s sent")
    failed = [load.failures_per_s.get(t, 0) * s.batch for t in seconds]
    top.plot([t - first for t in seconds], failed, label="records/s failed", color="tab:red")
    top.axhline(s.rate, linestyle="--", color="gray", label=f"target {s.rate:,.0f}")
    top.set_ylabel("records/s")
    top.legend(loc="lower right")
    top.set_title(f"{s.name}: {outcome.achieved_rate:,.0f} records/s achieved")
    t = [p.t_s for p in history]
    for attr, label in (("p50_ms", "P50"), ("p95_ms", "P95"), ("p99_ms", "P99")):
        bottom.plot(t, [getattr(p, attr) for p in history], label=f"HTTP {label} (last 10 s)")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(outcome: Outcome, out_dir: Path, command: str) -> Path:
    """Write report.md and chart.png into ``out_dir``; the report's path."""
    chart(outcome, out_dir / "chart.png")
    report = out_dir / "report.md"
    report.write_text(render(outcome, command))
    return report
