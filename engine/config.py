"""Settings: one small frozen object built from CANPIPE_* variables (each has a CLI flag twin)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.errors import ConfigError

if TYPE_CHECKING:  # engine.storage loads the schema: not at every command's start-up
    from engine.storage.url import StorageURL

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret_sha256: bytes


def parse_api_keys(raw: str) -> tuple[ApiKey, ...]:
    """Parse ``key_id:secret,key_id:secret``; only SHA-256 digests of the secrets are kept."""
    from hashlib import sha256  # here, not at start-up: OpenSSL's load costs every command 5-10 ms

    keys = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key_id, sep, secret = item.partition(":")
        if not sep or not key_id or not secret:
            raise ConfigError("CANPIPE_API_KEYS: each key must be 'key_id:secret' (got an entry without ':')")
        if key_id != key_id.strip() or secret != secret.strip():
            # 'ops : s3cret' would silently make the id 'ops ' and the secret ' s3cret'
            raise ConfigError(f"CANPIPE_API_KEYS: no spaces around ':' (key id {key_id.strip()!r})")
        # UTF-8, as clients send it: the receiver compares the header's raw bytes
        keys.append(ApiKey(key_id, sha256(secret.encode()).digest()))
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError("CANPIPE_API_KEYS: key ids must be unique")
    return tuple(keys)


class _Reader:
    """Reads settings from ``env``, noting every problem instead of stopping at the first one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def number(self, name: str, default: Any, *, minimum: float = 0.0, maximum: float = math.inf) -> Any:
        raw = self.env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}: expected a number, got {raw!r}")
            return default
        if not math.isfinite(value):
            self.problems.append(f"{name}: expected a finite number, got {raw!r}")
            return default
        if value < minimum:
            self.problems.append(f"{name}: must be >= {minimum:g}, got {raw!r}")
        elif value > maximum:
            self.problems.append(f"{name}: must be <= {maximum:g}, got {raw!r}")
        return value

    def integer(self, name: str, default: int, *, minimum: float = 0.0, maximum: float = math.inf) -> int:
        value = self.number(name, default, minimum=minimum, maximum=maximum)
        if not float(value).is_integer():  # 1.5 records per batch is a typo, not 1
            self.problems.append(f"{name}: expected a whole number, got {self.env[name]!r}")
            return default
        return int(value)

    def existing_file(self, name: str) -> str:
        raw = self.env.get(name, "")
        if raw and not Path(raw).is_file():
            self.problems.append(f"{name}: cannot read {raw}: no such file")
        return raw

    def check(self, parse: Callable[[], T], default: T) -> T:
        try:
            return parse()
        except ConfigError as exc:
            self.problems.append(str(exc))
            return default


#: the CANPIPE_* variables Settings.from_env reads (docs/configuration.md lists each)
SETTING_NAMES = frozenset(
    {
        "CANPIPE_API_KEYS",
        "CANPIPE_BATCH_RECORDS",
        "CANPIPE_STORAGE_URL",
        "CANPIPE_S3_OBJECT_BYTES",
        "CANPIPE_S3_OBJECT_SECONDS",
        "CANPIPE_RAW_COMPRESSION",
        "CANPIPE_BATCH_SECONDS",
        "CANPIPE_BODY_TIMEOUT_S",
        "CANPIPE_DATA_DIR",
        "CANPIPE_DBC",
        "CANPIPE_HEADER_TIMEOUT_S",
        "CANPIPE_INSECURE_NO_AUTH",
        "CANPIPE_MAX_AGE_S",
        "CANPIPE_MAX_BODY_BYTES",
        "CANPIPE_MAX_FUTURE_SKEW_S",
        "CANPIPE_MAX_PENDING_RECORDS",
        "CANPIPE_MAX_RECORDS_PER_REQUEST",
        "CANPIPE_PUBLISH_TIMEOUT_S",
        "CANPIPE_QUEUE_MAX_BYTES",
        "CANPIPE_QUEUE_URL",
        "CANPIPE_RATE_LIMIT_BURST",
        "CANPIPE_RATE_LIMIT_RECORDS_PER_S",
        "CANPIPE_RECEIVE_INTERVAL_MS",
        "CANPIPE_ROTATE_BYTES",
        "CANPIPE_SEND_LINGER_MS",
        "CANPIPE_SIGNAL_MAP",
        "CANPIPE_VISIBILITY_TIMEOUT_S",
    }
)
#: CANPIPE_* names read outside Settings: by the simulator, the kernel selector, the build, ``check``
OTHER_NAMES = frozenset(
    {
        "CANPIPE_API_KEY",
        "CANPIPE_NO_EXTENSIONS",
        "CANPIPE_REQUIRE_COMPILED",
        "CANPIPE_CYTHON_DEBUG",
        "CANPIPE_CYTHON_ANNOTATE",
        "CANPIPE_LOG_LEVEL",
        "CANPIPE_LOG_FORMAT",
        "CANPIPE_NUM_VEHICLES",  # the simulated fleet of simulate and run (engine/cli.py)
        "CANPIPE_SAMPLING_RATE_MS",
        "CANPIPE_DURATION_SECONDS",
        "CANPIPE_LAKE_FILE_BYTES",  # canpipe compact: the size an hour's Parquet file is split at (engine/lake)
    }
)
#: prefixes of the test suite's and benchmarks' own switches: not settings, never warned about
_TOOLING_PREFIXES = ("CANPIPE_TEST_", "CANPIPE_BENCH_", "CANPIPE_FAULT_", "CANPIPE_SOAK_")


def unknown_names(env: Mapping[str, str] | None = None) -> list[str]:
    """A warning per ``CANPIPE_*`` variable canpipe does not read, with the nearest known name: a typo
    (``CANPIPE_DATADIR``) would otherwise leave the default in force without a word."""
    env = os.environ if env is None else env
    known = sorted(SETTING_NAMES | OTHER_NAMES)
    warnings = []
    for name in sorted(env):
        if not name.startswith("CANPIPE_") or name in known or name.startswith(_TOOLING_PREFIXES):
            continue
        # compared without the common prefix, which would make any two names look alike
        suffix = name.removeprefix("CANPIPE_")
        from difflib import get_close_matches  # only for a variable canpipe does not know

        near = get_close_matches(suffix, [k.removeprefix("CANPIPE_") for k in known], n=1, cutoff=0.6)
        hint = f"; did you mean CANPIPE_{near[0]}?" if near else ""
        warnings.append(f"{name} is not a canpipe setting and is ignored{hint}")
    return warnings


def _storage(text: str | None, data_dir: Path) -> StorageURL | None:
    if not text:
        return None
    from engine.storage.url import parse_storage_url

    return parse_storage_url(text, data_dir)


def _compression(text: str | None) -> str:
    if text and text not in ("none", "zstd"):
        raise ConfigError(f"CANPIPE_RAW_COMPRESSION={text!r}: none or zstd")
    return text or "none"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable. Build with ``Settings.from_env()``; override with ``dataclasses.replace``."""

    data_dir: Path = Path("./data")
    queue_url: str = ""
    api_keys: tuple[ApiKey, ...] = ()
    insecure_no_auth: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    max_future_skew_s: float = 300.0
    max_age_s: float = 7 * 86400.0
    publish_timeout_s: float = 5.0
    max_pending_records: int = 200_000
    max_records_per_request: int = 10_000
    body_timeout_s: float = 30.0
    header_timeout_s: float = 30.0  # Granian's own default; it also ends idle keep-alive connections
    rate_limit_records_per_s: float = 0.0  # 0: off
    rate_limit_burst: float = 0.0  # 0: one second's worth
    batch_records: int = 100
    batch_seconds: float = 2.0
    visibility_timeout_s: float = 30.0
    rotate_bytes: int = 5 * 1024 * 1024
    send_linger_ms: float | None = None  # None: the backend's profile (SQLite 0, SQS 50); QueueProfile.with_overrides
    receive_interval_ms: float | None = None  # None: the backend's profile (SQLite 0, SQS 200)
    dbc: str = ""
    signal_map: str = ""  # CANPIPE_SIGNAL_MAP; empty: the map shipped for the DBC (engine/can/codec.py)
    queue_max_bytes: int = 2 * 1024**3  # embedded queue: past this many message bytes a send is refused (503)
    log_level: str = "INFO"  # CANPIPE_LOG_LEVEL; engine.logs.configure applies it, once per process
    log_format: str = "json"  # CANPIPE_LOG_FORMAT: json, or text (the default on a terminal)
    storage: StorageURL | None = None  # CANPIPE_STORAGE_URL; None: the local disk under data_dir
    s3_object_bytes: int = 8 * 1024 * 1024  # an S3 consumer puts its held records at this size ...
    s3_object_seconds: float = 60.0  # ... or this long after the first arrived, whichever comes first
    raw_compression: str = "none"  # CANPIPE_RAW_COMPRESSION: none, or zstd (S3 raw objects as .jsonl.zst)

    @property
    def storage_url(self) -> StorageURL:
        """Where raw data, Parquet and aggregates live: CANPIPE_STORAGE_URL, else ``data_dir``."""
        from engine.storage.url import StorageURL

        return self.storage or StorageURL("file", path=self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        from engine.logs import resolve  # here, not at import: `canpipe --help` loads config and errors only

        env = os.environ if env is None else env
        read = _Reader(env)
        log_level, log_format = read.check(lambda: resolve(env=env), (cls.log_level, cls.log_format))
        data_dir = Path(env.get("CANPIPE_DATA_DIR") or "./data")
        storage = read.check(lambda: _storage(env.get("CANPIPE_STORAGE_URL"), data_dir), None)
        if storage is not None and not storage.is_s3:  # file:///path: the local disk at path, i.e. the data dir
            assert storage.path is not None
            if env.get("CANPIPE_DATA_DIR") and Path(env["CANPIPE_DATA_DIR"]).resolve() != storage.path.resolve():
                read.problems.append("CANPIPE_STORAGE_URL=file://... and CANPIPE_DATA_DIR name two roots: set one")
            data_dir, storage = storage.path, None
        queue_url = env.get("CANPIPE_QUEUE_URL") or f"sqlite:///{(data_dir / 'queue.db').resolve()}"
        settings = cls(
            data_dir=data_dir,
            queue_url=queue_url,
            api_keys=read.check(lambda: parse_api_keys(env.get("CANPIPE_API_KEYS", "")), ()),
            insecure_no_auth=env.get("CANPIPE_INSECURE_NO_AUTH", "") == "1",
            max_body_bytes=read.integer("CANPIPE_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            max_future_skew_s=read.number("CANPIPE_MAX_FUTURE_SKEW_S", cls.max_future_skew_s),
            max_age_s=read.number("CANPIPE_MAX_AGE_S", cls.max_age_s),
            publish_timeout_s=read.number("CANPIPE_PUBLISH_TIMEOUT_S", cls.publish_timeout_s, minimum=0.01),
            max_pending_records=read.integer("CANPIPE_MAX_PENDING_RECORDS", cls.max_pending_records, minimum=1),
            max_records_per_request=read.integer(
                "CANPIPE_MAX_RECORDS_PER_REQUEST", cls.max_records_per_request, minimum=1
            ),
            body_timeout_s=read.number("CANPIPE_BODY_TIMEOUT_S", cls.body_timeout_s, minimum=0.1),
            header_timeout_s=read.number("CANPIPE_HEADER_TIMEOUT_S", cls.header_timeout_s, minimum=0.001, maximum=60),
            rate_limit_records_per_s=read.number("CANPIPE_RATE_LIMIT_RECORDS_PER_S", cls.rate_limit_records_per_s),
            rate_limit_burst=read.number("CANPIPE_RATE_LIMIT_BURST", cls.rate_limit_burst),
            batch_records=read.integer("CANPIPE_BATCH_RECORDS", cls.batch_records, minimum=1),
            batch_seconds=read.number("CANPIPE_BATCH_SECONDS", cls.batch_seconds, minimum=0.01),
            visibility_timeout_s=read.number("CANPIPE_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s, minimum=1),
            rotate_bytes=read.integer("CANPIPE_ROTATE_BYTES", cls.rotate_bytes, minimum=1024),
            send_linger_ms=read.number("CANPIPE_SEND_LINGER_MS", None),
            receive_interval_ms=read.number("CANPIPE_RECEIVE_INTERVAL_MS", None),
            dbc=read.existing_file("CANPIPE_DBC"),
            signal_map=read.existing_file("CANPIPE_SIGNAL_MAP"),
            queue_max_bytes=read.integer("CANPIPE_QUEUE_MAX_BYTES", cls.queue_max_bytes),
            log_level=log_level,
            log_format=log_format,
            storage=storage,
            s3_object_bytes=read.integer("CANPIPE_S3_OBJECT_BYTES", cls.s3_object_bytes, minimum=1024),
            s3_object_seconds=read.number("CANPIPE_S3_OBJECT_SECONDS", cls.s3_object_seconds, minimum=0.01),
            raw_compression=read.check(lambda: _compression(env.get("CANPIPE_RAW_COMPRESSION")), "none"),
        )
        if read.problems:
            raise ConfigError(
                f"{len(read.problems)} problem(s) in the settings:\n  " + "\n  ".join(read.problems)
                if len(read.problems) > 1
                else read.problems[0]
            )
        return settings

    def require_auth(self) -> None:
        """Refuse to serve without keys unless explicitly told to (``--insecure-no-auth``)."""
        if not self.api_keys and not self.insecure_no_auth:
            raise ConfigError("CANPIPE_API_KEYS is not set: configure 'key_id:secret' keys or pass --insecure-no-auth")
