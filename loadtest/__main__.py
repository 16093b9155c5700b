"""``python -m loadtest``: one constant-rate run with a report, or ``tune`` over consumer counts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import CanpipeError

REPORTS = Path(__file__).resolve().parent / "reports"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, required=True, help="target records/s (constant arrival rate)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--batch", type=int, default=1, help="records per request: 1 = single, N = a gateway batch")
    p.add_argument("--queue-url", help="queue for the started pipeline (default: embedded, in a fresh data dir)")
    p.add_argument("--out", type=Path, help="report folder (default loadtest/reports/<name>/)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    _common(p)
    p.add_argument("--consumers", type=int, default=2, help="consumer processes (default 2)")
    p.add_argument("--receiver-workers", type=int, default=1, help="Granian workers (default 1)")
    p.add_argument("--locust-processes", type=int, default=0, help="0: 1, or 2 past 600 requests/s")
    p.add_argument("--url", help="target this running receiver instead (needs CANPIPE_API_KEY)")
    p.add_argument("--data-dir", type=Path, help="with --url: that pipeline's data dir, for stages and losses")
    return p


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest tune", description="compare consumer counts")
    _common(p)
    p.add_argument("--consumers", default="1,2,4", help="comma-separated counts (default 1,2,4)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m loadtest " + " ".join(argv)
    # imported here so that --help answers without loading locust's dependencies
    from loadtest import report
    from loadtest.run import run_scenario
    from loadtest.scenario import Scenario
    from loadtest.tune import TuneOptions, tune

    try:
        if argv[:1] == ["tune"]:
            args = tune_parser().parse_args(argv[1:])
            counts = tuple(int(c) for c in args.consumers.split(","))
            options = TuneOptions(args.rate, counts, args.duration, args.batch)
            label = "single" if args.batch == 1 else f"batch-{args.batch}"
            out = args.out or REPORTS / f"tune-{args.rate:g}-{label}"
            outcomes, path = tune(options, out, command, queue_url=args.queue_url)
            print(path.read_text())
            return 0 if all(o.drained and o.lost == 0 for o in outcomes.values()) else 1
        args = parser().parse_args(argv)
        scenario = Scenario(
            args.rate, args.duration, args.batch, args.consumers, args.receiver_workers, args.locust_processes
        )
        out = args.out or REPORTS / scenario.name
        outcome = run_scenario(scenario, out, queue_url=args.queue_url, url=args.url, data_dir=args.data_dir)
        path = report.write(outcome, out, command)
        print(path.read_text())
        print(f"report: {path}")
        return 0 if outcome.passed else 1
    except CanpipeError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
