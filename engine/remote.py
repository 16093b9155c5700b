"""``canpipe aggregate`` and ``canpipe compact`` when the storage is S3 (``CANPIPE_STORAGE_URL=s3://…``).

Consumers on many hosts write one bucket; these commands see it as one dataset. Each hour is one job at a
time (a lease object per job and hour, ``engine.storage.s3.Lease``): its raw objects, its day's Parquet and
its aggregate are mirrored into a local cache (``<data dir>/s3-cache/<bucket>/<prefix>``, kept between
runs so unchanged objects are not fetched again), the local command runs on the cache, and what it wrote
is put back. The output is the local command's, byte for byte.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.schema import UTC
from engine.storage import Hour
from engine.storage.url import StorageURL

CLOSED_AFTER = dt.timedelta(minutes=5)  # as the local aggregator: an hour is closed 5 min after it ends


def cache_dir(settings: Settings) -> Path:
    url = settings.storage_url
    return settings.data_dir / "s3-cache" / url.bucket / (url.prefix or "_")


def _closed(hour: Hour, now: dt.datetime) -> bool:
    return hour.start + dt.timedelta(hours=1) + CLOSED_AFTER <= now


async def _jobs(
    url: StorageURL,
    job: str,
    hours: list[Hour] | None,
    outputs: Callable[[Hour], list[str]],
    work: Callable[[Hour], Any],
    cache: Path,
) -> tuple[list[Any], list[str]]:
    """Run ``work(hour)`` over each hour (every closed hour with raw objects when ``hours`` is None) under
    the hour's lease; return the results and the hours refused because another job held them."""
    from engine.storage.s3 import LeaseHeld, S3Store, raw_hours, run_hour_job

    results, held = [], []
    async with S3Store(url) as store:
        if hours is None:
            now = dt.datetime.now(UTC)
            hours = [hour for hour in await raw_hours(store) if _closed(hour, now)]
        for hour in hours:
            try:
                result = await run_hour_job(store, job, hour, cache, outputs(hour), functools.partial(work, hour))
            except LeaseHeld as exc:
                held.append(str(exc))
                continue
            if result is not None:
                results.append(result)
    return results, held


def aggregate(settings: Settings, hour: dt.datetime | None) -> tuple[list[Any], list[str]]:
    """``canpipe aggregate [--hour H]`` over S3: the results of the hours aggregated (as the local command's)
    and the lines of hours another job holds. ``--hour`` aggregates the hour even when it is up to date."""
    from engine import aggregator

    cache = cache_dir(settings)

    def outputs(h: Hour) -> list[str]:
        return [
            aggregator.output_path(cache, h.start).relative_to(cache).as_posix(),
            aggregator.manifest_path(cache, h.start).relative_to(cache).as_posix(),
        ]

    def work(h: Hour) -> Any:
        if hour is None and not aggregator.needs_aggregation(cache, h.start):
            return None
        if not aggregator.hour_inputs(cache, h.start) and not _has_parquet(cache, h):
            return None
        return aggregator.aggregate_isolated(cache, h.start)

    hours = None if hour is None else [Hour.from_datetime(hour)]
    return asyncio.run(_jobs(settings.storage_url, "aggregate", hours, outputs, work, cache))


def compact(settings: Settings, hour: dt.datetime | None, force: bool) -> tuple[list[Any], list[str]]:
    """``canpipe compact [--hour H] [--force]`` over S3, as ``aggregate``; without ``--hour`` the closed days
    are then merged (``engine.lake.daily``), each under a day lease."""
    from engine.lake.compact import compact_hour

    cache = cache_dir(settings)

    def work(h: Hour) -> Any:
        from engine import aggregator

        if not aggregator.hour_inputs(cache, h.start):
            return None
        result = compact_hour(cache, h.start, force=force)
        return None if result.skipped and hour is None else result  # the pending run says what it did

    hours = None if hour is None else [Hour.from_datetime(hour)]

    async def both() -> tuple[list[Any], list[str]]:
        results, held = await _jobs(settings.storage_url, "compact", hours, lambda h: [], work, cache)
        if hour is None:
            days, busy = await _day_jobs(settings.storage_url, cache)
            results, held = results + days, held + busy
        return results, held

    return asyncio.run(both())


async def _day_jobs(url: StorageURL, cache: Path) -> tuple[list[Any], list[str]]:
    """Merge every closed day whose hourly Parquet changed since its day file was made."""
    from engine.lake.daily import CLOSED_AFTER as DAY_CLOSED_AFTER
    from engine.lake.daily import DAILY_DIR, merge_day
    from engine.storage.layout import hour_of_folder
    from engine.storage.s3 import LeaseHeld, S3Store, day_prefix, run_hour_job

    now = dt.datetime.now(UTC)
    results, held = [], []
    async with S3Store(url) as store:
        days = set()
        for name, _ in await store.list("parquet/"):
            found = hour_of_folder(Path(name).parent)
            if found is not None:
                days.add(Hour(found.year, found.month, found.day, 0))
        for first in sorted(days):
            if first.start + dt.timedelta(days=1) + DAY_CLOSED_AFTER > now:
                continue
            date = first.start.date()
            trees = [day_prefix("parquet", first), day_prefix(DAILY_DIR, first)]
            try:
                result = await run_hour_job(
                    store,
                    "compact-day",
                    first,
                    cache,
                    [],
                    functools.partial(merge_day, cache, date),
                    trees=trees,
                    raw=False,
                )
            except LeaseHeld as exc:
                held.append(str(exc))
                continue
            if not result.skipped:
                results.append(result)
    return results, held


def _has_parquet(cache: Path, hour: Hour) -> bool:
    from engine.lake.compact import parquet_path

    return parquet_path(cache, hour.start).exists()
