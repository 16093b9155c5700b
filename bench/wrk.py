"""wrk, the HTTP load generator the receiver benchmarks drive: one run, its counts as a dict.

The Lua scripts of the benchmarks end with a ``done`` function that prints one ``WRKJSON {...}`` line
(requests, duration_us, non2xx, latency percentiles...); this runs wrk and reads that line back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

WRK = shutil.which("wrk")
MISSING = "wrk is not installed: apt-get install wrk (.ci/run installs it)"


def run_wrk(url: str, script: Path, seconds: float, connections: int) -> dict:
    """One ``wrk -t1 -c<connections> -d<seconds>s --latency -s <script> <url>``; its WRKJSON counts."""
    if WRK is None:
        raise RuntimeError(MISSING)
    wrk = subprocess.run(
        [WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    match = re.search(r"^WRKJSON (.*)$", wrk.stdout, re.M)
    if wrk.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {wrk.stdout}\n{wrk.stderr}")
    return json.loads(match.group(1))
