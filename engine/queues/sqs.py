"""The SQS backend (aiobotocore): AWS SQS or any SQS-compatible endpoint.

Selected when CANPIPE_QUEUE_URL is an SQS queue URL. The endpoint comes from AWS_ENDPOINT_URL_SQS or
AWS_ENDPOINT_URL, else from the queue URL itself; region and credentials from the standard AWS variables.
The SDK's retry mode is set explicitly (standard, 3 attempts), never left to the legacy default.

Bodies: SQS wants text. A body of canpipe NDJSON is sent as is when small, and as ``z:`` + base64(zlib)
otherwise: telemetry JSON shrinks about 5x, and SQS bills every 64 KiB of a request as one request, so
this is what brings the cost under 10 requests per 1,000 records. Receiving undoes it, so the consumer
gets exactly the bytes the receiver encoded.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import importlib.util
import json
import os
import re
import zlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from engine.errors import ConfigError, QueueError
from engine.queues import MAX_BATCH_ENTRIES, Queue, QueueAttributes, QueueProfile, QueueStats, QueueUsage, Received

BILLING_CHUNK_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024  # until the queue's own MaximumMessageSize is read
COMPRESS_ABOVE_BYTES = 2048
INSTALL_HINT = "pip install 'canpipe[sqs]'"  # aiobotocore is optional: the embedded queue does not need it
_REGION_IN_HOST = re.compile(r"sqs[.-]([a-z0-9-]+)\.amazonaws\.com")
_SYSTEM_ATTRIBUTES = ["SentTimestamp", "ApproximateFirstReceiveTimestamp", "ApproximateReceiveCount"]


def encode_body(body: bytes) -> str:
    if len(body) <= COMPRESS_ABOVE_BYTES:
        return body.decode()
    return "z:" + base64.b64encode(zlib.compress(body, 1)).decode("ascii")


def decode_body(text: str) -> bytes:
    if text.startswith("z:"):
        return zlib.decompress(base64.b64decode(text[2:]))
    return text.encode()


def _billed_units(payload_bytes: int) -> int:
    return max(1, -(-payload_bytes // BILLING_CHUNK_BYTES))


class SqsQueue:
    """The SQS backend. One aiobotocore client per instance, created on first use."""

    def __init__(self, url: str, *, visibility_timeout_s: float | None = None) -> None:
        if importlib.util.find_spec("aiobotocore") is None:  # said at start-up, not at the first call
            raise ConfigError(f"CANPIPE_QUEUE_URL {url} is an SQS queue, which needs aiobotocore: {INSTALL_HINT}")
        self.url = url
        self.name = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
        self.visibility_timeout_s = visibility_timeout_s
        self._max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES * 3 // 4  # raw bytes: base64 of incompressible data fits
        self._max_request_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.calls: collections.Counter[str] = collections.Counter()
        self.billed_requests = 0
        self._client: Any = None
        self._client_cm: Any = None
        self._closed = False
        self._limits_read = False

    @property
    def profile(self) -> QueueProfile:
        return QueueProfile(
            max_message_bytes=self._max_message_bytes,
            send_concurrency=16,  # concurrent SendMessageBatch calls per publisher
            send_linger_s=0.05,  # a publisher gathers requests this long: fewer, fuller (cheaper) calls
            receive_interval_s=0.2,  # SQS bills every receive, even an empty one
        )

    def usage(self) -> QueueUsage | None:
        return QueueUsage(requests_by_action=dict(self.calls), billed_requests=self.billed_requests)

    # --- plumbing -------------------------------------------------------------------------------

    async def _sqs(self) -> Any:
        if self._client is None:
            try:
                from aiobotocore.session import get_session
                from botocore.config import Config
            except ImportError as exc:  # pragma: no cover - found by __init__; only a broken install gets here
                raise QueueError(f"the SQS backend needs aiobotocore: {INSTALL_HINT}") from exc
            parts = urlsplit(self.url)
            endpoint = (
                os.environ.get("AWS_ENDPOINT_URL_SQS")
                or os.environ.get("AWS_ENDPOINT_URL")
                or f"{parts.scheme}://{parts.netloc}"
            )
            match = _REGION_IN_HOST.search(parts.netloc)
            region = (
                os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION")
                or (match.group(1) if match else "us-east-1")
            )
            config = Config(
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=5,
                read_timeout=30,
                max_pool_connections=32,
            )
            self._client_cm = get_session().create_client(
                "sqs", region_name=region, endpoint_url=endpoint, config=config
            )
            self._client = await self._client_cm.__aenter__()
        return self._client

    async def _call(self, action: str, payload_bytes: int = 0, **params: Any) -> dict:
        if self._closed:  # a closed client is not reopened behind the caller's back (it would leak a session)
            raise QueueError(f"SQS queue {self.url}: this client is closed")
        client = await self._sqs()
        method = getattr(client, re.sub(r"(?<!^)(?=[A-Z])", "_", action).lower())
        self.calls[action] += 1
        try:
            response = await method(**params)
        except Exception as exc:  # botocore raises many types: connection, client, credential errors
            self.billed_requests += 1
            raise QueueError(f"SQS {action} on {self.url} failed: {exc}; {_advice(exc)}") from exc
        self.billed_requests += _billed_units(max(payload_bytes, _response_bytes(response)))
        return response

    async def _read_limits(self) -> None:
        if not self._limits_read:
            attrs = (await self._call("GetQueueAttributes", QueueUrl=self.url, AttributeNames=["MaximumMessageSize"]))[
                "Attributes"
            ]
            limit = int(attrs.get("MaximumMessageSize", DEFAULT_MAX_MESSAGE_BYTES))
            self._max_request_bytes = limit
            self._max_message_bytes = limit * 3 // 4
            self._limits_read = True

    # --- protocol -------------------------------------------------------------------------------

    async def send_batch(self, bodies: Sequence[bytes]) -> list[int]:
        await self._read_limits()
        texts = [encode_body(body) for body in bodies]
        for text in texts:
            if len(text.encode()) > self._max_request_bytes:
                raise QueueError(f"an encoded message of {len(text)} bytes exceeds {self._max_request_bytes}")
        failed: list[int] = []
        # one call carries at most 10 entries and at most MaximumMessageSize bytes in all
        group: list[int] = []
        size = 0
        for index, text in enumerate(texts):
            if group and (len(group) == MAX_BATCH_ENTRIES or size + len(text) > self._max_request_bytes):
                failed += await self._send_group(group, texts, size)
                group, size = [], 0
            group.append(index)
            size += len(text)
        if group:
            failed += await self._send_group(group, texts, size)
        return failed

    async def _send_group(self, group: list[int], texts: list[str], size: int) -> list[int]:
        response = await self._call(
            "SendMessageBatch",
            size,
            QueueUrl=self.url,
            Entries=[{"Id": str(i), "MessageBody": texts[i]} for i in group],
        )
        return sorted(int(entry["Id"]) for entry in response.get("Failed", []))

    async def receive(self, max_messages: int = 10, wait_s: float = 20.0) -> list[Received]:
        params: dict[str, Any] = {
            "QueueUrl": self.url,
            "MaxNumberOfMessages": min(10, max_messages),
            "WaitTimeSeconds": int(max(0, min(20, round(wait_s)))),
            "MessageSystemAttributeNames": _SYSTEM_ATTRIBUTES,
        }
        if self.visibility_timeout_s is not None:
            params["VisibilityTimeout"] = int(self.visibility_timeout_s)
        response = await self._call("ReceiveMessage", **params)
        out = []
        for message in response.get("Messages", []):
            attrs = message.get("Attributes", {})
            sent = int(attrs.get("SentTimestamp", 0))
            out.append(
                Received(
                    message["MessageId"],
                    message["ReceiptHandle"],
                    decode_body(message["Body"]),
                    sent,
                    int(attrs.get("ApproximateFirstReceiveTimestamp", sent)),
                    int(attrs.get("ApproximateReceiveCount", 1)),
                )
            )
        return out

    async def delete_batch(self, receipts: Sequence[str]) -> list[str]:
        failed: list[str] = []
        for start in range(0, len(receipts), MAX_BATCH_ENTRIES):
            chunk = receipts[start : start + MAX_BATCH_ENTRIES]
            response = await self._call(
                "DeleteMessageBatch",
                QueueUrl=self.url,
                Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(chunk)],
            )
            failed += [chunk[int(entry["Id"])] for entry in response.get("Failed", [])]
        return failed

    async def change_visibility(self, receipts: Sequence[str], timeout_s: float) -> None:
        for start in range(0, len(receipts), MAX_BATCH_ENTRIES):
            chunk = receipts[start : start + MAX_BATCH_ENTRIES]
            await self._call(
                "ChangeMessageVisibilityBatch",
                QueueUrl=self.url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": int(timeout_s)} for i, r in enumerate(chunk)
                ],
            )

    async def _attributes(self, url: str, names: list[str]) -> dict[str, str]:
        return (await self._call("GetQueueAttributes", QueueUrl=url, AttributeNames=names))["Attributes"]

    async def _dlq_url(self) -> str | None:
        policy = (await self._attributes(self.url, ["RedrivePolicy"])).get("RedrivePolicy")
        if not policy:
            return None
        dlq_name = json.loads(policy)["deadLetterTargetArn"].rsplit(":", 1)[-1]
        return (await self._call("GetQueueUrl", QueueName=dlq_name))["QueueUrl"]

    async def stats(self) -> QueueStats:
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        attrs = await self._attributes(self.url, names)
        dlq = await self._dlq_url()
        dead = int((await self._attributes(dlq, names[:1]))["ApproximateNumberOfMessages"]) if dlq else 0
        return QueueStats(
            visible=int(attrs[names[0]]), in_flight=int(attrs[names[1]]), delayed=int(attrs[names[2]]), dead_letter=dead
        )

    async def create(self, attributes: QueueAttributes = QueueAttributes()) -> None:
        dlq = await self._call(
            "CreateQueue",
            QueueName=f"{self.name}-dlq",
            Attributes={"MessageRetentionPeriod": str(attributes.dlq_retention_s)},
        )
        dlq_arn = (await self._attributes(dlq["QueueUrl"], ["QueueArn"]))["QueueArn"]
        settings = {
            "MessageRetentionPeriod": str(attributes.retention_s),
            "VisibilityTimeout": str(attributes.visibility_timeout_s),
            "ReceiveMessageWaitTimeSeconds": str(attributes.receive_wait_s),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(attributes.max_receive_count)}
            ),
        }
        created = await self._call("CreateQueue", QueueName=self.name, Attributes=settings)
        if created["QueueUrl"].rstrip("/").rsplit("/", 1)[-1] != self.name:  # pragma: no cover - defensive
            raise QueueError(f"SQS created {created['QueueUrl']}, not {self.url}")
        # an existing queue keeps its old attributes on CreateQueue: set them explicitly
        await self._call("SetQueueAttributes", QueueUrl=self.url, Attributes=settings)

    async def purge(self) -> int:
        before = (await self.stats()).visible
        await self._call("PurgeQueue", QueueUrl=self.url)
        return before

    async def redrive(self) -> int:
        """Move dead-lettered messages back, bodies untouched (send first, then delete: never lost)."""
        dlq = await self._dlq_url()
        if dlq is None:
            return 0
        moved = 0
        while True:
            response = await self._call(
                "ReceiveMessage", QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=60
            )
            messages = response.get("Messages", [])
            if not messages:
                return moved
            sent = await self._call(
                "SendMessageBatch",
                sum(len(m["Body"]) for m in messages),
                QueueUrl=self.url,
                Entries=[{"Id": str(i), "MessageBody": m["Body"]} for i, m in enumerate(messages)],
            )
            ok = [messages[int(entry["Id"])] for entry in sent.get("Successful", [])]
            if ok:
                await self._call(
                    "DeleteMessageBatch",
                    QueueUrl=dlq,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(ok)],
                )
            moved += len(ok)

    async def ping(self) -> None:
        self._limits_read = False
        await self._read_limits()

    async def close(self) -> None:
        self._closed = True
        if self._client_cm is not None:
            with contextlib.suppress(Exception):
                await self._client_cm.__aexit__(None, None, None)
            self._client = self._client_cm = None


def _response_bytes(response: dict) -> int:
    return sum(len(m.get("Body", "")) for m in response.get("Messages", []))


def _advice(exc: Exception) -> str:
    """What to do about a failed SQS call, by the kind of botocore error (matched by name: no import)."""
    kind = type(exc).__name__
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
        return "the queue does not exist: create it with `canpipe queue create`"
    if kind in {"NoCredentialsError", "PartialCredentialsError"} or code in {
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AccessDeniedException",
    }:
        return "check the AWS credentials and the IAM policy (docs/operations.md); canpipe keeps retrying"
    if "Connect" in kind or "Endpoint" in kind or "Timeout" in kind:
        return "the SQS endpoint is unreachable (is it up? AWS_ENDPOINT_URL_SQS, network); canpipe keeps retrying"
    return "canpipe keeps retrying"


_: type[Queue] = SqsQueue  # mypy: the backend offers every member of the protocol
