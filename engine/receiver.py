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
import logging
import time
from collections.abc import AsyncIterator

import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from engine.config import Settings
from engine.errors import QueueError, QueueSaturated
from engine.lifetime import exit_with_parent
from engine.metrics import Metrics, render_queue_usage
from engine.publisher import Publisher
from engine.queues import Queue, open_queue
from engine.schema import UTC, SkewError, Telemetry, check_clock, decode_records, encode_stored

log = logging.getLogger("canpipe.receiver")

JSON_TYPES = {"application/json", ""}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_one = msgspec.json.Decoder(Telemetry)
_DUMMY_DIGEST = hashlib.sha256(b"canpipe-no-such-key").digest()
MAX_REPORTED_ERRORS = 50


class BodyTooLarge(Exception):
    pass


class Authenticator:
    """Constant-time check of ``X-API-Key: key_id:secret`` against SHA-256 digests held in memory."""

    def __init__(self, settings: Settings) -> None:
        self.digests = {key.key_id: key.secret_sha256 for key in settings.api_keys}
        self.enabled = not settings.insecure_no_auth or bool(self.digests)

    def key_id(self, header: str | None) -> str | None:
        """The key id when the header holds a valid key, else None. Never logs the secret."""
        key_id, _, secret = (header or "").partition(":")
        expected = self.digests.get(key_id, _DUMMY_DIGEST)
        valid = hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), expected)
        return key_id if valid and key_id in self.digests else None


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None, **extra: object) -> Response:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status, headers=headers)


def _validation_errors(body: bytes, ndjson: bool) -> list[dict[str, str]]:
    """Every bad record's error (decode each record alone; only on the error path)."""
    items: list[bytes] | list[msgspec.Raw]
    if ndjson:
        items = [line for line in body.splitlines() if line.strip()]
        prefix = "$[{}]"
    else:
        try:
            items = _raw_list.decode(body) if body.lstrip()[:1] == b"[" else [body]
        except msgspec.DecodeError as exc:
            return [{"path": "$", "message": str(exc)}]
        prefix = "$[{}]" if body.lstrip()[:1] == b"[" else "$"
    errors = []
    for index, item in enumerate(items):
        try:
            _one.decode(item)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            message, _, path = str(exc).partition(" - at `")
            path = path.rstrip("`") or "$"
            errors.append({"path": prefix.format(index) + path[1:], "message": message})
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    return errors


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Receiver:
    """Request handlers bound to one queue, publisher and metrics (one per Granian worker)."""

    def __init__(self, settings: Settings, queue: Queue) -> None:
        self.settings = settings
        self.queue = queue
        self.auth = Authenticator(settings)
        self.metrics = Metrics()
        self._last_auth_log = -1e9
        self.publisher = Publisher(
            queue,
            max_pending_records=settings.max_pending_records,
            timeout_s=settings.publish_timeout_s,
            concurrency=getattr(queue, "send_concurrency", 1),
            linger_s=settings.backend_default(settings.send_linger_ms, queue, "send_linger_s"),
        )

    def _auth_failed(self, header: str | None) -> None:
        """Count every rejected key; log the key id (never the secret) at most every 10 s."""
        self.metrics.inc("canpipe_auth_failures_total")
        now = time.monotonic()
        if now - self._last_auth_log >= 10.0:
            self._last_auth_log = now
            key_id = (header or "").partition(":")[0][:64]
            log.warning("rejected X-API-Key (key id %r); rejections in the next 10 s are only counted", key_id)

    def _count(self, status: int) -> None:
        self.metrics.inc(f'canpipe_http_responses_total{{route="/ingest",status="{status}"}}')

    async def ingest(self, request: Request) -> Response:
        response = await self._ingest(request)
        self._count(response.status_code)
        return response

    async def _ingest(self, request: Request) -> Response:
        if self.auth.enabled and self.auth.key_id(request.headers.get("x-api-key")) is None:
            self._auth_failed(request.headers.get("x-api-key"))
            return _error(401, "unauthorized", "missing or invalid X-API-Key")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        ndjson = content_type in NDJSON_TYPES
        if not ndjson and content_type not in JSON_TYPES:
            return _error(415, "unsupported_media_type", "send application/json or application/x-ndjson")
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
        except BodyTooLarge:
            return _error(413, "too_large", f"body exceeds {self.settings.max_body_bytes} bytes")
        received_at = dt.datetime.now(UTC)
        try:
            records = decode_records(body, ndjson=ndjson)
            if not records:
                return _error(
                    422, "validation", "no records in the request", errors=[{"path": "$", "message": "empty"}]
                )
            check_clock(
                records, received_at, max_future_s=self.settings.max_future_skew_s, max_age_s=self.settings.max_age_s
            )
        except SkewError as exc:
            return _error(422, "validation", str(exc), errors=[{"path": exc.path, "message": str(exc).split(" - ")[0]}])
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(422, "validation", str(exc), errors=_validation_errors(body, ndjson))
        try:
            await self.publisher.publish(encode_stored(records, received_at), len(records))
        except QueueSaturated:
            self.metrics.inc("canpipe_ingest_shed_records_total", len(records))
            return _error(503, "saturated", "queue cannot keep up; retry later", headers={"Retry-After": "1"})
        except QueueError as exc:
            log.warning("publish failed (stage=publish): %s", exc)
            self.metrics.inc("canpipe_ingest_publish_errors_total")
            return _error(503, "queue_unavailable", "queue unavailable; retry later", headers={"Retry-After": "2"})
        self.metrics.inc("canpipe_ingest_records_total", len(records))
        received_s = received_at.timestamp()
        self.metrics.latency["ingest"].record_many(
            np.fromiter(((received_s - r.timestamp.timestamp()) * 1000.0 for r in records), np.float64, len(records))
        )
        return JSONResponse({"accepted": len(records)}, status_code=202)

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.queue.ping(), 2.0)
        except (TimeoutError, QueueError) as exc:
            return JSONResponse({"status": "unavailable", "queue": str(exc) or "timeout"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render_prometheus()
        pending = self.publisher.pending_records
        text += f"# TYPE canpipe_publisher_pending_records gauge\ncanpipe_publisher_pending_records {pending}\n"
        text += (
            f"# TYPE canpipe_queue_send_calls_total counter\ncanpipe_queue_send_calls_total {self.publisher.calls}\n"
        )
        text += render_queue_usage(self.queue)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


def openapi_document() -> dict:
    """OpenAPI 3.1 generated from the msgspec schema."""
    (record,), components = msgspec.json.schema_components([Telemetry], ref_template="#/components/schemas/{name}")
    error = {"$ref": "#/components/schemas/Error"}
    components["Error"] = {"type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}
    body = {"oneOf": [record, {"type": "array", "items": record, "minItems": 1}]}
    ingest_responses = {
        "202": {
            "description": "all records are in the queue",
            "content": {
                "application/json": {"schema": {"type": "object", "properties": {"accepted": {"type": "integer"}}}}
            },
        },
        **{
            code: {"description": text, "content": {"application/json": {"schema": error}}}
            for code, text in [
                ("401", "missing or wrong X-API-Key"),
                ("413", "body too large"),
                ("415", "unsupported content type"),
                ("422", "malformed JSON or a field out of range; nothing enqueued"),
                ("503", "queue unavailable or saturated; see Retry-After"),
            ]
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "canpipe", "version": "0.1.0"},
        "paths": {
            "/ingest": {
                "post": {
                    "summary": "Ingest decoded battery telemetry",
                    "security": [{"apiKey": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": body},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    "responses": ingest_responses,
                }
            },
            "/health": {
                "get": {
                    "summary": "200 when the queue is reachable",
                    "responses": {"200": {"description": "ok"}, "503": {"description": "queue unreachable"}},
                }
            },
            "/metrics": {"get": {"summary": "Prometheus text", "responses": {"200": {"description": "metrics"}}}},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }


def create_app(settings: Settings | None = None, queue: Queue | None = None) -> Starlette:
    """The ASGI app for ``settings`` (from the environment when omitted) on ``queue`` (opened from the settings)."""
    settings = settings or Settings.from_env()
    settings.require_auth()
    queue = queue or open_queue(settings.queue_url)
    receiver = Receiver(settings, queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        receiver.publisher.start()
        try:
            yield
        finally:
            await receiver.publisher.close()
            await queue.close()

    app = Starlette(
        routes=[
            Route("/ingest", receiver.ingest, methods=["POST"]),
            Route("/health", receiver.health, methods=["GET"]),
            Route("/metrics", receiver.prometheus, methods=["GET"]),
            Route("/openapi.json", receiver.openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.receiver = receiver
    return app


def worker_app() -> Starlette:
    """The app of one Granian worker (``engine.receiver:worker_app``): ``create_app`` from the environment,
    in a process that ends with its server, so a server killed with SIGKILL leaves no worker on the port."""
    exit_with_parent()
    return create_app()
