"""The whole pipeline for real: Granian receiver, consumer processes, embedded queue, files on disk."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time

import pytest
from canpipe_testing import (
    API_KEY,
    children,
    consumers_polling,
    create_queue,
    key,
    make_record,
    on_disk,
    post_json,
    queue_counts,
    queue_empty,
    wait_for,
)

from engine.metrics import read_snapshots
from engine.simulator import Simulator

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "sqs"])
def backend_env(request, env):
    """The embedded queue, or a fresh queue on the SQS emulator."""
    if request.param == "sqlite":
        return env
    sqs_env = request.getfixturevalue("sqs_env")
    create_queue(sqs_env["CANPIPE_QUEUE_URL"])
    return env | sqs_env


def test_seed_integration_1000_messages_every_one_on_disk_unchanged(serve, start, backend_env, data_dir):
    url = serve(backend_env)
    consumers = start(["consume", "--workers", "2"], backend_env)
    # the end-to-end bound is for a running pipeline: a consumer's start-up (its SQS client takes a second
    # or more of CPU to build on a busy machine) is not the latency of a record
    wait_for(lambda: consumers_polling(data_dir) == 2, 60, "both consumers polling the queue")
    sim = Simulator(
        # 250 records/s for 4 s: the open-loop simulator sends on time, and a 1 s burst could all land in
        # one consumer's long polls; over 4 s both consumers take part (checked below on SQS)
        url,
        api_key=API_KEY,
        vehicles=20,
        rate_ms=80,
        duration_s=60,
        count=1000,
        keep_accepted=True,
        seed=7,
    )
    result = asyncio.run(sim.run())
    assert result.accepted == 1000 and result.failed == result.rejected == 0
    sent = {key(r): r for r in result.accepted_records}
    wait_for(lambda: set(sent) <= {key(r) for r in on_disk(data_dir)}, 90, "every accepted record on disk")
    stored = {key(r): r for r in on_disk(data_dir)}
    for k, record in sent.items():
        assert stored[k]["payload"] == record["payload"]
    assert consumers.stop() == 0
    metrics = read_snapshots(data_dir / "metrics")
    assert metrics.latency["end_to_end"].count >= len(sent)
    assert metrics.latency["end_to_end"].quantile(0.95) < 5000
    assert queue_empty(backend_env["CANPIPE_QUEUE_URL"])
    if "http" in backend_env["CANPIPE_QUEUE_URL"]:  # on SQS both consumer processes took part
        assert len({p.name.split("-", 2)[2] for p in (data_dir / "raw").rglob("*.jsonl")}) >= 2


def test_kill_9_between_write_and_delete_redelivers_and_loses_nothing(serve, start, env, data_dir):
    url = serve(env)
    env = env | {"CANPIPE_VISIBILITY_TIMEOUT_S": "3", "CANPIPE_BATCH_SECONDS": "1.0"}
    first = start(["consume", "--workers", "1"], env)
    records = [make_record(i) for i in range(50)]
    assert post_json(url, records)[0] == 202
    wait_for(lambda: queue_counts(data_dir)[1] == 1, 20, "the consumer to hold the message")
    # hold the queue's write lock: the consumer writes and fsyncs, then blocks in its delete
    lock = sqlite3.connect(data_dir / "queue.db", isolation_level=None, timeout=10)
    lock.execute("BEGIN IMMEDIATE")
    try:
        wait_for(lambda: len(on_disk(data_dir)) == 50, 20, "the batch on disk")
        (worker,) = children(first.pid)
        os.kill(worker, signal.SIGKILL)
        first.stop(signal.SIGKILL)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert queue_counts(data_dir)[0] == 1  # written, never deleted
    start(["consume", "--workers", "1"], env)
    wait_for(lambda: queue_counts(data_dir) == (0, 0), 30, "redelivery and delete")
    keys = [key(r) for r in on_disk(data_dir)]
    assert set(keys) == {key(r) for r in records}
    assert len(keys) == 100  # every record twice: a duplicate, never a loss


def test_sigterm_drains_held_batch_and_exits_zero(serve, start, env, data_dir):
    url = serve(env)
    consumers = start(["consume", "--workers", "1", "--batch-seconds", "60"], env)
    assert post_json(url, [make_record(i) for i in range(10)])[0] == 202
    wait_for(lambda: queue_counts(data_dir)[1] == 1, 20, "the consumer to hold the batch")
    assert on_disk(data_dir) == []
    started = time.monotonic()
    assert consumers.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert len(on_disk(data_dir)) == 10
    assert queue_counts(data_dir) == (0, 0)
    assert "10 records written in 1 batches, 0 errors" in consumers.output()


def test_supervisor_restarts_a_crashed_consumer(serve, start, env, data_dir):
    url = serve(env)
    consumers = start(["consume", "--workers", "2"], env)
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "two consumer processes")
    victim = min(children(consumers.pid))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(consumers.pid)) == 2 and victim not in children(consumers.pid), 30, "a restart")
    assert post_json(url, [make_record(i) for i in range(5)])[0] == 202
    wait_for(lambda: len(on_disk(data_dir)) == 5, 30, "records written after the restart")
    assert consumers.stop() == 0
    assert "1 restarts" in consumers.output()
