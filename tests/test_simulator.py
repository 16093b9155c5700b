"""The simulator's pack model and its client behaviour (against a small local HTTP server)."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import msgspec
from aiohttp import web

from engine.schema import Telemetry
from engine.simulator import PackModel, Simulator, describe


def test_pack_model_stays_physically_valid_for_an_hour():
    pack = PackModel(random.Random(11))
    soc0 = pack.soc
    decoder = msgspec.json.Decoder(Telemetry)
    for _ in range(18_000):  # one hour at 200 ms
        payload = pack.step(0.2)
        decoder.decode(
            json.dumps(
                {"timestamp": "2026-01-01T00:00:00Z", "vehicle_id": "EV-1", "can_id": "0x132", "payload": payload}
            )
        )
    assert pack.soc < soc0  # driving drains the pack (seed 11)
    assert 250 < payload["battery_voltage"] < 420


def test_retries_503_then_counts_accepted_and_rejected():
    statuses = [503, 503, 202, 422]
    seen = []

    async def ingest(request):
        seen.append(await request.json())
        status = statuses.pop(0)
        return web.json_response({}, status=status, headers={"Retry-After": "0"} if status == 503 else {})

    async def main():
        app = web.Application()
        app.router.add_post("/ingest", ingest)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        sim = Simulator(f"http://127.0.0.1:{port}", api_key="k:s", keep_accepted=True)
        records = [{"n": 1}, {"n": 2}]
        try:
            async with aiohttp.ClientSession() as session:
                await sim._post(session, records[:1])  # 503, 503, then 202
                await sim._post(session, records[1:])  # 422: rejected, not retried
        finally:
            await runner.cleanup()
        return sim.result

    result = asyncio.run(main())
    assert (result.retries, result.accepted, result.rejected, result.failed, result.requests) == (2, 1, 1, 0, 4)
    assert result.accepted_records == [{"n": 1}] and seen[-1] == {"n": 2}
    assert "retries 2" in describe(result)


def test_unreachable_receiver_counts_failures():
    sim = Simulator("http://127.0.0.1:9", vehicles=1, rate_ms=1000, duration_s=0.1, max_attempts=2)
    result = asyncio.run(sim.run())
    assert result.failed == 1 and result.accepted == 0
