"""Process lifetime: a worker process must not outlive the server that started it.

Granian's workers are child processes. When the main process is killed with SIGKILL it cannot stop them,
and they would go on serving the port (they hold it with SO_REUSEPORT) with no one to restart or stop
them, so a restarted ``canpipe serve`` would share the port with orphans. On Linux the kernel can send a
signal to a child when its parent dies (``PR_SET_PDEATHSIG``); SIGTERM makes the worker drain as on a
normal shutdown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

log = logging.getLogger("canpipe.lifetime")

PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; True when it is armed.

    Linux only (elsewhere a no-op returning False). The signal is tied to the parent *thread* that forked
    this process, so call it only in processes started from their parent's main thread (Granian's and
    multiprocessing's workers are).
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:  # pragma: no cover - prctl does not fail here
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent:  # the parent died before the request was armed
        os.kill(os.getpid(), sig)
    return True
