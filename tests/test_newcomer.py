"""The stumbles a new user hit (issue 14), one test each, run the way the user ran them: a real ``canpipe``
process in a folder of its own, a real receiver where one is needed."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from canpipe_testing import API_KEY, ROOT, free_port, make_record, post_json, wait_for
from test_readme import README, commands, shell_blocks

import engine


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any CANPIPE_* setting, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CANPIPE_")} | extra


def canpipe(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def in_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """``canpipe ARGS`` with stderr on a pseudo-terminal (the progress line's stream) and stdout on a pipe."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *args], stdout=subprocess.PIPE, stderr=terminal, cwd=cwd, env=env
    )
    os.close(terminal)
    return proc, controller


def read_terminal(fd: int, proc: subprocess.Popen, timeout_s: float) -> str:
    """Everything written to the terminal until the process ends (or ``timeout_s``)."""
    seen, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    return seen.decode(errors="replace")


# --- the README ----------------------------------------------------------------------------------------


def test_readme_curl_example_computes_its_timestamp_instead_of_a_fixed_one():
    curls = [c for block in shell_blocks(README.read_text()) for c, _ in commands(block) if "curl" in c]
    assert curls, "the README shows no curl example"
    for command in curls:
        assert not re.search(r'"timestamp":"\d{4}-', command), command  # a literal date is wrong a day later
        assert "date -u" in command or "$now" in command, command


def test_readme_shows_how_to_aggregate_the_open_hour_and_what_hour_takes():
    text = README.read_text()
    blocks = "\n".join(shell_blocks(text))
    assert re.search(r"canpipe aggregate --hour \"\$\(date -u \+%Y-%m-%dT%H\)\"", blocks), blocks
    assert "YYYY-MM-DDTHH" in text


def test_readme_links_resolve_inside_the_clone():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/design.md" in links
    for link in links:
        if "://" in link:
            continue
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT) and target.exists(), f"README links {link}, not in a clone"
    assert "../shared" not in text


# --- the command line ----------------------------------------------------------------------------------


def test_version_flag_prints_the_package_version(tmp_path):
    done = canpipe("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.stdout.strip() == f"canpipe {declared}" == f"canpipe {engine.__version__}"


def test_every_flag_has_help_text_and_shows_its_default(tmp_path):
    import argparse

    from engine.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in sub.choices.items()
        for action in command._actions
        if action.option_strings and action.dest != "help" and not action.help
    ]
    assert missing == [], f"flags without help text: {missing}"
    out = canpipe("serve", "--help", cwd=tmp_path).stdout
    squashed = " ".join(out.split())
    for flag, default in (("--host", "127.0.0.1"), ("--port", "8000"), ("--workers", "1")):
        assert re.search(rf"{flag} \S+ [^-]+\(default: {re.escape(default)}\)", squashed), out


def test_simulate_shows_progress_on_a_terminal_and_stays_quiet_in_a_pipe(serve, env, tmp_path):
    url = serve(env)
    args = ["simulate", "--url", url, "--api-key", API_KEY, "--vehicles", "2", "--rate-ms", "100", "--duration", "3"]
    proc, terminal = in_a_terminal(args, env, tmp_path)
    try:
        screen = read_terminal(terminal, proc, 60)
        assert proc.wait(30) == 0
    finally:
        os.close(terminal)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    summary = proc.stdout.read().decode()
    proc.stdout.close()
    assert re.search(r"simulate: \d/3 s, sent \d+, accepted \d+", screen), screen
    assert "sent 60, accepted 60" in summary
    piped = canpipe(*args, cwd=tmp_path, env=env)
    assert piped.returncode == 0 and "simulate:" not in piped.stderr + piped.stdout, piped.stderr


def test_aggregate_of_many_hours_shows_progress_on_a_terminal(env, data_dir, tmp_path):
    import datetime as dt

    from test_aggregator import HOUR, fleet, write

    from engine.storage import Hour

    for k in range(3):
        write(data_dir, fleet(vehicles=1, per_vehicle=5), hour=Hour.from_datetime(HOUR + dt.timedelta(hours=k)))
    proc, terminal = in_a_terminal(["aggregate"], env, tmp_path)
    try:
        screen = read_terminal(terminal, proc, 60)
        assert proc.wait(60) == 0
    finally:
        os.close(terminal)
        assert proc.stdout is not None
        summary = proc.stdout.read().decode()
        proc.stdout.close()
    assert re.search(r"aggregating 2025-10-19T1\d \(3/3\)", screen), screen
    assert summary.count("aggregated 2025-10-19T") == 3, summary


def test_consume_logs_a_start_up_line_naming_queue_storage_and_kernels(start, env, data_dir):
    consumers = start(["consume", "--workers", "1", "--log-format", "text"], env)
    wait_for(lambda: "consume, 1 workers" in consumers.output(), 30, "the consumer's start-up line")
    line = next(ln for ln in consumers.output().splitlines() if "consume, 1 workers" in ln)
    assert f"canpipe {engine.__version__} consume" in line
    assert f"queue sqlite:///{data_dir / 'queue.db'}" in line and f"data dir {data_dir}" in line
    assert re.search(r"kernels: candecode (compiled|Python twin)", line), line


def test_serve_logs_a_start_up_line_with_key_ids_never_secrets(serve, start, env):
    serve(env)
    logs = "\n".join(p.read_text() for p in Path(env["CANPIPE_DATA_DIR"]).parent.glob("serve-*.log"))
    assert f"canpipe {engine.__version__} serve on 127.0.0.1:" in logs
    assert "key ids old, test" in logs
    assert "s3cret" not in logs and "retired-but-valid" not in logs


def test_simulate_against_a_dead_receiver_says_connection_refused(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    done = canpipe("simulate", "--url", url, "--duration", "1", "--log-format", "text", cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    assert f"connection refused to {url}" in done.stderr, done.stderr
    assert "failed 1" not in done.stdout


def test_sqs_commands_do_not_print_the_sdk_credential_lines(sqs_env, tmp_path):
    env = clean_env(**sqs_env, CANPIPE_LOG_LEVEL="INFO")
    done = canpipe("queue", "create", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    stats = canpipe("queue", "stats", cwd=tmp_path, env=env)
    assert stats.returncode == 0, stats.stderr
    assert "visible 0" in stats.stdout
    assert "credentials" not in (done.stderr + stats.stderr).lower(), done.stderr + stats.stderr


# --- read-only commands --------------------------------------------------------------------------------


def test_queue_stats_in_an_empty_folder_creates_no_queue(tmp_path):
    done = canpipe("queue", "stats", "--log-format", "text", cwd=tmp_path)
    assert done.returncode == 1
    assert "does not exist" in done.stderr, done.stderr
    assert files_under(tmp_path) == []


def test_check_with_a_queue_in_a_missing_folder_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'nonexistent' / 'dir' / 'q.db'}"
    done = canpipe("check", "--consumer-only", "--queue-url", url, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr  # it could be created: fine, but not by check
    assert files_under(tmp_path) == []


# --- settings ------------------------------------------------------------------------------------------


def test_check_warns_about_a_misspelt_setting_with_the_nearest_name(tmp_path):
    done = canpipe(
        "check", "--consumer-only", "--log-format", "text", cwd=tmp_path, env=clean_env(CANPIPE_DATADIR="/x")
    )
    assert "CANPIPE_DATADIR is not a canpipe setting and is ignored; did you mean CANPIPE_DATA_DIR?" in done.stderr


def test_check_refuses_a_fractional_batch_size(tmp_path):
    done = canpipe("check", "--consumer-only", cwd=tmp_path, env=clean_env(CANPIPE_BATCH_RECORDS="1.5"))
    assert done.returncode == 1
    assert "CANPIPE_BATCH_RECORDS: expected a whole number, got '1.5'" in done.stderr


def test_check_refuses_a_dbc_that_does_not_exist(tmp_path):
    done = canpipe("check", "--consumer-only", cwd=tmp_path, env=clean_env(CANPIPE_DBC=str(tmp_path / "nope.dbc")))
    assert done.returncode == 1
    assert f"CANPIPE_DBC: cannot read {tmp_path / 'nope.dbc'}" in done.stderr


def test_check_lists_every_bad_setting_not_just_the_first(tmp_path):
    env = clean_env(CANPIPE_BATCH_RECORDS="abc", CANPIPE_BATCH_SECONDS="-1", CANPIPE_LOG_LEVEL="LOUD")
    done = canpipe("check", "--consumer-only", cwd=tmp_path, env=env)
    assert done.returncode == 1
    for name in ("CANPIPE_BATCH_RECORDS", "CANPIPE_BATCH_SECONDS", "CANPIPE_LOG_LEVEL"):
        assert name in done.stderr, done.stderr
    assert "3 problem(s)" in done.stderr


def test_consume_on_an_unwritable_data_dir_exits_1_with_the_reason(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    data_dir = tmp_path / "file" / "data"  # under a regular file: cannot be created, even by root
    env = clean_env(CANPIPE_DATA_DIR=str(data_dir), CANPIPE_QUEUE_URL=f"sqlite:///{tmp_path / 'q.db'}")
    started = time.monotonic()
    done = canpipe("consume", "--workers", "1", "--log-format", "text", cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 1
    assert f"CANPIPE_DATA_DIR: {data_dir} is not writable" in done.stderr, done.stderr
    assert "restarting" not in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("command", ["serve", "consume"])
def test_zero_workers_is_refused(tmp_path, command):
    done = canpipe(command, "--workers", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "--workers: must be at least 1, got 0" in done.stderr
    assert files_under(tmp_path) == []
    done = canpipe(command, "--workers", "two", cwd=tmp_path)
    assert done.returncode == 2 and "--workers: expected a whole number, got 'two'" in done.stderr


# --- kernels -------------------------------------------------------------------------------------------


def test_check_names_the_kernels_and_fails_when_compiled_ones_were_required(tmp_path):
    done = canpipe("check", "--consumer-only", cwd=tmp_path)
    assert re.match(r"kernels: candecode (compiled|Python twin)", done.stdout), done.stdout
    twins = clean_env(CANPIPE_NO_EXTENSIONS="1", CANPIPE_REQUIRE_COMPILED="1")
    done = canpipe("check", "--consumer-only", cwd=tmp_path, env=twins)
    assert done.returncode == 1
    assert "kernels: candecode Python twin (CANPIPE_NO_EXTENSIONS=1)" in done.stdout
    assert (
        "FAIL CANPIPE_REQUIRE_COMPILED: the compiled kernels candecode, groupby, histogram, jsonl are not in use"
        in done.stdout
    )
    assert canpipe("check", "--consumer-only", cwd=tmp_path, env=clean_env(CANPIPE_NO_EXTENSIONS="1")).returncode == 0


# --- aggregate --hour ----------------------------------------------------------------------------------


def test_an_hour_without_two_digits_is_refused(tmp_path):
    done = canpipe("aggregate", "--hour", "2026-11-28T8", cwd=tmp_path)
    assert done.returncode == 2
    assert "expected YYYY-MM-DDTHH" in done.stderr
    done = canpipe("aggregate", "--hour", "2026-13-28T08", cwd=tmp_path)  # the right shape, not a date
    assert done.returncode == 2 and "--hour: expected YYYY-MM-DDTHH (UTC), got '2026-13-28T08'" in done.stderr


def test_an_hour_in_the_future_is_refused_and_writes_nothing(tmp_path):
    done = canpipe("aggregate", "--hour", "2030-01-01T00", cwd=tmp_path)
    assert done.returncode == 2
    assert "2030-01-01T00 has not started yet" in done.stderr
    assert files_under(tmp_path) == []


def test_aggregate_in_a_folder_without_data_says_there_is_none(tmp_path):
    done = canpipe("aggregate", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"nothing to aggregate: no raw data under {Path('data') / 'raw'}"
    assert files_under(tmp_path) == []


def test_a_past_hour_without_data_says_so_and_writes_no_empty_aggregate(tmp_path):
    done = canpipe("aggregate", "--hour", "2026-01-01T00", cwd=tmp_path)
    assert done.returncode == 1
    assert "no raw data for 2026-01-01T00" in done.stderr
    assert files_under(tmp_path) == []


def test_the_current_hour_can_be_aggregated_while_it_is_open(serve, env, data_dir, tmp_path):
    url = serve(env)
    assert post_json(url, [make_record(i) for i in range(5)])[0] == 202
    consumer = subprocess.Popen([sys.executable, "-m", "engine", "consume", "--workers", "1"], env=env, cwd=tmp_path)
    try:
        wait_for(lambda: any((data_dir / "raw").rglob("*.jsonl")), 30, "the records on disk")
    finally:
        consumer.terminate()
        assert consumer.wait(40) == 0
    folder = next((data_dir / "raw").rglob("*.jsonl")).parent.as_posix()
    label = "{}-{}-{}T{}".format(*re.search(r"year=(\d+)/month=(\d+)/day=(\d+)/hour=(\d+)", folder).groups())
    pending = canpipe("aggregate", cwd=tmp_path, env=env)  # what the README's reader ran, and was puzzled by
    assert pending.returncode == 0, pending.stderr
    assert "nothing to aggregate" in pending.stdout and f"{label} still open" in pending.stdout, pending.stdout
    assert "canpipe aggregate --hour 20" in pending.stdout
    done = canpipe("aggregate", "--hour", label, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"aggregated {label}: 1 vehicles, 5 records" in done.stdout
