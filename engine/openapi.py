"""The OpenAPI 3.1 document of the receiver, generated from the msgspec schema and the configured limits."""

from __future__ import annotations

import msgspec

from engine.can.frame import CanFrame
from engine.config import Settings
from engine.schema import Telemetry

# every answer /ingest can give, each with the same JSON error body except 202
INGEST_ERRORS = [
    ("400", "the body could not be read (a malformed chunked encoding)"),
    ("401", "missing or wrong X-API-Key (same body whatever was wrong)"),
    ("404", "no such path"),
    ("405", "method not allowed"),
    ("408", "the body did not arrive within CANPIPE_BODY_TIMEOUT_S"),
    ("413", "body over CANPIPE_MAX_BODY_BYTES, or more records than CANPIPE_MAX_RECORDS_PER_REQUEST"),
    ("415", "Content-Type is not application/json or application/x-ndjson"),
    ("422", "malformed JSON, a duplicate key, a field out of range or a clock out of the window; nothing enqueued"),
    ("429", "over this key's CANPIPE_RATE_LIMIT_RECORDS_PER_S; see Retry-After"),
    ("503", "queue unavailable or saturated; see Retry-After"),
]


def openapi_document(settings: Settings) -> dict:
    """OpenAPI 3.1: the record schema (patterns, ranges), the body and record-count limits, every response."""
    (record, frame), components = msgspec.json.schema_components(
        [Telemetry, CanFrame], ref_template="#/components/schemas/{name}"
    )
    error = {"$ref": "#/components/schemas/Error"}
    components["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        "required": ["error", "detail"],
    }
    max_records = min(settings.max_records_per_request, settings.max_pending_records)
    body = {"oneOf": [record, {"type": "array", "items": record, "minItems": 1, "maxItems": max_records}]}
    retry_after = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
    ingest_responses: dict[str, dict] = {
        "202": {
            "description": "all records are in the queue",
            "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": {"accepted": {"type": "integer", "minimum": 1}}}
                }
            },
        },
        **{
            code: {
                "description": text,
                "content": {"application/json": {"schema": error}},
                **({"headers": retry_after} if code in ("429", "503") else {}),
            }
            for code, text in INGEST_ERRORS
        },
    }
    limits = (
        f"Limits: a body of at most {settings.max_body_bytes} bytes (Content-Length or chunked), at most "
        f"{max_records} records, sent within {settings.body_timeout_s:g} s."
    )
    plain = {"text/plain": {"schema": {"type": "string"}}}
    paths: dict[str, dict] = {}
    if settings.dbc:  # only a receiver with a DBC decodes raw frames (without one, /ingest/can answers 503)
        frames = {"oneOf": [frame, {"type": "array", "items": frame, "minItems": 1, "maxItems": max_records}]}
        paths["/ingest/can"] = {
            "post": {
                "summary": "Ingest raw CAN frames, decoded with the receiver's DBC (CANPIPE_DBC)",
                "description": "One frame, a JSON array of them, or NDJSON; all-or-nothing. Each frame becomes a "
                "record of /ingest's shape holding the mapped signals it carries; a CAN id not in the DBC, a wrong "
                "data length or a decoded value out of range is a 422 naming the frame. " + limits,
                "security": [{"apiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": frames},
                        "application/x-ndjson": {"schema": {"type": "string", "maxLength": settings.max_body_bytes}},
                    },
                },
                "responses": ingest_responses,
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "canpipe", "version": "0.1.0"},
        "paths": {
            "/ingest": {
                "post": {
                    "summary": "Ingest decoded battery telemetry",
                    "description": "One record, a JSON array of them, or NDJSON; all-or-nothing. " + limits,
                    "security": [{"apiKey": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": body},
                            "application/x-ndjson": {
                                "schema": {"type": "string", "maxLength": settings.max_body_bytes}
                            },
                        },
                    },
                    "responses": ingest_responses,
                }
            },
            **paths,
            "/health": {
                "get": {
                    "summary": "200 when the queue is reachable",
                    "responses": {
                        "200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "503": {
                            "description": "queue unreachable",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text",
                    "responses": {"200": {"description": "metrics", "content": plain}},
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }
