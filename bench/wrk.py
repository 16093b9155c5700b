"""wrk, the HTTP load generator the receiver benchmarks drive: one run, its counts as a dict.

The Lua scripts of the benchmarks end with a ``done`` function that prints one ``WRKJSON {...}`` line
(requests, duration_us, non2xx, latency percentiles...); this runs wrk and reads that line back.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
from pathlib import Path

from loadtest.cpu import cpu_seconds, tree

WRK = shutil.which("wrk")
MISSING = "wrk is not installed: apt-get install wrk (.ci/run installs it)"


def tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (a server and its workers), in seconds."""
    return cpu_seconds(tree(pid))


def run_wrk(url: str, script: Path, seconds: float, connections: int, *, server: int | None = None) -> dict:
    """One ``wrk -t1 -c<connections> -d<seconds>s --latency -s <script> <url>``; its WRKJSON counts, plus
    ``wrk_cpu_s`` (wrk's own CPU seconds) and, given the ``server``'s pid, ``server_cpu_s`` (its tree's)."""
    if WRK is None:
        raise RuntimeError(MISSING)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = tree_cpu_s(server) if server is not None else 0.0
    wrk = subprocess.run(
        [WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if server is not None:
        server_cpu_s = tree_cpu_s(server) - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"^WRKJSON (.*)$", wrk.stdout, re.M)
    if wrk.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {wrk.stdout}\n{wrk.stderr}")
    stats = json.loads(match.group(1))
    stats["wrk_cpu_s"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    if server is not None:
        stats["server_cpu_s"] = server_cpu_s
    return stats
