"""Process lifetime: a worker process must not outlive the server that started it, and a stop sent while it
starts must not be lost.

Granian's workers are child processes. When the main process is killed with SIGKILL it cannot stop them,
and they would go on serving the port (they hold it with SO_REUSEPORT) with no one to restart or stop
them, so a restarted ``canpipe serve`` would share the port with orphans. On Linux the kernel can send a
signal to a child when its parent dies (``PR_SET_PDEATHSIG``). That signal is SIGKILL: a SIGTERM asks Granian
to drain, and a Granian worker can hang in its stop with the interpreter lock held (seen here: workers
orphaned for half an hour, their own watchdog thread unable to run), so nothing inside the worker can be
relied on to end it. Requests in flight get a connection error and are retried by their clients; a 202 is
only ever sent after the queue has the records, so nothing accepted is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("canpipe.lifetime")

PR_SET_PDEATHSIG = 1
SERVE_AFTER_STARTUP_S = 0.2  # Granian calls its server's serve() right after the app's start-up returns


def exit_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; True when it is armed.

    Linux only (elsewhere a no-op returning False). The signal is tied to the parent *thread* that forked
    this process, so call it only in processes started from their parent's main thread (Granian's and
    multiprocessing's workers are).
    """
    if not sys.platform.startswith("linux"):
        return False
    # the pid multiprocessing recorded at the fork: a parent that died while this process was still importing
    # has already been replaced by init in getppid(), and would not be seen as gone
    spawner = multiprocessing.parent_process()
    parent = spawner.pid if spawner is not None and spawner.pid else os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:  # pragma: no cover - prctl does not fail here
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent:  # the parent died before the request was armed
        os.kill(os.getpid(), sig)
    return True


def keep_early_stop() -> Callable[[], None]:
    """Keep a SIGTERM or SIGINT that arrives while this Granian worker starts; call what it returns once the
    app's start-up is done.

    Granian forks its workers with the main process's handlers, which only set a flag in the worker's copy of
    the server, and installs the worker's own after the app is loaded; one that is set before its server runs
    is not seen either. A stop in that window (a server stopped just after its start) was lost and the
    worker served on until killed (found as a 40 s stop in the tests). So: a stop that came while the app's
    modules were imported ends this worker here, before it serves anything; one that comes while the app
    is built is recorded and sent again once, after the start-up, when Granian's server runs.
    """
    stops = (signal.SIGTERM, signal.SIGINT)
    for sig in stops:
        inherited = getattr(signal.getsignal(sig), "__self__", None)
        if getattr(inherited, "interrupt_signal", False) is True:
            log.info("a stop arrived while this worker started: it ends before serving")
            raise SystemExit(0)
    got: list[int] = []
    started = threading.Event()

    def record(signum: int, frame: object) -> None:
        got.append(signum)

    for sig in stops:
        signal.signal(sig, record)

    def send_again() -> None:
        if not started.wait(60.0) or not got:
            return
        time.sleep(SERVE_AFTER_STARTUP_S)
        log.info("a stop arrived while this worker started: stopping now")
        os.kill(os.getpid(), got[0])

    threading.Thread(target=send_again, name="canpipe-early-stop", daemon=True).start()
    return started.set


def keep_stop_between_loop_runs() -> bool:
    """Keep a SIGTERM or SIGINT that reaches this Granian worker while its event loop is paused; call before
    Granian sets its worker's signals (in the app factory). True when in place.

    Granian registers its stop with ``loop.add_signal_handler`` before the app's start-up, runs the start-up
    in one ``run_until_complete``, starts its server, and runs the loop again until told to stop. uvloop
    listens to signals only while the loop runs: between the two runs it gives the wakeup fd back, so a
    signal in that window (the few ms Granian takes to start its server) only lands in uvloop's Python-level
    handler, which records it for a wakeup that never comes. The worker then served on until killed 20 s
    later (once in CI; 2 runs in 60 here, stopped at "Started worker-N"). So the Python-level handler also
    queues the stop on the loop, which runs it when the loop next runs; and Granian's stop event is set once
    however many ways a signal arrives (its channel holds one: a third set would block the main thread).
    """
    try:
        import granian._signals as granian_signals
    except ImportError:  # pragma: no cover - granian is a dependency of serve
        return False
    set_loop_signals = getattr(granian_signals, "set_loop_signals", None)
    if set_loop_signals is None or getattr(set_loop_signals, "keeps_stops", False):  # pragma: no cover
        return False

    def set_loop_signals_keeping_stops(loop: Any) -> Any:
        event = set_loop_signals(loop)
        stopping: list[bool] = []

        def stop(*_: object) -> None:
            if not stopping:
                stopping.append(True)
                event.set()

        def on_signal(signum: int, frame: object) -> None:  # runs whether or not the loop does
            loop.call_soon_threadsafe(stop)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)  # in place of Granian's, which sets its event every time
            signal.signal(sig, on_signal)  # after add_signal_handler, which installs uvloop's own
        return event

    set_loop_signals_keeping_stops.keeps_stops = True  # type: ignore[attr-defined]
    granian_signals.set_loop_signals = set_loop_signals_keeping_stops
    return True


def after_startup(app: Any, done: Callable[[], None]) -> None:
    """Call ``done`` when the Starlette ``app``'s lifespan start-up has finished."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            done()
            yield state

    app.router.lifespan_context = lifespan
