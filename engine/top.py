"""``canpipe top``: a live terminal view of a receiver's ``/metrics``, refreshed every ``interval`` seconds.

``render`` is pure (two scrapes in, text out) so it is tested against a live receiver's real output; ``run`` is
the thin loop around it: scrape, clear screen, redraw, quit on ``q`` or Ctrl-C.
"""

from __future__ import annotations

import math
import select
import shutil
import signal
import sys
import termios
import time
import tty
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

STAGES = ("ingest", "queue", "processing", "end_to_end")
Scrape = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> [(labels, value)]


def parse(text: str) -> Scrape:
    """Prometheus text exposition -> samples by name (``_bucket``/``_count``/``_total`` names kept whole)."""
    out: Scrape = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((dict(s.labels), float(s.value)))
    return dict(out)


def total(scrape: Scrape | None, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` matching ``labels``; None when the metric is absent."""
    if scrape is None or name not in scrape:
        return None
    rows = [v for lab, v in scrape[name] if all(lab.get(k) == w for k, w in labels.items())]
    return sum(rows) if rows else None


def rate(prev: Scrape | None, cur: Scrape, name: str, elapsed_s: float) -> float | None:
    """Per-second increase of a counter between two scrapes; a reset (restart) counts from zero."""
    now, before = total(cur, name), total(prev, name)
    if now is None or before is None or elapsed_s <= 0:
        return None
    return (now - before if now >= before else now) / elapsed_s


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile: ``buckets`` are cumulative (upper bound le, count); linear inside a bucket.

    Like Prometheus, a rank in the +Inf bucket answers the highest finite bound, and the first bucket
    interpolates from 0.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def stage_buckets(scrape: Scrape, stage: str) -> list[tuple[float, float]]:
    """Cumulative buckets of ``canpipe_latency_seconds`` for one stage, summed over processes."""
    summed: dict[float, float] = defaultdict(float)
    for lab, v in scrape.get("canpipe_latency_seconds_bucket", []):
        if lab.get("stage") == stage:
            summed[float(lab["le"])] += v
    return list(summed.items())


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def render(previous_scrape: Scrape | None, scrape: Scrape, elapsed_s: float, width: int = 80) -> str:
    """The screen for ``scrape``; rates from counter deltas since ``previous_scrape`` (``elapsed_s`` apart)."""
    lines = ["canpipe top", ""]
    lines.append("RECORDS            total        per second")
    for label, name in (
        ("accepted", "canpipe_ingest_records_total"),
        ("written", "canpipe_consumer_records_written_total"),
    ):
        per_s = _num(rate(previous_scrape, scrape, name, elapsed_s), "{:,.1f}")
        lines.append(f"  {label:<10} {_num(total(scrape, name)):>12}  {per_s:>14}")
    lines.append("")
    lines.append("QUEUE")
    lines.append(
        f"  depth {_num(total(scrape, 'canpipe_queue_visible_messages'))}"
        f"   in flight {_num(total(scrape, 'canpipe_queue_in_flight_messages'))}"
        f"   dead letters {_num(total(scrape, 'canpipe_queue_dead_letter_messages'))}"
        f"   oldest {_secs(total(scrape, 'canpipe_queue_oldest_age_seconds'))}"
        f"   publisher pending {_num(total(scrape, 'canpipe_publisher_pending_records'))}"
    )
    lines.append("")
    lines.append(f"LATENCY      {'count':>10} {'P50':>10} {'P95':>10} {'P99':>10}")
    for stage in STAGES:
        b = stage_buckets(scrape, stage)
        count = total(scrape, "canpipe_latency_seconds_count", stage=stage)
        qs = " ".join(f"{_secs(quantile(q, b)):>10}" for q in (0.5, 0.95, 0.99))
        lines.append(f"  {stage:<10} {_num(count):>10} {qs}")
    lines.append("")
    statuses: dict[str, float] = defaultdict(float)
    for lab, v in scrape.get("canpipe_http_requests_total", []):
        statuses[lab.get("status", "?")] += v
    lines.append("HTTP  " + ("  ".join(f"{k}: {v:,.0f}" for k, v in sorted(statuses.items())) or "-"))
    errors: dict[str, float] = defaultdict(float)
    for lab, v in scrape.get("canpipe_consumer_errors_total", []):
        errors[lab.get("stage", "?")] += v
    errors["publish"] += total(scrape, "canpipe_ingest_publish_errors_total") or 0
    lines.append("ERRORS  " + "  ".join(f"{k}: {v:,.0f}" for k, v in sorted(errors.items())))
    return "\n".join(line[:width] for line in lines)


def scrape_once(url: str, timeout_s: float = 2.0) -> Scrape:
    """GET ``url`` (the receiver's /metrics) and parse it; raises OSError when unreachable."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 -- an operator-given URL
        return parse(resp.read().decode())


def run(url: str, interval_s: float = 1.0) -> int:
    """Redraw every ``interval_s`` seconds until ``q`` or Ctrl-C; keeps retrying an unreachable receiver."""
    tty_in = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if tty_in else None
    previous: Scrape | None = None
    previous_at = 0.0
    down_since: str | None = None
    # Ctrl-C quits even when started with SIGINT ignored (nohup, a background job of a script): Python installs
    # its KeyboardInterrupt handler only where the signal was at its default
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if tty_in:
            tty.setcbreak(sys.stdin.fileno())
        while True:
            try:
                scrape, at = scrape_once(url), time.monotonic()
                screen = render(previous, scrape, at - previous_at, shutil.get_terminal_size((120, 40)).columns)
                previous, previous_at, down_since = scrape, at, None
            except OSError as exc:
                down_since = down_since or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                screen = f"canpipe top\n\n{url} unreachable since {down_since} ({exc}); retrying every {interval_s:g} s"
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n\n(q to quit)\n")
            sys.stdout.flush()
            ready, _, _ = select.select([sys.stdin] if tty_in else [], [], [], interval_s)
            if ready and sys.stdin.read(1) in ("q", "Q"):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, interrupt)
        if saved is not None:
            # TCSANOW: TCSADRAIN would wait for the screen to drain, forever when the terminal stopped reading
            termios.tcsetattr(sys.stdin, termios.TCSANOW, saved)
