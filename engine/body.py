"""The request body of a raw ASGI request: its size limit, its deadline and its ``Content-Encoding``.

``read_body`` is the one way a route reads a body (``/ingest``; any route that takes records): the limit
holds for the bytes received and for what they decompress to, so a zip bomb is refused with 413 after at
most ``limit + 1`` inflated bytes, and a body trickled in slower than the deadline gets 408.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class BodyTooLarge(Exception):
    """The body, or what it decompresses to, is over the limit (413)."""


class BodyUnreadable(Exception):
    """The body ended early (a client gone, a malformed chunked body) or does not decompress (400)."""


class UnsupportedEncoding(Exception):
    """A ``Content-Encoding`` the receiver does not decode (415)."""


# Content-Encoding -> zlib's wbits: gzip (RFC 1952), deflate as RFC 9110 defines it (the zlib format, RFC 1950).
# zstd is not among them: Python 3.11 has no zstd decoder without a third-party module.
_CODINGS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}


# what reading a body may raise besides a disconnect: each is answered by the receiver's ``body_refusal``
READ_ERRORS = (UnsupportedEncoding, BodyTooLarge, TimeoutError, BodyUnreadable)


def content_coding(header: bytes | None) -> int | None:
    """zlib's wbits for a ``Content-Encoding`` header value, None for none or ``identity``; raise
    ``UnsupportedEncoding`` for anything else (several codings stacked included)."""
    if not header:
        return None
    codings = [c for c in header.lower().replace(b" ", b"").split(b",") if c and c != b"identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in _CODINGS:
        raise UnsupportedEncoding(header.decode("latin-1"))
    return _CODINGS[codings[0]]


class _Inflater:
    """Streaming decompression bounded by ``limit`` bytes of output: a zip bomb stops at ``limit + 1`` bytes
    (``max_length``), never inflated whole in memory. Concatenated gzip members are decoded one after another."""

    def __init__(self, wbits: int, limit: int) -> None:
        self.wbits = wbits
        self.room = limit
        self.engine = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                piece = self.engine.decompress(data, self.room + 1)
            except zlib.error as exc:
                raise BodyUnreadable(f"the body does not decompress: {exc}") from None
            if len(piece) > self.room:
                raise BodyTooLarge
            self.room -= len(piece)
            out.append(piece)
            data = self.engine.unconsumed_tail  # empty: max_length was not reached
            if self.engine.eof and self.engine.unused_data:  # another gzip member follows
                data, self.engine = self.engine.unused_data, zlib.decompressobj(self.wbits)
        return b"".join(out)

    def finish(self) -> None:
        if not self.engine.eof:
            raise BodyUnreadable("the compressed body is truncated")


async def receive_body(receive: Receive, declared: bytes | None, *, wbits: int | None, limit: int) -> bytes:
    """``read_body`` for a caller that already has the ``Content-Length`` value (``declared``) and the
    coding's wbits (``content_coding``) from its own pass over the headers; no deadline of its own."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    inflater = None if wbits is None else _Inflater(wbits, limit)
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: the client is gone before the body's end
            raise BodyUnreadable("the body could not be read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if inflater is not None:
            chunk = inflater.feed(chunk)
        if not message.get("more_body", False):
            if inflater is not None:
                inflater.finish()
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def read_body(
    receive: Receive, headers: Iterable[tuple[bytes, bytes]], limit_bytes: int, timeout_s: float
) -> bytes:
    """The body of a raw ASGI request (``scope["headers"]``, ``receive``), decompressed per its
    ``Content-Encoding`` (gzip, deflate; none or identity as is), at most ``limit_bytes`` both as received and
    decompressed, within ``timeout_s`` seconds.

    Raises ``BodyTooLarge`` (413; a declared Content-Length over the limit before reading anything),
    ``TimeoutError`` (408), ``BodyUnreadable`` (400: the client went away, a malformed chunked body, a body
    that does not decompress) and ``UnsupportedEncoding`` (415). After any of them the connection cannot be
    reused: answer with ``Connection: close``.
    """
    declared = coding = None
    for name, value in headers:
        if name == b"content-length":
            declared = value
        elif name == b"content-encoding":
            coding = value
    return await within(timeout_s, receive_body(receive, declared, wbits=content_coding(coding), limit=limit_bytes))


async def within(timeout_s: float, work: Coroutine[Any, Any, T]) -> T:
    """``await work``, or ``TimeoutError`` after ``timeout_s`` seconds: ``asyncio.timeout`` for the request
    path, a third of its cost (one timer handle, no context manager object), since every request pays it."""
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        return await work
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:  # our cancel, not the caller's: a timeout
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
