"""The bare anchor of ``bench/bench_receiver.py``: Starlette on Granian that decodes the body with canpipe's
msgspec Struct and answers 202, nothing else (no auth, no clock check, no queue).

What the receiver is measured against: the cost of HTTP, Starlette routing and msgspec decoding alone.
"""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.schema import Telemetry

_decode = msgspec.json.Decoder(Telemetry).decode


async def ingest(request: Request) -> Response:
    try:
        _decode(await request.body())
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return JSONResponse({"error": "validation", "detail": str(exc)}, status_code=422)
    return JSONResponse({"accepted": 1}, status_code=202)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/ingest", ingest, methods=["POST"]), Route("/health", health, methods=["GET"])])
