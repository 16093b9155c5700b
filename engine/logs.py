"""Log set-up, owned here and nowhere else: one line per event, JSON or text, the same in every process.

Every long-running command calls ``configure`` once (the cli for its own process, the consumer workers
in ``worker_main``); Granian's processes get the same handlers through ``granian_dictconfig``, so its own
lines (``_granian``) and the receiver's come out in canpipe's format and level.

Events carry context as ``extra`` fields, rendered as JSON keys or as ``key=value`` after the text:
``log.error("write failed: %s", exc, extra={"stage": "storage"})``. Errors name their ``stage``; a client is
named by its ``key_id``, never by its key.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from engine.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("json", "text")
#: libraries whose INFO lines are noise to an operator ("Found credentials in environment variables." on every
#: SQS command): kept at WARNING whatever canpipe's own level is
QUIET_LIBRARIES = ("aiobotocore", "botocore", "boto3", "urllib3", "asyncio")
# the attributes every LogRecord has; anything else on a record came in through ``extra``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_encoders: list[Any] = []  # msgspec's Encoder, built by the first JSON event: --help and text logs never load msgspec


def _encode(event: dict[str, Any]) -> bytes:
    if not _encoders:
        import msgspec

        _encoders.append(msgspec.json.Encoder(enc_hook=str))  # an extra field of any type renders as its str()
    return _encoders[0].encode(event)  # type: ignore[no-any-return]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of a record, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _time(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the extra fields, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event.update(_fields(record))
        if record.exc_info:
            event["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.stack_info:
            event["stack"] = record.stack_info
        return _encode(event).decode()


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z WARNING canpipe.consumer delete failed: ... stage=delete`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record)} {record.levelname:<7} {record.name} {record.getMessage()}"
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return line


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is at the time of the event, not at set-up (pytest and
    daemonizers swap it; a stream captured once may be closed by then)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def resolve(level: str | None = None, fmt: str | None = None, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The level and format to use: the flags, else ``CANPIPE_LOG_LEVEL``/``CANPIPE_LOG_FORMAT``, else
    ``INFO`` and ``text`` on a terminal, ``json`` otherwise. Raises ``ConfigError`` naming a bad value."""
    env = os.environ if env is None else env
    level = (level or env.get("CANPIPE_LOG_LEVEL") or "INFO").upper()
    if level not in LEVELS:
        raise ConfigError(f"CANPIPE_LOG_LEVEL: expected one of {', '.join(LEVELS)}, got {level!r}")
    fmt = (fmt or env.get("CANPIPE_LOG_FORMAT") or ("text" if sys.stderr.isatty() else "json")).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"CANPIPE_LOG_FORMAT: expected json or text, got {fmt!r}")
    return level, fmt


def dictconfig(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` sending every logger (canpipe's, Granian's, libraries') to stderr
    in ``fmt`` at ``level``. Granian merges it over its own defaults, key by top-level key."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"canpipe": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {"class": f"{StderrHandler.__module__}.{StderrHandler.__qualname__}", "formatter": "canpipe"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        # Granian's own loggers propagate to the root handler instead of printing "[INFO] ..." to stdout
        "loggers": {
            "_granian": {"handlers": [], "level": level, "propagate": True},
            "granian.access": {"handlers": [], "level": level, "propagate": True},
            **{name: {"level": "WARNING"} for name in QUIET_LIBRARIES},
        },
    }


def configure(level: str | None = None, fmt: str | None = None) -> tuple[str, str]:
    """Set up logging for this process (once, at start); returns the (level, format) in effect.

    The choice is written back to ``CANPIPE_LOG_LEVEL``/``CANPIPE_LOG_FORMAT`` so that child processes
    (consumer workers, Granian workers, ``canpipe run``'s children) log the same way."""
    level, fmt = resolve(level, fmt)
    os.environ["CANPIPE_LOG_LEVEL"], os.environ["CANPIPE_LOG_FORMAT"] = level, fmt
    root = logging.getLogger()
    # replace only what an earlier configure() installed: handlers others put on the root (pytest's) stay
    for old in [h for h in root.handlers if getattr(h, "canpipe", False)]:
        root.removeHandler(old)
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.canpipe = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    return level, fmt
