"""Request bodies: Content-Encoding (gzip, deflate) decoded within the body limit, zip bombs refused with 413,
unknown codings 415; ``read_body`` itself on a scripted ASGI ``receive``; and gzip through Granian."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import tracemalloc
import zlib

import pytest
from canpipe_testing import API_KEY, http, make_record, queued_records
from starlette.testclient import TestClient

from engine.body import BodyTooLarge, BodyUnreadable, UnsupportedEncoding, content_coding, read_body, within
from engine.config import Settings
from engine.queues import open_queue
from engine.receiver import create_app

KEY = "fleet1:s3cret-for-tests"
LIMIT = 64 * 1024
NDJSON = {"X-API-Key": KEY, "Content-Type": "application/x-ndjson"}


@pytest.fixture
def client(tmp_path):
    settings = Settings.from_env(
        {"CANPIPE_DATA_DIR": str(tmp_path), "CANPIPE_API_KEYS": KEY, "CANPIPE_MAX_BODY_BYTES": str(LIMIT)}
    )
    queue = open_queue(settings.queue_url, max_bytes=0)
    with TestClient(create_app(settings, queue), base_url="http://127.0.0.1") as client:
        client.queued = lambda: [m.body for m in client.portal.call(functools.partial(queue.receive, 10, 0.0))]
        yield client


def ndjson(count: int) -> bytes:
    return b"".join(json.dumps(make_record(i)).encode() + b"\n" for i in range(count))


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)  # the zlib format: what HTTP calls deflate (RFC 9110)


@pytest.mark.parametrize(
    "coding, compress",
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", deflate), ("GZIP", gzip.compress)],
)
def test_a_compressed_body_is_decoded_and_its_records_queued(client, coding, compress):
    body = ndjson(3)
    response = client.post("/ingest", content=compress(body), headers=NDJSON | {"Content-Encoding": coding})
    assert (response.status_code, response.json()) == (202, {"accepted": 3})
    stored = b"".join(client.queued()).splitlines()
    sent = [json.loads(line) for line in body.splitlines()]
    assert [json.loads(line)["payload"] for line in stored] == [record["payload"] for record in sent]


def test_identity_and_concatenated_gzip_members_are_accepted(client):
    response = client.post("/ingest", content=ndjson(1), headers=NDJSON | {"Content-Encoding": "identity"})
    assert response.status_code == 202
    members = gzip.compress(ndjson(2)) + gzip.compress(json.dumps(make_record(7)).encode())
    response = client.post("/ingest", content=members, headers=NDJSON | {"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (202, {"accepted": 3})


@pytest.mark.parametrize("coding", ["zstd", "br", "compress", "gzip, deflate", "bogus"])
def test_an_encoding_the_receiver_does_not_decode_is_415_and_queues_nothing(client, coding):
    response = client.post("/ingest", content=gzip.compress(ndjson(1)), headers=NDJSON | {"Content-Encoding": coding})
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert coding in response.json()["detail"]
    assert client.queued() == []


def test_a_zip_bomb_is_413_without_inflating_it(client):
    bomb = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]")  # 50 MiB of JSON in ~50 KiB
    assert len(bomb) < LIMIT
    response = client.post("/ingest", content=bomb, headers=NDJSON | {"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert client.queued() == []


def test_a_body_just_within_the_limit_once_decompressed_is_accepted_and_one_over_is_413(client):
    body = ndjson(1)
    padded = body + b" " * (LIMIT - len(body))
    ok = client.post("/ingest", content=gzip.compress(padded), headers=NDJSON | {"Content-Encoding": "gzip"})
    assert ok.status_code == 202
    over = client.post("/ingest", content=gzip.compress(padded + b" "), headers=NDJSON | {"Content-Encoding": "gzip"})
    assert over.status_code == 413


@pytest.mark.parametrize(
    "content", [gzip.compress(ndjson(2))[:-12], b"not gzip at all", gzip.compress(ndjson(1)) + b"trailing junk"]
)
def test_a_body_that_does_not_decompress_is_400(client, content):
    response = client.post("/ingest", content=content, headers=NDJSON | {"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert response.json()["error"] == "bad_body"
    assert client.queued() == []


def test_content_coding_names_what_it_refuses():
    assert content_coding(None) is None and content_coding(b"identity") is None and content_coding(b" ") is None
    assert content_coding(b"gzip") == content_coding(b"identity, gzip") == 31
    with pytest.raises(UnsupportedEncoding, match="zstd"):
        content_coding(b"zstd")


def script(*messages: dict) -> object:
    """An ASGI ``receive`` that hands out ``messages`` in order."""
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


def chunks(data: bytes, size: int) -> list[dict]:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


def read(receive, headers: list[tuple[bytes, bytes]], limit: int = LIMIT, timeout_s: float = 5.0) -> bytes:
    return asyncio.run(read_body(receive, headers, limit, timeout_s))


def test_read_body_inflates_a_body_streamed_in_small_chunks():
    body = ndjson(200)
    packed = gzip.compress(body)
    headers = [(b"content-encoding", b"gzip"), (b"content-length", str(len(packed)).encode())]
    assert read(script(*chunks(packed, 100)), headers, limit=len(body)) == body
    with pytest.raises(BodyTooLarge):
        read(script(*chunks(packed, 100)), headers, limit=len(body) - 1)
    assert read(script(*chunks(body, 1000)), [], limit=len(body)) == body
    with pytest.raises(BodyTooLarge):  # chunked, no Content-Length: counted as it arrives
        read(script(*chunks(body, 1000)), [], limit=len(body) - 1)


def test_read_body_bounds_memory_by_the_limit_not_by_the_bomb():
    bomb = gzip.compress(bytes(200 * 1024 * 1024))  # 200 MiB of zeros in ~200 KiB
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            read(script(*chunks(bomb, 16 * 1024)), [(b"content-encoding", b"gzip")], limit=1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak:,} bytes while refusing a 200 MiB bomb with a 1 MiB limit"


def test_read_body_refuses_a_declared_length_over_the_limit_before_reading():
    with pytest.raises(BodyTooLarge):
        read(script(), [(b"content-length", str(LIMIT + 1).encode())])


def test_read_body_says_when_the_client_went_away_or_was_too_slow():
    with pytest.raises(BodyUnreadable):
        read(script({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}), [])

    async def never() -> dict:
        await asyncio.sleep(10)
        return {}

    with pytest.raises(TimeoutError):
        read(never, [], timeout_s=0.05)


def test_a_gzip_body_through_granian_is_queued(serve, env, data_dir):
    url = serve(env)
    body = gzip.compress(b"".join(json.dumps(make_record(i)).encode() + b"\n" for i in range(5)))
    headers = {"Content-Type": "application/x-ndjson", "X-API-Key": API_KEY, "Content-Encoding": "gzip"}
    status, _, answer = http("POST", url + "/ingest", body, headers)
    assert (status, json.loads(answer)) == (202, {"accepted": 5})
    assert len(queued_records(data_dir)) == 5
    status, _, answer = http("POST", url + "/ingest", body, headers | {"Content-Encoding": "zstd"})
    assert status == 415


def test_within_is_a_timeout_only_when_its_own_deadline_passed():
    async def cancelled_by_its_caller() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.01, task.cancel)
        await within(5.0, asyncio.sleep(10))

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled_by_its_caller())
    assert asyncio.run(within(5.0, asyncio.sleep(0, "done"))) == "done"
