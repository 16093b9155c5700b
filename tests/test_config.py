from __future__ import annotations

import hashlib

import pytest

from engine.config import Settings, parse_api_keys
from engine.errors import ConfigError


def test_defaults_put_the_queue_in_the_data_dir(tmp_path):
    settings = Settings.from_env({"CANPIPE_DATA_DIR": str(tmp_path)})
    assert settings.queue_url == f"sqlite:///{tmp_path / 'queue.db'}"
    assert (settings.batch_records, settings.batch_seconds, settings.visibility_timeout_s) == (100, 2.0, 30.0)
    assert settings.rotate_bytes == 5 * 1024 * 1024


def test_keys_are_kept_as_digests_only():
    (key,) = parse_api_keys("ops:hunter2")
    assert key.key_id == "ops" and key.secret_sha256 == hashlib.sha256(b"hunter2").digest()
    assert "hunter2" not in repr(key)


@pytest.mark.parametrize("raw", ["nocolon", ":secret", "id:", "a:1,a:2"])
def test_bad_keys_name_the_setting(raw):
    with pytest.raises(ConfigError, match="CANPIPE_API_KEYS"):
        parse_api_keys(raw)


@pytest.mark.parametrize(("name", "value"), [("CANPIPE_BATCH_SECONDS", "x"), ("CANPIPE_ROTATE_BYTES", "10")])
def test_bad_numbers_name_the_setting(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_serving_without_keys_needs_an_explicit_opt_out():
    with pytest.raises(ConfigError, match="--insecure-no-auth"):
        Settings.from_env({}).require_auth()
    Settings.from_env({"CANPIPE_INSECURE_NO_AUTH": "1"}).require_auth()


@pytest.mark.parametrize("raw", ["ops :s3cret", "ops: s3cret", " ops : s3cret,b:c"])
def test_spaces_around_the_colon_are_refused_not_made_part_of_the_key(raw):
    with pytest.raises(ConfigError, match="CANPIPE_API_KEYS: no spaces around ':'"):
        parse_api_keys(raw)


def test_receiver_limits_and_deadlines_come_from_the_environment():
    settings = Settings.from_env(
        {
            "CANPIPE_MAX_RECORDS_PER_REQUEST": "500",
            "CANPIPE_BODY_TIMEOUT_S": "2.5",
            "CANPIPE_HEADER_TIMEOUT_S": "3",
            "CANPIPE_RATE_LIMIT_RECORDS_PER_S": "100",
            "CANPIPE_RATE_LIMIT_BURST": "400",
        }
    )
    assert (settings.max_records_per_request, settings.body_timeout_s, settings.header_timeout_s) == (500, 2.5, 3)
    assert (settings.rate_limit_records_per_s, settings.rate_limit_burst) == (100, 400)
    assert Settings().rate_limit_records_per_s == 0  # off unless configured


@pytest.mark.parametrize(
    ("name", "value"),
    [("CANPIPE_HEADER_TIMEOUT_S", "61"), ("CANPIPE_MAX_RECORDS_PER_REQUEST", "0"), ("CANPIPE_BODY_TIMEOUT_S", "-1")],
)
def test_bad_receiver_limits_name_the_setting(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_numbers_must_be_finite(value):
    with pytest.raises(ConfigError, match=f"CANPIPE_BATCH_SECONDS: expected a finite number, got '{value}'"):
        Settings.from_env({"CANPIPE_BATCH_SECONDS": value})


def test_every_problem_is_listed_and_unknown_names_get_the_nearest_known_one():
    from engine.config import unknown_names

    with pytest.raises(ConfigError) as error:
        Settings.from_env({"CANPIPE_ROTATE_BYTES": "2048.5", "CANPIPE_API_KEYS": "nocolon", "CANPIPE_DBC": "/nope"})
    assert str(error.value).splitlines()[1:] == [
        "  CANPIPE_API_KEYS: each key must be 'key_id:secret' (got an entry without ':')",
        "  CANPIPE_ROTATE_BYTES: expected a whole number, got '2048.5'",
        "  CANPIPE_DBC: cannot read /nope: no such file",
    ]
    env = {"CANPIPE_BATCH_RECORD": "1", "CANPIPE_TEST_SEED": "1", "CANPIPE_ZZZZZZ": "1", "PATH": ""}
    assert unknown_names(env) == [
        "CANPIPE_BATCH_RECORD is not a canpipe setting and is ignored; did you mean CANPIPE_BATCH_RECORDS?",
        "CANPIPE_ZZZZZZ is not a canpipe setting and is ignored",
    ]


def test_every_canpipe_name_the_code_reads_is_known_so_never_warned_about():
    """A name read anywhere in engine/ but missing from the known lists would be called a typo on every run."""
    import re
    from pathlib import Path

    from engine.config import OTHER_NAMES, SETTING_NAMES, unknown_names

    engine_dir = Path(__file__).resolve().parent.parent / "engine"
    read = {
        name
        for path in engine_dir.rglob("*.py")
        for name in re.findall(r"[\"'](CANPIPE_[A-Z0-9_]*[A-Z0-9])[\"']", path.read_text())  # as code reads it
    }
    assert read, "no CANPIPE_* names found in engine/"
    assert unknown_names(dict.fromkeys(read, "1")) == [], sorted(read - SETTING_NAMES - OTHER_NAMES)
