from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from canpipe_testing import make_record
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from engine import instruments as m
from engine.config import Settings
from engine.metrics import Metrics, read_snapshots, render, write_snapshot
from engine.queues import QueueUsage, open_queue
from engine.receiver import create_app


def scrape(metrics: Metrics) -> dict[str, dict[tuple, float]]:
    """The rendered text read back as a scraper would: sample name -> {sorted labels: value}."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(render(metrics).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_snapshots_from_several_processes_merge_by_adding(tmp_path):
    a, b = Metrics(), Metrics()
    a.latency["end_to_end"].record_many(np.full(90, 100.0))
    b.latency["end_to_end"].record_many(np.full(10, 3000.0))
    a.inc(m.RECORDS_WRITTEN, 90)
    b.inc(m.RECORDS_WRITTEN, 10)
    b.inc(m.CONSUMER_ERRORS, 2, stage="delete")
    write_snapshot(tmp_path / "a.metrics", a)
    write_snapshot(tmp_path / "b.metrics", b)
    total = read_snapshots(tmp_path)
    assert total.value(m.RECORDS_WRITTEN) == 100
    assert total.value(m.CONSUMER_ERRORS, stage="delete") == 2
    assert total.counters['canpipe_consumer_errors_total{stage="delete"}'] == 2  # the series' name, read only
    summary = total.summary("end_to_end")
    assert summary["count"] == 100
    assert abs(summary["p50"] - 100) < 1 and abs(summary["p95"] - 3000) < 30  # not an average of percentiles
    assert not list(tmp_path.glob("*.tmp"))


def test_a_dead_process_keeps_its_counters_in_the_merge_but_not_its_gauges(tmp_path):
    """A restarted worker must not make a total go down; a dead worker's pending records are not pending."""
    dead = Metrics()
    dead.pid = dead_pid()
    dead.inc(m.INGEST_RECORDS, 7)
    dead.set(m.PUBLISHER_PENDING, 5)
    live = Metrics()
    live.inc(m.INGEST_RECORDS, 3)
    live.set(m.PUBLISHER_PENDING, 2)
    write_snapshot(tmp_path / "receiver-dead.metrics", dead)
    write_snapshot(tmp_path / "receiver-live.metrics", live)
    (tmp_path / "old-format.metrics").write_bytes(b"\x00not msgpack")  # passed over, not fatal
    total = read_snapshots(tmp_path)
    assert total.value(m.INGEST_RECORDS) == 10
    assert total.value(m.PUBLISHER_PENDING) == 2


def test_every_family_has_help_and_type_and_idle_counters_read_zero():
    text = render(Metrics()).decode()
    for family in m.FAMILIES.values():
        assert f"# HELP {family.name} " in text and f"# TYPE {family.name} {family.kind}\n" in text, family.name
    samples = scrape(Metrics())
    assert samples["canpipe_ingest_records_total"][()] == 0
    assert samples["canpipe_consumer_records_written_total"][()] == 0
    assert samples["canpipe_consumer_errors_total"][(("stage", "storage"),)] == 0
    assert samples["canpipe_ingest_rejected_requests_total"][(("reason", "validation"),)] == 0
    for stage in m.STAGES:
        assert samples["canpipe_latency_seconds_count"][(("stage", stage),)] == 0
        assert samples["canpipe_latency_seconds_bucket"][(("le", "+Inf"), ("stage", stage))] == 0


def test_latency_is_a_prometheus_histogram_with_cumulative_le_buckets():
    metrics = Metrics()
    metrics.histogram(m.LATENCY, stage="queue").record_many(np.array([0.7, 2.0, 3.0, 700.0]))  # milliseconds
    samples = scrape(metrics)
    buckets = {dict(labels)["le"]: v for labels, v in samples["canpipe_latency_seconds_bucket"].items()
               if dict(labels)["stage"] == "queue"}  # fmt: skip
    assert buckets["0.0005"] == 0 and buckets["0.001"] == 1 and buckets["0.0025"] == 2 and buckets["0.005"] == 3
    assert buckets["0.5"] == 3 and buckets["1.0"] == 4 and buckets["+Inf"] == 4
    assert samples["canpipe_latency_seconds_count"][(("stage", "queue"),)] == 4
    assert samples["canpipe_latency_seconds_sum"][(("stage", "queue"),)] == pytest.approx(0.7057, rel=0.01)


def test_labels_are_declared_not_written_into_names():
    metrics = Metrics()
    with pytest.raises(ValueError, match="takes labels"):
        metrics.inc(m.CONSUMER_ERRORS)
    with pytest.raises(ValueError, match="takes labels"):
        metrics.inc(m.RECORDS_WRITTEN, stage="delete")


def test_queue_usage_shows_sqs_counters_and_nothing_for_sqlite():
    """/metrics shows a queue's usage(): SQS calls by action and billed requests; a backend not billed per
    request (usage() is None) adds no samples."""
    metrics = Metrics()
    metrics.use_queue_usage(None)
    samples = scrape(metrics)
    assert "canpipe_sqs_requests_total" not in samples and "canpipe_sqs_billed_requests_total" not in samples
    usage = QueueUsage(requests_by_action={"SendMessageBatch": 3, "GetQueueAttributes": 1}, billed_requests=5)
    metrics.use_queue_usage(usage)
    samples = scrape(metrics)
    assert samples["canpipe_sqs_requests_total"] == {
        (("action", "GetQueueAttributes"),): 1,
        (("action", "SendMessageBatch"),): 3,
    }
    assert samples["canpipe_sqs_billed_requests_total"][()] == 5


def test_embedded_queue_reports_the_age_of_its_oldest_message(tmp_path):
    async def ages() -> tuple[float | None, float | None]:
        queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
        try:
            empty = (await queue.stats()).oldest_age_s
            await queue.send_batch([b"x"])
            await asyncio.sleep(0.05)
            return empty, (await queue.stats()).oldest_age_s
        finally:
            await queue.close()

    empty, age = asyncio.run(ages())
    assert empty is None
    assert age is not None and 0.04 <= age < 30


def test_the_receiver_counts_each_answer_by_route_status_and_reason(tmp_path):
    """What an operator reads after a bad request, a good one and a wrong key: each counted once, by label."""
    key = "fleet1:s3cret-for-tests"
    settings = Settings.from_env({"CANPIPE_DATA_DIR": str(tmp_path), "CANPIPE_API_KEYS": key})
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.post("/ingest", json=[make_record(i) for i in range(3)], headers=headers).status_code == 202
        assert client.post("/ingest", json=[{"vehicle_id": 1}], headers=headers).status_code == 422
        assert client.post("/ingest", json=[make_record()], headers=headers | {"X-API-Key": "x:y"}).status_code == 401
        text = client.get("/metrics").text
    samples: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    assert samples["canpipe_ingest_records_total", ()] == 3
    assert samples["canpipe_latency_seconds_count", (("stage", "ingest"),)] == 3
    assert samples["canpipe_ingest_rejected_requests_total", (("reason", "validation"),)] == 1
    assert samples["canpipe_ingest_rejected_requests_total", (("reason", "unauthorized"),)] == 1
    assert samples["canpipe_ingest_rejected_requests_total", (("reason", "saturated"),)] == 0
    assert samples["canpipe_auth_failures_total", ()] == 1
    for status in ("202", "422", "401"):
        assert samples["canpipe_http_requests_total", (("route", "/ingest"), ("status", status))] == 1
    assert samples["canpipe_http_request_duration_seconds_count", (("route", "/ingest"),)] == 3
    assert samples["canpipe_queue_visible_messages", ()] >= 1  # the queue's gauges, read at scrape time
    assert samples["canpipe_publisher_send_calls_total", ()] >= 1
