"""The ``canpipe`` command: wires the stages together, owns no pipeline logic."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.errors import CanpipeError, ConfigError

log = logging.getLogger("canpipe")


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        env["CANPIPE_DATA_DIR"] = str(args.data_dir)
    if getattr(args, "queue_url", None):
        env["CANPIPE_QUEUE_URL"] = args.queue_url
    if getattr(args, "insecure_no_auth", False):
        env["CANPIPE_INSECURE_NO_AUTH"] = "1"
    return Settings.from_env(env)


def _start_up(settings: Settings, command: str, *, serving: bool) -> None:
    """A daemon's start: the checks of ``canpipe check`` (exit 1 naming each problem, not a crash loop), then
    one line saying what this process runs with."""
    from engine import __version__
    from engine.checks import describe_kernels, run_checks

    problems = run_checks(settings, serving=serving, queue=False, daemon=True)  # the retries ride out the rest
    if problems:
        raise ConfigError("; ".join(problems))
    keys = ", ".join(k.key_id for k in settings.api_keys) or ("none (--insecure-no-auth)" if serving else "-")
    url, scratch = settings.storage_url, settings.data_dir.resolve()
    log.info(
        "canpipe %s %s: queue %s, %s, key ids %s, kernels: %s",
        __version__,
        command,
        settings.queue_url,
        f"storage {url}, scratch {scratch}" if url.is_s3 else f"data dir {scratch}",
        keys,
        describe_kernels(probe=True),  # the workers import them; this process need not load numpy
        extra={"version": __version__, "queue_url": settings.queue_url, "data_dir": str(settings.data_dir)},
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.server import serve

    settings = _settings(args)
    settings.require_auth()
    _start_up(settings, f"serve on {args.host}:{args.port}, {args.workers} workers", serving=True)
    serve(settings, args.host, args.port, args.workers)
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    from engine.queues import refuse_broken_queue
    from engine.supervisor import Supervisor

    settings = _settings(args)
    _start_up(settings, f"consume, {args.workers} workers", serving=False)
    refuse_broken_queue(settings.queue_url)
    if args.batch_seconds is not None:
        settings = dataclasses.replace(settings, batch_seconds=args.batch_seconds)
    return Supervisor(settings, args.workers).run()


#: the simulated fleet of ``run`` and ``simulate``: (flag's attribute, environment variable, type, default)
FLEET_SETTINGS = (
    ("vehicles", "CANPIPE_NUM_VEHICLES", int, 10),
    ("rate_ms", "CANPIPE_SAMPLING_RATE_MS", float, 200.0),
    ("duration", "CANPIPE_DURATION_SECONDS", float, 10.0),
)


def _fleet(args: argparse.Namespace) -> None:
    """Fill --vehicles, --rate-ms and --duration left unset from their environment variables, else defaults."""
    for attr, name, kind, default in FLEET_SETTINGS:
        if getattr(args, attr) is not None:
            continue
        raw = os.environ.get(name, "").strip()
        try:
            value = kind(raw) if raw else default
        except ValueError:
            raise ConfigError(f"{name}: expected a {'whole ' * (kind is int)}number, got {raw!r}") from None
        if not 0 < value < float("inf"):
            raise ConfigError(f"{name}: must be a positive number, got {raw!r}")
        setattr(args, attr, value)


def cmd_simulate(args: argparse.Namespace) -> int:
    from engine.simulator import Simulator, describe

    _fleet(args)
    if args.can:  # raw frames to /ingest/can
        return _simulate_can(args)
    key = args.api_key or os.environ.get("CANPIPE_API_KEY")
    sim = Simulator(
        args.url,
        api_key=key,
        vehicles=args.vehicles,
        rate_ms=args.rate_ms,
        duration_s=args.duration,
        batch=args.batch or 1,
        seed=args.seed,
        count=args.count,
        max_in_flight=args.max_in_flight,
    )
    _wait_for_receiver(args.url)
    import asyncio

    from engine.progress import simulation_line, with_progress

    result = asyncio.run(with_progress(sim.run(), lambda s: simulation_line(sim.result, args.duration, s)))
    print(describe(result))
    if result.failed or result.rejected:
        return 1
    return 1 if args.strict and result.short else 0


def _can_codec(args: argparse.Namespace):  # -> engine.can.codec.CanCodec (imported only when a command runs)
    """The DBC and map of ``simulate --can`` and ``replay``: the flags, else CANPIPE_DBC / CANPIPE_SIGNAL_MAP."""
    from engine.can.codec import DEFAULT_DBC, CanCodec

    dbc = args.dbc or os.environ.get("CANPIPE_DBC") or (DEFAULT_DBC if args.command == "simulate" else None)
    if not dbc:
        raise ConfigError("CANPIPE_DBC: replay needs a DBC: --dbc FILE (or CANPIPE_DBC)")
    return CanCodec.load(dbc, args.signal_map or (None if args.dbc else os.environ.get("CANPIPE_SIGNAL_MAP")))


def _simulate_can(args: argparse.Namespace) -> int:
    import asyncio

    from engine.can.simulate import CanSimulator, describe

    sim = CanSimulator(
        args.url,
        _can_codec(args),
        api_key=args.api_key or os.environ.get("CANPIPE_API_KEY"),
        vehicles=args.vehicles,
        rate_ms=args.rate_ms,
        duration_s=args.duration,
        batch=args.batch or 100,
        seed=args.seed,
        count=args.count,
    )
    result = asyncio.run(sim.run())
    print(describe(result))
    return 1 if result.counts.failed_frames else 0


def cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    from engine.can.replay import Replayer, describe

    settings = Settings.from_env()
    if not args.log.is_file():
        raise ConfigError(f"replay: no log file {args.log}")
    replayer = Replayer(
        args.log,
        _can_codec(args),
        args.url,
        api_key=args.api_key or os.environ.get("CANPIPE_API_KEY"),
        vehicle_id=args.vehicle_id,
        speed=None if args.speed == "max" else float(args.speed),
        batch=args.batch,
        timestamps=args.timestamps,
        max_age_s=settings.max_age_s,
        max_future_s=settings.max_future_skew_s,
    )
    summary = asyncio.run(replayer.run())
    print(describe(summary))
    return 1 if summary.failed_frames else 0


def _speed(text: str) -> str:
    if text != "max" and not (text.replace(".", "", 1).isdigit() and float(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'max', got {text!r}")
    return text


def _wait_for_receiver(url: str, timeout_s: float = 10.0) -> None:
    """Wait up to ``timeout_s`` for something to listen at ``url`` (a receiver started a moment ago with ``&``);
    a CanpipeError saying so when nothing does, instead of a run of failed sends."""
    import socket
    import urllib.parse

    from engine.launch import wait_until

    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80))
    last: list[OSError] = []

    def listening() -> bool:
        try:
            socket.create_connection(address, timeout=2).close()
        except OSError as exc:
            last[:] = [exc]
            return False
        return True

    if not wait_until(listening, timeout_s, 0.2):
        cause = "connection refused" if isinstance(last[0], ConnectionRefusedError) else str(last[0])
        raise CanpipeError(f"{cause} to {url} after {timeout_s:.0f} s: is the receiver running? (canpipe serve)")


def cmd_queue(args: argparse.Namespace) -> int:
    import asyncio

    from engine.queues import QueueAttributes, open_queue

    settings = _settings(args)

    async def main() -> int:
        queue = open_queue(settings.queue_url, create=args.action == "create")  # stats never make a queue
        try:
            if args.action == "create":
                await queue.create(
                    QueueAttributes(
                        visibility_timeout_s=args.visibility_timeout, max_receive_count=args.max_receive_count
                    )
                )
                print(
                    f"created {settings.queue_url} (visibility {args.visibility_timeout} s, "
                    f"dead-letter after {args.max_receive_count} receives)"
                )
            elif args.action == "stats":
                stats = await queue.stats()
                size = "" if stats.size_bytes is None else f"  bytes {stats.size_bytes}"
                print(
                    f"visible {stats.visible}  in_flight {stats.in_flight}  delayed {stats.delayed}  "
                    f"dead_letter {stats.dead_letter}{size}"
                )
            elif args.action == "purge":
                print(f"purged {await queue.purge()} messages")
            else:
                print(f"redrove {await queue.redrive()} messages from the dead-letter queue")
        finally:
            await queue.close()
        return 0

    return asyncio.run(main())


def cmd_aggregate(args: argparse.Namespace) -> int:
    from engine import aggregator

    settings = _settings(args)
    if args.schedule:
        return _aggregate_on_schedule(settings)
    results: list[aggregator.HourResult | aggregator.HourFailure]
    held: list[str] = []
    if settings.storage_url.is_s3:
        from engine import remote

        results, held = remote.aggregate(settings, args.hour)
        if args.hour and not results and not held:
            label = aggregator.hour_label(args.hour)
            print(f"no raw data for {label} under {settings.storage_url}/raw: nothing written", file=sys.stderr)
            return 1
    elif args.hour:
        if not aggregator.hour_inputs(settings.data_dir, args.hour) and not _compacted(settings.data_dir, args.hour):
            label = aggregator.hour_label(args.hour)
            print(f"no raw data for {label} under {settings.data_dir / 'raw'}: nothing written", file=sys.stderr)
            return 1
        results = [aggregator.aggregate_isolated(settings.data_dir, args.hour)]
    else:
        from engine.progress import Progress

        progress = Progress()
        try:
            results = aggregator.aggregate_pending(
                settings.data_dir, on_hour=lambda i, n, label: progress.update(f"aggregating {label} ({i + 1}/{n})")
            )
        finally:
            progress.done()
    failed = [r for r in results if isinstance(r, aggregator.HourFailure)]
    for r in results:
        if isinstance(r, aggregator.HourFailure):
            continue
        print(
            f"aggregated {r.hour}: {r.vehicles} vehicles, {r.records} records ({r.duplicates_dropped} duplicates "
            f"dropped) from {r.files} files -> {r.path}"
        )
        if r.torn_tail_bytes:
            print(f"  skipped torn tails: {r.torn_tail_bytes} bytes")
        if r.corrupt_lines:
            print(
                f"  WARNING: {r.corrupt_lines} corrupt lines skipped (listed in the output's input section)",
                file=sys.stderr,
            )
    for f in failed:  # after all the others were done: one line per hour, the traceback is in the log
        print(f"FAILED {f.hour}: {f.error}", file=sys.stderr)
    for line in held:  # another host's job has the hour: not a failure of this run, but nothing done
        print(f"BUSY {line}", file=sys.stderr)
    if not results and not held:
        s3 = settings.storage_url.is_s3
        why = "every closed hour is up to date" if s3 else _why_nothing_pending(settings.data_dir)
        print(f"nothing to aggregate: {why}")
    return 1 if failed or (held and args.hour) else 0


def cmd_compact(args: argparse.Namespace) -> int:
    from engine.lake.compact import compact_hour, pending_hours
    from engine.lake.daily import DayResult, merge_day, pending_days

    settings = _settings(args)
    held: list[str] = []
    results: list[Any]
    if settings.storage_url.is_s3:
        from engine import remote

        results, held = remote.compact(settings, args.hour, args.force)
    else:
        now = dt.datetime.now(dt.UTC)
        hours = [args.hour] if args.hour else pending_hours(settings.data_dir, now)
        results = [compact_hour(settings.data_dir, hour, force=args.force) for hour in hours]
        if not args.hour:  # then the closed days whose hours changed: merged into the day's file
            results += [merge_day(settings.data_dir, day) for day in pending_days(settings.data_dir, now)]
    if not results and not held:
        print("nothing to compact: every closed hour and day is compacted and unchanged since")
    for line in held:
        print(f"BUSY {line}", file=sys.stderr)
    for r in results:
        if isinstance(r, DayResult):
            if r.incomplete:
                print(f"day {r.day} not merged: {r.incomplete}", file=sys.stderr)
            elif not r.skipped:
                where = r.paths[0].parent if r.paths else "-"
                print(f"merged day {r.day}: {r.hours} hours, {r.rows} records -> {r.parquet_bytes} bytes in {where}")
            continue
        if r.skipped:
            print(f"{r.hour}: up to date ({r.path})")
            continue
        print(
            f"compacted {r.hour}: {r.rows} records ({r.duplicates} duplicates dropped) from {r.raw_bytes} raw bytes "
            f"-> {r.parquet_bytes} bytes {r.path}"
        )
    return 1 if held and args.hour else 0


def cmd_query(args: argparse.Namespace) -> int:
    from engine.lake import query

    settings = _settings(args)
    columns, rows = query.run(settings.data_dir, args.sql, settings.storage_url)
    sys.stdout.write(query.render(columns, rows, args.format))
    return 0


def _why_nothing_pending(data_dir: Path) -> str:
    """Why ``aggregate`` found nothing: no data, or only hours still open (the usual case right after a
    first run), or every closed hour done."""
    from engine import aggregator
    from engine.storage import raw_hours

    now = dt.datetime.now(dt.UTC)
    hours = [h.start for h in raw_hours(data_dir / "raw")]
    if not hours:
        return f"no raw data under {data_dir / 'raw'}"
    closed = set(aggregator.closed_hours(data_dir, now))
    still_open = [aggregator.hour_label(h) for h in hours if h not in closed]
    if still_open:
        return (
            f"every closed hour is up to date; {', '.join(still_open)} still open (an hour closes 5 min after it "
            f"ends): canpipe aggregate --hour {still_open[-1]} gives its figures so far"
        )
    return "every closed hour is up to date"


def _compacted(data_dir: Path, hour: dt.datetime) -> bool:
    """The hour has a Parquet file (its raw files may be gone: ``aggregate --hour`` reads the lake then)."""
    from engine.lake.compact import parquet_path

    return parquet_path(data_dir, hour).exists()


def _aggregate_on_schedule(settings: Settings) -> int:
    """``aggregate --schedule``: the aggregator's schedule until SIGTERM/SIGINT, one line per hour."""
    import signal
    import threading

    from engine import aggregator

    def report(r: aggregator.HourResult | aggregator.HourFailure) -> None:
        if isinstance(r, aggregator.HourFailure):  # retried on the next run; the schedule goes on
            print(f"FAILED {r.hour}: {r.error}", file=sys.stderr, flush=True)
        else:
            print(f"aggregated {r.hour}: {r.vehicles} vehicles, {r.records} records -> {r.path}", flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if settings.storage_url.is_s3:  # the same schedule, each hour under its lease (hosts may all run it)
        from engine import remote

        while not stop.is_set():
            results, held = remote.aggregate(settings, None)
            for r in results:
                report(r)
            for line in held:
                print(f"BUSY {line}", file=sys.stderr, flush=True)
            now = dt.datetime.now(dt.UTC)
            stop.wait((aggregator.next_run(now) - now).total_seconds())
    else:
        aggregator.run_schedule(settings.data_dir, stop, report)
    print("aggregate --schedule: stopped", flush=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from engine.checks import describe_kernels, run_checks

    settings = _settings(args)
    print(f"kernels: {describe_kernels()}")
    problems = run_checks(settings, serving=not args.consumer_only)
    for line in problems:
        print(f"FAIL {line}")
    print("ok" if not problems else f"{len(problems)} check(s) failed")
    return 1 if problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    from engine.run import RunOptions, run_pipeline

    settings = _settings(args)
    _fleet(args)
    options = RunOptions(
        vehicles=args.vehicles,
        rate_ms=args.rate_ms,
        duration_s=args.duration,
        consumers=args.consumers,
        batch=args.batch,
        receiver_workers=args.receiver_workers,
        timeout_s=args.timeout,
    )
    return run_pipeline(settings, options)


def cmd_top(args: argparse.Namespace) -> int:
    from engine import top

    return top.run(args.url, args.interval)


def build_parser() -> argparse.ArgumentParser:
    from engine import __version__, logs

    parser = argparse.ArgumentParser(prog="canpipe", description="CAN battery telemetry pipeline")
    parser.add_argument("--version", action="version", version=f"canpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, help="root of raw/ and aggregated/ (CANPIPE_DATA_DIR, ./data)")
        p.add_argument("--queue-url", help="sqlite:///PATH or an SQS queue URL (CANPIPE_QUEUE_URL)")

    def logging_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", choices=logs.LEVELS, type=str.upper, help="CANPIPE_LOG_LEVEL, default INFO")
        p.add_argument(
            "--log-format", choices=logs.FORMATS, help="CANPIPE_LOG_FORMAT, default text on a terminal, else json"
        )

    p = sub.add_parser("run", help="the whole pipeline on one machine: receiver + consumers + simulator")
    common(p)
    p.add_argument("--vehicles", type=_positive_int, help="simulated vehicles (CANPIPE_NUM_VEHICLES, default 10)")
    p.add_argument("--rate-ms", type=float, help="sampling period per vehicle, ms (CANPIPE_SAMPLING_RATE_MS, 200)")
    p.add_argument("--duration", type=float, help="seconds of simulated driving (CANPIPE_DURATION_SECONDS, 10)")
    p.add_argument("--consumers", type=_positive_int, default=2, help="consumer processes")
    p.add_argument("--batch", type=int, default=1, help="records per HTTP request")
    p.add_argument("--receiver-workers", type=_positive_int, default=1, help="receiver (Granian) worker processes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the files after the simulator ends")
    logging_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="the receiver (Granian)")
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--workers", type=_positive_int, default=1, help="receiver (Granian) worker processes")
    p.add_argument("--insecure-no-auth", action="store_true", help="serve without API keys (development only)")
    logging_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("consume", help="the consumers")
    common(p)
    p.add_argument("--workers", type=_positive_int, default=2, help="consumer processes")
    p.add_argument(
        "--batch-seconds", type=float, help="flush a batch this long after its first record (CANPIPE_BATCH_SECONDS)"
    )
    logging_flags(p)
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("simulate", help="the battery simulator posting to a receiver")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the receiver's base URL")
    p.add_argument("--api-key", help="key_id:secret (or CANPIPE_API_KEY)")
    p.add_argument("--vehicles", type=_positive_int, help="simulated vehicles (CANPIPE_NUM_VEHICLES, default 10)")
    p.add_argument("--rate-ms", type=float, help="sampling period per vehicle, ms (CANPIPE_SAMPLING_RATE_MS, 200)")
    p.add_argument("--duration", type=float, help="seconds of simulated driving (CANPIPE_DURATION_SECONDS, 10)")
    p.add_argument("--batch", type=int, help="records per request, default 1 (with --can: frames, default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated fleet")
    p.add_argument("--count", type=int, default=0, help="stop after this many records (0: run for --duration)")
    p.add_argument(
        "--max-in-flight", type=int, default=512, help="requests awaiting an answer, in all; a send over it is late"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the asked rate was not kept (achieved < 95%% of it, or over 5%% of sends late)",
    )
    p.add_argument("--can", action="store_true", help="post raw frames encoded with a DBC to /ingest/can")
    p.add_argument("--dbc", help="with --can: the DBC (default CANPIPE_DBC, else canpipe's own BMS DBC)")
    p.add_argument("--signal-map", help="with --can: TOML [signals] map (default: the one shipped for the DBC)")
    logging_flags(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("replay", help="a candump .log, ASC or BLF log through /ingest/can, paced by its timestamps")
    p.add_argument("log", type=Path, help="the log file (candump .log, .asc, .blf, or another python-can format)")
    p.add_argument("--dbc", help="the DBC to decode with (CANPIPE_DBC); must match the receiver's")
    p.add_argument("--signal-map", help="TOML [signals] map (CANPIPE_SIGNAL_MAP; default: the one shipped for the DBC)")
    p.add_argument("--vehicle-id", help="the vehicle the log came from (default: from the log's file name)")
    p.add_argument("--speed", type=_speed, default="1", help="times real time (2: twice as fast), or max")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the receiver's base URL")
    p.add_argument("--api-key", help="key_id:secret (or CANPIPE_API_KEY)")
    p.add_argument("--batch", type=int, default=100, help="frames per request")
    p.add_argument(
        "--timestamps",
        choices=["auto", "log", "now"],
        default="auto",
        help="the log's own (log), re-based to now (now), or the log's own when within the receiver's clock window "
        "(auto, the default)",
    )
    logging_flags(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("queue", help="queue administration")
    common(p)
    p.add_argument("action", choices=["create", "stats", "purge", "redrive"])
    p.add_argument("--visibility-timeout", type=int, default=30, help="create: seconds a received message stays hidden")
    p.add_argument(
        "--max-receive-count",
        type=int,
        default=5,
        help="create: receives before a message goes to the dead-letter queue",
    )
    logging_flags(p)
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("aggregate", help="per-vehicle statistics of one hour, or of every closed hour pending")
    common(p)
    p.add_argument(
        "--hour",
        type=_hour,
        help="one hour, YYYY-MM-DDTHH (UTC), e.g. $(date -u +%%Y-%%m-%%dT%%H) for the current, still open hour; "
        "default: every closed hour (ended 5 min ago) not yet aggregated or changed since",
    )
    p.add_argument("--schedule", action="store_true", help="keep running: aggregate every hour at :05 UTC")
    logging_flags(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("compact", help="closed hours of raw JSONL into Parquet (deduplicated, sorted), for the lake")
    common(p)
    p.add_argument(
        "--hour", type=_hour, help="one hour, YYYY-MM-DDTHH (UTC); default: every closed hour new or changed since"
    )
    p.add_argument("--force", action="store_true", help="compact again even when the raw files are unchanged")
    logging_flags(p)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("query", help='SQL over the lake with DuckDB: views "raw" and "parquet"')
    common(p)
    p.add_argument("sql", help='e.g. "SELECT vehicle_id, avg(battery_soc) FROM raw GROUP BY 1"')
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    logging_flags(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("check", help="start-up checks: queue reachable, data dir writable, keys configured")
    common(p)
    p.add_argument("--consumer-only", action="store_true", help="skip the API key check")
    logging_flags(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("top", help="live view of a receiver's /metrics in the terminal (q or Ctrl-C quits)")
    p.add_argument("--url", default="http://127.0.0.1:8000/metrics", help="the receiver's /metrics URL")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    logging_flags(p)
    p.set_defaults(func=cmd_top)
    for p in sub.choices.values():  # every flag's help says its default
        p.formatter_class = _HelpFormatter
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help where there is a default to show (not None, not a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    """A count of processes or vehicles: 0 would start nothing and say nothing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _hour(text: str) -> dt.datetime:
    """``--hour``: exactly YYYY-MM-DDTHH, UTC, not after the current hour."""
    import re

    from engine.aggregator.hours import parse_hour

    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}", text):
        raise argparse.ArgumentTypeError(
            f"expected YYYY-MM-DDTHH (UTC, two-digit hour, e.g. 2026-11-28T08), got {text!r}"
        )
    try:
        hour = parse_hour(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    now = dt.datetime.now(dt.UTC)
    if hour > now:
        current = now.strftime("%Y-%m-%dT%H")
        raise argparse.ArgumentTypeError(f"{text} has not started yet (the current hour is {current} UTC)")
    return hour


def main(argv: Sequence[str] | None = None) -> int:
    from engine import logs

    args = build_parser().parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_format)
    except ConfigError as exc:  # no log format to speak in yet
        problem = str(exc)
        try:  # the whole list, the log setting's problem among them, not only the first problem
            Settings.from_env()
        except ConfigError as every:
            problem = str(every)
        print(f"canpipe: configuration error: {problem}", file=sys.stderr)
        return 1
    from engine.config import unknown_names

    for warning in unknown_names():  # a typo'd name would leave its default in force without a word
        log.warning("%s", warning, extra={"stage": "config"})
    # a refusal to start is an event like the others: in the log's format, so a JSON log stays JSON
    try:
        return args.func(args)
    except ConfigError as exc:
        log.error("configuration error: %s", exc, extra={"stage": "config"})
        return 1
    except CanpipeError as exc:
        log.error("%s", exc, extra={"stage": "start"})
        return 1
