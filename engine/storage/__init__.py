"""Storage: where raw records live, written and read back in one layout (DESIGN.md "Storage rules").

``layout`` names the partitions (``Hour``, ``hour_path``) for every backend. A backend provides:

- a writer: ``PartitionWriter(data_dir, writer_id).append(hour, buffers)``, durable (fsynced, or put)
  when it returns, and never a partial batch left visible after a failure (``StorageError``);
- reading: ``raw_hours`` (the hours holding raw files), ``raw_files`` (an hour's files, by name),
  ``iter_raw_files`` (all of them) and ``read_complete_lines`` (a file's bytes up to its last newline, so
  a torn tail is never read as a record; ``complete_end`` cuts a mapped file's chunks the same way);
- recovery: ``repair_torn_tails``, run by the consumers' supervisor before its workers start and when one dies.

``local`` is the filesystem backend (the only one today; an S3 backend will sit beside it). Storage knows
nothing of delivery: not the queue, not the consumer, not the receiver.
"""

from engine.storage.layout import Hour, hour_path
from engine.storage.local import (
    PartitionWriter,
    UnsafeFileState,
    complete_end,
    fault_point,
    iter_raw_files,
    raw_files,
    raw_hours,
    read_complete_lines,
    repair_torn_tails,
)

__all__ = [
    "Hour",
    "PartitionWriter",
    "UnsafeFileState",
    "complete_end",
    "fault_point",
    "hour_path",
    "iter_raw_files",
    "raw_files",
    "raw_hours",
    "read_complete_lines",
    "repair_torn_tails",
]
