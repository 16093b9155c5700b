"""Start-up checks shared by ``canpipe check``: each returns a problem that names the setting, or None."""

from __future__ import annotations

import asyncio
import os
import tempfile

from engine.config import Settings
from engine.errors import CanpipeError
from engine.queues import open_queue


def run_checks(settings: Settings, *, serving: bool = True) -> list[str]:
    problems = []
    if serving and not settings.api_keys and not settings.insecure_no_auth:
        problems.append("CANPIPE_API_KEYS: no API keys configured ('key_id:secret,...')")
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=settings.data_dir, prefix=".check-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        problems.append(f"CANPIPE_DATA_DIR: {settings.data_dir} is not writable: {exc}")

    async def ping() -> None:
        queue = open_queue(settings.queue_url)
        try:
            await asyncio.wait_for(queue.ping(), 10)
        finally:
            await queue.close()

    try:
        asyncio.run(ping())
    except (TimeoutError, CanpipeError, OSError) as exc:
        problems.append(f"CANPIPE_QUEUE_URL: queue {settings.queue_url} is not reachable: {exc or 'timeout'}")
    return problems
