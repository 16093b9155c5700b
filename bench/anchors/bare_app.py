"""The bare anchor of ``bench/bench_receiver.py``: Starlette on Granian that decodes the body with canpipe's
msgspec Struct and answers 202, nothing else (no auth, no clock check, no queue). NDJSON bodies (the batched
anchor) are only counted: the ceiling of HTTP and Starlette on the box, with no work per record at all.

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
    body = await request.body()
    try:
        if request.headers.get("content-type", "").startswith("application/x-ndjson"):
            # the ceiling of a batch: HTTP and Starlette only, the records counted, not decoded (decoding them
            # as one array of the Struct costs ~2-4 us a record more; the receiver's batch path ~1.2 us)
            accepted = body.count(b"\n")
        else:
            _decode(body)
            accepted = 1
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return JSONResponse({"error": "validation", "detail": str(exc)}, status_code=422)
    return JSONResponse({"accepted": accepted}, status_code=202)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/ingest", ingest, methods=["POST"]), Route("/health", health, methods=["GET"])])
