"""A fault-injecting HTTP proxy in front of moto's SQS server, for tests only.

It forwards every request unchanged, except when told to: fail the first entry of the next N
SendMessageBatch or DeleteMessageBatch calls (the client sees a genuine 200 with a ``Failed`` list,
as SQS answers a partial failure), or answer every call with 503 (an outage).
"""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
from aiohttp import web
from canpipe_testing import free_port


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fail_send = 0
        self.fail_delete = 0
        self.down = False
        self.calls: list[tuple[str, list[str]]] = []  # (action, entry bodies or receipts)
        self.failed: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        assert self._started.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        # a fresh upstream connection per request: moto closes idle keep-alive connections
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as self._session:
            self._started.set()
            await self._stop.wait()
        await runner.cleanup()

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
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            async with self._session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as upstream:
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
