"""One /metrics for the whole pipeline: two Granian workers and two consumer processes add up in every scrape,
whichever worker answers, and a consumer or receiver worker killed with SIGKILL and restarted takes nothing
off the totals."""

from __future__ import annotations

import os
import signal
import time

import pytest
from canpipe_testing import child_pids, children, free_port, http, make_record, post_json, start_server, wait_for
from prometheus_client.parser import text_string_to_metric_families

from engine import instruments as m
from engine.metrics import Metrics

pytestmark = pytest.mark.slow

SCRAPES = 5  # consecutive scrapes that must agree (with two workers, a per-worker answer would alternate)
# A scraper's interval, longer than the receiver's snapshot interval (0.5 s) as any real one is: then every
# worker's snapshot is newer than the previous scrape, whichever worker answers
SCRAPE_INTERVAL_S = 1.0
STAGES_WRITTEN = ("queue", "processing", "end_to_end")  # recorded by the consumers; ingest by the receiver


def scrape(url: str) -> dict[tuple, float]:
    """One scrape of ``url``/metrics as Prometheus reads it: (sample name, sorted labels) -> value."""
    status, _, body = http("GET", url + "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def totals(url: str) -> dict[str, float]:
    """The numbers the acceptance is about, from one scrape."""
    s = scrape(url)
    out = {
        "accepted": s["canpipe_ingest_records_total", ()],
        "202 answers": s["canpipe_http_requests_total", (("route", "/ingest"), ("status", "202"))],
        "written": s["canpipe_consumer_records_written_total", ()],
        "ingest _count": s["canpipe_latency_seconds_count", (("stage", "ingest"),)],
        "ingest +Inf": s["canpipe_latency_seconds_bucket", (("le", "+Inf"), ("stage", "ingest"))],
    }
    for stage in STAGES_WRITTEN:
        out[f"{stage} _count"] = s["canpipe_latency_seconds_count", (("stage", stage),)]
        out[f"{stage} +Inf"] = s["canpipe_latency_seconds_bucket", (("le", "+Inf"), ("stage", stage))]
    return out


def expected(records: int, requests: int) -> dict[str, float]:
    out = dict.fromkeys(["accepted", "written", "ingest _count", "ingest +Inf"], float(records))
    out["202 answers"] = float(requests)
    for stage in STAGES_WRITTEN:
        out[f"{stage} _count"] = out[f"{stage} +Inf"] = float(records)
    return out


def send(url: str, first: int, requests: int, per_request: int = 5) -> None:
    """``requests`` POSTs of ``per_request`` distinct records, each on its own connection (both workers get some)."""
    for r in range(requests):
        records = [make_record(first + r * per_request + i, vehicle_id=f"EV-{r % 7:05d}") for i in range(per_request)]
        status, _, body = post_json(url, records)
        assert status == 202 and body == {"accepted": per_request}


def assert_scrapes_agree(url: str, want: dict[str, float]) -> None:
    wait_for(lambda: totals(url) == want, 30, f"/metrics to add up to {want}")
    for _ in range(SCRAPES):
        time.sleep(SCRAPE_INTERVAL_S)  # the scraper's schedule, not a wait for a condition
        assert totals(url) == want


def test_workers_and_consumers_add_up_in_every_scrape_also_after_kill_9_and_restarts(start, env, data_dir):
    port = free_port()
    server = start_server(start, env, port, workers=2)
    url = f"http://127.0.0.1:{port}"
    consumers = start(["consume", "--workers", "2"], env)
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "two consumer processes")

    send(url, 0, 30)
    assert_scrapes_agree(url, expected(150, 30))

    # both Granian workers took requests: the scrape is a sum, not one worker's view
    def per_worker() -> list[float]:  # each worker's own snapshot (written every 0.5 s)
        files = (data_dir / "metrics").glob("receiver-*.metrics")
        return sorted(Metrics.from_bytes(path.read_bytes()).value(m.INGEST_RECORDS) for path in files)

    wait_for(lambda: len(per_worker()) == 2 and 0 < per_worker()[0] and sum(per_worker()) == 150, 10, "2 workers")

    victim = min(children(consumers.pid))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in children(consumers.pid), 10, "the killed consumer to be gone")
    assert totals(url)["written"] == 150  # the dead process's count stays in the total
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "the supervisor to restart the consumer")

    send(url, 1000, 20)
    assert_scrapes_agree(url, expected(250, 50))

    # a Granian worker killed once its snapshot is current: Granian replaces it, its counts stay in the sum
    wait_for(lambda: sum(per_worker()) == 250, 10, "both receiver workers' snapshots current")
    workers = child_pids(server.pid)
    os.kill(min(workers), signal.SIGKILL)
    wait_for(lambda: len(child_pids(server.pid) - workers) == 1, 30, "Granian to replace the killed worker")
    assert totals(url) == expected(250, 50)
    send(url, 2000, 10)
    assert_scrapes_agree(url, expected(300, 60))


def test_an_idle_pipeline_shows_every_family_with_zero_counters(serve, start, env):
    url = serve(env, "--workers", "2")
    status, _, body = http("GET", url + "/metrics")
    text = body.decode()
    assert status == 200
    for family in m.FAMILIES.values():
        assert f"# HELP {family.name} " in text and f"# TYPE {family.name} {family.kind}\n" in text, family.name
    s = scrape(url)
    assert s["canpipe_ingest_records_total", ()] == 0
    assert s["canpipe_consumer_records_written_total", ()] == 0
    assert s["canpipe_consumer_errors_total", (("stage", "delete"),)] == 0
    assert s["canpipe_queue_visible_messages", ()] == 0
    assert s["canpipe_publisher_pending_records", ()] == 0
