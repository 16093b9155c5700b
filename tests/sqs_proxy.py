"""A fault-injecting HTTP proxy in front of moto's SQS server, for tests only.

It forwards every request unchanged, except when told to: fail the first entry of the next N
SendMessageBatch or DeleteMessageBatch calls (the client sees a genuine 200 with a ``Failed`` list,
as SQS answers a partial failure), or answer every call with 503 (an outage).
"""

from __future__ import annotations

import json

from aiohttp import web
from http_proxy import ProxyBase


class FaultProxy(ProxyBase):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.fail_send = 0
        self.fail_delete = 0
        self.down = False
        self.calls: list[tuple[str, list[str]]] = []  # (action, entry bodies or receipts)
        self.failed: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        action = request.headers.get("X-Amz-Target", "").removeprefix("AmazonSQS.")
        body = await request.read()
        if self.down:
            return web.json_response({"__type": "ServiceUnavailable", "message": "injected outage"}, status=503)
        injected = None
        if action in ("SendMessageBatch", "DeleteMessageBatch") and body:
            params = json.loads(body)
            entries = params["Entries"]
            self.calls.append((action, [e.get("MessageBody") or e.get("ReceiptHandle") for e in entries]))
            budget = "fail_send" if action == "SendMessageBatch" else "fail_delete"
            if getattr(self, budget) > 0:
                setattr(self, budget, getattr(self, budget) - 1)
                injected, params["Entries"] = entries[0], entries[1:]
                self.failed.append(injected.get("MessageBody") or injected.get("ReceiptHandle"))
                body = json.dumps(params).encode()
        if injected is not None and not json.loads(body)["Entries"]:
            result: dict = {"Successful": [], "Failed": []}
            status, content_type = 200, "application/x-amz-json-1.0"
        else:
            async with self.forward(request, body) as upstream:
                raw, status = await upstream.read(), upstream.status
                content_type = upstream.headers.get("Content-Type", "application/x-amz-json-1.0")
            if injected is None:
                return web.Response(body=raw, status=status, headers={"Content-Type": content_type})
            result = json.loads(raw)
        result.setdefault("Failed", []).append(
            {
                "Id": injected["Id"],
                "SenderFault": False,
                "Code": "InternalError",
                "Message": "injected by the test proxy",
            }
        )
        return web.Response(body=json.dumps(result).encode(), status=status, headers={"Content-Type": content_type})
