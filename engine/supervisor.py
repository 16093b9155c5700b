"""Runs N consumer processes, restarts any that crash, drains them all on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
import time

from engine.config import Settings
from engine.consumer import Consumer, writer_id
from engine.queues import open_queue
from engine.storage import PartitionWriter, repair_torn_tails

log = logging.getLogger("canpipe.supervisor")


async def _consume(settings: Settings) -> Consumer:
    queue = open_queue(settings.queue_url, visibility_timeout_s=settings.visibility_timeout_s)
    wid = writer_id()
    repair_torn_tails(settings.data_dir / "raw")
    writer = PartitionWriter(settings.data_dir, wid, rotate_bytes=settings.rotate_bytes)
    metrics_dir = settings.data_dir / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    consumer = Consumer(settings, queue, writer, snapshot=metrics_dir / f"consumer-{wid}.metrics")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await consumer.run(stop)
    finally:
        writer.close()
        await queue.close()
    counters = consumer.metrics.counters
    errors = sum(v for k, v in counters.items() if k.startswith("canpipe_consumer_errors_total"))
    print(
        f"consumer {wid}: {counters['canpipe_consumer_records_written_total']} records written in "
        f"{counters['canpipe_consumer_batches_total']} batches, {errors} errors",
        flush=True,
    )
    return consumer


def worker_main(settings: Settings) -> None:
    """Entry point of one consumer process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM drains
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio serves without it
        asyncio.run(_consume(settings))
    else:
        uvloop.run(_consume(settings))


class Supervisor:
    """Keeps ``workers`` consumer processes alive until told to stop."""

    def __init__(self, settings: Settings, workers: int, *, grace_s: float = 30.0) -> None:
        self.settings = settings
        self.workers = workers
        self.grace_s = grace_s
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._stopping = False

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        proc = self._context.Process(target=worker_main, args=(self.settings,), name="canpipe-consumer")
        proc.start()
        return proc

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self._procs = [self._spawn() for _ in range(self.workers)]
        backoff = dict.fromkeys(range(self.workers), 0.5)
        while not self._stopping:
            multiprocessing.connection.wait([p.sentinel for p in self._procs], timeout=0.5)
            for index, proc in enumerate(self._procs):
                if proc.exitcode is not None and not self._stopping:
                    log.error(
                        "consumer pid %s exited with %s; restarting in %.1f s", proc.pid, proc.exitcode, backoff[index]
                    )
                    time.sleep(backoff[index])
                    backoff[index] = min(backoff[index] * 2, 10.0)
                    self._procs[index] = self._spawn()
                    self.restarts += 1
        return self._drain()

    def _drain(self) -> int:
        for proc in self._procs:
            if proc.exitcode is None and proc.pid is not None:
                proc.terminate()  # SIGTERM: flush, delete, exit 0
        deadline = time.monotonic() + self.grace_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("consumer pid %s did not drain within %.0f s; killing it", proc.pid, self.grace_s)
                proc.kill()
                proc.join()
        codes = [proc.exitcode for proc in self._procs]
        print(
            f"supervisor: {self.workers} consumers stopped, exit codes {codes}, {self.restarts} restarts",
            file=sys.stderr,
        )
        return 0 if all(code == 0 for code in codes) else 1
