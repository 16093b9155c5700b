"""Runs N consumer processes, restarts any that crash, drains them all on SIGTERM/SIGINT.

A worker that exits unasked is restarted after a backoff (0.5 s doubling to 10 s, per slot) that starts
over once a worker has run healthily for ``HEALTHY_S``: a crash a day apart is not a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from engine import logs
from engine.config import Settings
from engine.consumer import Consumer, writer_id
from engine.errors import QueueBroken, QueueError, StorageError
from engine.queues import open_queue
from engine.storage import PartitionWriter, repair_torn_tails

if TYPE_CHECKING:
    from engine.storage.s3 import S3Writer

log = logging.getLogger("canpipe.supervisor")

HEALTHY_S = 30.0  # a worker that ran this long before exiting restarts with the first backoff again
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
EXIT_QUEUE_BROKEN = 3
EXIT_STORAGE = 4
EXIT_UNEXPECTED = 1


class RestartBackoff:
    """The delay before restarting one worker slot: doubles per crash, resets after a healthy run."""

    def __init__(self, healthy_s: float = HEALTHY_S) -> None:
        self.healthy_s = healthy_s
        self.next_s = FIRST_BACKOFF_S

    def delay_s(self, ran_s: float) -> float:
        """Seconds to wait before the restart of a worker that ran ``ran_s`` seconds."""
        if ran_s >= self.healthy_s:
            self.next_s = FIRST_BACKOFF_S
        delay, self.next_s = self.next_s, min(self.next_s * 2, MAX_BACKOFF_S)
        return delay


async def _consume(settings: Settings) -> Consumer:
    queue = open_queue(settings.queue_url, visibility_timeout_s=settings.visibility_timeout_s)
    wid = writer_id()
    writer: PartitionWriter | S3Writer
    if settings.storage_url.is_s3:
        from engine.storage.s3 import S3Writer

        writer = S3Writer(settings.storage_url, compression=settings.raw_compression)
        await writer.store.check()  # a missing bucket or no credentials: said now, not at the first put
    else:  # what a dead writer left is repaired by the supervisor, before any worker starts and at each death
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
        if isinstance(writer, PartitionWriter):
            writer.close()
        else:
            await writer.close()
        with contextlib.suppress(QueueError):
            await queue.close()
    counters = consumer.metrics.counters
    errors = sum(v for k, v in counters.items() if k.startswith("canpipe_consumer_errors_total"))
    written, batches = counters["canpipe_consumer_records_written_total"], counters["canpipe_consumer_batches_total"]
    # the shutdown summary is a log event like any other, so that a JSON log stays JSON to its last line
    logging.getLogger("canpipe.consumer").info(
        "consumer %s: %d records written in %d batches, %d errors",
        wid,
        written,
        batches,
        errors,
        extra={"writer": wid, "records_written": written, "batches": batches, "errors": errors},
    )
    return consumer


def _run_loop(main: Coroutine[Any, Any, Consumer]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio serves without it
        asyncio.run(main)
    else:
        uvloop.run(main)


def worker_main(settings: Settings) -> None:
    """Entry point of one consumer process."""
    logs.configure()  # the level and format the parent resolved, handed down in CANPIPE_LOG_*
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM drains
    try:
        _run_loop(_consume(settings))
    except QueueBroken as exc:
        log.error("consumer exiting: the queue is broken: %s", exc, extra={"stage": "receive"})
        sys.exit(EXIT_QUEUE_BROKEN)
    except StorageError as exc:
        log.error("consumer exiting: %s", exc, extra={"stage": "storage"})
        sys.exit(EXIT_STORAGE)
    except Exception:
        log.exception("consumer exiting on an unexpected error", extra={"stage": "consumer"})
        sys.exit(EXIT_UNEXPECTED)


class Supervisor:
    """Keeps ``workers`` consumer processes alive until told to stop."""

    def __init__(
        self, settings: Settings, workers: int, *, grace_s: float = 30.0, healthy_s: float = HEALTHY_S
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.grace_s = grace_s
        self.healthy_s = healthy_s
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._started: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self._stopping = False

    def _spawn(self, index: int) -> multiprocessing.process.BaseProcess:
        proc = self._context.Process(target=worker_main, args=(self.settings,), name="canpipe-consumer")
        proc.start()
        self._started[index] = time.monotonic()
        return proc

    def _repair(self) -> None:
        """Cut the torn tails and remove the partial files dead writers left: once before any worker starts
        (a crash of a previous supervisor, or of the host), and as soon as a worker dies, not at its
        replacement's start, which a stop during the restart's backoff may never come to."""
        if self.settings.storage_url.is_s3:
            return  # an S3 object is put whole or not at all
        try:
            repair_torn_tails(self.settings.data_dir / "raw")
        except OSError as exc:  # the next worker's start tries again
            log.warning("could not repair the raw files: %s", exc, extra={"stage": "storage"})

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self._repair()
        self._procs = [self._spawn(index) for index in range(self.workers)]
        backoff = [RestartBackoff(self.healthy_s) for _ in range(self.workers)]
        restart_at = self._restart_at  # slot -> when its dead worker is replaced (the others go on)
        while not self._stopping:
            now = time.monotonic()
            wait_s = min([0.5, *(max(0.0, at - now) for at in restart_at.values())])
            multiprocessing.connection.wait([p.sentinel for p in self._procs if p.exitcode is None], timeout=wait_s)
            now = time.monotonic()
            for index, proc in enumerate(self._procs):
                if self._stopping or proc.exitcode is None:
                    continue
                if index not in restart_at:
                    delay = backoff[index].delay_s(now - self._started[index])
                    log.error(
                        "consumer pid %s exited with %s; restarting in %.1f s",
                        proc.pid,
                        proc.exitcode,
                        delay,
                        extra={"stage": "consumer", "pid": proc.pid, "exit_code": proc.exitcode},
                    )
                    restart_at[index] = now + delay
                    self._repair()
                elif now >= restart_at[index]:
                    del restart_at[index]
                    self._procs[index] = self._spawn(index)
                    self.restarts += 1
        # stopping: a second SIGTERM (an impatient operator, a test) asks nothing more. Ignored, not handled:
        # at interpreter exit Python puts its own handlers back to the default, and a SIGTERM then would end
        # a clean drain as "killed by SIGTERM"; an ignored signal stays ignored to the end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self._drain()

    def _drain(self) -> int:
        for index, proc in enumerate(self._procs):
            if proc.exitcode is not None and index not in self._restart_at:
                # died just before the stop, unnoticed yet: a crash like any other, logged as one; the exit
                # code of the drain is about the workers that were running
                log.error(
                    "consumer pid %s exited with %s while stopping",
                    proc.pid,
                    proc.exitcode,
                    extra={"stage": "consumer", "pid": proc.pid, "exit_code": proc.exitcode},
                )
                self._restart_at[index] = 0.0
        for proc in self._procs:
            if proc.exitcode is None and proc.pid is not None:
                proc.terminate()  # SIGTERM: flush, delete, exit 0
        deadline = time.monotonic() + self.grace_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error(
                    "consumer pid %s did not drain within %.0f s; killing it",
                    proc.pid,
                    self.grace_s,
                    extra={"stage": "drain", "pid": proc.pid},
                )
                proc.kill()
                proc.join()
        if any(proc.exitcode for proc in self._procs):
            self._repair()
        # a slot waiting for its restart has had its crash logged already; the exit code is about the drain
        codes = [proc.exitcode for index, proc in enumerate(self._procs) if index not in self._restart_at]
        # A worker ended by our SIGTERM's default action was still starting: once it runs, its handler turns
        # SIGTERM into a drain (exit 0), so it had received nothing and held nothing. A clean stop.
        codes = [0 if code == -signal.SIGTERM else code for code in codes]
        log.info(
            "supervisor: %d consumers stopped, exit codes %s, %d restarts%s",
            len(codes),
            codes,
            self.restarts,
            f", {len(self._restart_at)} restarts pending" if self._restart_at else "",
            extra={"exit_codes": codes, "restarts": self.restarts},
        )
        return 0 if all(code == 0 for code in codes) else 1
