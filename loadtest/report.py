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
        f"- **Pipeline**: the running receiver at {outcome.running_url}"
        if outcome.running_url
        else f"- **Pipeline**: `canpipe serve --workers {s.receiver_workers}` + `canpipe consume --workers "
        f"{s.consumers}`, embedded queue in a fresh data dir unless `--queue-url`",
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
    lines += _limits(outcome)
    lines += [
        "",
        "Receiver and consumer CPU count from the start of the load to the end of the drain; locust's from its "
        f"start. The machine's other tenants are not in these figures (1-minute load average at the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores).",
        "",
        "![throughput and latency over time](chart.png)",
        "",
    ]
    return "\n".join(lines)


def _limits(outcome: Outcome) -> list[str]:
    """When the rate was missed: what the measured CPU costs say the target needs, and the pacing loop."""
    s, load = outcome.scenario, outcome.load
    if outcome.achieved_rate >= s.rate * 0.9 or not outcome.accepted:
        return []
    per_record_s = sum(outcome.cpu_s.values()) / outcome.accepted
    needed = per_record_s * s.rate
    period_ms = 1000 / s.requests_per_user_s
    return [
        "",
        "## What limited it",
        "",
        f"- **CPU**: receiver, consumers and locust together used {per_record_s * 1e6:,.0f} us of CPU per record, "
        f"so {s.rate:,.0f} records/s needs about **{needed:.1f} cores**; this machine has {os.cpu_count()}, "
        "shared with other work. Locust alone costs more per request than the receiver.",
        f"- **Closed loop per user**: each of the {s.users} users waits for its answer before the next request "
        f"({period_ms:.0f} ms pacing); with an HTTP P50 of {load.p50_ms:,.0f} ms a user manages about "
        f"{min(s.requests_per_user_s, 1000 / load.p50_ms if load.p50_ms else 0):.1f} requests/s, not "
        f"{s.requests_per_user_s:.1f}. The latency is CPU queueing on the shared cores (the receiver's "
        "group commit needs a few ms), and the ingest stage includes the time a record waits in a busy "
        "locust process before it is sent.",
    ] + (
        [
            "- The pipeline itself kept up with what arrived: zero errors, zero lost, drained "
            f"{outcome.drain_s:.1f} s after the load. Batched requests (`--batch 100`) cost far less CPU per "
            "record (see the gateway-batch report)."
        ]
        if outcome.drained and outcome.lost == 0 and not load.failures
        else []
    )


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
