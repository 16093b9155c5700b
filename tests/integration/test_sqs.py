"""The pipeline on SQS over the real wire protocol: aiobotocore against moto's server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time

import pytest
from canpipe_testing import create_queue, make_record, post_json, queue_empty, wait_for
from integration.test_pipeline import key, on_disk
from sqs_proxy import FaultProxy

from engine.metrics import read_snapshots
from engine.queues import open_queue

pytestmark = pytest.mark.slow


def drain_bodies(url: str) -> list[bytes]:
    async def go():
        queue = open_queue(url)
        out = []
        while messages := await queue.receive(10, 1):
            out += [m.body for m in messages]
        await queue.close()
        return out

    return asyncio.run(go())


@pytest.fixture
def sqs(env, sqs_env):
    create_queue(sqs_env["CANPIPE_QUEUE_URL"])
    return env | sqs_env


def test_canpipe_run_on_sqs_reports_cost(sqs, data_dir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "run",
            "--data-dir",
            str(data_dir),
            "--duration",
            "2",
            "--vehicles",
            "5",
            "--rate-ms",
            "50",
        ],
        env=sqs,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "missing 0" in done.stdout
    assert "SQS: " in done.stdout and "per 1,000" in done.stdout and "SendMessageBatch" in done.stdout


def test_partial_send_failure_retries_exactly_the_failed_entries(serve, sqs, moto_endpoint):
    with FaultProxy(moto_endpoint) as proxy:
        url = serve(sqs | {"AWS_ENDPOINT_URL_SQS": proxy.url})
        assert post_json(url, make_record(0))[0] == 202  # the receiver has read the queue's limits
        proxy.fail_send = 1
        # one request larger than a message: split into several entries of one call
        # distinct by content, not by clock: "now - i ms" repeats when the clock moves exactly (j - i) ms between
        # two records of one vehicle (a stall while building them), and one CI run got 4,000 unique of 4,001
        records = [make_record(i, vehicle_id=f"EV-{i % 7}", battery_soc=i / 40) for i in range(4000)]
        assert post_json(url, records)[0] == 202
        sends = [bodies for action, bodies in proxy.calls if action == "SendMessageBatch"][1:]
        (failed,) = proxy.failed
        assert len(sends[0]) >= 2 and failed in sends[0]
        assert sends[1:] == [[failed]]  # the retry carried exactly the failed entry, nothing else
    lines = [line for body in drain_bodies(sqs["CANPIPE_QUEUE_URL"]) for line in body.splitlines()]
    assert len(lines) == 4001 and len(set(lines)) == 4001  # every record once


def test_partial_delete_failure_becomes_a_duplicate_never_a_loss(serve, start, sqs, data_dir, moto_endpoint):
    with FaultProxy(moto_endpoint) as proxy:
        env = sqs | {"AWS_ENDPOINT_URL_SQS": proxy.url, "CANPIPE_VISIBILITY_TIMEOUT_S": "2"}
        url = serve(env)
        proxy.fail_delete = 1
        consumers = start(["consume", "--workers", "1"], env)
        records = [make_record(i) for i in range(30)]
        assert post_json(url, records)[0] == 202
        wait_for(lambda: len(on_disk(data_dir)) >= 60, 60, "the redelivered copy")
        wait_for(lambda: queue_empty(sqs["CANPIPE_QUEUE_URL"]), 30, "an empty queue")
        assert consumers.stop() == 0
    keys = [key(r) for r in on_disk(data_dir)]
    assert set(keys) == {key(r) for r in records} and len(keys) == 60
    counters = read_snapshots(data_dir / "metrics").counters
    assert counters['canpipe_consumer_errors_total{stage="delete"}'] == 1
    assert counters["canpipe_consumer_redelivered_messages_total"] == 1


def test_sqs_outage_gives_503_in_bounded_time_then_recovers(serve, sqs, moto_endpoint):
    with FaultProxy(moto_endpoint) as proxy:
        url = serve(sqs | {"AWS_ENDPOINT_URL_SQS": proxy.url, "CANPIPE_PUBLISH_TIMEOUT_S": "3"})
        assert post_json(url, make_record(1))[0] == 202
        proxy.down = True
        started = time.monotonic()
        status, headers, _ = post_json(url, make_record(2))
        assert status == 503 and headers["retry-after"]
        assert time.monotonic() - started < 10
        from canpipe_testing import http

        assert http("GET", url + "/health")[0] == 503
        proxy.down = False
        wait_for(lambda: http("GET", url + "/health")[0] == 200, 20, "health to recover")
        assert post_json(url, make_record(3))[0] == 202


def test_timestamps_survive_the_sqs_round_trip(sqs):
    """Compressed bodies come back byte for byte."""
    import json

    from engine.schema import decode_records, encode_stored

    body = encode_stored(
        decode_records(json.dumps([make_record(i) for i in range(50)]).encode(), ndjson=False), dt.datetime.now(dt.UTC)
    )
    assert len(body) > 2048  # large enough to be compressed on the way

    async def go():
        queue = open_queue(sqs["CANPIPE_QUEUE_URL"])
        await queue.send_batch([body, b'{"small":1}\n'])
        got = []
        while len(got) < 2:
            got += await queue.receive(10, 2)
        await queue.close()
        return sorted(m.body for m in got)

    assert asyncio.run(go()) == sorted([body, b'{"small":1}\n'])
