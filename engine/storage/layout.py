"""The raw layout, whatever the backend: one UTC ``Hour`` and the Hive-style path that names it.

``raw/year=YYYY/month=MM/day=DD/hour=HH/batch-<unix_ms>-<writer>.jsonl`` (DESIGN.md "Storage rules"). A
local root and an object-store prefix use the same relative names, so ``hour_path`` is the one place that
spells them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import NamedTuple

from engine.schema import UTC

RAW_FILE_GLOB = "*.jsonl"  # in an hour folder: what a writer creates (batch-<unix_ms>-<writer>.jsonl)
# a new file until its first batch is fsynced (then renamed to .jsonl); no reader lists it, not even *.jsonl*
PARTIAL_SUFFIX = ".partial"
PARTIAL_FILE_GLOB = "*" + PARTIAL_SUFFIX
HOUR_FOLDER_GLOB = "year=*/month=*/day=*/hour=*"


class Hour(NamedTuple):
    """One UTC hour: the partition a record lands in (by its ``ingest_received_at``)."""

    year: int
    month: int
    day: int
    hour: int

    @classmethod
    def from_datetime(cls, moment: dt.datetime) -> Hour:
        """The UTC hour holding ``moment`` (an aware datetime, any offset)."""
        moment = moment.astimezone(UTC)
        return cls(moment.year, moment.month, moment.day, moment.hour)

    @classmethod
    def from_epoch_hour(cls, index: int) -> Hour:
        """The hour ``index`` hours after the Unix epoch (``epoch_s // 3600``); once per consumed message."""
        moment = dt.datetime.fromtimestamp(index * 3600, UTC)
        return cls(moment.year, moment.month, moment.day, moment.hour)

    @classmethod
    def from_epoch_us(cls, epoch_us: int) -> Hour:
        """The hour holding ``epoch_us`` (microseconds since the Unix epoch)."""
        return cls.from_epoch_hour(epoch_us // 3_600_000_000)

    @property
    def start(self) -> dt.datetime:
        """The hour's first instant, UTC."""
        return dt.datetime(self.year, self.month, self.day, self.hour, tzinfo=UTC)


def hour_path(raw_dir: Path, hour: Hour) -> Path:
    """The folder of ``hour`` under ``raw_dir`` (``year=YYYY/month=MM/day=DD/hour=HH``)."""
    year, month, day, hh = hour
    return Path(raw_dir) / f"year={year:04d}" / f"month={month:02d}" / f"day={day:02d}" / f"hour={hh:02d}"


def hour_of_folder(folder: Path) -> Hour | None:
    """The ``Hour`` a folder named by ``hour_path`` stands for; None for a name that is not one."""
    try:
        year, month, day, hour = (int(p.name.split("=", 1)[1]) for p in (*folder.parents[2::-1], folder))
        dt.datetime(year, month, day, hour)  # a month 13 or an hour 24 names no hour
    except (IndexError, ValueError):
        return None
    return Hour(year, month, day, hour)
