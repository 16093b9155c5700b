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


class QueueBroken(QueueError):
    """The queue's storage is gone or damaged (an embedded file deleted, replaced or corrupted).

    Not transient: a process that sees it fails closed (the receiver answers 503, a consumer exits non-zero
    for its supervisor to restart it), and nothing is written to a queue that would lose it.
    """
