"""Shared fixtures: real processes (Granian receiver, consumers) on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.run import free_port, wait_until

API_KEY = "test:s3cret-test-key"
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


class Proc:
    """A child ``python -m engine ...`` with its output captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "engine", *args], env=env, stdout=self._out,
                                      stderr=subprocess.STDOUT, cwd=ROOT)

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


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
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


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def env(data_dir: Path) -> dict[str, str]:
    return os.environ | {
        "CANPIPE_DATA_DIR": str(data_dir),
        "CANPIPE_QUEUE_URL": f"sqlite:///{data_dir / 'queue.db'}",
        "CANPIPE_API_KEYS": f"old:retired-but-valid,{API_KEY}",
        "CANPIPE_BATCH_SECONDS": "0.5",
    }


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``canpipe`` commands; every one still running at the end is stopped by its PID."""
    procs: list[Proc] = []

    def _start(args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(args, env, tmp_path / f"{args[0]}-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        proc.stop()


@pytest.fixture
def serve(start: Callable[..., Proc]) -> Callable[..., str]:
    """Start the receiver under Granian; return its base URL once /health answers 200."""

    def _serve(env: dict[str, str], *extra: str, expect_status: int = 200) -> str:
        port = free_port()
        proc = start(["serve", "--port", str(port), *extra], env)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return http("GET", url + "/health", timeout=3)[0] == expect_status
            except OSError:
                return False

        assert wait_until(lambda: up() or proc.popen.poll() is not None, 30), proc.output()
        assert proc.popen.poll() is None, proc.output()
        return url

    return _serve


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> Iterator[str]:
    """moto's SQS server over real HTTP on 127.0.0.1, started for this test session and stopped by PID."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return http("GET", endpoint + "/moto-api/", timeout=1)[0] < 500
        except OSError:
            return False

    try:
        assert wait_until(lambda: up() or proc.poll() is not None, 60), log.read_text()
        assert proc.poll() is None, log.read_text()
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture
def sqs_env(moto_endpoint, monkeypatch) -> dict[str, str]:
    """A fresh SQS queue (with its DLQ) on the emulator; the AWS variables set for this process too."""
    import uuid

    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    url = f"{moto_endpoint}/123456789012/canpipe-{uuid.uuid4().hex[:12]}"
    return AWS_TEST_ENV | {"CANPIPE_QUEUE_URL": url}


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared data folder is only beside the project checkout")
    return path


def wait_for(condition: Callable[[], object], timeout: float, message: str = "condition") -> None:
    assert wait_until(condition, timeout, 0.05), f"timed out after {timeout} s waiting for {message}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000000Z"


def make_record(index: int = 0, vehicle_id: str = "EV-00001", **payload: float) -> dict:
    """A valid seed-shaped record, timestamped now (distinct per index)."""
    import datetime as dt

    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(milliseconds=index)
    return {
        "timestamp": moment.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "vehicle_id": vehicle_id,
        "can_id": "0x132",
        "payload": {
            "battery_soc": 80.5, "battery_voltage": 396.2, "battery_current": 42.0, "cell_voltage_min": 4.11,
            "cell_voltage_max": 4.13, "cell_temp_min": 24.0, "cell_temp_max": 26.5, **payload,
        },
    }


def queued_records(data_dir: Path) -> list[dict]:
    """Every record in the embedded queue's messages, read straight from the SQLite file."""
    import sqlite3

    with sqlite3.connect(data_dir / "queue.db") as conn:
        bodies = [row[0] for row in conn.execute("SELECT body FROM messages ORDER BY id")]
    return [json.loads(line) for body in bodies for line in body.splitlines()]
