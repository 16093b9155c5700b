"""The receiver app in process (Starlette's TestClient), on a real embedded SQLite queue: each answer of
POST /ingest and what it leaves in the queue. The Granian end-to-end tests are in tests/test_receiver.py."""

from __future__ import annotations

import datetime as dt
import functools
import json

import pytest
from canpipe_testing import make_record
from starlette.testclient import TestClient

from engine.config import Settings
from engine.queues import open_queue
from engine.receiver import create_app

KEY = "fleet1:s3cret-for-tests"
JSON = {"X-API-Key": KEY, "Content-Type": "application/json"}


@pytest.fixture
def settings(tmp_path):
    return Settings.from_env(
        {"CANPIPE_DATA_DIR": str(tmp_path), "CANPIPE_API_KEYS": KEY, "CANPIPE_MAX_BODY_BYTES": "4096"}
    )


@pytest.fixture
def queue(settings):
    return open_queue(settings.queue_url, max_bytes=0)


@pytest.fixture
def client(settings, queue):
    with TestClient(create_app(settings, queue), base_url="http://127.0.0.1") as client:
        yield client


def queued(client, queue) -> list[bytes]:
    """Every message body now in the queue (received with no wait, through the app's own event loop)."""
    return [m.body for m in client.portal.call(functools.partial(queue.receive, 10, 0.0))]


def test_accepted_records_are_queued_as_sent_with_the_receive_time(client, queue):
    records = [make_record(i, vehicle_id=f"EV-{i:05d}") for i in range(3)]
    before = dt.datetime.now(dt.UTC)
    response = client.post("/ingest", content=json.dumps(records), headers=JSON)
    after = dt.datetime.now(dt.UTC)
    assert (response.status_code, response.json()) == (202, {"accepted": 3})
    (body,) = queued(client, queue)
    lines = [json.loads(line) for line in body.splitlines()]
    received = {line.pop("ingest_received_at") for line in lines}
    assert lines == records
    (stamp,) = received  # one receive time for the whole request
    assert before <= dt.datetime.fromisoformat(stamp) <= after
    assert body.endswith(b"\n") and body.count(b"\n") == 3


def test_ndjson_body_is_accepted(client, queue):
    records = [make_record(i) for i in range(2)]
    body = "".join(json.dumps(r) + "\n" for r in records)
    response = client.post("/ingest", content=body, headers={**JSON, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 202, response.text
    assert [json.loads(line)["timestamp"] for line in queued(client, queue)[0].splitlines()] == [
        r["timestamp"] for r in records
    ]


@pytest.mark.parametrize("key", [None, "fleet1:wrong", "nobody:s3cret-for-tests", "fleet1"])
def test_missing_or_wrong_key_is_401_and_queues_nothing(client, queue, key):
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": key} if key else {})
    response = client.post("/ingest", content=json.dumps(make_record()), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert queued(client, queue) == []


def test_body_over_the_limit_is_413_and_queues_nothing(client, queue):
    records = [make_record(i) for i in range(40)]  # ~10 kB against a 4096-byte limit
    response = client.post("/ingest", content=json.dumps(records), headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert "4096 bytes" in response.json()["detail"]
    assert response.headers["connection"] == "close"
    assert queued(client, queue) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", ""])
def test_other_content_types_are_415(client, queue, content_type):
    response = client.post("/ingest", content=json.dumps(make_record()), headers={**JSON, "Content-Type": content_type})
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert queued(client, queue) == []


def test_an_invalid_record_is_422_naming_its_path_and_nothing_of_the_request_is_queued(client, queue):
    bad = make_record(1)
    bad["payload"]["battery_soc"] = "full"
    response = client.post("/ingest", content=json.dumps([make_record(0), bad]), headers=JSON)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation"
    assert [e["path"] for e in body["errors"]] == ["$[1].payload.battery_soc"]
    assert queued(client, queue) == []


@pytest.mark.parametrize("content", [b"[]", b"not json", b'{"timestamp": 1}'])
def test_empty_or_malformed_bodies_are_422(client, queue, content):
    response = client.post("/ingest", content=content, headers=JSON)
    assert response.status_code == 422
    assert response.json()["error"] == "validation" and response.json()["errors"]
    assert queued(client, queue) == []


def test_a_deleted_queue_file_is_503_with_retry_after_and_health_says_unavailable(client, settings, tmp_path):
    assert client.post("/ingest", content=json.dumps(make_record()), headers=JSON).status_code == 202
    (tmp_path / "queue.db").unlink()  # the embedded queue's storage gone under the running receiver
    response = client.post("/ingest", content=json.dumps(make_record(1)), headers=JSON)
    assert response.status_code == 503
    assert response.json()["error"] == "queue_unavailable"
    assert response.headers["retry-after"] == "2"
    assert client.get("/health").status_code == 503
    assert not (tmp_path / "queue.db").exists()  # not silently recreated empty
