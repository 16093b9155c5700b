"""The receiver over real HTTP, served by Granian, publishing into the real embedded queue."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time

import pytest
from canpipe_testing import API_KEY, http, make_record, post_json, queued_records, wait_for

from engine.metrics import parse_counters


@pytest.fixture
def url(serve, env) -> str:
    return serve(env)


def test_single_array_and_ndjson_are_accepted_and_queued_with_server_stamp(url, data_dir):
    one = make_record(1)
    assert post_json(url, one)[::2] == (202, {"accepted": 1})
    assert post_json(url, [make_record(2), make_record(3)])[::2] == (202, {"accepted": 2})
    ndjson = b"\n".join(json.dumps(make_record(i)).encode() for i in (4, 5, 6)) + b"\n"
    status, _, body = http(
        "POST", url + "/ingest", ndjson, {"Content-Type": "application/x-ndjson", "X-API-Key": API_KEY}
    )
    assert (status, json.loads(body)) == (202, {"accepted": 3})
    stored = queued_records(data_dir)
    assert len(stored) == 6
    assert stored[0]["payload"] == one["payload"] and stored[0]["vehicle_id"] == one["vehicle_id"]
    assert all(r["ingest_received_at"].endswith("Z") and r["ingest_received_at"] >= r["timestamp"] for r in stored)


def test_rotated_keys_both_work(url):
    assert post_json(url, make_record(), key="old:retired-but-valid")[0] == 202
    assert post_json(url, make_record(), key=API_KEY)[0] == 202


@pytest.mark.parametrize("key", [None, "test:wrong", "nobody:s3cret-test-key", "garbage", ""])
def test_missing_or_wrong_key_is_401_with_the_same_body(url, data_dir, key):
    status, _, body = post_json(url, make_record(), key=key)
    assert status == 401
    assert body == {"error": "unauthorized", "detail": "missing or invalid X-API-Key"}
    assert queued_records(data_dir) == []


def test_key_never_appears_in_logs(serve, env, start, tmp_path):
    url = serve(env)
    post_json(url, make_record(), key="test:not-the-secret-xyz")
    post_json(url, make_record())
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "s3cret-test-key" not in logs and "not-the-secret-xyz" not in logs
    assert "rejected X-API-Key (key id 'test')" in logs  # the id is logged, so operators can tell who
    assert "canpipe_auth_failures_total 1" in http("GET", url + "/metrics")[2].decode()


def test_unsupported_media_type_is_415(url):
    status, _, _ = http(
        "POST", url + "/ingest", b"a=1", {"Content-Type": "application/x-www-form-urlencoded", "X-API-Key": API_KEY}
    )
    assert status == 415


def test_body_over_limit_is_413_before_the_body_is_read(serve, env):
    url = serve(env | {"CANPIPE_MAX_BODY_BYTES": "4096"})
    status, _, body = http(
        "POST", url + "/ingest", b"[" + b" " * 5000 + b"]", {"Content-Type": "application/json", "X-API-Key": API_KEY}
    )
    assert status == 413 and json.loads(body)["error"] == "too_large"
    # declare a huge body and send none of it: the answer must come without waiting for the body
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Length: 100000000\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_chunked_body_over_limit_is_413(serve, env):
    url = serve(env | {"CANPIPE_MAX_BODY_BYTES": "4096"})
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-API-Key: " + API_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(3):
            sock.sendall(b"800\r\n" + b" " * 0x800 + b"\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_validation_errors_name_every_bad_field_and_enqueue_nothing(url, data_dir):
    bad = [make_record(0), make_record(1, battery_soc=101.0), make_record(2, cell_temp_min=30.0, cell_temp_max=20.0)]
    bad[0]["colour"] = "red"
    status, _, body = post_json(url, bad)
    assert status == 422
    paths = [e["path"] for e in body["errors"]]
    assert paths == ["$[0]", "$[1].payload.battery_soc", "$[2].payload"]
    assert "unknown field `colour`" in body["errors"][0]["message"]
    assert queued_records(data_dir) == []


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda r: r.update(vehicle_id="bad id!"), "$.vehicle_id"),
        (lambda r: r.update(can_id="132"), "$.can_id"),
        (lambda r: r.update(timestamp="2026-01-01T00:00:00"), "$.timestamp"),  # no UTC offset
        (lambda r: r.update(timestamp="2001-01-01T00:00:00Z"), "$[0].timestamp"),  # too old
        (lambda r: r.update(timestamp="2999-01-01T00:00:00Z"), "$[0].timestamp"),  # from the future
        (lambda r: r["payload"].update(battery_voltage=-1), "$.payload.battery_voltage"),
        (lambda r: r["payload"].update(battery_current=1e999), "$.payload.battery_current"),
        (lambda r: r.update(payload={}), "$.payload"),
        (lambda r: r.pop("vehicle_id"), "$"),
    ],
)
def test_physically_invalid_records_are_422_with_path(url, data_dir, mutate, path):
    record = make_record()
    mutate(record)
    status, _, body = http(
        "POST",
        url + "/ingest",
        json.dumps(record).replace("Infinity", "1e999").encode(),
        {"Content-Type": "application/json", "X-API-Key": API_KEY},
    )
    assert status == 422, body
    assert json.loads(body)["errors"][0]["path"] == path
    assert queued_records(data_dir) == []


def test_malformed_json_and_empty_input_are_422(url):
    for body in (b"{not json", b"[]", b"", b"[1, 2"):
        status, _, _ = http("POST", url + "/ingest", body, {"Content-Type": "application/json", "X-API-Key": API_KEY})
        assert status == 422, body
    status, _, body = http(
        "POST",
        url + "/ingest",
        b'{"timestamp": 1}\n{oops\n',
        {"Content-Type": "application/x-ndjson", "X-API-Key": API_KEY},
    )
    assert status == 422 and json.loads(body)["errors"][0]["path"].startswith("$[0]")


def _lock(data_dir) -> sqlite3.Connection:
    """Hold the embedded queue's write lock, as a stuck or saturated queue would."""
    conn = sqlite3.connect(data_dir / "queue.db", isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def pending_records(url: str) -> int:
    """The receiver's records handed to its publisher and not yet answered by the queue."""
    metrics = http("GET", url + "/metrics")[2].decode()
    return int(parse_counters(metrics, "canpipe_publisher_pending_records")["canpipe_publisher_pending_records"])


def test_no_202_until_the_queue_has_the_records(serve, env, data_dir):
    url = serve(env | {"CANPIPE_PUBLISH_TIMEOUT_S": "1.5"})
    lock = _lock(data_dir)
    try:
        started = time.monotonic()
        status, headers, body = post_json(url, make_record())
        assert status == 503 and headers["retry-after"] and body["error"] == "queue_unavailable"
        assert time.monotonic() - started < 5
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    # while the queue is blocked the request waits; the 202 comes only after the queue committed it
    wait_for(lambda: pending_records(url) == 0, 10, "the 503'd request's send to settle")
    lock = _lock(data_dir)
    answers = []
    record = make_record(7, vehicle_id="EV-LATE")
    client = threading.Thread(target=lambda: answers.append((post_json(url, record)[0], time.monotonic())))
    client.start()
    wait_for(lambda: pending_records(url) == 1, 10, "the request to wait on the blocked queue")
    assert answers == []
    released = time.monotonic()
    lock.execute("ROLLBACK")
    lock.close()
    client.join(10)
    assert answers and answers[0][0] == 202 and answers[0][1] >= released
    # (the 503'd request may still land later: a client retry makes a duplicate, never a loss)
    assert [r["vehicle_id"] for r in queued_records(data_dir)].count("EV-LATE") == 1


def test_saturated_publisher_sheds_load_with_503(serve, env, data_dir):
    url = serve(env | {"CANPIPE_MAX_PENDING_RECORDS": "5", "CANPIPE_PUBLISH_TIMEOUT_S": "3"})
    lock = _lock(data_dir)
    try:
        holder = threading.Thread(target=post_json, args=(url, [make_record(i) for i in range(5)]))
        holder.start()
        wait_for(
            lambda: "canpipe_publisher_pending_records 5" in http("GET", url + "/metrics")[2].decode(),
            10,
            "the first request to be in flight",
        )
        status, headers, body = post_json(url, make_record(9))
        assert (status, body["error"], headers["retry-after"]) == (503, "saturated", "1")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        holder.join(10)


def test_health_metrics_and_openapi(url, data_dir):
    assert http("GET", url + "/health")[0] == 200
    post_json(url, [make_record(i) for i in range(3)])
    status, headers, body = http("GET", url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "canpipe_ingest_records_total 3" in text
    assert 'canpipe_latency_seconds_count{stage="ingest"} 3' in text
    assert 'canpipe_http_requests_total{route="/ingest",status="202"} 1.0' in text
    doc = json.loads(http("GET", url + "/openapi.json")[2])
    assert doc["openapi"].startswith("3.1")
    assert "battery_soc" in json.dumps(doc["components"]["schemas"]["Payload"])
    assert set(doc["paths"]["/ingest"]["post"]["responses"]) >= {"202", "401", "413", "415", "422", "503"}


def test_health_is_503_when_the_queue_is_unreachable(serve, env, data_dir):
    (data_dir / "queue.db").mkdir()  # the queue's path is a directory: SQLite cannot open it
    url = serve(env, expect_status=503)
    status, _, body = http("GET", url + "/health")
    assert status == 503 and json.loads(body)["status"] == "unavailable"
    status, headers, _ = post_json(url, make_record())
    assert status == 503 and headers["retry-after"]
