"""The S3 backend (aiobotocore): raw objects in a bucket, in the local backend's Hive layout.

``CANPIPE_STORAGE_URL=s3://bucket/prefix`` (``engine.storage.url``). A consumer holds what it received
until ``CANPIPE_S3_OBJECT_BYTES`` are held or ``CANPIPE_S3_OBJECT_SECONDS`` have passed, then puts one
object per hour and only then deletes the messages (the delivery rule: deleted once durable, and an S3
PUT that answered 200 is durable). Object keys::

    <prefix>/raw/year=YYYY/month=MM/day=DD/hour=HH/batch-<unix_ms>-<digest>.jsonl[.zst]

``unix_ms`` is the earliest ``ingest_received_at`` in the object and ``digest`` 16 hex digits of the
SHA-256 of its (uncompressed) bytes: the name follows from what the object holds. Every put is
create-only (``If-None-Match: *``): a retry of a put whose answer was lost, or a batch redelivered and
regrouped the same way, finds its name taken (412) and is done, never a second object. What still
duplicates (a redelivery grouped differently) is covered by the aggregator's and the compactor's dedup;
docs/adr/0002-s3-storage.md says when.

No partial object is ever visible: a single PUT is atomic, and above ``MULTIPART_ABOVE_BYTES`` a multipart
upload is completed only once every part is in, and aborted on failure. Reading (``canpipe aggregate``,
``compact``) materialises an hour's objects into a local tree with the same relative names
(``materialize``), runs the local code and uploads what it wrote (``upload``), one job per hour at a time
under a lease object (``Lease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import ConfigError, StorageError
from engine.storage.layout import Hour, hour_of_folder, hour_path
from engine.storage.local import fault_point
from engine.storage.url import StorageURL, s3_client_kwargs

log = logging.getLogger("canpipe.storage")

INSTALL_HINT = "pip install 'canpipe[s3]'"
MULTIPART_ABOVE_BYTES = 64 * 1024 * 1024
PART_BYTES = 16 * 1024 * 1024  # S3 wants parts of 5 MiB to 5 GiB; 16 MiB keeps a retry cheap
COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 3
RAW_SUFFIXES = (".jsonl", ".jsonl.zst")

Buffer = bytes | memoryview
T = TypeVar("T")


def require_sdk(url: StorageURL) -> None:
    """Said at start-up, not at the first put: an S3 URL without aiobotocore."""
    if importlib.util.find_spec("aiobotocore") is None:
        raise ConfigError(f"CANPIPE_STORAGE_URL={url} is S3, which needs aiobotocore: {INSTALL_HINT}")


def raw_name(hour: Hour, data: bytes, first_ms: int, compression: str = "none") -> str:
    """The relative name of the raw object holding ``data`` (uncompressed) for ``hour``."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    suffix = ".jsonl.zst" if compression == "zstd" else ".jsonl"
    return f"{hour_path(Path('raw'), hour).as_posix()}/batch-{first_ms}-{digest}{suffix}"


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Store:
    """One aiobotocore S3 client for a storage root; the calls canpipe makes, errors as StorageError."""

    def __init__(self, url: StorageURL) -> None:
        require_sdk(url)
        self.url = url
        self._client: Any = None
        self._client_cm: Any = None
        self.calls: dict[str, int] = {}

    async def _s3(self) -> Any:
        if self._client is None:
            from aiobotocore.session import get_session

            self._client_cm = get_session().create_client("s3", **s3_client_kwargs())
            self._client = await self._client_cm.__aenter__()
        return self._client

    async def close(self) -> None:
        if self._client_cm is not None:
            cm, self._client_cm, self._client = self._client_cm, None, None
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)

    async def __aenter__(self) -> S3Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _count(self, action: str) -> None:
        self.calls[action] = self.calls.get(action, 0) + 1

    async def put(self, relative: str, data: bytes, *, create_only: bool = True, if_match: str | None = None) -> bool:
        """Put ``data`` at ``relative`` whole; False when ``create_only`` and the name is taken (412), or
        ``if_match`` no longer matches. StorageError on any other failure, with nothing left visible."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        key = self.url.key(relative)
        conditions: dict[str, str] = {}
        if if_match is not None:
            conditions["IfMatch"] = if_match
        elif create_only:
            conditions["IfNoneMatch"] = "*"
        try:
            if len(data) > MULTIPART_ABOVE_BYTES:
                await self._multipart(s3, key, data, conditions)
            else:
                self._count("PutObject")
                await s3.put_object(Bucket=self.url.bucket, Key=key, Body=data, **conditions)
        except ClientError as exc:
            if _status(exc) == 412 or _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StorageError(f"put s3://{self.url.bucket}/{key} failed: {exc}") from exc
        except (TimeoutError, BotoCoreError, OSError) as exc:
            raise StorageError(f"put s3://{self.url.bucket}/{key} failed: {exc}") from exc
        return True

    async def _multipart(self, s3: Any, key: str, data: bytes, conditions: dict[str, str]) -> None:
        self._count("CreateMultipartUpload")
        upload = await s3.create_multipart_upload(Bucket=self.url.bucket, Key=key)
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), PART_BYTES), 1):
                self._count("UploadPart")
                answer = await s3.upload_part(
                    Bucket=self.url.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[start : start + PART_BYTES]),
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            self._count("CompleteMultipartUpload")
            await s3.complete_multipart_upload(
                Bucket=self.url.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **conditions
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the parts are never visible; abort frees them
                self._count("AbortMultipartUpload")
                await s3.abort_multipart_upload(Bucket=self.url.bucket, Key=key, UploadId=upload_id)
            raise

    async def get(self, relative: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag; None when there is none."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        key = self.url.key(relative)
        try:
            self._count("GetObject")
            answer = await s3.get_object(Bucket=self.url.bucket, Key=key)
            async with answer["Body"] as body:
                return await body.read(), answer["ETag"]
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                return None
            raise StorageError(f"get s3://{self.url.bucket}/{key} failed: {exc}") from exc
        except (TimeoutError, BotoCoreError, OSError) as exc:
            raise StorageError(f"get s3://{self.url.bucket}/{key} failed: {exc}") from exc

    async def delete(self, relative: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        try:
            self._count("DeleteObject")
            await s3.delete_object(Bucket=self.url.bucket, Key=self.url.key(relative))
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StorageError(f"delete s3://{self.url.bucket}/{self.url.key(relative)} failed: {exc}") from exc

    async def list(self, relative_prefix: str) -> list[tuple[str, int]]:
        """(relative name, size) of every object under ``relative_prefix``, by name."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        found: list[tuple[str, int]] = []
        try:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.url.bucket, Prefix=self.url.key(relative_prefix)):
                self._count("ListObjectsV2")
                found.extend((self.url.relative(o["Key"]), int(o["Size"])) for o in page.get("Contents", ()))
        except ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                raise StorageError(f"bucket {self.url.bucket} does not exist") from exc
            raise StorageError(f"list s3://{self.url.bucket}/{self.url.key(relative_prefix)} failed: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"list s3://{self.url.bucket}/{self.url.key(relative_prefix)} failed: {exc}") from exc
        return sorted(found)

    async def check(self) -> None:
        """The bucket answers and lets us list it (start-up check); StorageError otherwise."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        try:
            await s3.list_objects_v2(Bucket=self.url.bucket, Prefix=self.url.key("raw/"), MaxKeys=1)
        except ClientError as exc:
            raise StorageError(f"{self.url}: {_code(exc) or exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"{self.url}: {exc}") from exc


class S3Writer:
    """The consumer's S3 sink: each hour's held lines as one create-only object (see the module text)."""

    def __init__(self, url: StorageURL, *, compression: str = "none") -> None:
        if compression not in COMPRESSIONS:
            raise ConfigError(f"CANPIPE_RAW_COMPRESSION={compression!r}: one of {', '.join(COMPRESSIONS)}")
        if compression == "zstd" and importlib.util.find_spec("zstandard") is None:
            raise ConfigError(f"CANPIPE_RAW_COMPRESSION=zstd needs zstandard: {INSTALL_HINT}")
        self.store = S3Store(url)
        self.compression = compression
        self.already_there = 0  # puts that found their object made by an earlier attempt

    async def write(self, hour: Hour, buffers: Sequence[Buffer], first_ms: int) -> tuple[str, int]:
        """Put the hour's lines as one object; return its name and its size as stored. StorageError."""
        data = b"".join(buffers)
        name = raw_name(hour, data, first_ms, self.compression)
        body = await asyncio.to_thread(_compress, data) if self.compression == "zstd" else data
        created = await self.store.put(name, body)
        if not created:
            self.already_there += 1
            log.info("%s was put before (a retry or a redelivery): kept as it is", name, extra={"stage": "storage"})
        fault_point("after_put")
        return name, len(body)

    async def close(self) -> None:
        await self.store.close()


def _compress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def decompress(name: str, data: bytes) -> bytes:
    """A raw object's lines: ``.jsonl.zst`` inflated (a truncated frame raises StorageError)."""
    if not name.endswith(".zst"):
        return data
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as exc:
        raise StorageError(f"{name}: not a zstd frame: {exc}") from exc


# --- reading: an hour's objects into a local tree, and results back ------------------------------


def hour_prefix(kind: str, hour: Hour) -> str:
    return hour_path(Path(kind), hour).as_posix() + "/"


async def raw_hours(store: S3Store) -> list[Hour]:
    """The hours holding raw objects, oldest first."""
    hours = set()
    for name, _ in await store.list("raw/"):
        hour = hour_of_folder(Path(name).parent)
        if hour is not None and name.endswith(RAW_SUFFIXES):
            hours.add(hour)
    return sorted(hours)


async def materialize(store: S3Store, hours: Iterable[Hour], dest: Path, kinds: Sequence[str] = ("raw",)) -> int:
    """Download the objects of ``hours`` under ``kinds`` (``raw``, ``parquet``) into ``dest`` with the same
    relative names, ``.jsonl.zst`` inflated to ``.jsonl``; return the bytes written. Files already there with
    the same size (an earlier run's cache) are kept."""
    total = 0
    for hour in hours:
        for kind in kinds:
            for name, size in await store.list(hour_prefix(kind, hour)):
                if kind == "raw" and not name.endswith(RAW_SUFFIXES):
                    continue
                local = dest / (name[: -len(".zst")] if name.endswith(".jsonl.zst") else name)
                if not name.endswith(".zst") and local.is_file() and local.stat().st_size == size:
                    continue
                got = await store.get(name)
                if got is None:  # deleted between the list and the get (a compaction's cleanup): not ours
                    continue
                data = decompress(name, got[0])
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(local.name + ".part")
                tmp.write_bytes(data)
                os.replace(tmp, local)
                total += len(data)
    return total


async def upload(store: S3Store, root: Path, paths: Iterable[Path]) -> list[str]:
    """Put each local file of ``paths`` (under ``root``) at the same relative name, overwriting; names put."""
    done = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        await store.put(relative, path.read_bytes(), create_only=False)
        done.append(relative)
    return done


# --- one job per hour at a time ------------------------------------------------------------------


class LeaseHeld(StorageError):
    """Another job holds the hour's lease."""


LEASE_S = 900.0  # a lease's lifetime; a running job renews it every third of that


@dataclass
class Lease:
    """A lease object ``leases/<job>/year=…/hour=HH.json``: taken with a create-only put, taken over with a
    put conditional on the expired lease's ETag, renewed by its holder with a put conditional on the ETag of
    the lease it read as its own (``keep``), given back by deleting it. Why an object and not a conditional
    put of the output: a job's output is several objects (the aggregate and its manifest, or Parquet files
    and the late files they replace), which no single conditional put can guard."""

    store: S3Store
    job: str
    hour: Hour
    ttl_s: float = LEASE_S
    owner: str = ""
    lost: bool = False  # a renewal found another job holding it: this job must put nothing more

    @property
    def name(self) -> str:
        return hour_path(Path("leases") / self.job, self.hour).as_posix() + ".json"

    @property
    def label(self) -> str:
        year, month, day, hour = self.hour
        return f"{self.job} of {year:04d}-{month:02d}-{day:02d}T{hour:02d}"

    def _body(self) -> bytes:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.ttl_s)
        return json.dumps({"owner": self.owner, "expires_at": expires.isoformat(timespec="milliseconds")}).encode()

    async def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming its holder and expiry."""
        self.owner = self.owner or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        if await self.store.put(self.name, self._body()):
            return
        got = await self.store.get(self.name)
        if got is None:  # given back meanwhile: try once more
            if await self.store.put(self.name, self._body()):
                return
            raise LeaseHeld(f"{self.label} is running elsewhere (lease {self.name})")
        data, etag = got
        try:
            held = json.loads(data)
            expires = dt.datetime.fromisoformat(held["expires_at"])
        except (ValueError, KeyError, TypeError):
            held, expires = {"owner": "?"}, dt.datetime.min.replace(tzinfo=dt.UTC)
        if expires > dt.datetime.now(dt.UTC):
            raise LeaseHeld(
                f"{self.label} is running elsewhere: {held.get('owner')} holds its lease until "
                f"{expires.isoformat()} ({self.name})"
            )
        if not await self.store.put(self.name, self._body(), if_match=etag):  # someone took it over first
            raise LeaseHeld(f"{self.label}: its expired lease was taken over by another job")
        log.warning("took over the expired lease %s of %s", self.name, held.get("owner"), extra={"stage": "storage"})

    async def renew(self) -> bool:
        """Push the expiry on by ``ttl_s``: read the lease, and when it names this holder put it again on
        condition of the ETag read (another job taking it over in between makes the put fail). False, and
        ``lost``, when it is no longer this holder's; StorageError when S3 does not answer (retried)."""
        got = await self.store.get(self.name)
        try:
            ours = got is not None and json.loads(got[0]).get("owner") == self.owner
        except (ValueError, AttributeError):
            ours = False
        if got is not None and ours and await self.store.put(self.name, self._body(), if_match=got[1]):
            return True
        self.lost = True
        return False

    async def keep(self) -> None:
        """Renew every third of ``ttl_s`` while the job runs (cancel it when the job ends); a lease found
        taken sets ``lost`` and ends the renewals."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.renew():
                    log.error(
                        "lost the lease %s while %s ran: another job holds it; this one puts nothing more",
                        self.name,
                        self.label,
                        extra={"stage": "storage"},
                    )
                    return
            except StorageError as exc:
                log.warning("could not renew the lease %s (retrying): %s", self.name, exc, extra={"stage": "storage"})

    def check(self) -> None:
        """Raise LeaseHeld when the lease was lost: the job must not put or delete anything."""
        if self.lost:
            raise LeaseHeld(f"{self.label}: its lease ran out while it ran and another job took it; nothing put")

    async def release(self) -> None:
        if self.lost:  # another job's lease now: not ours to delete
            return
        with contextlib.suppress(StorageError):
            await self.store.delete(self.name)


# --- a job over S3: the hour's objects mirrored into a local cache, the local code, its output put back ---


def _tree(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns): what a job changed is what differs afterwards."""
    if not root.is_dir():
        return {}
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


async def _mirror_tree(store: S3Store, cache: Path, prefix: str) -> None:
    """Make ``cache/prefix`` hold exactly the objects under ``prefix`` (unchanged sizes are not fetched)."""
    objects = dict(await store.list(prefix))
    for path in (cache / prefix).rglob("*") if (cache / prefix).is_dir() else ():
        if path.is_file() and path.relative_to(cache).as_posix() not in objects:
            path.unlink()
    for name, size in objects.items():
        local = cache / name
        if local.is_file() and local.stat().st_size == size:
            continue
        got = await store.get(name)
        if got is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(got[0])


def day_prefix(kind: str, hour: Hour) -> str:
    """``kind/year=…/month=…/day=…/``: the day of ``hour``."""
    return hour_path(Path(kind), hour).parent.as_posix() + "/"


async def sync_down(
    store: S3Store, hour: Hour, cache: Path, *, outputs: Sequence[str], trees: Sequence[str], raw: bool = True
) -> None:
    """Make ``cache`` hold exactly the hour's raw objects (inflated, unless ``raw`` is false), every object
    under each of ``trees`` (folders, e.g. the Parquet of the hour's day) and the named ``outputs`` (e.g. the
    hour's aggregate and manifest) as they are in the bucket."""
    if raw:
        raw_folder = cache / hour_prefix("raw", hour)
        listed = {
            name[: -len(".zst")] if name.endswith(".jsonl.zst") else name
            for name, _ in await store.list(hour_prefix("raw", hour))
        }
        for path in raw_folder.glob("*") if raw_folder.is_dir() else ():
            if path.relative_to(cache).as_posix() not in listed:  # gone from the bucket (retention, a compaction)
                path.unlink()
        await materialize(store, [hour], cache, ("raw",))
    for tree in trees:
        await _mirror_tree(store, cache, tree)
    for name in outputs:
        local = cache / name
        got = await store.get(name)
        if got is None:
            local.unlink(missing_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(got[0])


def _stamps(cache: Path, trees: Sequence[str], outputs: Sequence[str]) -> dict[Path, tuple[int, int]]:
    found: dict[Path, tuple[int, int]] = {}
    for tree in trees:
        found |= _tree(cache / tree)
    for name in outputs:
        path = cache / name
        if path.is_file():
            found[path] = (path.stat().st_size, path.stat().st_mtime_ns)
    return found


async def run_hour_job(
    store: S3Store,
    job: str,
    hour: Hour,
    cache: Path,
    outputs: Sequence[str],
    work: Callable[[], T],
    *,
    trees: Sequence[str] | None = None,
    raw: bool = True,
    lease_s: float = LEASE_S,
) -> T:
    """``work()`` (the local command on ``cache``) for one hour, under the hour's ``job`` lease: the hour
    mirrored down first (its raw objects, each of ``trees``: by default the Parquet of its day, and
    ``outputs``), then every file it wrote or changed in them put back, and files it removed deleted from the
    bucket. LeaseHeld when another job has it, or took it over while this one ran (the lease is renewed every
    third of ``lease_s``; lost only when S3 refused the renewals that long): then nothing more is put."""
    trees = [day_prefix("parquet", hour)] if trees is None else trees
    lease = Lease(store, job, hour, ttl_s=lease_s)
    await lease.acquire()
    keeper = asyncio.get_running_loop().create_task(lease.keep())  # however long the hour takes
    try:
        await sync_down(store, hour, cache, outputs=outputs, trees=trees, raw=raw)
        before = _stamps(cache, trees, outputs)
        result = await asyncio.to_thread(work)
        after = _stamps(cache, trees, outputs)
        lease.check()
        # new files first, removed ones last: a reader listing meanwhile sees the old or both, never neither
        await upload(store, cache, sorted(p for p, stamp in after.items() if before.get(p) != stamp))
        for path in sorted(set(before) - set(after)):
            lease.check()
            await store.delete(path.relative_to(cache).as_posix())
        return result
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await lease.release()
