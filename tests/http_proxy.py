"""The common part of the fault-injecting test proxies (tests/sqs_proxy.py, tests/s3_proxy.py): an aiohttp
server on 127.0.0.1 in a thread of its own, forwarding to moto's server through fresh connections.

A subclass writes ``_handle(request)``; ``forward`` sends a request upstream unchanged (body bytes, or the
request's stream) and ``relay`` streams an upstream answer back with its status and headers.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Self

import aiohttp
from aiohttp import web
from canpipe_testing import free_port

# hop-by-hop headers: the proxy's own connections carry them, never the forwarded message
HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "expect"})


class ProxyBase:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
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
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        # a fresh upstream connection per request: moto closes idle keep-alive connections
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as self._session:
            self._started.set()
            await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def forward(self, request: web.Request, body: Any) -> Any:
        """The upstream request (an async context manager) for ``request`` with ``body``: bytes, or
        ``request.content`` to stream it through (its Content-Length kept, so nothing is re-chunked)."""
        keep_length = not isinstance(body, bytes | bytearray)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and (keep_length or k.lower() != "content-length")
        }
        return self._session.request(
            request.method,
            self.upstream + request.raw_path,
            data=body,
            headers=headers,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent"),
            allow_redirects=False,
        )

    @staticmethod
    async def relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Stream ``upstream``'s answer back to the client unchanged (status, headers, body)."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
        await response.write_eof()
        return response

    @staticmethod
    def drop(request: web.Request) -> web.Response:
        """Close the client's connection without an answer (a network failure as the client sees it)."""
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=599)  # never sent: the transport is gone
