"""The receiver alone under wrk: records/s and the serve process tree's CPU per request and per record.

Starts ``canpipe serve --workers 1`` on a fresh embedded queue (no consumer), drives ``/ingest`` with wrk
(``-t1``, the batched-ingest benchmark's Lua script: N-record NDJSON or array bodies with fresh timestamps),
and reads the serve tree's utime + stime from ``/proc`` before and after. ``--py-spy FILE`` samples the
worker meanwhile (``--format raw --threads``, read with ``bench/fold_top.py``). ``--tree DIR`` serves the
code of another checkout (an exported older commit) with this one's venv, to compare two versions in one run:

    flock /tmp/canpipe-bench.lock .venv/bin/python bench/receiver_cpu.py --records 100 --seconds 6
    git archive HEAD~1 | tar -x -C /tmp/old   # then copy engine/**/*.so over, and alternate:
    flock /tmp/canpipe-bench.lock .venv/bin/python bench/receiver_cpu.py --tree /tmp/old
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ingest_batched import LUA  # noqa: E402
from wrk import run_wrk  # noqa: E402

from engine.launch import free_port, healthy, start_command, stop, wait_until  # noqa: E402


def worker_of(pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
    return pid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100, help="records per request body")
    parser.add_argument("--array", action="store_true", help="JSON array bodies instead of NDJSON")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tree", type=Path, default=ROOT, help="serve the engine/ of this checkout")
    parser.add_argument("--py-spy", type=Path, help="sample the worker into this file (raw collapsed stacks)")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="canpipe-rcvcpu-"))
    key = f"bench:{secrets.token_hex(8)}"
    url = f"http://127.0.0.1:{free_port()}"
    env = os.environ | {
        "CANPIPE_DATA_DIR": str(data),
        "CANPIPE_API_KEYS": key,
        "CANPIPE_QUEUE_URL": f"sqlite:///{data / 'queue.db'}",
        "PYTHONPATH": str(args.tree.resolve()),
    }
    script = data / "post.lua"
    script.write_text(
        LUA.replace("__RECORDS__", str(args.records))
        .replace("__ARRAY__", "true" if args.array else "false")
        .replace("__KEY__", key)
    )
    os.chdir(args.tree)  # ``python -m engine`` imports from the working directory first
    server = start_command(["serve", "--port", url.rsplit(":", 1)[1], "--workers", "1"], env)
    try:
        if not wait_until(lambda: healthy(url), 30):
            raise RuntimeError("the receiver did not become healthy within 30 s")
        time.sleep(1.0)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                [str(ROOT / ".venv/bin/py-spy"), "record", "--pid", str(worker_of(server.pid))]
                + ["--duration", str(max(1, int(args.seconds) - 1)), "--rate", "250", "--format", "raw"]
                + ["--threads", "--nonblocking", "-o", str(args.py_spy)],
                stdout=subprocess.DEVNULL,
            )
        stats = run_wrk(url + "/ingest", script, args.seconds, args.connections, server=server.pid)
        cpu_s = stats["server_cpu_s"]
        if spy is not None:
            spy.wait()
    finally:
        stop(server)
        shutil.rmtree(data, ignore_errors=True)
    accepted = stats["requests"] - stats["non2xx"]
    seconds = stats["duration_us"] / 1e6
    print(
        f"{args.tree}: {args.records}-record {'array' if args.array else 'NDJSON'} bodies: "
        f"{accepted / seconds:,.0f} req/s, {accepted * args.records / seconds:,.0f} records/s, "
        f"CPU {1e6 * cpu_s / max(1, accepted):,.0f} us a request, "
        f"{1e6 * cpu_s / max(1, accepted * args.records):.1f} us a record; "
        f"P50 {stats['p50_us'] / 1000:.1f} ms; non-2xx {stats['non2xx']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
