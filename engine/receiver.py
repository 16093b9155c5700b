"""The receiver: a Starlette app (served by Granian) that validates telemetry and hands it to the queue.

``202`` only once the queue has acknowledged every record of the request; a request is all-or-nothing.
Ingest never writes files and never imports the consumer: receiver and consumer meet only through the
queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import itertools
import logging
import operator
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import instruments as m
from engine.batch_decode import BATCH_MIN_RECORDS, count_byte, decode_checked, stored_lines
from engine.body import READ_ERRORS, content_coding, receive_body, within
from engine.can.ingest import can_route
from engine.config import Settings
from engine.door import JSON_MEDIA, NDJSON_MEDIA, Refusal, body_refusal, refuse, retry_after
from engine.errors import QueueError, QueueSaturated
from engine.kernels.jsonl import micros
from engine.lifetime import after_startup, exit_with_parent, keep_early_stop, keep_stop_between_loop_runs
from engine.metrics import CONTENT_TYPE, Metrics, read_snapshots, render, write_snapshot
from engine.openapi import openapi_document
from engine.publisher import Publisher
from engine.queues import Queue, QueueStats, open_queue
from engine.schema import (
    UTC,
    SkewError,
    Telemetry,
    check_clock,
    decode_records,
    encode_stored,
    validation_errors,
)

log = logging.getLogger("canpipe.receiver")

_DUMMY_DIGEST = hashlib.sha256(b"canpipe-no-such-key").digest()


class Authenticator:
    """Constant-time check of ``X-API-Key: key_id:secret`` against SHA-256 digests held in memory.

    Timing does not depend on how much of a key was right: the secret is hashed and its fixed-length digest
    compared with ``hmac.compare_digest``, against a dummy digest when the key id is unknown. Headers are
    compared as bytes: Starlette decodes them as Latin-1, so ``encode("latin-1")`` gives back exactly what the
    client sent, and a UTF-8 secret matches its UTF-8 configuration (its Latin-1 bytes do not).
    """

    def __init__(self, settings: Settings) -> None:
        self.digests = {key.key_id.encode(): key.secret_sha256 for key in settings.api_keys}
        self.enabled = not settings.insecure_no_auth or bool(self.digests)

    def key_id(self, header: str | None) -> str | None:
        """The key id when the header holds a valid key, else None."""
        return self.key_id_of((header or "").encode("latin-1", "replace"))

    def key_id_of(self, header: bytes) -> str | None:
        """``key_id`` of the header's raw bytes (as an ASGI scope holds them)."""
        key_id, _, secret = header.partition(b":")
        expected = self.digests.get(key_id, _DUMMY_DIGEST)
        valid = hmac.compare_digest(hashlib.sha256(secret).digest(), expected)
        return key_id.decode() if valid and key_id in self.digests else None

    def describe(self, header: str | None) -> str:
        """What a log line may say about a rejected header: a configured key id by name, any other id only as
        a short hash (a client that put its secret where the id goes must not leak it), nothing without ':'."""
        key_id, colon, _ = (header or "").encode("latin-1", "replace").partition(b":")
        if not colon:
            return "no key id"
        if key_id in self.digests:
            return f"key id {key_id.decode()!r}"
        return f"unknown key id sha256:{hashlib.sha256(key_id).hexdigest()[:8]}"


class RateLimiter:
    """A token bucket of records per API key, in this worker process (each Granian worker has its own).

    A request may take more tokens than are left as long as the bucket is full enough for it or full, so
    one request larger than the burst is never refused forever; the debt delays the next ones.
    """

    def __init__(self, records_per_s: float, burst: float) -> None:
        self.rate = records_per_s
        self.capacity = burst or records_per_s
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, monotonic time)

    def retry_after_s(self, key: str, records: int) -> float:
        """0 and the records taken when the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, then = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        needed = min(records, self.capacity)
        if tokens < needed:
            self.buckets[key] = (tokens, now)
            return (needed - tokens) / self.rate
        self.buckets[key] = (tokens - records, now)
        return 0.0


# How stale another worker's counts can be in a scrape. Scrapes further apart than this (any real scrape
# interval) see every counter monotonic: each worker's file is newer than the previous scrape.
SNAPSHOT_INTERVAL_S = 0.5
STATS_WAIT_S = 0.25  # a scrape waits this long for the queue's stats, then answers with the last known


class Receiver:
    """Request handlers bound to one queue, publisher and metrics (one per Granian worker)."""

    def __init__(self, settings: Settings, queue: Queue, *, snapshot: Path | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.auth = Authenticator(settings)
        self.metrics = Metrics()
        self.snapshot = snapshot  # this worker's file among the processes' snapshots merged by /metrics
        self._stats: QueueStats | None = None
        self._durations_ms: dict[str, list[float]] = {}  # per route, since the last fold into the histogram
        self._stats_task: asyncio.Task[QueueStats] | None = None
        self._accepted = [0, 0]  # 202 answers of /ingest and their records since the last fold into the counters
        self._lag_received_s: list[float] = []  # per accepted request since the last fold: its receive time
        self._lag_stamps: list[list[float]] = []  # ... and its records' client timestamps (Unix seconds)
        self._lag_received_us: list[int] = []  # the same for the batch path, in int64 microseconds
        self._lag_stamps_us: list[np.ndarray] = []
        self.limiter = RateLimiter(settings.rate_limit_records_per_s, settings.rate_limit_burst)
        # past the pending cap a request could never be accepted: 413, not a 503 that invites a retry
        self.max_records = min(settings.max_records_per_request, settings.max_pending_records)
        self._last_auth_log = -1e9
        profile = queue.profile.with_overrides(
            send_linger_ms=settings.send_linger_ms, receive_interval_ms=settings.receive_interval_ms
        )
        self.publisher = Publisher(
            queue,
            max_pending_records=settings.max_pending_records,
            timeout_s=settings.publish_timeout_s,
            concurrency=profile.send_concurrency,
            linger_s=profile.send_linger_s,
        )

    async def admit(self, key_id: str, count: int, encode: Callable[[], bytes]) -> Refusal | None:
        """The last steps of both ingest routes: the key's rate limit (429), then the publish of ``encode()``
        (503 when the queue is saturated or unavailable); None once the queue has the records."""
        wait_s = self.limiter.retry_after_s(key_id, count)
        if wait_s:
            self.metrics.inc(m.REJECTED_RECORDS, count, reason="rate_limited")
            return refuse(
                429,
                "rate_limited",
                "over this key's record rate; retry later",
                headers={"Retry-After": retry_after(wait_s)},
            )
        try:
            await self.publisher.publish(encode(), count)
        except QueueSaturated:
            self.metrics.inc(m.REJECTED_RECORDS, count, reason="saturated")
            return refuse(503, "saturated", "queue cannot keep up; retry later", headers={"Retry-After": "1"})
        except QueueError as exc:
            log.warning("publish failed: %s", exc, extra={"stage": "publish", "key_id": key_id})
            self.metrics.inc(m.PUBLISH_ERRORS)
            self.metrics.inc(m.REJECTED_RECORDS, count, reason="queue_unavailable")
            return refuse(503, "queue_unavailable", "queue unavailable; retry later", headers={"Retry-After": "2"})
        return None

    def _auth_failed(self, header: str | None) -> None:
        """Count every rejected key; log the key id (never the secret) at most every 10 s."""
        self.metrics.inc(m.AUTH_FAILURES)
        now = time.monotonic()
        if now - self._last_auth_log >= 10.0:
            self._last_auth_log = now
            log.warning(
                "rejected X-API-Key (%s); rejections in the next 10 s are only counted",
                self.auth.describe(header),
                extra={"stage": "auth"},
            )

    def instrumented(
        self, route: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` counted by route and status, and timed: a duration is appended to a list per request
        and the list folded into the histogram in one call per snapshot (every 0.5 s) or scrape."""

        async def answer(request: Request) -> Response:
            started = time.perf_counter()
            response = await handler(request)
            self.metrics.inc(m.HTTP_REQUESTS, route=route, status=response.status_code)
            durations.append((time.perf_counter() - started) * 1000.0)
            return response

        durations = self._durations_ms.setdefault(route, [])  # folded into the histogram per snapshot/scrape

        return answer

    def _ingest_lag(self, received_s: float, records: list[Telemetry]) -> None:
        """Keep the request's client timestamps for the ingest stage (folded into the histogram per snapshot)."""
        self._lag_received_s.append(received_s)
        self._lag_stamps.append(list(map(_epoch_s, map(_timestamp_of, records))))

    def _ingest_lag_us(self, received_us: int, stamps_us: np.ndarray) -> None:
        """``_ingest_lag`` for a batch whose client timestamps were read in C (int64 microseconds)."""
        self._lag_received_us.append(received_us)
        self._lag_stamps_us.append(stamps_us)

    def _fold_ingest_lags(self) -> None:
        histogram = self.metrics.histogram(m.LATENCY, stage="ingest")
        if self._lag_stamps:
            stamps = np.fromiter(itertools.chain.from_iterable(self._lag_stamps), np.float64)
            received = np.repeat(np.array(self._lag_received_s), [len(s) for s in self._lag_stamps])
            histogram.record_many((received - stamps) * 1000.0)
            self._lag_stamps.clear()
            self._lag_received_s.clear()
        if self._lag_stamps_us:
            stamps_us = np.concatenate(self._lag_stamps_us)
            received_us = np.repeat(np.array(self._lag_received_us, np.int64), [len(s) for s in self._lag_stamps_us])
            histogram.record_many((received_us - stamps_us) / 1000.0)
            self._lag_stamps_us.clear()
            self._lag_received_us.clear()

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.queue.ping(), 2.0)
        except (TimeoutError, QueueError) as exc:
            return JSONResponse({"status": "unavailable", "queue": str(exc) or "timeout"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def own_metrics(self) -> Metrics:
        """This worker's metrics, with the values the publisher and the queue keep copied in."""
        requests, records = self._accepted
        if requests:  # two plain int additions per accepted request; the labelled counters once per fold
            self._accepted[:] = [0, 0]
            self.metrics.inc(m.HTTP_REQUESTS, requests, route=Ingest.route, status=202)
            self.metrics.inc(m.INGEST_RECORDS, records)
        self._fold_ingest_lags()
        for route, durations in self._durations_ms.items():
            if durations:  # one numpy call for all the requests since the last fold, not one per request
                self.metrics.histogram(m.HTTP_DURATION, route=route).record_many(np.array(durations))
                durations.clear()
        self.metrics.set(m.PUBLISHER_PENDING, self.publisher.pending_records)
        self.metrics.set(m.PUBLISHER_SEND_CALLS, self.publisher.calls)
        self.metrics.use_queue_usage(self.queue.usage())
        return self.metrics

    def write_snapshot(self) -> None:
        metrics = self.own_metrics()  # also without a file: folds the request durations, bounding their list
        if self.snapshot is not None:
            with contextlib.suppress(OSError):
                write_snapshot(self.snapshot, metrics)

    async def merged_metrics(self) -> Metrics:
        """Every process's snapshot (other workers, consumers, dead ones' counters) plus this worker's live
        values, plus the queue's gauges read now."""
        if self.snapshot is None:
            total = Metrics()
        else:
            total = await asyncio.to_thread(read_snapshots, self.snapshot.parent, skip=self.snapshot)
        total.merge(self.own_metrics())
        stats = await self.queue_stats()
        if stats is not None:
            total.set(m.QUEUE_VISIBLE, stats.visible)
            total.set(m.QUEUE_IN_FLIGHT, stats.in_flight)
            total.set(m.QUEUE_DELAYED, stats.delayed)
            total.set(m.QUEUE_DEAD_LETTER, stats.dead_letter)
            if stats.oldest_age_s is not None:
                total.set(m.QUEUE_OLDEST_AGE, stats.oldest_age_s)
        return total

    async def queue_stats(self) -> QueueStats | None:
        """The queue's stats for a scrape, waiting at most ``STATS_WAIT_S``: a scrape never hangs on a slow or
        locked queue; the query goes on and the next scrape shows it (meanwhile the last known, or none)."""
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self.queue.stats())
        with contextlib.suppress(TimeoutError, QueueError):
            await asyncio.wait_for(asyncio.shield(self._stats_task), STATS_WAIT_S)
        if self._stats_task.done():
            error = self._stats_task.exception()
            if error is None:
                self._stats = self._stats_task.result()
            else:
                log.warning("queue stats for /metrics failed: %s", error)
                self._stats = None
        return self._stats

    async def prometheus(self, request: Request) -> Response:
        return Response(render(await self.merged_metrics()), media_type=CONTENT_TYPE)

    async def write_snapshots(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.write_snapshot()

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.settings))


_timestamp_of = operator.attrgetter("timestamp")
_epoch_s = dt.datetime.timestamp
_ACCEPTED_HEADERS = [(b"content-type", b"application/json")]


class Ingest:
    """``POST /ingest`` as a raw ASGI endpoint (Starlette routes to it as to an app): the headers are read from
    the scope as bytes in one pass, the body through ``read_body``, and the 202 is sent as two ASGI messages;
    no Request or Response object on the accepting path. Errors are answered with ``_error``'s responses.
    """

    route = "/ingest"

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.durations = receiver._durations_ms.setdefault(self.route, [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        response = await self.accept(scope, receive, send)
        if response is not None:
            metrics = self.receiver.metrics
            metrics.inc(m.REJECTED_REQUESTS, reason=response.reason)
            await response(scope, receive, send)
            metrics.inc(m.HTTP_REQUESTS, route=self.route, status=response.status_code)
        self.durations.append((time.perf_counter() - started) * 1000.0)

    async def accept(self, scope: Scope, receive: Receive, send: Send) -> Refusal | None:
        """Queue the request's records and send the 202; else the refusal to send."""
        receiver, settings = self.receiver, self.receiver.settings
        api_key = content_type = declared = coding = None
        for name, value in scope["headers"]:  # the first of a repeated header counts, as in Starlette
            if name == b"x-api-key":
                api_key = value if api_key is None else api_key
            elif name == b"content-type":
                content_type = value if content_type is None else content_type
            elif name == b"content-length":
                declared = value
            elif name == b"content-encoding":
                coding = value
        key_id = receiver.auth.key_id_of(api_key or b"") if receiver.auth.enabled else ""
        if key_id is None:
            receiver._auth_failed(None if api_key is None else api_key.decode("latin-1"))
            return refuse(401, "unauthorized", "missing or invalid X-API-Key")
        media = (content_type or b"").split(b";")[0].strip().lower()
        ndjson = media in NDJSON_MEDIA
        if not ndjson and media not in JSON_MEDIA:
            return refuse(415, "unsupported_media_type", "send application/json or application/x-ndjson")
        try:
            wbits = content_coding(coding)
            body = await within(
                settings.body_timeout_s, receive_body(receive, declared, wbits=wbits, limit=settings.max_body_bytes)
            )
        except READ_ERRORS as exc:
            return body_refusal(exc, settings)
        # a valid record holds exactly two '{' (strings are pattern-limited), so this bounds the records
        # before any of them is decoded: memory and time stay bounded by the limit, not by the body
        braces = count_byte(body, b"{")
        if braces > 2 * receiver.max_records:
            return refuse(413, "too_many_records", f"more than {receiver.max_records} records in one request; split it")
        received_at = dt.datetime.now(UTC)
        # checked per batch in C where it can be (engine.batch_decode); on any doubt the exact door decides. A body
        # of a few records decodes faster record by record (the batch checks cost ~8 us a request)
        batch = decode_checked(body, ndjson=ndjson) if braces >= 2 * BATCH_MIN_RECORDS else None
        try:
            records = decode_records(body, ndjson=ndjson) if batch is None else cast(list[Telemetry], batch.records)
            if not records:
                return refuse(
                    422, "validation", "no records in the request", errors=[{"path": "$", "message": "empty"}]
                )
            ahead, behind = settings.max_future_skew_s, settings.max_age_s
            if batch is None or not batch.within(received_at, max_future_s=ahead, max_age_s=behind):
                # names the first record out of bounds; normalises offsets other than UTC
                check_clock(records, received_at, max_future_s=ahead, max_age_s=behind)
        except SkewError as exc:
            return refuse(422, "validation", str(exc), errors=[{"path": exc.path, "message": str(exc).split(" - ")[0]}])
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return refuse(422, "validation", str(exc), errors=validation_errors(body, ndjson=ndjson))
        count = len(records)
        if batch is None:
            refused = await receiver.admit(key_id, count, lambda: encode_stored(records, received_at))
        else:
            fast = batch.records
            refused = await receiver.admit(key_id, count, lambda: stored_lines(fast, received_at))
        if refused is not None:
            return refused
        accepted = receiver._accepted  # folded into the request and record counters per snapshot or scrape
        accepted[0] += 1
        accepted[1] += count
        if log.isEnabledFor(logging.DEBUG):  # the contents, never the key: only at DEBUG, checked once per request
            log.debug("accepted %d records: %s", count, body[:4096].decode(errors="replace"), extra={"key_id": key_id})
        # the ingest stage is recorded here, once per request (the consumer records the three later stages)
        if batch is None:
            receiver._ingest_lag(received_at.timestamp(), records)
        else:
            receiver._ingest_lag_us(micros(received_at), batch.stamps_us)
        answer = b'{"accepted":%d}' % count
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [(b"content-length", b"%d" % len(answer)), *_ACCEPTED_HEADERS],
            }
        )
        await send({"type": "http.response.body", "body": answer})
        return None


class ReceiverApp(Starlette):
    """Starlette, with ``POST /ingest`` handed from the top of the stack straight to its raw endpoint.

    Starlette's exception middleware and router cost ~30 us of CPU a request in process, a quarter of the
    accepting path, and give ``/ingest`` nothing: its endpoint raises no HTTPException and answers every
    refusal itself. It keeps the outermost layer, ServerErrorMiddleware (an unexpected error is a 500, as on
    every other route), and stays in the routes (``GET /ingest`` is 405, the OpenAPI document lists it). A
    request with a ``root_path``, or an app given user middleware, goes through the whole stack.
    """

    def __init__(self, *, ingest: ASGIApp, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._ingest = ServerErrorMiddleware(ingest, debug=self.debug)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == Ingest.route
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and not self.user_middleware
        ):
            scope["app"] = self
            await self._ingest(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None, queue: Queue | None = None, *, metrics_dir: Path | None = None
) -> Starlette:
    """The ASGI app for ``settings`` (from the environment when omitted) on ``queue`` (opened from the settings).
    With ``metrics_dir``, the worker keeps a snapshot there and ``/metrics`` merges every process's."""
    settings = settings or Settings.from_env()
    settings.require_auth()
    queue = queue or open_queue(settings.queue_url)
    snapshot = None if metrics_dir is None else metrics_dir / f"receiver-{os.getpid()}-{os.urandom(3).hex()}.metrics"
    receiver = Receiver(settings, queue, snapshot=snapshot)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        receiver.publisher.start()
        snapshots = asyncio.get_running_loop().create_task(receiver.write_snapshots())
        try:
            yield
        finally:
            snapshots.cancel()
            await receiver.publisher.close()
            await queue.close()
            receiver.write_snapshot()  # the last counts, with the publisher's last send calls

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return refuse(exc.status_code, "http", exc.detail, headers=dict(exc.headers or {}))

    ingest = Ingest(receiver)
    app = ReceiverApp(
        ingest=ingest,
        exception_handlers={HTTPException: http_error},
        routes=[
            Route(Ingest.route, ingest, methods=["POST"]),
            Route("/ingest/can", receiver.instrumented("/ingest/can", can_route(receiver)), methods=["POST"]),
            Route("/health", receiver.instrumented("/health", receiver.health), methods=["GET"]),
            Route("/metrics", receiver.instrumented("/metrics", receiver.prometheus), methods=["GET"]),
            Route("/openapi.json", receiver.instrumented("/openapi.json", receiver.openapi), methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.receiver = receiver
    return app


def worker_app() -> Starlette:
    """The app of one Granian worker (``engine.receiver:worker_app``): ``create_app`` from the environment,
    in a process that ends with its server, so a server killed with SIGKILL leaves no worker on the port, and
    that stops when told to while it starts (engine/lifetime.py)."""
    exit_with_parent()
    started = keep_early_stop()
    keep_stop_between_loop_runs()
    settings = Settings.from_env()
    metrics_dir = settings.data_dir / "metrics"
    try:
        metrics_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no metrics snapshots (%s): /metrics shows this worker only", exc)
        app = create_app(settings)
    else:
        app = create_app(settings, metrics_dir=metrics_dir)
    after_startup(app, started)
    return app
