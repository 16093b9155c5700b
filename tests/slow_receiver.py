"""A receiver that answers 202 after a delay: ``python tests/slow_receiver.py PORT``.

``POST /slow/ingest`` answers after 200 ms, ``POST /fast/ingest`` at once. It runs in its own process so
that it does not share the GIL with the load generator under test. Started and stopped by the tests.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

DELAY_S = 0.2


async def slow(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(DELAY_S)
    return web.json_response({"accepted": 1}, status=202)


async def fast(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"accepted": 1}, status=202)


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/slow/ingest", slow)
    app.router.add_post("/fast/ingest", fast)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), backlog=1024, print=None, access_log=None)
