"""Every metric canpipe exposes, declared once: name, type, help, labels, and the label values shown as 0
before anything happened (an idle counter is present, not missing).

Names follow ``canpipe_<noun>_<unit>[_total]``. Code increments a family with label values
(``metrics.inc(CONSUMER_ERRORS, stage="delete")``), never with label text in a name. docs/instrumentation.md
describes each one.
"""

from __future__ import annotations

import dataclasses

STAGES = ("ingest", "queue", "processing", "end_to_end")
ROUTES = ("/ingest", "/ingest/can", "/health", "/metrics", "/openapi.json")
# the ``error`` codes of the receiver's 4xx/5xx answers (docs/api: the error body)
REJECT_REASONS = (
    "unauthorized",
    "unsupported_media_type",
    "too_large",
    "timeout",
    "bad_body",
    "too_many_records",
    "validation",
    "rate_limited",
    "saturated",
    "queue_unavailable",
    "no_dbc",  # /ingest/can without CANPIPE_DBC
)
CONSUMER_ERROR_STAGES = ("receive", "parse", "storage", "delete")
# upper bounds (``le``) of the histogram buckets, seconds: 0.5 ms to 5 min, about 2.5x apart
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclasses.dataclass(frozen=True)
class Family:
    """One metric family. ``kind`` is counter, gauge or histogram; histograms are recorded in milliseconds
    and exposed in seconds. ``idle`` lists label-value tuples exposed as 0 before the first increment."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    idle: tuple[tuple[str, ...], ...] = ((),)


def _each(*values: str) -> tuple[tuple[str, ...], ...]:
    return tuple((v,) for v in values)


# receiver (one set per Granian worker, summed over workers)
HTTP_REQUESTS = Family(
    "canpipe_http_requests_total", "counter", "HTTP requests answered, by route and status code.",
    ("route", "status"), (("/ingest", "202"),),
)  # fmt: skip
HTTP_DURATION = Family(
    "canpipe_http_request_duration_seconds", "histogram",
    "Time from the request reaching the app to its answer, by route.", ("route",), _each(*ROUTES),
)  # fmt: skip
INGEST_RECORDS = Family("canpipe_ingest_records_total", "counter", "Records accepted (202: the queue has them).")
REJECTED_REQUESTS = Family(
    "canpipe_ingest_rejected_requests_total", "counter", "Ingest requests refused, by the error code of the answer.",
    ("reason",), _each(*REJECT_REASONS),
)  # fmt: skip
REJECTED_RECORDS = Family(
    "canpipe_ingest_rejected_records_total", "counter",
    "Valid records refused (rate limit, queue saturated or unavailable), by reason; retry them.",
    ("reason",), _each("rate_limited", "saturated", "queue_unavailable"),
)  # fmt: skip
AUTH_FAILURES = Family("canpipe_auth_failures_total", "counter", "Requests with a missing or wrong X-API-Key.")
PUBLISH_ERRORS = Family("canpipe_ingest_publish_errors_total", "counter", "Publishes the queue failed (stage publish).")
PUBLISHER_PENDING = Family(
    "canpipe_publisher_pending_records", "gauge", "Records accepted by the app and not yet acknowledged by the queue."
)
PUBLISHER_SEND_CALLS = Family(
    "canpipe_publisher_send_calls_total", "counter", "Send calls (batches of up to 10 messages) made to the queue."
)
# queue, read from queue.stats() by the worker that answers the scrape
QUEUE_VISIBLE = Family("canpipe_queue_visible_messages", "gauge", "Messages waiting in the queue (depth).")
QUEUE_IN_FLIGHT = Family("canpipe_queue_in_flight_messages", "gauge", "Messages received and not yet deleted.")
QUEUE_DELAYED = Family("canpipe_queue_delayed_messages", "gauge", "Messages sent with a delay, not yet visible.")
QUEUE_DEAD_LETTER = Family("canpipe_queue_dead_letter_messages", "gauge", "Messages in the dead-letter queue.")
QUEUE_OLDEST_AGE = Family(
    "canpipe_queue_oldest_age_seconds", "gauge",
    "Age of the oldest message in the queue; absent for SQS (CloudWatch only).", idle=(),
)  # fmt: skip
# consumers (one set per consumer process, summed over processes, dead ones included)
RECORDS_WRITTEN = Family("canpipe_consumer_records_written_total", "counter", "Records written and fsynced.")
BATCHES = Family("canpipe_consumer_batches_total", "counter", "Batches written (one writev + fsync per hour file).")
MESSAGES_DELETED = Family(
    "canpipe_consumer_messages_deleted_total", "counter", "Queue messages deleted after their records were fsynced."
)
FILES_WRITTEN = Family("canpipe_consumer_files_written_total", "counter", "Hour files created (new or rotated).")
BYTES_WRITTEN = Family("canpipe_consumer_bytes_written_total", "counter", "Record bytes appended to hour files.")
REDELIVERED = Family(
    "canpipe_consumer_redelivered_messages_total", "counter", "Messages received more than once (a retry or a crash)."
)
CONSUMER_ERRORS = Family(
    "canpipe_consumer_errors_total", "counter", "Consumer errors, by stage (receive, parse, storage, delete).",
    ("stage",), _each(*CONSUMER_ERROR_STAGES),
)  # fmt: skip
LATENCY = Family(
    "canpipe_latency_seconds", "histogram",
    "Per record: ingest (client timestamp to receipt), queue (sent to first receive), processing (receive to "
    "fsync), end_to_end (client timestamp to fsync).", ("stage",), _each(*STAGES),
)  # fmt: skip
# the queue's own API calls (SQS: billed per request); nothing for SQLite
SQS_REQUESTS = Family("canpipe_sqs_requests_total", "counter", "SQS API calls, by action.", ("action",), idle=())
SQS_BILLED = Family("canpipe_sqs_billed_requests_total", "counter", "SQS requests as billed (64 KiB chunks).", idle=())

FAMILIES = {
    f.name: f
    for f in (
        HTTP_REQUESTS, HTTP_DURATION, INGEST_RECORDS, REJECTED_REQUESTS, REJECTED_RECORDS, AUTH_FAILURES,
        PUBLISH_ERRORS, PUBLISHER_PENDING, PUBLISHER_SEND_CALLS, QUEUE_VISIBLE, QUEUE_IN_FLIGHT, QUEUE_DELAYED,
        QUEUE_DEAD_LETTER, QUEUE_OLDEST_AGE, RECORDS_WRITTEN, BATCHES, MESSAGES_DELETED, FILES_WRITTEN,
        BYTES_WRITTEN, REDELIVERED, CONSUMER_ERRORS, LATENCY, SQS_REQUESTS, SQS_BILLED,
    )
}  # fmt: skip
