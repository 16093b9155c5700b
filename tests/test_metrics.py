from __future__ import annotations

import numpy as np

from engine.metrics import Metrics, queue_usage, read_snapshots, render_queue_usage, write_snapshot
from engine.queues import QueueUsage


def test_snapshots_from_several_processes_merge_by_adding(tmp_path):
    a, b = Metrics(), Metrics()
    a.latency["end_to_end"].record_many(np.full(90, 100.0))
    b.latency["end_to_end"].record_many(np.full(10, 3000.0))
    a.inc("canpipe_consumer_records_written_total", 90)
    b.inc("canpipe_consumer_records_written_total", 10)
    write_snapshot(tmp_path / "a.metrics", a)
    write_snapshot(tmp_path / "b.metrics", b)
    total = read_snapshots(tmp_path)
    assert total.counters["canpipe_consumer_records_written_total"] == 100
    summary = total.summary("end_to_end")
    assert summary["count"] == 100
    assert abs(summary["p50"] - 100) < 1 and abs(summary["p95"] - 3000) < 30  # not an average of percentiles
    assert not list(tmp_path.glob("*.tmp"))


def test_prometheus_text():
    m = Metrics()
    m.latency["queue"].record_many(np.array([1.0, 2.0, 3.0]))
    m.inc('canpipe_consumer_errors_total{stage="storage"}')
    m.inc('canpipe_consumer_errors_total{stage="delete"}', 2)
    text = m.render_prometheus()
    assert 'canpipe_latency_seconds{stage="queue",quantile="0.5"} 0.002' in text
    assert 'canpipe_latency_seconds_count{stage="queue"} 3' in text
    assert 'canpipe_latency_seconds_count{stage="ingest"} 0' in text
    assert text.count("# TYPE canpipe_consumer_errors_total counter") == 1
    assert 'canpipe_consumer_errors_total{stage="delete"} 2' in text


def test_queue_usage_renders_sqs_counters_and_nothing_for_sqlite():
    """/metrics and the consumer snapshots show a queue's usage(): SQS calls by action and billed requests;
    a backend not billed per request (usage() is None) adds no lines."""
    assert queue_usage(None) == {} and render_queue_usage(None) == ""
    usage = QueueUsage(requests_by_action={"SendMessageBatch": 3, "GetQueueAttributes": 1}, billed_requests=5)
    assert render_queue_usage(usage) == (
        "# TYPE canpipe_sqs_requests_total counter\n# TYPE canpipe_sqs_billed_requests_total counter\n"
        'canpipe_sqs_requests_total{action="GetQueueAttributes"} 1\n'
        'canpipe_sqs_requests_total{action="SendMessageBatch"} 3\n'
        "canpipe_sqs_billed_requests_total 5\n"
    )
