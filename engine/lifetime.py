"""Process lifetime: a worker process must not outlive the server that started it.

Granian's workers are child processes. When the main process is killed with SIGKILL it cannot stop them,
and they would go on serving the port (they hold it with SO_REUSEPORT) with no one to restart or stop
them, so a restarted ``canpipe serve`` would share the port with orphans. On Linux the kernel can send a
signal to a child when its parent dies (``PR_SET_PDEATHSIG``); SIGTERM makes the worker drain as on a
normal shutdown. Nobody is left to bound that drain (Granian's main process would, on a normal stop), so a
watcher thread blocked on the parent's pidfd kills the worker if it is still there ``grace_s`` after the
parent died: a drain stuck behind clients that keep their connections busy cannot keep the port.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import signal
import sys
import threading
import time

log = logging.getLogger("canpipe.lifetime")

PR_SET_PDEATHSIG = 1
DRAIN_GRACE_S = 5.0  # in-flight requests take milliseconds; a drain still running after this is stuck


def exit_with_parent(sig: int = signal.SIGTERM, grace_s: float = DRAIN_GRACE_S) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; True when it is armed.

    Linux only (elsewhere a no-op returning False). The signal is tied to the parent *thread* that forked
    this process, so call it only in processes started from their parent's main thread (Granian's and
    multiprocessing's workers are). ``grace_s`` after the parent died the process is killed if still alive.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:  # pragma: no cover - prctl does not fail here
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    watcher = threading.Thread(target=_kill_after_parent, args=(parent, grace_s), name="canpipe-parent", daemon=True)
    watcher.start()
    if os.getppid() != parent:  # the parent died before the request was armed
        os.kill(os.getpid(), sig)
    return True


def _kill_after_parent(parent: int, grace_s: float) -> None:
    """Block until ``parent`` has ended, give the drain ``grace_s``, then SIGKILL this process."""
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:  # pragma: no cover - kernels before 5.3, or the parent already gone
        while os.getppid() == parent:
            time.sleep(0.5)
    else:
        try:  # a pidfd is readable once the process it refers to has ended
            while os.getppid() == parent and not select.select([pidfd], [], [], 5.0)[0]:
                pass
        finally:
            os.close(pidfd)
    time.sleep(grace_s)
    log.error("the server died %.0f s ago and this worker is still draining: killing it", grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def keep_early_stop() -> None:
    """Keep a SIGTERM or SIGINT that arrives while this Granian worker starts, and send it again once Granian
    listens for it.

    Granian forks its workers with the main process's handlers, which only set a flag in the worker's copy of
    the server, and installs the worker's own on its event loop after the app is loaded. A stop in between (a
    server stopped just after its start) was lost and the worker served on until killed (found as a 40 s stop
    in the tests). Called while the app loads: records such a signal, and a thread sends it again as soon as
    the handlers are no longer this one's.
    """
    got: list[int] = []
    stops = (signal.SIGTERM, signal.SIGINT)

    def record(signum: int, frame: object) -> None:
        got.append(signum)

    for sig in stops:
        # one that came before (while the app's modules were imported) set the flag of the forked copy of
        # Granian's server that the inherited handler belongs to
        inherited = getattr(signal.getsignal(sig), "__self__", None)
        if getattr(inherited, "interrupt_signal", False) is True and not got:
            got.append(signal.SIGTERM)
        signal.signal(sig, record)

    def send_again() -> None:
        deadline = time.monotonic() + 60.0
        while any(signal.getsignal(sig) is record for sig in stops) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not got:
            return
        log.info("a stop arrived while this worker started: stopping now")
        # Granian's handler is in place, but one sent before its server runs (during the app's lifespan
        # start-up) is lost too: sent again until the process ends (a stop already under way ignores it)
        while True:
            os.kill(os.getpid(), got[0])
            time.sleep(0.5)

    threading.Thread(target=send_again, name="canpipe-early-stop", daemon=True).start()
