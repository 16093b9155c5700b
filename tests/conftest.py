"""Shared fixtures: real processes (Granian receiver, consumers, moto) on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from canpipe_testing import API_KEY, AWS_TEST_ENV, Bucket, Proc, free_port, http, start_moto, stop_process, wait_until


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
    proc = start_moto(port, tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


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


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> Bucket:
    """A fresh bucket on the session's moto server; the AWS variables set for this process too."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    name = f"canpipe-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=AWS_TEST_ENV["AWS_REGION"])
    client.create_bucket(Bucket=name)
    return Bucket(name, "fleet", client, moto_endpoint)
