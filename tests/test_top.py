"""``canpipe top``: the numbers a user reads off the screen, against a live receiver and through a real terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from canpipe_testing import ROOT, make_record, post_json, wait_for

from engine import top


def _line(screen: str, heading: str) -> list[str]:
    return next(line for line in screen.splitlines() if line.strip().startswith(heading)).split()


def test_render_shows_accepted_written_rates_stages_and_depth(serve, start, env):
    url = serve(env)
    first = top.scrape_once(url + "/metrics")
    t0 = time.monotonic()
    for batch in range(3):
        assert post_json(url, [make_record(batch * 10 + i) for i in range(10)])[0] == 202
    before_consumer = top.scrape_once(url + "/metrics")
    screen = top.render(first, before_consumer, time.monotonic() - t0, 120)
    accepted = _line(screen, "accepted")
    assert accepted[1] == "30", screen
    assert float(accepted[2].replace(",", "")) > 0, screen  # records/s from the counter delta
    depth = int(_line(screen, "depth")[1])
    assert depth == top.total(before_consumer, "canpipe_queue_visible_messages") and depth > 0, screen  # none consumed

    start(["consume", "--workers", "1"], env)
    wait_for(
        lambda: (top.total(top.scrape_once(url + "/metrics"), "canpipe_consumer_records_written_total") or 0) >= 30,
        60,
        "30 records written",
    )
    latest = top.scrape_once(url + "/metrics")
    screen = top.render(before_consumer, latest, 1.0, 120)
    assert _line(screen, "written")[1] == "30", screen
    for stage in ("ingest", "queue", "processing", "end_to_end"):
        row = _line(screen, stage)
        assert row[1] == "30", screen  # one latency observation per record
        assert row[2] != "-", screen  # a P50 read off the buckets
    assert "202: 3" in screen, screen


def test_quantile_interpolates_like_histogram_quantile():
    buckets = [(0.1, 10.0), (0.2, 20.0), (float("inf"), 20.0)]
    assert top.quantile(0.5, buckets) == 0.1
    assert abs(top.quantile(0.75, buckets) - 0.15) < 1e-9
    assert top.quantile(0.99, [(0.1, 0.0), (float("inf"), 5.0)]) == 0.1  # +Inf answers the highest finite bound
    assert top.quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def _read_until(fd: int, pattern: str, timeout_s: float) -> str:
    seen, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
            if re.search(pattern, seen.decode(errors="replace")):
                break
    return seen.decode(errors="replace")


def _top_in_a_terminal(url: str, *, sigint_ignored: bool = False) -> tuple[subprocess.Popen, int]:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "top", "--url", url, "--interval", "0.5"],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, start_new_session=True,
        # as started by nohup or as a background job of a script: SIGINT ignored, inherited
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )  # fmt: skip
    os.close(terminal)
    return proc, controller


def test_top_in_a_terminal_redraws_and_quits_on_q(serve, env):
    url = serve(env)
    assert post_json(url, [make_record(i) for i in range(7)])[0] == 202
    proc, controller = _top_in_a_terminal(url + "/metrics")
    try:
        screen = _read_until(controller, r"(?s)LATENCY.*LATENCY.*q to quit", 30)  # two refreshes
        assert screen.count("\x1b[2J") >= 2, screen
        assert "RECORDS" in screen and "QUEUE" in screen and "end_to_end" in screen, screen
        assert re.search(r"accepted\s+7\b", screen), screen
        os.write(controller, b"q")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["plain", "sigint-ignored-by-the-parent"])
def test_top_says_unreachable_keeps_retrying_and_exits_0_on_ctrl_c(sigint_ignored):
    proc, controller = _top_in_a_terminal("http://127.0.0.1:9/metrics", sigint_ignored=sigint_ignored)
    try:
        screen = _read_until(controller, r"(?s)unreachable since.*unreachable since", 30)
        assert screen.count("unreachable since") >= 2, screen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)


def test_grafana_dashboard_uses_only_declared_metrics():
    import json

    from engine.instruments import FAMILIES

    dashboard = json.loads((ROOT / "docs" / "grafana" / "canpipe.json").read_text())
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_bucket$", "", name) for e in exprs for name in re.findall(r"\bcanpipe_\w+", e)}
    assert used and used <= set(FAMILIES), used - set(FAMILIES)
    for stage in top.STAGES:
        assert any("histogram_quantile" in e and f'stage="{stage}"' in e for e in exprs), stage
