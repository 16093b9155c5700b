"""The simulator's pack model and its client behaviour (against a small local HTTP server)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys

import aiohttp
import msgspec
import pytest
from aiohttp import web
from canpipe_testing import free_port, http, start_answering, stop_process

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


# --- open loop: the asked rate against a receiver made slow on purpose ---------------------------------------


@pytest.fixture(scope="module")
def receiver_base(tmp_path_factory):
    """A real HTTP server in its own process on 127.0.0.1 (tests/slow_receiver.py): ``{base}/slow`` answers
    202 after 200 ms, ``{base}/fast`` at once. Stopped by its PID."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_answering(
        [sys.executable, os.path.join(os.path.dirname(__file__), "slow_receiver.py"), str(port)],
        tmp_path_factory.mktemp("slow-receiver") / "out.log",
        lambda: http("POST", f"{base}/fast/ingest", b"{}", timeout=1)[0] == 202,
        30,
    )
    yield base
    stop_process(proc)


@pytest.fixture
def slow_receiver(receiver_base):
    return f"{receiver_base}/slow"


def test_slow_receiver_does_not_lower_the_rate(receiver_base):
    # 5 vehicles every 20 ms = 250 records/s; at 200 ms an answer, a vehicle waiting for each answer would
    # send 5 a second (25 records/s in all): open-loop keeps ~10 requests in flight per vehicle instead.
    # The same schedule against a receiver that answers at once, in the same run, is the reference: on a
    # starved machine the generator itself falls behind, and that is no fault of the slow answers.
    def run(path: str):
        sim = Simulator(f"{receiver_base}/{path}", vehicles=5, rate_ms=20, duration_s=2.0)
        return asyncio.run(sim.run())

    fast = run("fast")
    slow = run("slow")
    summary = f"fast: {describe(fast)}\nslow: {describe(slow)}"
    assert slow.target_rate == pytest.approx(250.0)
    assert slow.accepted == slow.sent >= 250 and slow.failed == 0, summary
    assert slow.http_ms.quantile(0.5) >= 190, summary  # the answers were slow indeed
    assert slow.achieved_rate >= 0.85 * fast.achieved_rate, summary
    assert slow.achieved_rate >= 0.6 * 250.0, summary  # a closed loop would reach 25 records/s
    assert ("SHORTFALL" in describe(slow)) == slow.short
    assert "target 250.0 records/s, achieved" in summary


def test_a_held_back_rate_is_reported_and_fails_with_strict(slow_receiver):
    # two requests in flight at 200 ms each carry 10 requests/s (10 records/s), far under the 250 asked
    args = ["--url", slow_receiver, "--vehicles", "5", "--rate-ms", "20", "--duration", "2", "--max-in-flight", "2"]
    lenient = simulate(*args)
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert "SHORTFALL" in lenient.stdout and "late sends" in lenient.stdout, lenient.stdout
    achieved = float(re.search(r"achieved ([\d.]+) records/s", lenient.stdout).group(1))
    assert achieved < 0.5 * 250, lenient.stdout
    late = int(re.search(r"(\d+) late sends", lenient.stdout).group(1))
    assert late > 0, lenient.stdout
    strict = simulate(*args, "--strict")
    assert strict.returncode == 1 and "SHORTFALL" in strict.stdout, strict.stdout + strict.stderr


def test_strict_passes_an_on_time_run(slow_receiver):
    done = simulate("--url", slow_receiver, "--vehicles", "2", "--rate-ms", "50", "--duration", "1.5", "--strict")
    assert done.returncode == 0 and "SHORTFALL" not in done.stdout, done.stdout + done.stderr


def test_a_dead_receiver_is_named_with_the_connection_error():
    port = free_port()  # nothing listens there
    sim = Simulator(f"http://127.0.0.1:{port}", vehicles=1, rate_ms=1000, duration_s=0.1, max_attempts=2)
    result = asyncio.run(sim.run())
    summary = describe(result)
    assert result.failed == 1 and "after 2 attempts" in summary, summary
    assert "Cannot connect to host 127.0.0.1" in summary, summary


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"CANPIPE_LOG_FORMAT": "text"},
    )


def test_fleet_size_and_pace_come_from_the_environment_and_flags_win(slow_receiver, monkeypatch):
    monkeypatch.setenv("CANPIPE_NUM_VEHICLES", "3")
    monkeypatch.setenv("CANPIPE_SAMPLING_RATE_MS", "100")
    monkeypatch.setenv("CANPIPE_DURATION_SECONDS", "1")
    by_env = simulate("--url", slow_receiver)
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    assert "target 30.0 records/s" in by_env.stdout, by_env.stdout
    assert 20 <= int(re.search(r"sent (\d+)", by_env.stdout).group(1)) <= 30, by_env.stdout  # 3 vehicles x 10 s^-1
    assert "not a canpipe setting" not in by_env.stderr
    by_flag = simulate("--url", slow_receiver, "--vehicles", "1")
    assert "target 10.0 records/s" in by_flag.stdout, by_flag.stdout
    for bad in ("many", "0"):
        monkeypatch.setenv("CANPIPE_NUM_VEHICLES", bad)
        refused = simulate("--url", slow_receiver)
        assert refused.returncode == 1 and "CANPIPE_NUM_VEHICLES" in refused.stderr, refused.stderr
