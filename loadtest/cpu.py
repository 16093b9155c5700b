"""CPU seconds of process trees, read from /proc/<pid>/stat (Linux)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` plus what their already reaped children used (cutime + cstime), seconds.

    Summing the reaped children's time of every live process counts a finished worker once, in its parent.
    """
    ticks = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / TICKS_PER_S


class CpuMeter:
    """Samples the CPU seconds of named process trees every ``interval_s`` in a thread.

    A tree's total only grows, so the last sample before a process exits is kept: a process that ends on
    its own (locust at the end of its run) is measured up to at most ``interval_s`` before its exit.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.roots: dict[str, int] = {}
        self.latest: dict[str, float] = {}
        self.baseline: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid
        self.latest[name] = self.baseline[name] = cpu_seconds(tree(pid))
        if not self._thread.is_alive():
            self._thread.start()

    def restart_clock(self, name: str) -> None:
        """Count ``name``'s CPU from now on (e.g. the receiver's, once its start-up imports are done)."""
        self.sample()
        self.baseline[name] = self.latest[name]

    def sample(self) -> None:
        for name, pid in list(self.roots.items()):
            self.latest[name] = max(self.latest[name], cpu_seconds(tree(pid)))

    def seconds(self) -> dict[str, float]:
        """CPU seconds per tree since it was watched (or since ``restart_clock``)."""
        return {name: self.latest[name] - self.baseline[name] for name in self.roots}

    def stop(self) -> dict[str, float]:
        self.sample()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.seconds()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
