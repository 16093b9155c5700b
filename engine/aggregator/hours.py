"""Which hours to aggregate: hour names, the hour's raw files, output and manifest paths, and the schedule.

A manifest beside each aggregate records the input files and their sizes: an hour whose files changed
since (late data, a redelivery after the hour closed) is aggregated again.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import msgspec

from engine.errors import ConfigError
from engine.schema import UTC
from engine.storage import Hour, raw_files, raw_hours


def parse_hour(text: str) -> dt.datetime:
    """``YYYY-MM-DDTHH`` (UTC) -> the hour's start; a ``ConfigError`` naming ``--hour`` otherwise."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"--hour: expected YYYY-MM-DDTHH (UTC), got {text!r}") from None


def hour_label(hour: dt.datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


def hour_inputs(data_dir: Path, hour: dt.datetime, warn: bool = False) -> list[Path]:
    """The raw files of the hour starting at ``hour``, as storage lists them (``warn``: log what it skips)."""
    return raw_files(Path(data_dir) / "raw", Hour.from_datetime(hour), warn)


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
    return [
        hour.start for hour in raw_hours(Path(data_dir) / "raw") if hour.start + dt.timedelta(hours=1) + grace <= now
    ]


def next_run(now: dt.datetime, minute: int = 5) -> dt.datetime:
    """The next HH:05:00 UTC strictly after ``now``."""
    candidate = now.replace(minute=minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + dt.timedelta(hours=1)
