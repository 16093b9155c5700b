"""canpipe: CAN battery telemetry over HTTP into a durable queue and hour-partitioned JSONL files."""

from engine.config import Settings
from engine.errors import CanpipeError, ConfigError, QueueError, StorageError

__version__ = "0.1.0"
__all__ = ["CanpipeError", "ConfigError", "QueueError", "Settings", "StorageError", "__version__"]
