"""Fixtures for the pipeline over SQS and S3 on the session's moto server: a fresh bucket per test, the
consumers' environment pointing at it, and consumer "hosts" (each its own local scratch dir)."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable, Iterator

import pytest
from canpipe_testing import Proc, create_queue


@pytest.fixture
def s3_env(env, sqs_env, s3_bucket) -> dict[str, str]:
    """The receiver's and consumers' environment: a fresh SQS queue and the bucket as the storage root, both on
    moto; objects put after 1 s (not 60) and messages visible again after 4 s, so the tests are quick."""
    create_queue(sqs_env["CANPIPE_QUEUE_URL"])
    return (
        env
        | sqs_env
        | {
            "AWS_ENDPOINT_URL_S3": s3_bucket.endpoint,
            "CANPIPE_STORAGE_URL": s3_bucket.url,
            "CANPIPE_S3_OBJECT_SECONDS": "1",
            # a consumer stopped during a long poll abandons it, and moto still hands that poll the next
            # messages: they come back after the visibility timeout (SQS's default 30 s is too long to wait)
            "CANPIPE_VISIBILITY_TIMEOUT_S": "4",
        }
    )


@functools.cache
def can_name_hosts() -> bool:
    """Whether a child can get a host name of its own here: ``unshare -u`` (a UTS namespace; root, or user
    namespaces allowed)."""
    try:
        probe = subprocess.run(["unshare", "-u", "hostname", "canpipe-probe"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def as_host(name: str) -> tuple[str, ...]:
    """A command prefix running the rest with host name ``name`` (then exec'd: the PID stays the child's),
    or nothing where host names cannot be set."""
    if not can_name_hosts():
        return ()
    return ("unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', name)


@pytest.fixture
def host(tmp_path) -> Iterator[Callable[..., Proc]]:
    """``host(env, name, *args, **extra)``: a consumer "host" (``canpipe consume --workers 1``, or ``args``)
    with a local scratch dir of its own (``CANPIPE_DATA_DIR``: metrics, the S3 cache) and, where
    :func:`can_name_hosts`, the host name ``name`` (what ``engine.consumer.writer_id`` and a lease's owner
    read: ``socket.gethostname()``, which no variable sets). Stopped by PID at the end."""
    procs: list[Proc] = []

    def _host(env: dict[str, str], name: str, *args: str, **extra: str) -> Proc:
        scratch = tmp_path / name
        scratch.mkdir(exist_ok=True)
        command = list(args) or ["consume", "--workers", "1"]
        log = tmp_path / f"{name}-{command[0]}-{len(procs)}.log"
        proc = Proc(command, env | {"CANPIPE_DATA_DIR": str(scratch)} | extra, log, wrap=as_host(name))
        procs.append(proc)
        return proc

    yield _host
    for proc in procs:
        proc.stop()
