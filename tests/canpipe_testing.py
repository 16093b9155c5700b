"""Helpers for the tests: real child processes, real HTTP, records and queue inspection."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.launch import free_port, healthy, wait_until  # noqa: F401 (the tests import them from here)
from engine.queues import QueueAttributes, open_queue
from engine.simulator import SimulationResult, Simulator
from engine.storage import iter_raw_files, read_complete_lines

API_KEY = "test:s3cret-test-key"


ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A child ``python -m engine ...`` with its output captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, wrap: tuple[str, ...] = ()) -> None:
        """``wrap``: a command that execs the rest (so ``pid`` is still the canpipe process), e.g. ``unshare``."""
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(
            [*wrap, sys.executable, "-m", "engine", *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._out.close()
        return code


def start_answering(args: list[str], log: Path, answers: Callable[[], bool], timeout: float = 60.0) -> subprocess.Popen:
    """``args`` started with its output going to ``log``, returned once ``answers()`` (a request to it that
    raises OSError until it listens). Stop it with :func:`stop_process`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            return answers()
        except OSError:
            return proc.poll() is not None

    if not wait_until(ready, timeout) or proc.poll() is not None:
        stop_process(proc)
        raise AssertionError(f"{' '.join(args)} did not start:\n{log.read_text(errors='replace')}")
    return proc


def start_moto(port: int, log: Path, timeout: float = 60.0) -> subprocess.Popen:
    """moto's server (SQS and S3 over real HTTP) on 127.0.0.1:port, returned once it answers; its output goes to
    ``log``. Stop it with :func:`stop_process`. It runs through ``moto_server.py``, which closes moto's race
    that lets two concurrent receives take one message."""
    return start_answering(
        [sys.executable, str(Path(__file__).with_name("moto_server.py")), "-H", "127.0.0.1", "-p", str(port)],
        log,
        lambda: http("GET", f"http://127.0.0.1:{port}/moto-api/", timeout=1)[0] < 500,
        timeout,
    )


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a child we started, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """One real HTTP request; returns (status, headers, body) whatever the status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def post_json(url: str, payload: object, key: str | None = API_KEY, **kw) -> tuple[int, dict, object]:
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": key} if key else {})
    status, hdrs, body = http("POST", url + "/ingest", json.dumps(payload).encode(), headers, **kw)
    return status, hdrs, json.loads(body) if body else None


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def modules_loaded_by(module: str) -> set[str]:
    """The ``engine.*`` modules a fresh interpreter holds after ``import <module>``: what it pulls in."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('engine.')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, cwd=ROOT
    )
    return set(loaded.stdout.split())


def consumers_polling(data_dir: Path) -> int:
    """How many consumer processes are up and polling their queue, from their metrics snapshots (written
    every second): on SQS one counts once it has made its first ReceiveMessage call (its client is built)."""
    from engine.metrics import Metrics

    polling = 0
    for path in (data_dir / "metrics").glob("consumer-*.metrics"):
        try:
            snapshot = Metrics.from_bytes(path.read_bytes())
        except (OSError, ValueError):
            continue
        calls = {labels: n for (name, labels), n in snapshot.values.items() if name == "canpipe_sqs_requests_total"}
        polling += not calls or calls.get(("ReceiveMessage",), 0) > 0
    return polling


def wait_for(condition: Callable[[], object], timeout: float, message: str = "condition") -> None:
    assert wait_until(condition, timeout, 0.05), f"timed out after {timeout} s waiting for {message}"


_STAMPS = itertools.count()


def make_record(index: int = 0, vehicle_id: str = "EV-00001", **payload: float) -> dict:
    """A valid seed-shaped record, timestamped ``index`` ms before now (older as the index grows), and distinct
    from the 999 records made before it: the microseconds below the millisecond count the calls, so two records
    of one vehicle never share a timestamp when the clock moves exactly ``j - i`` ms between making ``i`` and ``j``
    (which made one CI run's 4,000 records 3,999 distinct ones)."""
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=index)
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000 + next(_STAMPS) % 1000)
    return {
        "timestamp": moment.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "vehicle_id": vehicle_id,
        "can_id": "0x132",
        "payload": {
            "battery_soc": 80.5,
            "battery_voltage": 396.2,
            "battery_current": 42.0,
            "cell_voltage_min": 4.11,
            "cell_voltage_max": 4.13,
            "cell_temp_min": 24.0,
            "cell_temp_max": 26.5,
            **payload,
        },
    }


def queued_records(data_dir: Path) -> list[dict]:
    """Every record in the embedded queue's messages, read straight from the SQLite file."""
    import sqlite3

    with sqlite3.connect(data_dir / "queue.db") as conn:
        bodies = [row[0] for row in conn.execute("SELECT body FROM messages ORDER BY id")]
    return [json.loads(line) for body in bodies for line in body.splitlines()]


def create_queue(url: str, **attributes) -> None:
    async def go():
        queue = open_queue(url)
        await queue.create(QueueAttributes(**attributes))
        await queue.close()

    asyncio.run(go())


def queue_stats(url: str):
    async def go():
        queue = open_queue(url)
        try:
            return await queue.stats()
        finally:
            await queue.close()

    return asyncio.run(go())


def queue_empty(url: str) -> bool:
    stats = queue_stats(url)
    return stats.visible == stats.in_flight == 0


# --- what is on disk, in the queue, and which processes run -------------------------------------------------


def on_disk(data_dir: Path) -> list[dict]:
    out = []
    for path in iter_raw_files(data_dir / "raw"):
        out += [json.loads(line) for line in read_complete_lines(path).splitlines()]
    return out


def key(record: dict) -> tuple[str, str, dt.datetime]:
    return record["vehicle_id"], record["can_id"], dt.datetime.fromisoformat(record["timestamp"])


def queue_counts(data_dir: Path) -> tuple[int, int]:
    with sqlite3.connect(data_dir / "queue.db") as conn:
        total = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        now = time.time_ns() // 1_000_000
        in_flight = conn.execute("SELECT COUNT(*) FROM messages WHERE visible_ms > ?", (now,)).fetchone()[0]
    return total, in_flight


def child_pids(pid: int) -> set[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (exited, not yet reaped by whoever adopted it) counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    """The consumer worker processes of a supervisor (not multiprocessing's resource tracker)."""
    pids = child_pids(pid)
    workers = set()
    for child in pids:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(child)
        except FileNotFoundError:
            pass
    return workers


# --- a fleet under load and a receiver to take it ----------------------------------------------------------


class Fleet:
    """The simulator posting from a background thread; ``progress`` is what has been accepted so far."""

    def __init__(
        self,
        url: str,
        *,
        vehicles: int = 20,
        rate_ms: float = 40.0,
        duration_s: float = 8.0,
        max_attempts: int = 12,  # rides out a receiver restart (backoff capped at 5 s)
        seed: int = 1,
    ):
        self.sim = Simulator(
            url,
            api_key=API_KEY,
            vehicles=vehicles,
            rate_ms=rate_ms,
            duration_s=duration_s,
            keep_accepted=True,
            seed=seed,
            max_attempts=max_attempts,
        )
        self.result: SimulationResult | None = None
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(self.sim.run())

    @property
    def accepted(self) -> int:
        return self.sim.result.accepted

    def start(self) -> Fleet:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 90.0) -> SimulationResult:
        self._thread.join(timeout_s)
        assert self.result is not None, f"the fleet did not finish within {timeout_s} s"
        return self.result


def serving(url: str) -> bool:
    try:
        return http("GET", url + "/health", timeout=2)[0] == 200
    except OSError:
        return False


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_server(start, env: dict[str, str], port: int, workers: int = 2) -> Proc:
    proc = start(["serve", "--port", str(port), "--workers", str(workers)], env)
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: serving(url) or proc.popen.poll() is not None, 30), proc.output()
    assert proc.popen.poll() is None, proc.output()
    wait_for(lambda: len(child_pids(proc.pid)) == workers, 30, f"{workers} receiver workers")
    return proc


# <prefix>/raw/year=YYYY/month=MM/day=DD/hour=HH/batch-<unix_ms>-<digest>.jsonl[.zst] (docs/adr/0002-s3-storage.md)
RAW_KEY = re.compile(r"raw/year=(\d{4})/month=(\d\d)/day=(\d\d)/hour=(\d\d)/batch-(\d+)-([0-9a-f]{16})\.jsonl(\.zst)?")


@dataclass
class Bucket:
    """A bucket on moto's server and the prefix canpipe writes under; read with boto3, straight from moto."""

    name: str
    prefix: str
    client: Any
    endpoint: str
    _seen: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    def keys(self, kind: str = "") -> list[str]:
        """Every object key (with the prefix) under ``<prefix>/<kind>``."""
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=f"{self.prefix}/{kind}"
        ):
            found += [o["Key"] for o in page.get("Contents", ())]
        return sorted(found)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def raw_objects(self) -> dict[str, bytes]:
        """Every raw object's lines (a .jsonl.zst inflated), by key. Raw objects are create-only, so each is
        fetched once (the tests poll this while the consumers put)."""
        import zstandard

        out = {}
        for key in self.keys("raw/"):
            if key not in self._seen:
                body = self.get(key)
                zstd = zstandard.ZstdDecompressor()
                self._seen[key] = zstd.decompressobj().decompress(body) if key.endswith(".zst") else body
            out[key] = self._seen[key]
        return out

    def records(self) -> list[dict]:
        return [json.loads(line) for body in self.raw_objects().values() for line in body.splitlines()]

    def hours(self) -> list[dt.datetime]:
        """The UTC hours holding raw objects."""
        found = set()
        for key in self.keys("raw/"):
            match = RAW_KEY.search(key)
            assert match, f"{key} is not named as the contract says"
            y, mo, d, h = (int(g) for g in match.groups()[:4])
            found.add(dt.datetime(y, mo, d, h, tzinfo=dt.UTC))
        return sorted(found)

    def mirror_raw(self, dest: Path) -> Path:
        """The raw objects as a local data dir (same relative names, .zst inflated): the local run's input."""
        for key, body in self.raw_objects().items():
            relative = key[len(self.prefix) + 1 :].removesuffix(".zst")
            path = dest / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        return dest

    def open_uploads(self) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])
