"""POST /ingest's raw ASGI endpoint in process (Starlette's TestClient, real embedded queue): the refusals that
the Granian tests reach only in a worker process, and the counters and ingest latency the 202 path folds
per snapshot."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging

import pytest
from canpipe_testing import make_record
from starlette.testclient import TestClient

from engine import instruments as m
from engine.config import Settings
from engine.queues import open_queue
from engine.receiver import create_app

KEY = "fleet1:s3cret-for-tests"
JSON = {"X-API-Key": KEY, "Content-Type": "application/json"}


def serve(tmp_path, **env: str):
    settings = Settings.from_env({"CANPIPE_DATA_DIR": str(tmp_path), "CANPIPE_API_KEYS": KEY} | env)
    queue = open_queue(settings.queue_url, max_bytes=int(env.get("MAX_BYTES", "0")))
    client = TestClient(create_app(settings, queue), base_url="http://127.0.0.1")
    client.queued = lambda: [m.body for m in client.portal.call(functools.partial(queue.receive, 10, 0.0))]
    return client


def test_more_records_than_allowed_is_413_before_decoding(tmp_path):
    with serve(tmp_path, CANPIPE_MAX_RECORDS_PER_REQUEST="2") as client:
        response = client.post("/ingest", content=json.dumps([make_record(i) for i in range(3)]), headers=JSON)
        assert (response.status_code, response.json()["error"]) == (413, "too_many_records")
        assert client.queued() == []


def test_a_clock_far_ahead_is_422_naming_the_record(tmp_path):
    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    with serve(tmp_path) as client:
        body = json.dumps([make_record(0), make_record(1) | {"timestamp": ahead}])
        response = client.post("/ingest", content=body, headers=JSON)
        assert response.status_code == 422
        assert response.json()["errors"] == [
            {"path": "$[1].timestamp", "message": "timestamp is more than 300 s ahead of server time"}
        ]


def test_over_the_key_rate_is_429_with_retry_after(tmp_path):
    with serve(tmp_path, CANPIPE_RATE_LIMIT_RECORDS_PER_S="1", CANPIPE_RATE_LIMIT_BURST="2") as client:
        assert (
            client.post("/ingest", content=json.dumps([make_record(0), make_record(1)]), headers=JSON).status_code
            == 202
        )
        response = client.post("/ingest", content=json.dumps(make_record(2)), headers=JSON)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert len(b"".join(client.queued()).splitlines()) == 2


def test_a_full_queue_is_503_saturated(tmp_path):
    with serve(tmp_path, MAX_BYTES="100") as client:
        response = client.post("/ingest", content=json.dumps(make_record()), headers=JSON)
        assert (response.status_code, response.json()["error"]) == (503, "saturated")
        assert response.headers["retry-after"] == "1"


def test_accepted_requests_show_in_the_counters_and_the_ingest_latency(tmp_path, caplog):
    with serve(tmp_path) as client:
        with caplog.at_level(logging.DEBUG, logger="canpipe.receiver"):
            for i in range(3):
                assert (
                    client.post(
                        "/ingest", content=json.dumps([make_record(2 * i), make_record(2 * i + 1)]), headers=JSON
                    ).status_code
                    == 202
                )
        assert "accepted 2 records" in caplog.text and KEY.split(":")[1] not in caplog.text
        metrics = client.app.state.receiver.own_metrics()
        assert metrics.value(m.HTTP_REQUESTS, route="/ingest", status=202) == 3
        assert metrics.value(m.INGEST_RECORDS) == 6
        lag = metrics.histogram(m.LATENCY, stage="ingest")
        assert lag.count == 6 and 0 <= lag.quantile(0.5) < 60_000


@pytest.mark.parametrize("header", [b"test", b""])
def test_a_second_key_header_does_not_override_the_first(tmp_path, header):
    with serve(tmp_path) as client:
        headers = [
            ("content-type", "application/json"),
            ("x-api-key", KEY),
            ("x-api-key", "fleet1:wrong" + header.decode()),
        ]
        assert client.post("/ingest", content=json.dumps(make_record()), headers=headers).status_code == 202


def test_a_body_slower_than_its_deadline_is_408_and_closes_the_connection(tmp_path):
    settings = Settings.from_env(
        {"CANPIPE_DATA_DIR": str(tmp_path), "CANPIPE_API_KEYS": KEY, "CANPIPE_BODY_TIMEOUT_S": "0.1"}
    )
    app = create_app(settings, open_queue(settings.queue_url))
    headers = [(b"x-api-key", KEY.encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/ingest", "headers": headers, "query_string": b""}
    sent: list[dict] = []

    async def trickle() -> dict:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope | {"root_path": "", "scheme": "http", "server": ("127.0.0.1", 80)}, trickle, send))
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] == "timeout"


def test_a_batch_is_decoded_per_batch_and_stored_as_the_exact_door_stores_it(tmp_path, monkeypatch):
    """100 records go through engine.batch_decode (the exact door, ~2x its CPU a record, is not called) and the
    queue holds the bytes the exact door's encoding writes; 3 records go through the exact door."""
    from engine import receiver, schema

    exact_calls = []

    def exact_door(body: bytes, *, ndjson: bool) -> list[schema.Telemetry]:
        exact_calls.append(len(body))
        return schema.decode_records(body, ndjson=ndjson)

    monkeypatch.setattr(receiver, "decode_records", exact_door)
    records = [make_record(i, vehicle_id=f"EV-{i % 9}") for i in range(100)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    with serve(tmp_path) as client:
        response = client.post("/ingest", content=body, headers=JSON | {"Content-Type": "application/x-ndjson"})
        assert (response.status_code, response.json()) == (202, {"accepted": 100})
        assert exact_calls == [], "a 100-record body went through the exact door, record by record"
        (stored,) = client.queued()
        received_at = json.loads(stored.splitlines()[0])["ingest_received_at"]
        moment = dt.datetime.fromisoformat(received_at.replace("Z", "+00:00"))
        assert stored == schema.encode_stored(schema.decode_records(body, ndjson=True), moment)
        response = client.post("/ingest", content=json.dumps(records[:3]), headers=JSON)
        assert response.status_code == 202 and len(exact_calls) == 1


@pytest.mark.parametrize(
    ("where", "shift", "message"), [(7, dt.timedelta(hours=1), "ahead of"), (3, -dt.timedelta(days=8), "old")]
)
def test_a_batch_with_one_clock_out_of_bounds_is_422_naming_that_record(tmp_path, where, shift, message):
    """The batch path decides the clock on its C-read timestamps; the record out of bounds is named as the exact
    door names it, and nothing is queued."""
    records = [make_record(i) for i in range(10)]
    records[where]["timestamp"] = (dt.datetime.now(dt.UTC) + shift).isoformat()
    body = "".join(json.dumps(r) + "\n" for r in records)
    with serve(tmp_path) as client:
        response = client.post("/ingest", content=body, headers=JSON | {"Content-Type": "application/x-ndjson"})
        assert response.status_code == 422
        (error,) = response.json()["errors"]
        assert error["path"] == f"$[{where}].timestamp" and message in error["message"]
        assert client.queued() == []


def test_a_batch_with_utc_offsets_is_stored_in_utc_and_its_latency_recorded(tmp_path):
    from engine import schema

    records = [make_record(i) for i in range(10)]
    for r in records[::2]:  # every other record at +02:00, the same instants
        moment = dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))
        r["timestamp"] = moment.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    body = json.dumps(records).encode()
    with serve(tmp_path) as client:
        assert client.post("/ingest", content=body, headers=JSON).status_code == 202
        (stored,) = client.queued()
        lines = [json.loads(line) for line in stored.splitlines()]
        assert all(line["timestamp"].endswith("Z") for line in lines)
        moment = dt.datetime.fromisoformat(lines[0]["ingest_received_at"].replace("Z", "+00:00"))
        expected = schema.decode_records(body, ndjson=False)
        schema.check_clock(expected, moment, max_future_s=300, max_age_s=86400)
        assert stored == schema.encode_stored(expected, moment)
        lag = client.app.state.receiver.own_metrics().histogram(m.LATENCY, stage="ingest")
        assert lag.count == 10 and 0 <= lag.quantile(0.5) < 60_000


def test_ingest_keeps_the_app_contract_around_its_shortcut(tmp_path, monkeypatch):
    """POST /ingest skips Starlette's router: the route still answers 405 to GET, an unexpected error is still a
    500, and a request under a root_path or an app given middleware still reaches the endpoint."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from engine import receiver

    body = json.dumps(make_record(0))
    with serve(tmp_path) as client:
        assert client.get("/ingest", headers=JSON).status_code == 405
        assert client.post("/ingest", content=body, headers=JSON).status_code == 202
    seen = []

    async def note(request, call_next):
        seen.append(request.url.path)
        return await call_next(request)

    settings = Settings.from_env({"CANPIPE_DATA_DIR": str(tmp_path / "m"), "CANPIPE_API_KEYS": KEY})
    app = create_app(settings, open_queue(settings.queue_url))
    app.add_middleware(BaseHTTPMiddleware, dispatch=note)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.post("/ingest", content=body, headers=JSON).status_code == 202
        assert seen == ["/ingest"], "the app's middleware was skipped"
    with TestClient(create_app(settings, open_queue(settings.queue_url)), root_path="/edge") as client:
        assert client.post("/edge/ingest", content=body, headers=JSON).status_code == 202

    async def broken(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(receiver.Receiver, "admit", broken)
    with TestClient(create_app(settings, open_queue(settings.queue_url)), raise_server_exceptions=False) as client:
        response = client.post("/ingest", content=body, headers=JSON)
        assert (response.status_code, response.text) == (500, "Internal Server Error")
