"""Which hours to aggregate: hour names, the hour's raw files, output and manifest paths, and the schedule.

A manifest beside each aggregate records the input files and their sizes: an hour whose files changed
since (late data, a redelivery after the hour closed) is aggregated again.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import msgspec

from engine.errors import ConfigError
from engine.schema import UTC
from engine.storage import hour_path

log = logging.getLogger("canpipe.aggregator")


def parse_hour(text: str) -> dt.datetime:
    """``YYYY-MM-DDTHH`` (UTC) -> the hour's start; a ``ConfigError`` naming ``--hour`` otherwise."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"--hour: expected YYYY-MM-DDTHH (UTC), got {text!r}") from None


def hour_label(hour: dt.datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


def hour_inputs(data_dir: Path, hour: dt.datetime, warn: bool = False) -> list[Path]:
    """The hour's raw files, sorted by name: regular files only, since a directory (or a FIFO, which would
    block the open) named ``*.jsonl`` holds no records; ``warn`` logs each one skipped."""
    folder = hour_path(Path(data_dir) / "raw", (hour.year, hour.month, hour.day, hour.hour))
    files = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if path.is_file():
            files.append(path)
        elif warn:
            log.warning("%s: not a regular file, skipped", path)
    return files


def output_path(data_dir: Path, hour: dt.datetime) -> Path:
    return Path(data_dir) / "aggregated" / f"aggregated-{hour_label(hour)}.json"


def manifest_path(data_dir: Path, hour: dt.datetime) -> Path:
    return Path(data_dir) / "aggregated" / f"aggregated-{hour_label(hour)}.manifest.json"


class InputFile(msgspec.Struct):
    file: str  # relative to data/raw
    bytes: int


class Manifest(msgspec.Struct):
    hour: str
    inputs: list[InputFile]
    output_bytes: int


def fingerprint(data_dir: Path, files: list[Path]) -> list[InputFile]:
    raw = Path(data_dir) / "raw"
    return [InputFile(str(path.relative_to(raw)), path.stat().st_size) for path in files]


def needs_aggregation(data_dir: Path, hour: dt.datetime) -> bool:
    """True when the hour has input and no manifest, or its files or sizes changed since (late data)."""
    files = hour_inputs(data_dir, hour)
    if not files:
        return False
    try:
        manifest = msgspec.json.decode(manifest_path(data_dir, hour).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return True
    return manifest.inputs != fingerprint(data_dir, files) or not output_path(data_dir, hour).exists()


def closed_hours(data_dir: Path, now: dt.datetime, grace: dt.timedelta = dt.timedelta(minutes=5)) -> list[dt.datetime]:
    """Every hour with raw files that ended at least ``grace`` before ``now``."""
    hours = []
    for folder in sorted((Path(data_dir) / "raw").glob("year=*/month=*/day=*/hour=*")):
        parts = [int(p.name.split("=")[1]) for p in (folder.parents[2], folder.parents[1], folder.parent, folder)]
        hour = dt.datetime(parts[0], parts[1], parts[2], parts[3], tzinfo=UTC)
        if hour + dt.timedelta(hours=1) + grace <= now:
            hours.append(hour)
    return hours


def next_run(now: dt.datetime, minute: int = 5) -> dt.datetime:
    """The next HH:05:00 UTC strictly after ``now``."""
    candidate = now.replace(minute=minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + dt.timedelta(hours=1)
