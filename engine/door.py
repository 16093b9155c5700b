"""The door's answers, shared by ``POST /ingest`` (engine.receiver) and ``POST /ingest/can`` (engine.can.ingest).

The media types a body may have, the error answer (``{"error", "detail", ...}`` with the code that labels the
rejection counters), the answer to a body that could not be read, and the Retry-After value.
"""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

from engine.body import BodyTooLarge, UnsupportedEncoding
from engine.config import Settings

JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}
JSON_MEDIA = {t.encode() for t in JSON_TYPES}  # as ASGI headers hold them
NDJSON_MEDIA = {t.encode() for t in NDJSON_TYPES}


class Refusal(JSONResponse):
    """An error answer; its error code labels the rejection counters."""

    def __init__(self, status: int, error: str, body: dict[str, object], headers: dict[str, str] | None) -> None:
        super().__init__(body, status_code=status, headers=headers)
        self.reason = error


def refuse(status: int, error: str, detail: str, headers: dict[str, str] | None = None, **extra: object) -> Refusal:
    return Refusal(status, error, {"error": error, "detail": detail, **extra}, headers)


CLOSE = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused


def body_refusal(exc: BaseException, settings: Settings) -> Refusal:
    """The answer to a body that could not be read (``engine.body.READ_ERRORS``), for /ingest and /ingest/can:
    after 413, 408 and 400 the rest of the body is unread, so the connection closes."""
    if isinstance(exc, UnsupportedEncoding):
        return refuse(
            415, "unsupported_media_type", f"Content-Encoding {exc} is not supported: send gzip, deflate or none"
        )
    if isinstance(exc, BodyTooLarge):
        return refuse(413, "too_large", f"body exceeds {settings.max_body_bytes} bytes", headers=CLOSE)
    if isinstance(exc, TimeoutError):
        return refuse(408, "timeout", f"body not received within {settings.body_timeout_s:g} s", headers=CLOSE)
    return refuse(400, "bad_body", str(exc), headers=CLOSE)


def retry_after(wait_s: float) -> str:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait_s)))
