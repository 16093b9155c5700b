"""Where the data lives: ``CANPIPE_STORAGE_URL``, parsed once, and the S3 endpoint settings every S3 reader
and writer shares.

- unset, or ``file://PATH``: the local disk (``PATH``, else ``CANPIPE_DATA_DIR``), the embedded default;
- ``s3://BUCKET[/PREFIX]``: raw objects, Parquet and aggregates under ``PREFIX/`` in ``BUCKET``, through
  the standard AWS credential chain; ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``) points at an
  S3-compatible server (moto in the tests, MinIO), ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` names the region.

The relative names below the root are the same for both (``raw/year=…/hour=…/``, ``parquet/…``,
``aggregated/…``), so DuckDB, Athena, Spark and Glue read either as Hive partitions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.errors import ConfigError


@dataclass(frozen=True)
class StorageURL:
    """A parsed storage root: ``scheme`` "file" (``path``) or "s3" (``bucket``, ``prefix``)."""

    scheme: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""  # no leading or trailing slash; "" for the bucket's root

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def key(self, relative: str) -> str:
        """The object key of ``relative`` (``raw/year=…/x.jsonl``) under this root."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str:
        """The name of ``key`` below this root (the inverse of ``key``)."""
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return str(self.path)


def parse_storage_url(text: str | None, data_dir: Path) -> StorageURL:
    """``CANPIPE_STORAGE_URL`` as a StorageURL; ConfigError naming what is wrong with it."""
    if not text:
        return StorageURL("file", path=Path(data_dir))
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigError(f"CANPIPE_STORAGE_URL={text!r}: a file URL is file:///absolute/path")
        return StorageURL("file", path=Path(parts.path))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket or parts.query or parts.fragment:
            raise ConfigError(f"CANPIPE_STORAGE_URL={text!r}: an S3 URL is s3://bucket or s3://bucket/prefix")
        return StorageURL("s3", bucket=bucket, prefix=parts.path.strip("/"))
    raise ConfigError(f"CANPIPE_STORAGE_URL={text!r}: the storage is file:///path or s3://bucket/prefix")


def s3_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint to use instead of AWS's (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``)."""
    env = os.environ if env is None else env
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def s3_region(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client_kwargs(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``session.create_client("s3", **kwargs)`` (aiobotocore or botocore): the region,
    the endpoint when one is set (path-style addressing then, as S3-compatible servers on an IP expect);
    credentials come from the standard chain."""
    kwargs: dict[str, Any] = {"region_name": s3_region(env)}
    endpoint = s3_endpoint(env)
    if endpoint:
        from botocore.config import Config

        kwargs["endpoint_url"] = endpoint
        kwargs["config"] = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"})
    return kwargs
