"""Hostile input and access, over real HTTP against a real Granian: keys, limits, a JSON corpus, slow clients,
rate limits. Every refusal is a 4xx with the JSON error body, and nothing reaches the queue."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from canpipe_testing import API_KEY, http, make_record, post_json, queued_records, wait_for

from engine import receiver
from engine.config import Settings, parse_api_keys
from engine.run import stored_keys

JSON = {"Content-Type": "application/json", "X-API-Key": API_KEY}
JSON_NO_KEY = {"Content-Type": "application/json"}
UNAUTHORIZED = {"error": "unauthorized", "detail": "missing or invalid X-API-Key"}


@pytest.fixture
def url(serve, env) -> str:
    return serve(env)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(url: str, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send bytes exactly as given (no client library fixing them up); return the whole answer."""
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=timeout) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- 9. authentication ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),  # missing
        ({"X-API-Key": ""}, ""),  # empty
        ({"X-API-Key": "test:wrong"}, ""),  # wrong secret
        ({"X-API-Key": "test:s3cret-test-ke"}, ""),  # all but the last character right
        ({"X-API-Key": "test:s3cret-test-keyX"}, ""),  # one character too many
        ({"X-API-Key": "revoked:was-valid-once"}, ""),  # a key no longer configured
        ({"X-API-Key": "test"}, ""),  # a key id without its secret
        ({"X-API-Key": "test:"}, ""),
        ({"X-API-Key": "s3cret-test-key"}, ""),  # a secret without its key id
        ({}, "?api_key=" + API_KEY),  # a key in the query string is not a key
        ({"X-API-Key": "TEST:S3CRET-TEST-KEY"}, ""),  # right letters, wrong case
    ],
)
def test_every_bad_key_is_401_with_the_same_body(url, data_dir, headers, query):
    status, _, body = http("POST", url + "/ingest" + query, json.dumps(make_record()).encode(), headers | JSON_NO_KEY)
    assert (status, json.loads(body)) == (401, UNAUTHORIZED)
    assert queued_records(data_dir) == []


def test_two_active_keys_for_one_client_both_work_during_rotation(url, data_dir):
    assert post_json(url, make_record(1), key="old:retired-but-valid")[0] == 202
    assert post_json(url, make_record(2), key=API_KEY)[0] == 202
    assert len(queued_records(data_dir)) == 2


def test_a_non_ascii_secret_is_compared_as_the_utf8_bytes_the_client_sent(serve, env, data_dir):
    url = serve(env | {"CANPIPE_API_KEYS": "intl:pässwört-ü"})
    utf8 = "intl:pässwört-ü".encode().decode("latin-1")  # how the header's bytes reach Starlette
    latin1 = "intl:pässwört-ü"  # urllib sends a str header as Latin-1 bytes
    body = json.dumps(make_record()).encode()
    assert http("POST", url + "/ingest", body, JSON_NO_KEY | {"X-API-Key": utf8})[0] == 202
    assert http("POST", url + "/ingest", body, JSON_NO_KEY | {"X-API-Key": latin1})[0] == 401


def test_the_comparison_is_constant_time_by_construction(monkeypatch):
    """Every header, known id or not, costs one SHA-256 and one compare_digest of two 32-byte digests, so the
    time cannot depend on how much of the key was right (a statistical timing test would be flaky)."""
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(receiver.hmac, "compare_digest", spy)
    auth = receiver.Authenticator(Settings(api_keys=parse_api_keys(API_KEY)))
    for header in [API_KEY, "test:s3cret-test-ke", "test:x", "nobody:s3cret-test-key", "garbage", "", None]:
        calls.clear()
        assert (auth.key_id(header) == "test") == (header == API_KEY)
        assert len(calls) == 1 and [len(d) for d in calls[0]] == [32, 32], header


def test_rejected_keys_are_logged_by_key_id_or_short_hash_never_the_secret():
    auth = receiver.Authenticator(Settings(api_keys=parse_api_keys(API_KEY)))
    assert auth.describe("s3cretWithNoColon") == "no key id"
    assert auth.describe("test:wrong") == "key id 'test'"
    leaked = auth.describe("my-real-secret:x")
    assert "my-real-secret" not in leaked and leaked == (
        "unknown key id sha256:" + hashlib.sha256(b"my-real-secret").hexdigest()[:8]
    )


def test_secrets_never_reach_logs_metrics_or_data_files(serve, start, env, data_dir, tmp_path):
    url = serve(env)
    start(["consume", "--workers", "1"], env)
    bad = ["SECRETNOCOLON-1234", "test:SECRETWRONG-5678", "SECRETASID-9012:x", "SECRETASID-9012:SECRETBOTH-3456"]
    for key in bad:
        assert post_json(url, make_record(), key=key)[0] == 401
    assert post_json(url, make_record(), key=API_KEY)[0] == 202
    assert post_json(url, make_record(1), key="old:retired-but-valid")[0] == 202
    wait_for(lambda: len(stored_keys(data_dir / "raw")) == 2, 30, "the accepted records in the raw files")
    metrics = http("GET", url + "/metrics")[2].decode()
    assert "canpipe_auth_failures_total 4" in metrics
    texts = [metrics] + [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert any("rejected X-API-Key" in text for text in texts)
    for secret in ["SECRETNOCOLON", "SECRETWRONG", "SECRETASID", "SECRETBOTH", "s3cret-test-key", "retired-but-valid"]:
        assert not [t[:80] for t in texts if secret in t], secret


# --- 10. body and record-count limits ---------------------------------------------------------------------


def test_a_body_exactly_at_the_limit_is_accepted_and_one_byte_more_is_413(serve, env, data_dir):
    url = serve(env | {"CANPIPE_MAX_BODY_BYTES": "4096"})
    record = json.dumps(make_record()).encode()
    at_limit = record + b" " * (4096 - len(record))
    assert http("POST", url + "/ingest", at_limit, JSON)[0] == 202
    status, _, body = http("POST", url + "/ingest", at_limit + b" ", JSON)
    assert (status, json.loads(body)["error"]) == (413, "too_large")
    assert len(queued_records(data_dir)) == 1


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(serve, env):
    url = serve(env | {"CANPIPE_MAX_BODY_BYTES": "4096"})
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as sock:
        sock.sendall(
            b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-API-Key: " + API_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(b"1400\r\n" + b" " * 0x1400 + b"\r\n")  # 5 KiB, and the body never ends
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_many_tiny_records_are_bounded_by_the_record_limit(serve, env, data_dir):
    url = serve(env | {"CANPIPE_MAX_RECORDS_PER_REQUEST": "50"})
    assert post_json(url, [make_record(i) for i in range(50)])[::2] == (202, {"accepted": 50})
    status, _, body = post_json(url, [make_record(i) for i in range(51)])
    assert status == 413 and body["error"] == "too_many_records" and "50 records" in body["detail"]
    # 4 MiB of empty objects: refused from a byte count, nothing decoded, quickly
    started = time.monotonic()
    status, _, body = http("POST", url + "/ingest", b"[" + b"{}," * 1_300_000 + b"{}]", JSON)
    assert status == 413 and json.loads(body)["error"] == "too_many_records"
    assert time.monotonic() - started < 10
    ndjson = b"\n".join(json.dumps(make_record(i)).encode() for i in range(51))
    status, _, _ = http("POST", url + "/ingest", ndjson, JSON | {"Content-Type": "application/x-ndjson"})
    assert status == 413
    assert len(queued_records(data_dir)) == 50


def test_more_records_than_the_pending_cap_is_413_not_a_503_that_can_never_succeed(serve, env, data_dir):
    url = serve(env | {"CANPIPE_MAX_PENDING_RECORDS": "5"})
    status, headers, body = post_json(url, [make_record(i) for i in range(6)])
    assert (status, body["error"]) == (413, "too_many_records") and "retry-after" not in headers
    assert post_json(url, [make_record(i) for i in range(5)])[0] == 202


# --- 11. a JSON edge-case corpus --------------------------------------------------------------------------

GOOD = json.dumps(make_record())


def _swap(old: str, new: str, text: str = GOOD) -> bytes:
    assert old in text, old
    return text.replace(old, new, 1).encode("utf-8", "surrogatepass")


def _ts(value: str) -> bytes:
    record = json.loads(GOOD)
    record["timestamp"] = value
    return json.dumps(record).encode()


CORPUS: list[tuple[str, bytes, str, int]] = [
    ("NaN", _swap("80.5", "NaN"), "application/json", 422),
    ("Infinity", _swap("80.5", "Infinity"), "application/json", 422),
    ("-Infinity", _swap("42.0", "-Infinity"), "application/json", 422),
    ("1e400", _swap("396.2", "1e400"), "application/json", 422),
    ("5000-digit integer", _swap("396.2", "9" * 5000), "application/json", 422),
    ("10000-deep arrays", b"[" * 10_000 + b"]" * 10_000, "application/json", 422),
    ("10000-deep objects", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "application/json", 422),
    ("500000 [", b"[" * 500_000, "application/json", 422),
    ("500000 [ in NDJSON", b"[" * 500_000, "application/x-ndjson", 422),
    ("duplicate key", _swap('"can_id": "0x132"', '"can_id": "0x132", "can_id": "0x7FF"'), "application/json", 422),
    ("duplicate escaped key", _swap('"battery_soc": 80.5', '"battery_soc": 80.5, "battery\\u005fsoc": 1'), "", 422),
    ("invalid UTF-8 in a value", _swap("EV-00001", "EV-\udcff0001").replace(b"\xed\xb3\xbf", b"\xff"), "", 422),
    ("invalid UTF-8 in a key", _swap('"vehicle_id"', '"vehicle_\udcffid"').replace(b"\xed\xb3\xbf", b"\xff"), "", 422),
    ("invalid UTF-8 in NDJSON", b'{"vehicle_id": "\xff"}\n', "application/x-ndjson", 422),
    ("escaped lone surrogate", _swap("EV-00001", "\\ud800"), "application/json", 422),
    ("raw lone surrogate (CESU)", _swap("EV-00001", "\ud800"), "application/json", 422),
    ("NUL byte", _swap("EV-00001", "EV-\x000001"), "application/json", 422),
    ("escaped NUL", _swap("EV-00001", "EV-\\u00000001"), "application/json", 422),
    ("BOM", b"\xef\xbb\xbf" + GOOD.encode(), "application/json", 422),
    ("trailing garbage", GOOD.encode() + b"x", "application/json", 422),
    ("two objects", GOOD.encode() + GOOD.encode(), "application/json", 422),
    ("empty body", b"", "application/json", 422),
    ("whitespace body", b" \n ", "application/json", 422),
    ("empty array", b"[]", "application/json", 422),
    ("empty NDJSON", b"\n\n", "application/x-ndjson", 422),
    ("wrong Content-Type", GOOD.encode(), "text/plain", 415),
    ("form Content-Type", GOOD.encode(), "application/x-www-form-urlencoded", 415),
    ("missing Content-Type", GOOD.encode(), "-", 415),
    ("unknown top-level field", _swap('"can_id"', '"colour": "red", "can_id"'), "application/json", 422),
    ("unknown payload field", _swap('"battery_soc"', '"soc": 1, "battery_soc"'), "application/json", 422),
    ("vehicle_id a number", _swap('"EV-00001"', "123"), "application/json", 422),
    ("payload a list", _swap('"payload": {', '"payload": [{').replace(b"}}", b"}]}"), "application/json", 422),
    ("soc a string", _swap("80.5", '"80.5"'), "application/json", 422),
    ("soc a bool", _swap("80.5", "true"), "application/json", 422),
    ("record a string", b'"hello"', "application/json", 422),
    ("array of numbers", b"[1, 2, 3]", "application/json", 422),
    ("null", b"null", "application/json", 422),
    ("soc 101", _swap("80.5", "101"), "application/json", 422),
    ("negative voltage", _swap("396.2", "-1"), "application/json", 422),
    ("current 1e5 A", _swap("42.0", "100000"), "application/json", 422),
    ("cell temp min > max", _swap("24.0", "99.0"), "application/json", 422),
    ("no signal", _swap(GOOD[GOOD.index('"payload"') :], '"payload": {}}'), "application/json", 422),
    ("timestamp without offset", _ts("2026-11-28T10:00:00"), "application/json", 422),
    ("timestamp a date", _ts("2026-11-28"), "application/json", 422),
    ("timestamp words", _ts("yesterday"), "application/json", 422),
    ("timestamp epoch number", _swap(f'"{json.loads(GOOD)["timestamp"]}"', "1764324000"), "application/json", 422),
    ("timestamp month 13", _ts("2026-13-01T00:00:00Z"), "application/json", 422),
    ("timestamp far future", _ts("2999-01-01T00:00:00Z"), "application/json", 422),
    ("timestamp far past", _ts("1970-01-01T00:00:00Z"), "application/json", 422),
    ("vehicle_id with newline", _swap("EV-00001", "EV-00001\\n"), "application/json", 422),
    ("can_id with newline", _swap("0x132", "0x132\\n"), "application/json", 422),
    ("vehicle_id ../../etc", _swap("EV-00001", "../../etc"), "application/json", 422),
    ("vehicle_id ..", _swap("EV-00001", ".."), "application/json", 422),
    ("vehicle_id with a slash", _swap("EV-00001", "EV/0001"), "application/json", 422),
    ("vehicle_id with a backslash", _swap("EV-00001", "EV\\\\..\\\\0001"), "application/json", 422),
    ("vehicle_id hidden file", _swap("EV-00001", ".hidden"), "application/json", 422),
    ("vehicle_id escaped slash", _swap("EV-00001", "EV\\/0001"), "application/json", 422),
    ("vehicle_id too long", _swap("EV-00001", "E" * 65), "application/json", 422),
    ("vehicle_id non-ASCII", _swap("EV-00001", "EV-ÄÖ"), "application/json", 422),
]


def test_the_json_corpus_is_refused_with_a_clear_4xx_and_nothing_is_enqueued(url, data_dir):
    wrong = []
    for name, body, content_type, expected in CORPUS:
        headers = {"X-API-Key": API_KEY} | ({"Content-Type": content_type or "application/json"})
        head = f"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v != "-") + "\r\n"
        answer = raw_request(url, head.encode(), body, timeout=30)
        status, payload = _status(answer), json.loads(answer.partition(b"\r\n\r\n")[2])
        if status != expected or not payload.get("error") or not payload.get("detail"):
            wrong.append(f"{name}: {status} {payload}")
    assert not wrong, "\n".join(wrong)
    assert queued_records(data_dir) == []
    assert post_json(url, make_record())[0] == 202  # and the receiver is still fine


def test_only_known_routes_answer_and_nothing_redirects(url):
    answer = raw_request(url, b"POST /ingest/ HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\n\r\n", b"{}")
    assert _status(answer) == 404 and b"location:" not in answer.lower()
    status, _, body = http("GET", url + "/ingest")
    assert status == 405 and json.loads(body)["error"] == "http"


def test_a_malformed_chunked_body_is_4xx_not_500(url, data_dir):
    for bad in [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhel", b"3\r\nhello\r\n0\r\n\r\n"]:
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as sock:
            sock.sendall(
                b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: "
                + API_KEY.encode()
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                + bad
            )
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(200)
        assert not answer or 400 <= _status(answer) < 500, (bad, answer)
    assert 'status="500"' not in http("GET", url + "/metrics")[2].decode()
    assert queued_records(data_dir) == []


# --- 12. slow clients -------------------------------------------------------------------------------------


def _trickle(port: int, head: bytes, drip: bytes, stop: threading.Event, result: list, held: list) -> None:
    """Send ``head`` then one byte of ``drip`` every 0.2 s; record when and how the server ended it."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.settimeout(0.2)
        sock.sendall(head)
        held.append(1)
        answer = b""
        for byte in drip:
            if stop.is_set():
                break
            try:
                sock.sendall(bytes([byte]))
                chunk = sock.recv(200)
                answer += chunk
                if not chunk or answer:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        result.append((time.monotonic() - started, answer))


def test_trickled_bodies_and_headers_are_cut_off_while_normal_requests_keep_their_latency(serve, env, data_dir):
    url = serve(env | {"CANPIPE_BODY_TIMEOUT_S": "1.5", "CANPIPE_HEADER_TIMEOUT_S": "1.5"})
    port = _port(url)
    body_head = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: "
        + API_KEY.encode()
        + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    stop, slow_bodies, slow_headers, held = threading.Event(), [], [], []
    threads = [
        threading.Thread(target=_trickle, args=(port, body_head, b" " * 999, stop, slow_bodies, held)) for _ in range(8)
    ] + [
        threading.Thread(
            target=_trickle, args=(port, b"POST /ingest HTTP/1.1\r\n", b"X" * 999, stop, slow_headers, held)
        )
        for _ in range(8)
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(held) == 16, 10, "the slow clients to hold their connections")
        for index in range(5):  # while they trickle, a normal request keeps its latency
            started = time.monotonic()
            assert post_json(url, make_record(index))[0] == 202
            assert time.monotonic() - started < 3.0
        for thread in threads:
            thread.join(20)
    finally:
        stop.set()
    assert len(slow_bodies) == 8 and len(slow_headers) == 8
    for elapsed, answer in slow_bodies:
        assert elapsed < 10 and _status(answer) == 408, (elapsed, answer[:100])
    for elapsed, answer in slow_headers:
        assert elapsed < 10 and (answer == b"" or 400 <= _status(answer) < 500), (elapsed, answer[:100])
    assert len(queued_records(data_dir)) == 5


# --- 13. per-key rate limit -------------------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_are_unaffected(serve, env, data_dir):
    url = serve(env | {"CANPIPE_RATE_LIMIT_RECORDS_PER_S": "2", "CANPIPE_RATE_LIMIT_BURST": "10"})
    assert post_json(url, [make_record(i) for i in range(10)])[0] == 202
    status, headers, body = post_json(url, [make_record(i) for i in range(10, 14)])
    assert (status, body["error"]) == (429, "rate_limited") and 1 <= int(headers["retry-after"]) <= 5
    assert post_json(url, [make_record(i) for i in range(20, 30)], key="old:retired-but-valid")[0] == 202
    wait_for(lambda: post_json(url, [make_record(i) for i in range(40, 44)])[0] == 202, 10, "the bucket to refill")
    assert len(queued_records(data_dir)) == 24


# --- the port is this receiver's alone --------------------------------------------------------------------


def test_a_second_serve_on_the_same_port_is_refused(serve, env, start, tmp_path: Path):
    url = serve(env)
    second = start(["serve", "--port", str(_port(url))], env)
    assert second.popen.wait(30) == 1
    assert "cannot serve on 127.0.0.1:" in second.output() and "another receiver" in second.output()
    assert post_json(url, make_record())[0] == 202
