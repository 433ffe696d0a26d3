"""The proxy's upstream client: keep-alive HTTP/1.1 connections to the engines.

Why not a general-purpose client: profiled under load, aiohttp's client took about 30% of the proxy's
CPU per request (two upstream requests per client request, each building request and response objects,
header multidicts, timers and payload wrappers; `docs/serving.md`, Performance). The legs to the
engines have one known shape — a small JSON POST (or a health GET), an answer read whole or relayed as
it streams — so here a request is one `transport.write` and the answer is parsed by httptools (the C
parser uvicorn uses), chunked transfer encoding included.

- `Endpoint.of("http://host:port")`: one engine and its idle connections (`https://` engines are
  verified against the system's CAs; `SSL_CERT_FILE` adds a private one);
- `await client.request(endpoint, method, path, headers, body, deadline)` -> `UpstreamResponse`
  once the status line and headers arrived (`deadline`: event-loop time); then
  `await response.read(deadline, max_bytes)` (the whole body) or
  `async for chunk in response.chunks(idle_timeout_s)`, and `response.close()` (idempotent).

A connection is reused only after an answer was read to its end with keep-alive. Idle connections
expire after `keepalive_s`, which must stay below the engines' own keep-alive timeout (5 s for vLLM's
uvicorn server), so no request is written to a connection the engine is closing; a connection the
engine closed (EOF) is never reused. An error, a timeout, a cancellation or an answer dropped
half-read closes its connection. Reading pauses while more than `HIGH_WATER_BYTES` of an answer wait
for a slow consumer. An answer's status line and headers may take at most `max_head_bytes` (the parser
never sees more: httptools joins a header that arrives in pieces by concatenation, so an unbounded
head costs time quadratic in its size), and the framing of a chunked body with its trailers at most
`max_head_bytes` plus 64 bytes per chunk. Errors are `UpstreamError`s (`eldr.errors`): connection
refused or lost `UpstreamConnectionError`, no answer in time `UpstreamTimeout` (a `TimeoutError`),
malformed answer `UpstreamProtocolError`, an answer or its head over its size limit `AnswerTooLarge`.
Endpoints are kept per engine identity (`engineurl.url_identity`): `localhost` and `127.0.0.1` share
one pool of connections.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

from eldr.engineurl import url_identity
from eldr.errors import (
    AnswerTooLarge,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from eldr.proxy.config import check_url

HIGH_WATER_BYTES = 256 * 1024  # pause reading from an engine above this much unconsumed answer
LOW_WATER_BYTES = 64 * 1024
DEFAULT_MAX_HEAD_BYTES = 64 * 1024  # an answer's status line + headers
CHUNK_OVERHEAD_BYTES = 64  # per chunk of a chunked answer: its size line and CRLFs


@dataclass(eq=False)
class Endpoint:
    """One engine's address and its idle keep-alive connections."""

    host: str
    port: int
    host_header: bytes
    is_tls: bool = False
    idle: deque[_Connection] = field(default_factory=deque)

    @classmethod
    def of(cls, url: str) -> Endpoint:
        parts = urlsplit(check_url(url))  # http(s), a host, a valid port, no credentials: ConfigError
        is_tls = parts.scheme == "https"
        host, port = str(parts.hostname), parts.port
        name = f"[{host}]" if ":" in host else host
        host_header = name if port is None else f"{name}:{port}"
        return cls(host, port or (443 if is_tls else 80), host_header.encode("idna"), is_tls)


def _timeout_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("no answer from the engine in time"))


class UpstreamResponse:
    """An engine's answer: status and headers now, the body as it arrives."""

    __slots__ = (
        "_conn",
        "_error",
        "_is_done",
        "_is_released",
        "_num_buffered",
        "_parts",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[bytes, bytes] = {}  # lower-case names
        self._parts: deque[bytes] = deque()
        self._num_buffered = 0
        self._is_done = False
        self._is_released = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> bytes:
        return self.headers.get(b"content-type", b"application/json")

    # ---- fed by the connection (parser callbacks, connection_lost)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._parts.append(data)
        self._num_buffered += len(data)
        self._conn.num_body += len(data)
        if self._num_buffered > HIGH_WATER_BYTES:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._is_done = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._is_done and self._error is None:  # the first reason stands
            self._error = error
            self._wake()

    # ---- read by the proxy

    async def _wait(self, deadline: float | None) -> None:
        loop = self._conn.loop
        waiter = self._waiter = loop.create_future()
        handle = loop.call_at(deadline, _timeout_waiter, waiter) if deadline is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _take(self) -> bytes:
        parts = self._parts
        data = parts.popleft() if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self._num_buffered = 0
        self._conn.resume()
        return data

    async def next_chunk(self, idle_timeout_s: float | None = None) -> bytes:
        """The body bytes that arrived since the last call, waiting for some; b"" at the end.

        `UpstreamTimeout` if nothing came for `idle_timeout_s`."""
        while not self._parts:
            if self._error is not None:
                raise self._error
            if self._is_done:
                self.close()
                return b""
            await self._wait(None if idle_timeout_s is None else self._conn.loop.time() + idle_timeout_s)
        return self._take()

    async def chunks(self, idle_timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives (see `next_chunk`)."""
        while chunk := await self.next_chunk(idle_timeout_s):
            yield chunk

    async def read(self, deadline: float | None = None, max_bytes: int | None = None) -> bytes:
        """The whole body; `UpstreamTimeout` if it is not in by `deadline` (event-loop time),
        `AnswerTooLarge` once more than `max_bytes` arrived. Closes the answer, whatever happens."""
        body: list[bytes] = []
        size = 0
        try:
            while True:
                if self._parts:  # taken as it comes: reading resumes if it paused above the high water
                    body.append(self._take())
                    size += len(body[-1])
                    if max_bytes is not None and size > max_bytes:
                        raise AnswerTooLarge(f"answer over {max_bytes} bytes")
                if self._error is not None:
                    raise self._error
                if self._is_done:
                    return body[0] if len(body) == 1 else b"".join(body)
                await self._wait(deadline)
        finally:
            self.close()

    def close(self) -> None:
        """Give the connection back (answer read to its end, keep-alive) or close it."""
        if self._is_released:
            return
        self._is_released = True
        self._conn.release(self, is_clean=self._is_done and self._error is None)


class _Connection(asyncio.Protocol):
    """One TCP connection to an engine; at most one request on it at a time."""

    def __init__(
        self,
        endpoint: Endpoint,
        loop: asyncio.AbstractEventLoop,
        keepalive_s: float,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    ) -> None:
        self.endpoint, self.loop, self.keepalive_s = endpoint, loop, keepalive_s
        self.max_head_bytes = max_head_bytes
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.headers_waiter: asyncio.Future[None] | None = None
        self.is_open = True
        self.is_paused = False
        self.idle_since = 0.0
        self.on_release: Callable[[], None] | None = None
        self.num_received = 0  # bytes received since the current request was sent
        self.num_head = 0  # of which status lines and headers (before the final answer's headers ended)
        self.num_body = 0  # of which body bytes passed on
        self.num_chunks = 0  # chunks of a chunked body
        self.num_trailer = 0  # bytes of its trailers
        self.is_in_head = True  # the final answer's headers have not ended yet
        self.is_interim = False  # parsing a 1xx answer

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.num_received += len(data)
        response = self.response
        if response is None or response._is_done:  # talking out of turn: never trust this connection
            self.close()
            return
        if self.is_in_head:
            room = self.max_head_bytes - self.num_head
            if len(data) > room:  # the parser never sees more of a head than the limit
                self.num_head += room
                if not self._parse(data[:room]):
                    return
                if self.is_in_head:
                    self._fail(AnswerTooLarge(f"answer head over {self.max_head_bytes} bytes"))
                    self.close()
                    return
                data = data[room:]
            else:
                self.num_head += len(data)
        if not self._parse(data):
            return
        framing = self.num_received - self.num_head - self.num_body
        if framing > self.max_head_bytes + CHUNK_OVERHEAD_BYTES * (self.num_chunks + 1):
            self._fail(AnswerTooLarge(f"answer framing and trailers over {self.max_head_bytes} bytes"))
            self.close()

    def _parse(self, data: bytes) -> bool:
        """Feed the parser; False (connection closed) when the data is not HTTP."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"malformed answer: {exc}"))
            self.close()
            return False
        return True

    def eof_received(self) -> bool:
        self.is_open = False
        response = self.response
        if response is not None and response.status and not response._is_done:
            headers = response.headers
            if b"content-length" not in headers and b"transfer-encoding" not in headers:
                response._finish()  # an answer delimited by the connection's end (RFC 9112 §6.3)
        self._fail(UpstreamConnectionError("connection closed by the engine"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        self._fail(
            UpstreamConnectionError(f"connection lost: {exc}" if exc else "connection closed by the engine")
        )

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        assert self.response is not None
        if self.response._is_done:  # a second answer to one request
            raise UpstreamProtocolError("the engine sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        if not self.response.status:  # trailers (after a chunked body) do not replace headers
            self.response.headers[name.lower()] = value
            return
        self.num_trailer += len(name) + len(value) + 4
        if self.num_trailer > self.max_head_bytes:
            self._fail(AnswerTooLarge(f"answer framing and trailers over {self.max_head_bytes} bytes"))
            raise UpstreamError("trailers too large")  # stops the parser

    def on_headers_complete(self) -> None:
        assert self.response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.is_interim = True
            self.response.headers.clear()
            return
        self.is_in_head = False
        self.response.status = status
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_chunk_header(self) -> None:
        self.num_chunks += 1

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self.is_interim:
            self.is_interim = False
            return
        if not self.parser.should_keep_alive():
            self.is_open = False
        self.response._finish()

    # ---- used by the client and the response

    def _fail(self, error: UpstreamError) -> None:
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.response is not None:
            self.response._fail(error)

    def pause(self) -> None:
        if not self.is_paused and self.is_open:
            self.is_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.is_paused and self.is_open:
            self.is_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.is_open = False
        if self.transport is not None:
            self.transport.close()

    def release(self, response: UpstreamResponse, *, is_clean: bool) -> None:
        if response is not self.response:
            return
        self.response = None
        self.headers_waiter = None
        if self.on_release is not None:
            self.on_release()
            self.on_release = None
        if is_clean and self.is_open and not self.transport.is_closing():
            self.resume()
            self.parser = httptools.HttpResponseParser(self)
            self.num_received = self.num_head = self.num_body = self.num_chunks = self.num_trailer = 0
            self.is_in_head = True
            self.idle_since = self.loop.time()
            self.endpoint.idle.append(self)
        else:
            self.close()

    def is_reusable(self, now: float) -> bool:
        return self.is_open and not self.transport.is_closing() and now - self.idle_since < self.keepalive_s


class UpstreamClient:
    """Requests to engines over pooled keep-alive connections (one client per proxy)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        keepalive_s: float = 2.0,
        tls: ssl.SSLContext | None = None,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_head_bytes = max_head_bytes
        self._tls = tls  # for https engines; made on first use: the system's CAs (and SSL_CERT_FILE)
        self._endpoints: dict[str, Endpoint] = {}  # by URL as given (the hot path's lookup)
        self._by_identity: dict[str, Endpoint] = {}
        self.num_in_use = 0  # connections carrying a request whose answer is not closed yet

    def endpoint(self, url: str) -> Endpoint:
        """The endpoint of an engine's base URL (one per engine: it holds the idle connections)."""
        found = self._endpoints.get(url)
        if found is None:
            identity = url_identity(url)
            found = self._by_identity.get(identity)
            if found is None:
                found = self._by_identity[identity] = Endpoint.of(url)
            self._endpoints[url] = found
        return found

    def forget(self, url: str) -> None:
        """Close the idle connections of an engine that left the pool."""
        identity = url_identity(url)
        for name in [u for u, e in self._endpoints.items() if e is self._by_identity.get(identity)]:
            del self._endpoints[name]
        endpoint = self._by_identity.pop(identity, None)
        while endpoint is not None and endpoint.idle:
            endpoint.idle.pop().close()

    async def _connection(
        self, endpoint: Endpoint, deadline: float | None, *, is_new: bool = False
    ) -> tuple[_Connection, bool]:
        """An idle connection (True) or a new one (False); `is_new`: always a new one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = endpoint.idle
        while idle and not is_new:
            conn = idle.pop()  # the most recently used: the least likely to be expiring
            if conn.is_reusable(now):
                return conn, True
            conn.close()
        timeout_s = (
            self.connect_timeout_s if deadline is None else min(self.connect_timeout_s, deadline - now)
        )
        tls: dict[str, Any] = {}
        if endpoint.is_tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = {"ssl": self._tls, "server_hostname": endpoint.host}
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(endpoint, loop, self.keepalive_s, self.max_head_bytes),
                    endpoint.host,
                    endpoint.port,
                    **tls,
                )
        except OSError as exc:  # ssl.SSLError (a certificate refused) is one too
            raise UpstreamConnectionError(
                f"cannot connect to {endpoint.host}:{endpoint.port}: {exc}"
            ) from exc
        return conn, False

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes = b"",
        deadline: float | None = None,
        *,
        is_replayable: bool = True,
    ) -> UpstreamResponse:
        """Send a request; returns when the answer's headers are in, `UpstreamTimeout` if they are not
        by `deadline` (event-loop time).

        A reused connection that the engine closes before sending a single byte back (it was closing
        the idle connection as the request went out) is replaced by a new connection, once, for a
        request that may run twice (`is_replayable`): the engine may have taken it before closing.
        """
        head = _request_head(method, path, endpoint.host_header, headers, len(body))
        conn, is_reused = await self._connection(endpoint, deadline)
        try:
            return await self._send(conn, head, body, deadline)
        except UpstreamTimeout:  # no connection the engine closed: never sent again
            raise
        except UpstreamError:
            if not (is_replayable and is_reused) or conn.num_received:
                raise
        conn, _ = await self._connection(endpoint, deadline, is_new=True)
        return await self._send(conn, head, body, deadline)

    async def _send(
        self, conn: _Connection, head: bytes, body: bytes, deadline: float | None
    ) -> UpstreamResponse:
        response = conn.response = UpstreamResponse(conn)
        self.num_in_use += 1
        conn.on_release = self._released
        waiter = conn.headers_waiter = conn.loop.create_future()
        handle = conn.loop.call_at(deadline, _timeout_waiter, waiter) if deadline is not None else None
        try:
            if len(body) < 65536:
                conn.transport.write(head + body)
            else:
                conn.transport.writelines((head, body))
            await waiter
        except BaseException:
            response.close()
            raise
        finally:
            if handle is not None:
                handle.cancel()
        return response

    def _released(self) -> None:
        self.num_in_use -= 1

    async def close(self) -> None:
        """Close every idle connection (in-use ones close when their answers are closed)."""
        for url in list(self._endpoints):
            if url in self._endpoints:
                self.forget(url)


def _request_head(method: str, path: str, host: bytes, headers: dict[str, str], num_bytes: int) -> bytes:
    text = [f"{method} {path} HTTP/1.1\r\n"]
    if num_bytes or method == "POST":
        text.append(f"Content-Length: {num_bytes}\r\n")
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise UpstreamError(f"header {name} holds a line break")
        text.append(f"{name}: {value}\r\n")
    try:
        return b"".join((*(line.encode("latin-1") for line in text), b"Host: ", host, b"\r\n\r\n"))
    except UnicodeEncodeError as exc:
        raise UpstreamError(f"a header is not latin-1 text: {exc}") from None
