"""Throughput of the whole pipeline on this machine: receiver + consumers + load generator.

Starts ``canpipe serve`` and ``canpipe consume`` on a fresh data dir (embedded queue), drives them with
bench/loadgen.py in its own process at a target rate, then waits until every accepted record is on disk.
Reports sustained records/s, HTTP P50/P99, end-to-end P95 and CPU seconds per component (from
/proc/<pid>/stat of each process tree) as a table, or with ``--json`` as one JSON line (for scripts).

    python bench/pipeline.py --rate 5000 --batch 1 --duration 20
    python bench/pipeline.py --rate 50000 --batch 100 --duration 20 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # canpipe_testing: free_port, healthy, wait_until

from canpipe_testing import free_port, healthy, wait_until  # noqa: E402

from engine import cost  # noqa: E402
from engine.metrics import parse_counters, read_snapshots  # noqa: E402
from loadtest.cpu import cpu_seconds, tree  # noqa: E402


def print_table(report: dict) -> None:
    """The report as aligned ``name  value`` lines, nested dicts flattened with dots."""

    def flat(prefix: str, value: object) -> list[tuple[str, object]]:
        if isinstance(value, dict):
            return [item for k, v in value.items() for item in flat(f"{prefix}.{k}" if prefix else str(k), v)]
        return [(prefix, value)]

    rows = flat("", report)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        print(f"{name:<{width}}  {value:,}" if number else f"{name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000, help="target records/s")
    parser.add_argument("--batch", type=int, default=1, help="records per HTTP request")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--receiver-workers", type=int, default=1)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--queue-url", help="default: an embedded queue in a fresh temp dir")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="canpipe-bench-"))
    key = f"bench:{secrets.token_hex(8)}"
    port = free_port()
    env = os.environ | {
        "CANPIPE_DATA_DIR": str(data_dir),
        "CANPIPE_API_KEYS": key,
        "CANPIPE_QUEUE_URL": args.queue_url or f"sqlite:///{data_dir / 'queue.db'}",
    }
    py = [sys.executable, "-m", "engine"]
    server = subprocess.Popen(
        [*py, "serve", "--port", str(port), "--workers", str(args.receiver_workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    consumers = subprocess.Popen(
        [*py, "consume", "--workers", str(args.consumers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: healthy(url), 30), "receiver did not start"
        time.sleep(1.0)  # let the consumer workers finish importing before the clock starts
        before = {name: cpu_seconds(tree(p.pid)) for name, p in (("receiver", server), ("consumers", consumers))}
        t0 = time.monotonic()
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        gen = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench/loadgen.py"),
                "--url",
                url,
                "--key",
                key,
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                "--batch",
                str(args.batch),
                "--connections",
                str(args.connections),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        load_s = time.monotonic() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the generator was reaped meanwhile
        gen_cpu = usage.ru_utime + usage.ru_stime - reaped.ru_utime - reaped.ru_stime
        load = json.loads(gen.stdout.strip().splitlines()[-1])
        during = {
            name: cpu_seconds(tree(p.pid)) - before[name]
            for name, p in (("receiver", server), ("consumers", consumers))
        }
        accepted = load.get("accepted", 0)

        def written() -> int:
            return read_snapshots(data_dir / "metrics").counters["canpipe_consumer_records_written_total"]

        drained = wait_until(lambda: written() >= accepted, 120, 0.25)
        drain_s = time.monotonic() - t0 - load_s
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            receiver_sqs = parse_counters(response.read().decode(), "canpipe_sqs_")
    finally:
        for proc in (consumers, server):
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    metrics = read_snapshots(data_dir / "metrics")
    e2e = metrics.summary("end_to_end")
    report = {
        "target_rate": args.rate,
        "batch": args.batch,
        "duration_s": round(load_s, 2),
        "sent": load.get("sent", 0),
        "accepted": accepted,
        "written": written(),
        "drained": drained,
        "drain_after_load_s": round(drain_s, 2),
        "accepted_per_s": round(accepted / load["elapsed_s"]),
        "written_per_s": round(written() / (load_s + drain_s)),
        "statuses": {k: v for k, v in load.items() if k.startswith("status_")},
        "generator_behind": load.get("behind", 0),
        "http_p50_ms": round(load["http_p50_ms"], 2),
        "http_p99_ms": round(load["http_p99_ms"], 2),
        "ingest_p50_ms": round(metrics.summary("ingest")["p50"], 1),
        "ingest_p99_ms": round(metrics.summary("ingest")["p99"], 1),
        "e2e_p50_ms": round(e2e["p50"], 1),
        "e2e_p95_ms": round(e2e["p95"], 1),
        "e2e_p99_ms": round(e2e["p99"], 1),
        "cpu_s": {**{k: round(v, 1) for k, v in during.items()}, "loadgen": round(gen_cpu, 1)},
        "cpu_cores_during_load": {
            **{k: round(v / load_s, 2) for k, v in during.items()},
            "loadgen": round(gen_cpu / load_s, 2),
        },
    }
    consumer_sqs = {k: v for k, v in metrics.counters.items() if k.startswith("canpipe_sqs_")}
    if receiver_sqs or consumer_sqs:
        billed = receiver_sqs.get("canpipe_sqs_billed_requests_total", 0) + consumer_sqs.get(
            "canpipe_sqs_billed_requests_total", 0
        )
        per_1000 = cost.requests_per_1000(int(billed), accepted)
        report["sqs"] = {
            "receiver": receiver_sqs,
            "consumers": consumer_sqs,
            "billed_requests": int(billed),
            "requests_per_1000_records": round(per_1000, 2),
            "monthly_usd": {rate: round(cost.monthly_bill_usd(rate, per_1000), 2) for rate in cost.RATES_PER_S},
        }
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if drained else 1


if __name__ == "__main__":
    sys.exit(main())
