"""Start-up checks shared by ``canpipe check`` and the daemons: each returns a problem that names the setting.

Read-only: a check never creates the data directory or the embedded queue, it says whether they could be.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

from engine.config import Settings
from engine.errors import CanpipeError
from engine.queues import open_queue

log = logging.getLogger("canpipe.checks")

KERNELS = ("candecode", "groupby", "histogram", "jsonl")


def kernel_implementations(*, probe: bool = False) -> dict[str, tuple[str, str]]:
    """Kernel name -> ("c" | "py", why), as the selector picks it. ``probe``: only look for the built modules
    instead of importing them (and numpy, 0.2 s): what a process that runs no kernel itself (the consumers'
    supervisor, Granian's main process) reports for the workers it starts."""
    from engine.kernels._select import SELECTED, extensions_disabled

    if probe:
        if extensions_disabled():
            return dict.fromkeys(KERNELS, ("py", "CANPIPE_NO_EXTENSIONS=1"))
        built = {name: importlib.util.find_spec(f"engine.kernels._{name}_c") is not None for name in KERNELS}
        return {name: ("c", "compiled") if built[name] else ("py", "compiled module not built") for name in KERNELS}
    for name in KERNELS:
        importlib.import_module(f"engine.kernels.{name}")
    return {name: SELECTED[name] for name in KERNELS}


def describe_kernels(*, probe: bool = False) -> str:
    """``groupby compiled, histogram compiled, jsonl Python twin (...)``: for start-up lines and ``check``."""
    return ", ".join(
        f"{name} compiled" if impl == "c" else f"{name} Python twin ({why})"
        for name, (impl, why) in kernel_implementations(probe=probe).items()
    )


def _creatable(path: Path) -> str | None:
    """None when ``path`` (a directory, missing) could be created: its nearest existing ancestor is a
    writable directory. Otherwise why not."""
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


# a data dir that is full (or over quota) is a passing state the consumers ride out (they hold their batch
# and retry: docs/reliability.md); permissions, a read-only mount or a missing folder are configuration
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _data_dir_problem(data_dir: Path, *, transient_ok: bool = False) -> str | None:
    if not data_dir.exists():
        why = _creatable(data_dir)
        return None if why is None else f"cannot be created: {why}"
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".check-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        if transient_ok and exc.errno in TRANSIENT_ERRNOS:
            log.warning("CANPIPE_DATA_DIR %s: %s; starting anyway, writes wait for space", data_dir, exc)
            return None
        return str(exc)
    return None


def _storage_problem(settings: Settings) -> str | None:
    """An S3 root: the bucket answers a list with these credentials (a check puts nothing)."""
    from engine.storage.s3 import S3Store

    async def ping() -> None:
        async with S3Store(settings.storage_url) as store:
            await asyncio.wait_for(store.check(), 10)

    try:
        asyncio.run(ping())
    except (TimeoutError, CanpipeError, OSError) as exc:
        return str(exc) or "timeout"
    return None


def _queue_problem(queue_url: str) -> str | None:
    if queue_url.startswith("sqlite://"):
        path = Path(queue_url.removeprefix("sqlite://"))
        if not path.exists():  # created by the first serve or consume; a check leaves nothing behind
            why = _creatable(path.parent)
            return None if why is None else f"cannot be created: {why}"

    async def ping() -> None:
        queue = open_queue(queue_url, create=False)
        try:
            await asyncio.wait_for(queue.ping(), 10)
        finally:
            await queue.close()

    try:
        asyncio.run(ping())
    except (TimeoutError, CanpipeError, OSError) as exc:
        return str(exc) or "timeout"
    return None


def run_checks(settings: Settings, *, serving: bool = True, queue: bool = True, daemon: bool = False) -> list[str]:
    """Every problem found, each naming its setting; empty when all is well. ``queue=False`` leaves the queue
    to the caller (the daemons, whose retries ride out a queue that is not up yet); ``daemon``: a full data
    dir is logged, not a problem (the daemons ride it out; ``canpipe check`` reports it)."""
    problems = []
    if serving and not settings.api_keys and not settings.insecure_no_auth:
        problems.append("CANPIPE_API_KEYS: no API keys configured ('key_id:secret,...')")
    if (why := _data_dir_problem(settings.data_dir, transient_ok=daemon)) is not None:
        problems.append(f"CANPIPE_DATA_DIR: {settings.data_dir} is not writable: {why}")
    if queue and (why := _queue_problem(settings.queue_url)) is not None:
        problems.append(f"CANPIPE_QUEUE_URL: queue {settings.queue_url} is not reachable: {why}")
    if settings.storage_url.is_s3:
        if importlib.util.find_spec("aiobotocore") is None:  # said at start-up, not as a crash loop of workers
            problems.append(f"CANPIPE_STORAGE_URL: {settings.storage_url} is S3, which needs pip install 'canpipe[s3]'")
        elif queue and (why := _storage_problem(settings)) is not None:
            problems.append(f"CANPIPE_STORAGE_URL: {settings.storage_url} is not usable: {why}")
    if os.environ.get("CANPIPE_REQUIRE_COMPILED", "") == "1":
        missing = [name for name, (impl, _) in kernel_implementations().items() if impl != "c"]
        if missing:
            problems.append(
                f"CANPIPE_REQUIRE_COMPILED: the compiled kernels {', '.join(missing)} are not in use "
                f"({describe_kernels()}); rebuild with a C compiler: pip install -e ."
            )
    return problems
