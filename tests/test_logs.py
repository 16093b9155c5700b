"""Logs as an operator's shipper (Vector, Fluent Bit) reads them: one event per line, in one format."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from canpipe_testing import API_KEY, children, free_port, make_record, on_disk, post_json, start_server, wait_for

from engine import logs
from engine.errors import ConfigError

WRONG_SECRET = "not-the-real-secret-9f3a"
SECRET = API_KEY.split(":", 1)[1]


def events(output: str) -> list[dict]:
    """Every line of a process's output parsed as JSON (fails naming the first line that is not)."""
    parsed = []
    for line in output.splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}\n--- whole output ---\n{output}")
    return parsed


@pytest.mark.slow
def test_serve_and_consume_write_only_json_events_granians_included(start, env, data_dir):
    env = env | {"CANPIPE_LOG_FORMAT": "json"}
    port = free_port()
    server = start_server(start, env, port, workers=2)
    url = f"http://127.0.0.1:{port}"
    consumers = start(["consume", "--workers", "2"], env)
    assert post_json(url, [make_record(i) for i in range(5)])[0] == 202
    assert post_json(url, make_record(), key=f"test:{WRONG_SECRET}")[0] == 401
    wait_for(lambda: len(children(consumers.pid)) == 2, 30, "two consumer processes")
    wait_for(lambda: len(on_disk(data_dir)) == 5, 30, "the records on disk")
    writers = {int(path.name.split("-")[3]) for path in (data_dir / "raw").rglob("*.jsonl")}
    # kill a worker that wrote nothing (the writer's shutdown summary is asserted below): the supervisor
    # logs the crash as an error
    os.kill(min(children(consumers.pid) - writers), signal.SIGKILL)
    wait_for(lambda: "restarting in" in consumers.output(), 30, "the supervisor to log the crash")
    assert consumers.stop() == 0, consumers.output()
    assert server.stop() == 0, server.output()
    every = events(server.output()) + events(consumers.output())
    for event in every:
        assert {"time", "level", "logger", "message"} <= event.keys(), event
        if event["level"] == "ERROR":
            assert event.get("stage"), f"an error without a stage: {event}"
    loggers = {e["logger"] for e in every}
    assert {"_granian", "canpipe.receiver", "canpipe.consumer", "canpipe.supervisor"} <= loggers, loggers
    assert any(e["message"].startswith("Listening at") for e in every)  # Granian's own line, as JSON
    crash = [e for e in every if e["level"] == "ERROR" and "restarting in" in e["message"]]
    assert crash and crash[0]["stage"] == "consumer" and crash[0]["exit_code"] == -signal.SIGKILL
    rejected = [e for e in every if "X-API-Key" in e["message"]]
    assert rejected and "'test'" in rejected[0]["message"]  # the key id names the client
    text = server.output() + consumers.output()
    assert WRONG_SECRET not in text and SECRET not in text  # the key itself never


@pytest.mark.slow
def test_text_format_reads_as_text_and_the_level_filters(start, env):
    consumers = start(["consume", "--workers", "1", "--log-format", "text", "--log-level", "WARNING"], env)
    wait_for(lambda: len(children(consumers.pid)) == 1, 30, "the consumer process")
    os.kill(min(children(consumers.pid)), signal.SIGKILL)
    wait_for(lambda: "restarting in" in consumers.output(), 30, "the supervisor to log the crash")
    assert consumers.stop() == 0
    lines = consumers.output().splitlines()
    crash = [line for line in lines if "restarting in" in line]
    assert crash and " ERROR " in crash[0] and "canpipe.supervisor" in crash[0] and "stage=consumer" in crash[0]
    assert not crash[0].startswith("{")
    # WARNING and up only: the INFO shutdown summaries are filtered out
    assert not [line for line in lines if " INFO " in line], lines


@pytest.mark.slow
def test_granian_follows_the_text_format_and_the_level(start, env):
    port = free_port()
    server = start_server(start, env | {"CANPIPE_LOG_FORMAT": "text", "CANPIPE_LOG_LEVEL": "WARNING"}, port, 1)
    assert post_json(f"http://127.0.0.1:{port}", make_record(), key=f"test:{WRONG_SECRET}")[0] == 401
    assert server.stop() == 0
    lines = server.output().splitlines()
    assert not [line for line in lines if "granian" in line.lower()], lines  # its INFO lines are filtered out
    (rejected,) = lines
    assert " WARNING " in rejected and "canpipe.receiver rejected X-API-Key (key id 'test')" in rejected
    assert WRONG_SECRET not in rejected


@pytest.fixture
def own_logging(monkeypatch):
    """configure() in this process: its handler and the CANPIPE_LOG_* it hands down are undone after."""
    monkeypatch.setenv("CANPIPE_LOG_LEVEL", "INFO")
    monkeypatch.setenv("CANPIPE_LOG_FORMAT", "json")
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, "canpipe", False)]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_json_event_carries_extra_fields_and_the_exception_on_one_line(capsys, own_logging):
    logs.configure("DEBUG", "json")
    log = logging.getLogger("canpipe.test")
    try:
        raise OSError("disk full")
    except OSError:
        log.exception("write failed", extra={"stage": "storage", "key_id": "ops"})
    log.debug("contents")
    (error, debug) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert error["level"] == "ERROR" and error["stage"] == "storage" and error["key_id"] == "ops"
    assert "OSError: disk full" in error["exception"] and error["message"] == "write failed"
    assert debug["level"] == "DEBUG"
    logs.configure("INFO", "text")
    log.debug("hidden")
    log.warning("retrying", extra={"stage": "publish"})
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("WARNING canpipe.test retrying stage=publish")


@pytest.mark.slow
def test_a_refusal_to_start_is_a_json_event_too(env):
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve"],
        env=env | {"CANPIPE_API_KEYS": "", "CANPIPE_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    (event,) = events(done.stderr)
    assert event["level"] == "ERROR" and event["stage"] == "config" and "CANPIPE_API_KEYS" in event["message"]
    bad = subprocess.run(
        [sys.executable, "-m", "engine", "check", "--log-format", "json"],
        env=env | {"CANPIPE_LOG_LEVEL": "LOUD"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "CANPIPE_LOG_LEVEL" in bad.stderr


def test_bad_log_settings_are_named():
    with pytest.raises(ConfigError, match="CANPIPE_LOG_LEVEL"):
        logs.resolve(env={"CANPIPE_LOG_LEVEL": "LOUD"})
    with pytest.raises(ConfigError, match="CANPIPE_LOG_FORMAT"):
        logs.resolve(env={"CANPIPE_LOG_FORMAT": "xml"})
    assert logs.resolve(env={"CANPIPE_LOG_LEVEL": "debug", "CANPIPE_LOG_FORMAT": "TEXT"}) == ("DEBUG", "text")
    assert logs.resolve("ERROR", "json", env={"CANPIPE_LOG_LEVEL": "DEBUG"}) == ("ERROR", "json")
