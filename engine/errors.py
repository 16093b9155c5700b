"""One error tree for canpipe: everything we raise on purpose is a CanpipeError."""


class CanpipeError(Exception):
    """Base class of every error canpipe raises on purpose."""


class ConfigError(CanpipeError):
    """A setting is missing or invalid; the message names the setting. Exit 1 at start-up."""


class QueueError(CanpipeError):
    """The queue could not be reached or refused an operation."""


class QueueSaturated(QueueError):
    """The publisher has too much work in flight; callers should shed load (HTTP 503)."""


class StorageError(CanpipeError):
    """Writing or reading the raw files failed."""
