"""The canpipe command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from canpipe_testing import AWS_TEST_ENV, make_record, modules_loaded_by, post_json, queue_stats

from engine.cli import main

pytestmark = pytest.mark.slow


def canpipe(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_run_drives_the_whole_pipeline_and_reports(env, data_dir):
    done = canpipe("run", "--data-dir", str(data_dir), "--duration", "2", "--vehicles", "5", "--rate-ms", "50", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "missing 0" in out and "accepted 0" not in out
    for stage in ("ingest", "queue", "processing", "end_to_end"):
        assert f"\n{stage} " in out
    assert str(data_dir / "raw") in out
    assert list((data_dir / "raw").glob("year=*/month=*/day=*/hour=*/batch-*.jsonl"))


def test_run_on_an_s3_storage_root_reads_its_records_back_from_the_bucket(env, data_dir, s3_bucket):
    s3 = env | AWS_TEST_ENV | {"CANPIPE_STORAGE_URL": s3_bucket.url, "AWS_ENDPOINT_URL_S3": s3_bucket.endpoint}
    s3 |= {"CANPIPE_RAW_COMPRESSION": "zstd"}
    done = canpipe("run", "--data-dir", str(data_dir), "--duration", "2", "--vehicles", "3", "--rate-ms", "100", env=s3)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "missing 0" in done.stdout and f"storage {s3_bucket.url}" in done.stdout
    accepted = int(done.stdout.split("accepted ", 1)[1].split(",", 1)[0])
    assert accepted > 0 and len(s3_bucket.records()) >= accepted  # in the bucket, not on the local disk
    assert all(key.endswith(".jsonl.zst") for key in s3_bucket.keys("raw/"))
    assert not list(data_dir.glob("raw/**/*.jsonl"))


def test_the_command_loads_only_settings_and_errors_until_a_command_runs():
    # cli parses and wires: each command imports its stage when it runs, so `canpipe --help` or a bad flag
    # never pays for (or fails on) Granian, the queue drivers or numpy
    assert modules_loaded_by("engine.cli") == {"engine.cli", "engine.config", "engine.errors"}


def test_help_on_every_command(env):
    for command in ("run", "serve", "consume", "simulate", "queue", "check"):
        done = canpipe(command, "--help", env=env)
        assert done.returncode == 0 and "usage: canpipe" in done.stdout


def test_serve_refuses_to_start_without_keys(env):
    done = canpipe("serve", env=env | {"CANPIPE_API_KEYS": ""}, timeout=30)
    assert done.returncode == 1
    assert "CANPIPE_API_KEYS" in done.stderr


def test_serve_hands_its_flags_to_the_receiver_workers(serve, env, tmp_path):
    # the workers build their settings from the environment: the flags must reach them, not only the parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    queue_url = f"sqlite:///{elsewhere / 'flagged.db'}"
    bare = {k: v for k, v in env.items() if k not in ("CANPIPE_API_KEYS", "CANPIPE_QUEUE_URL")}
    url = serve(bare, "--insecure-no-auth", "--data-dir", str(elsewhere), "--queue-url", queue_url)
    status, _, body = post_json(url, make_record(), key=None)
    assert (status, body) == (202, {"accepted": 1})
    assert queue_stats(queue_url).visible == 1


def test_bad_setting_is_named(env):
    done = canpipe("check", env=env | {"CANPIPE_BATCH_SECONDS": "soon"}, timeout=30)
    assert done.returncode == 1 and "CANPIPE_BATCH_SECONDS" in done.stderr


def test_check_passes_and_fails_with_reasons(env, data_dir, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    monkeypatch.setenv("CANPIPE_API_KEYS", "")
    monkeypatch.setenv("CANPIPE_QUEUE_URL", f"sqlite:///{data_dir / 'nope' / 'q.db'}")
    (data_dir / "nope").write_text("a file where a folder should be")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL CANPIPE_API_KEYS" in out and "FAIL CANPIPE_QUEUE_URL" in out
    assert main(["check", "--consumer-only", "--data-dir", str(data_dir / "nope")]) == 1
    assert "FAIL CANPIPE_DATA_DIR" in capsys.readouterr().out


def test_check_lists_the_bucket_of_an_s3_storage_root(env, capsys, monkeypatch, s3_bucket):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CANPIPE_STORAGE_URL", s3_bucket.url)
    assert main(["check"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    monkeypatch.setenv("CANPIPE_STORAGE_URL", f"s3://{s3_bucket.name}-gone/fleet")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL CANPIPE_STORAGE_URL: s3://{s3_bucket.name}-gone/fleet is not usable" in out and "NoSuchBucket" in out


def test_queue_admin_commands(env, data_dir, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["queue", "create", "--visibility-timeout", "45", "--max-receive-count", "4"]) == 0
    assert "dead-letter after 4 receives" in capsys.readouterr().out
    assert main(["queue", "stats"]) == 0
    assert "visible 0  in_flight 0  delayed 0  dead_letter 0" in capsys.readouterr().out
    assert main(["queue", "purge"]) == 0
    assert "purged 0 messages" in capsys.readouterr().out
    assert main(["queue", "redrive"]) == 0
    assert "redrove 0 messages" in capsys.readouterr().out


def test_simulate_command_against_a_receiver(serve, env):
    url = serve(env)
    done = canpipe(
        "simulate",
        "--url",
        url,
        "--api-key",
        "test:s3cret-test-key",
        "--vehicles",
        "3",
        "--duration",
        "1",
        "--batch",
        "2",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "failed 0" in done.stdout and "rejected 0" in done.stdout
    wrong = canpipe(
        "simulate", "--url", url, "--api-key", "test:wrong", "--vehicles", "1", "--duration", "0.5", env=env
    )
    assert wrong.returncode == 1 and "rejected 0" not in wrong.stdout


def test_aggregate_commands(env, data_dir, capsys, monkeypatch, start):
    import datetime as dt
    import signal

    from canpipe_testing import wait_for
    from test_aggregator import HOUR, fleet, write

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    write(data_dir, fleet(vehicles=2))
    assert main(["aggregate", "--hour", "2025-10-19T17"]) == 0
    assert (
        "aggregated 2025-10-19T17: 2 vehicles, 400 records (0 duplicates dropped) from 1 files"
        in capsys.readouterr().out
    )
    assert main(["aggregate"]) == 0
    assert "nothing to aggregate" in capsys.readouterr().out
    with open(next((data_dir / "raw").rglob("*.jsonl")), "ab") as f:
        f.write(b'{"torn')
        f.write(b"\n{not json}\n")
    assert main(["aggregate"]) == 0  # the input changed: aggregated again
    captured = capsys.readouterr()
    assert "aggregated 2025-10-19T17" in captured.out and "2 corrupt lines" in captured.err
    with pytest.raises(SystemExit) as refused:  # a malformed --hour is a usage error, as argparse reports them
        main(["aggregate", "--hour", "yesterday"])
    assert refused.value.code == 2
    (data_dir / "aggregated" / f"aggregated-{HOUR:%Y-%m-%dT%H}.manifest.json").unlink()
    scheduled = start(["aggregate", "--schedule"], env)
    wait_for(lambda: "aggregated 2025-10-19T17" in scheduled.output(), 30, "the scheduler's catch-up run")
    assert scheduled.stop(signal.SIGTERM) == 0
    assert "aggregate --schedule: stopped" in scheduled.output()
    assert dt.datetime.now(dt.UTC) > HOUR
