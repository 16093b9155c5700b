"""A fault-injecting HTTP proxy in front of moto's S3 server, for tests only.

Point a client at ``proxy.url`` (``AWS_ENDPOINT_URL_S3``, path-style addressing as canpipe uses with an
endpoint). Every request is forwarded unchanged (headers such as ``If-None-Match`` and ``ETag``, bodies
streamed both ways), except for the writes of an object (PutObject, UploadPart, CompleteMultipartUpload)
whose key contains ``match`` (``faulty`` narrows the operations) when told to:

- ``fail_puts = N``: answer the next N with ``status`` (503 SlowDown, or 500 InternalError) without
  forwarding them; ``math.inf`` fails them until set back to 0. The client's own retries count, one each;
- ``drop_puts = N``: read half of the next N bodies, then close the connection (no answer, nothing stored);
- ``lose_answers = N``: forward the next N, so the object IS stored, then close the connection instead of
  answering (a lost answer: the client retries a put that already succeeded);
- ``delay_gets = seconds``: hold each GetObject whose key contains ``match`` that long before forwarding.

``calls`` records ``Call(operation, key, status)`` for every request; ``status`` 0 for a dropped one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from http_proxy import ProxyBase

WRITES = ("PutObject", "UploadPart", "CompleteMultipartUpload")


@dataclass(frozen=True)
class Call:
    operation: str
    key: str  # "bucket/key" as in the path
    status: int  # 0: the connection was closed without an answer


def operation(request: web.Request) -> str:
    """The S3 operation a path-style request names (the ones the tests look at; "Other" for the rest)."""
    query = request.query
    has_key = "/" in request.path.strip("/")
    if request.method == "PUT" and has_key:
        if "partNumber" in query and "uploadId" in query:
            return "UploadPart"
        if "x-amz-copy-source" in request.headers:
            return "CopyObject"
        return "PutObject" if not query else "Other"
    if request.method == "POST" and has_key:
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "uploads" in query:
            return "CreateMultipartUpload"
    if request.method == "DELETE" and has_key:
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if request.method == "GET":
        return "GetObject" if has_key and not query else "ListObjects" if not has_key else "Other"
    if request.method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    return "Other"


ERRORS = {
    503: ("SlowDown", "Please reduce your request rate (injected by the test proxy)."),
    500: ("InternalError", "We encountered an internal error (injected by the test proxy)."),
}


class S3FaultProxy(ProxyBase):
    def __init__(self, upstream: str, match: str = "/raw/") -> None:
        super().__init__(upstream)
        self.match = match
        self.faulty = set(WRITES)  # the operations the fail/drop/lose budgets apply to
        self.fail_puts: float = 0
        self.status = 503
        self.drop_puts = 0
        self.lose_answers = 0
        self.delay_gets = 0.0
        self.calls: list[Call] = []

    def count(self, op: str, status: int | None = None) -> int:
        """How many ``op`` calls were made (answered with ``status``, when given)."""
        return sum(1 for c in self.calls if c.operation == op and (status is None or c.status == status))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = operation(request)
        key = request.path.lstrip("/")
        faulty = op in self.faulty and self.match in request.path
        if faulty and self.fail_puts > 0:
            self.fail_puts -= 1
            await request.read()  # the client sent it whole; the answer is the error
            code, message = ERRORS[self.status]
            self.calls.append(Call(op, key, self.status))
            body = f"<?xml version='1.0'?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return web.Response(status=self.status, body=body.encode(), content_type="application/xml")
        if faulty and self.drop_puts > 0:
            self.drop_puts -= 1
            await request.content.read(max(1, (request.content_length or 2) // 2))
            self.calls.append(Call(op, key, 0))
            return self.drop(request)
        if op == "GetObject" and self.match in request.path and self.delay_gets:
            await asyncio.sleep(self.delay_gets)
        lose = faulty and self.lose_answers > 0
        if lose:
            self.lose_answers -= 1
        async with self.forward(request, request.content if request.can_read_body else b"") as upstream:
            self.calls.append(Call(op, key, 0 if lose else upstream.status))
            if lose:
                await upstream.read()  # stored upstream; the client never hears so
                return self.drop(request)
            return await self.relay(request, upstream)
