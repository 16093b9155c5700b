"""``canpipe check``: each start-up problem named by its setting, all of them in one run."""

from __future__ import annotations

import pytest

from engine.checks import run_checks
from engine.config import Settings


def settings(tmp_path, **env: str) -> Settings:
    return Settings.from_env({"CANPIPE_DATA_DIR": str(tmp_path / "data"), "CANPIPE_API_KEYS": "fleet1:s3cret"} | env)


def test_good_settings_report_nothing_and_create_nothing(tmp_path):
    assert run_checks(settings(tmp_path)) == []
    assert not (tmp_path / "data").exists()  # a check is read-only: the first serve or consume creates it
    (tmp_path / "data").mkdir()
    assert run_checks(settings(tmp_path)) == []
    assert list((tmp_path / "data").iterdir()) == []  # the write probe is removed, no queue file appears


def test_missing_api_keys_are_named_when_serving_only(tmp_path):
    no_keys = settings(tmp_path, CANPIPE_API_KEYS="")
    (problem,) = run_checks(no_keys)
    assert problem.startswith("CANPIPE_API_KEYS: no API keys configured")
    assert run_checks(no_keys, serving=False) == []  # consumers never see a key


def test_an_explicitly_open_receiver_needs_no_keys(tmp_path):
    assert run_checks(settings(tmp_path, CANPIPE_API_KEYS="", CANPIPE_INSECURE_NO_AUTH="1")) == []


def test_a_data_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    bad = settings(tmp_path, CANPIPE_DATA_DIR=str(tmp_path / "file" / "data"))
    problems = run_checks(bad, serving=False)
    assert any(p.startswith(f"CANPIPE_DATA_DIR: {tmp_path / 'file' / 'data'} is not writable") for p in problems)


def test_an_unreachable_queue_is_named_with_its_url(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    url = f"sqlite:///{tmp_path / 'file' / 'queue.db'}"  # a path under a regular file: cannot be opened
    (problem,) = run_checks(settings(tmp_path, CANPIPE_QUEUE_URL=url), serving=False)
    assert problem.startswith(f"CANPIPE_QUEUE_URL: queue {url} is not reachable: ")


def test_every_problem_is_reported_in_one_run(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    bad = settings(
        tmp_path,
        CANPIPE_API_KEYS="",
        CANPIPE_DATA_DIR=str(tmp_path / "file" / "data"),
        CANPIPE_QUEUE_URL=f"sqlite:///{tmp_path / 'file' / 'queue.db'}",
    )
    assert [p.split(":", 1)[0] for p in run_checks(bad)] == [
        "CANPIPE_API_KEYS",
        "CANPIPE_DATA_DIR",
        "CANPIPE_QUEUE_URL",
    ]


@pytest.mark.parametrize(("consumer_only", "status"), [(False, 1), (True, 0)])
def test_canpipe_check_prints_each_problem_and_exits_non_zero(tmp_path, monkeypatch, capsys, consumer_only, status):
    from engine.cli import main

    monkeypatch.setenv("CANPIPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CANPIPE_QUEUE_URL", raising=False)
    monkeypatch.setenv("CANPIPE_API_KEYS", "")
    monkeypatch.delenv("CANPIPE_INSECURE_NO_AUTH", raising=False)
    assert main(["check", *(["--consumer-only"] if consumer_only else [])]) == status
    out = capsys.readouterr().out
    assert out.startswith("kernels: candecode ")  # which implementation of each kernel runs, first
    if consumer_only:
        assert out.splitlines()[-1] == "ok"
    else:
        assert out.splitlines()[1:] == [
            "FAIL CANPIPE_API_KEYS: no API keys configured ('key_id:secret,...')",
            "1 check(s) failed",
        ]


def test_an_existing_queue_is_pinged_and_a_damaged_one_named(tmp_path):
    import asyncio

    from engine.queues import open_queue

    good = tmp_path / "good.db"

    async def create() -> None:
        queue = open_queue(f"sqlite:///{good}")
        await queue.create()
        await queue.close()

    asyncio.run(create())
    assert run_checks(settings(tmp_path, CANPIPE_QUEUE_URL=f"sqlite:///{good}"), serving=False) == []
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not an SQLite database" * 100)
    (problem,) = run_checks(settings(tmp_path, CANPIPE_QUEUE_URL=f"sqlite:///{damaged}"), serving=False)
    assert problem.startswith(f"CANPIPE_QUEUE_URL: queue sqlite:///{damaged} is not reachable: ")
    assert damaged.read_bytes() == b"this is not an SQLite database" * 100  # looked at, never rewritten


def test_a_data_dir_under_a_read_only_folder_is_named(tmp_path, monkeypatch):
    import os

    # root may write anywhere, so the folder's permission bits are stood in for by os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    (problem,) = run_checks(settings(tmp_path), serving=False, queue=False)
    assert (
        problem
        == f"CANPIPE_DATA_DIR: {tmp_path / 'data'} is not writable: cannot be created: {tmp_path} is not writable"
    )


def test_the_daemons_probe_agrees_with_what_the_selector_picks(monkeypatch):
    import importlib.util

    from engine.checks import KERNELS, kernel_implementations

    assert kernel_implementations(probe=True) == kernel_implementations()  # this build, as imported
    monkeypatch.setenv("CANPIPE_NO_EXTENSIONS", "1")
    assert kernel_implementations(probe=True) == dict.fromkeys(KERNELS, ("py", "CANPIPE_NO_EXTENSIONS=1"))
    monkeypatch.delenv("CANPIPE_NO_EXTENSIONS")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a build without a C compiler
    assert kernel_implementations(probe=True) == dict.fromkeys(KERNELS, ("py", "compiled module not built"))
