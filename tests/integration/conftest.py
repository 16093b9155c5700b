"""Fixtures for the pipeline over SQS and S3 on the session's moto server: a fresh bucket per test, the
consumers' environment pointing at it, and consumer "hosts" (each its own local scratch dir)."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import zstandard
from canpipe_testing import AWS_TEST_ENV, Proc, create_queue

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
