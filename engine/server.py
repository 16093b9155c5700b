"""Serving the receiver: the port probe, the settings handed to Granian's worker processes, and Granian.

The app itself is ``engine.receiver:worker_app``; each Granian worker builds it from the environment, so the
settings the command line resolved (flags over ``CANPIPE_*``) are written back to ``os.environ`` before
the workers start.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from engine.config import Settings
from engine.errors import CanpipeError
from engine.queues import refuse_broken_queue

RESPAWN_INTERVAL_S = 0.5  # a worker that dies is replaced after this
# a worker still draining this long after SIGTERM is killed: a stop is bounded (systemd's TimeoutStopSec is 30 s)
WORKERS_KILL_TIMEOUT_S = 20
LISTEN_BACKLOG = 2048  # connections the kernel queues while every worker is busy


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on. Granian binds with SO_REUSEPORT, so a second ``serve`` on
    the same port would start without error and silently take half the traffic; a bind without it fails
    while anyone listens (SO_REUSEADDR only lets it past connections left in TIME_WAIT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CanpipeError(
                f"cannot serve on {host}:{port}: {exc.strerror} (is another receiver running?)"
            ) from None


def hand_over(settings: Settings) -> None:
    """Write the resolved settings the workers read back (``Settings.from_env``) into this process's
    environment, which Granian's worker processes inherit."""
    if settings.insecure_no_auth:
        os.environ["CANPIPE_INSECURE_NO_AUTH"] = "1"
    os.environ["CANPIPE_QUEUE_URL"] = settings.queue_url
    os.environ["CANPIPE_DATA_DIR"] = str(settings.data_dir)


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run the receiver on ``host:port`` with ``workers`` processes until SIGTERM/SIGINT.

    Refuses to start (``ConfigError``/``CanpipeError``) without API keys, on a port in use, or on a damaged
    embedded queue: one clear error here rather than a server of 401s or 503s, or an error in every worker.
    """
    from granian import Granian
    from granian.log import LogLevels

    from engine import logs

    settings.require_auth()
    if settings.dbc:  # /ingest/can: an unreadable DBC or signal map is one clear error here, not one per worker
        from engine.can.codec import CanCodec

        CanCodec.load(settings.dbc, settings.signal_map or None)
    ensure_port_free(host, port)
    refuse_broken_queue(settings.queue_url)
    hand_over(settings)
    level, fmt = logs.resolve()
    Granian(
        "engine.receiver:worker_app",
        factory=True,
        address=host,
        port=port,
        workers=workers,
        **granian_options(settings.header_timeout_s),
        # Granian configures logging in its own process and in each worker from this: its lines and the
        # receiver's come out in canpipe's format and level (CANPIPE_LOG_*, as the cli resolved them)
        log_level=LogLevels(level.lower()),
        log_dictconfig=logs.dictconfig(level, fmt),
        respawn_failed_workers=True,  # a worker that dies is replaced; without it Granian shuts the server down
        respawn_interval=RESPAWN_INTERVAL_S,
        workers_kill_timeout=WORKERS_KILL_TIMEOUT_S,
    ).serve()


def granian_options(header_timeout_s: float) -> dict[str, Any]:
    """Granian's settings of the request path (interface, loop, threads, HTTP/1), shared with the benchmark's
    bare anchor app (``bench/bench_receiver.py``) so that both are served alike."""
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    return {
        "interface": Interfaces.ASGI,
        "loop": Loops.uvloop,
        "backlog": LISTEN_BACKLOG,
        # a client that trickles its headers is cut off (the body has its own deadline in the app)
        "http1_settings": HTTP1Settings(header_read_timeout=max(1, int(header_timeout_s * 1000))),
        "log_access": False,
    }
