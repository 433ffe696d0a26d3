"""The proxy's HTTP/1.1 server: the ASGI app served over httptools, with limits a hostile client
cannot outlast.

Why not uvicorn: its httptools protocol has no limit on a request's header block (httptools joins a
header that arrives in pieces by concatenation, so a 100 MB header block took the event loop ~10 s and
stalled every other request and the health checks), no time limit on a request's head or body, no cap
on open connections, and it closes a connection with `transport.close()`, which waits for the write
buffer to drain: a client that stopped reading kept its socket forever. This module is the small part
of a server the proxy needs (keep-alive, pipelining, chunked bodies both ways, `Expect: 100-continue`,
ASGI lifespan), with every limit enforced where the bytes arrive:

- `max_header_bytes`: a request line + headers larger than this is answered 431 and the connection
  closed; the parser never sees more than the limit, and the rest is never read;
- `header_timeout_s`: a head not complete this long after the connection opened (or after the first
  byte of a keep-alive request): 408, connection closed (a connection that sent nothing: closed);
- `body_timeout_s`: a body not complete this long after its head: 408 (if no answer started),
  connection closed; the app sees a disconnect;
- `write_timeout_s`: the connection's write buffer stays full (the client stopped reading) this long:
  the connection is aborted and the app sees a disconnect; a closing connection whose last answer is
  not taken within it is aborted too;
- `keep_alive_s`: an idle keep-alive connection is closed;
- `max_connections`: a connection beyond this many open ones gets 503 + `Retry-After` and is closed.

A request's chunk framing and trailers are bounded too (`max_header_bytes` plus 64 bytes per chunk,
else 400). Closing after an error answer lingers: reading stops, the answer and a FIN go out, and the
socket is closed a moment later, so that the client reads the answer instead of a reset.
Every trip is reported through `on_event(reason)` (the proxy counts them in
`eldr_client_protocol_errors_total`). Shutdown (`HttpServer.stop`) stops listening, closes idle
connections, lets running requests finish for up to `shutdown_timeout_s`, then aborts the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools
import orjson

from eldr.errors import ListenError

log = logging.getLogger("eldr.proxy")

BODY_HIGH_WATER_BYTES = 256 * 1024  # unread request body above which reading pauses
LINGER_S = 1.0  # after an error answer: how long the socket stays open for the client to read it
CHUNK_OVERHEAD_BYTES = 64  # per request-body chunk: size line and CRLFs allowed beyond max_header_bytes
_DISCONNECT = {"type": "http.disconnect"}
_ASGI = {"version": "3.0", "spec_version": "2.3"}


@dataclass(frozen=True)
class ServerLimits:
    """What one client connection may take (see the module's table)."""

    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    keep_alive_s: float = 75.0
    max_connections: int = 4096
    shutdown_timeout_s: float = 10.0


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {s.value: _status_line(s.value) for s in http.HTTPStatus}


def error_answer(status: int, message: str, kind: str, *, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP answer with an OpenAI-style error body that closes the connection."""
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
    head = _STATUS_LINES.get(status) or _status_line(status)
    extra = f"retry-after: {retry_after_s}\r\n".encode() if retry_after_s is not None else b""
    return (
        head
        + b"content-type: application/json\r\nconnection: close\r\n"
        + extra
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


_REFUSED = error_answer(503, "too many open connections", "service_unavailable", retry_after_s=1)
_TOO_LARGE = "request header block over {} bytes"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection


class _Cycle:
    """One request on a connection and its answer."""

    __slots__ = (
        "body",
        "body_bytes",
        "chunks",
        "conn",
        "expects_continue",
        "fed_after_head",
        "head",
        "is_body_delivered",
        "is_chunked",
        "is_complete",
        "is_disconnected",
        "is_head_request",
        "keep_alive",
        "received_body",
        "response_complete",
        "response_started",
        "scope",
        "trailer_bytes",
        "waiter",
    )

    def __init__(
        self, conn: _Connection, scope: dict[str, Any], keep_alive: bool, expects_continue: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expects_continue = expects_continue
        self.body: list[bytes] = []  # received body pieces the app has not taken yet
        self.body_bytes = 0  # their size
        self.received_body = 0  # every body byte received
        self.chunks = 0  # chunks of a chunked body (bounds its framing)
        self.fed_after_head = 0  # bytes parsed after the head: body, chunk framing, trailers
        self.trailer_bytes = 0
        self.is_complete = False  # the whole request arrived
        self.is_body_delivered = False  # the app got the last body message
        self.is_disconnected = False
        self.response_started = False
        self.response_complete = False
        self.is_chunked = False  # the answer goes out in chunked encoding
        self.head: bytes | None = None  # the answer's head, written with its first body bytes
        self.waiter: asyncio.Future[None] | None = None
        self.is_head_request = scope["method"] == "HEAD"

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.conn.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def receive(self) -> dict[str, Any]:
        """ASGI receive: body pieces as they arrive; then, once the answer is out or the client has
        gone, a disconnect."""
        while True:
            if self.is_disconnected or self.response_complete:
                return _DISCONNECT
            if not self.is_body_delivered and (self.body or self.is_complete):
                break
            if self.expects_continue and not self.response_started:
                self.expects_continue = False
                self.conn.write(_CONTINUE)
            await self._wait()
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.body_bytes = 0
        if self.is_complete:
            self.is_body_delivered = True
        else:
            self.conn.resume_body()
        return {"type": "http.request", "body": body, "more_body": not self.is_complete}

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI send: the answer's head is held back and written with its first body bytes."""
        if self.is_disconnected:
            return
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("http.response.start sent twice")
            self.response_started = True
            self.head = self._head(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body" or not self.response_started or self.response_complete:
            raise RuntimeError(f"ASGI message {kind!r} out of order")
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        head, self.head = self.head, None
        if self.is_head_request:
            body = b""
        if self.is_chunked:
            if body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        if head is not None:
            if len(body) < 65536:
                conn.write(head + body)
            else:
                conn.write(head)
                conn.write(body)
        elif body:
            conn.write(body)
        if not more:
            self.response_complete = True
            conn.response_done(self)
        elif conn.is_write_paused:
            await conn.drain()

    def _head(self, status: int, headers: Any) -> bytes:
        lines = [_STATUS_LINES.get(status) or _status_line(status)]
        has_length = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                has_length = True
            elif lower == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            lines.append(b"%b: %b\r\n" % (name, value))
        method = self.scope["method"]
        if not has_length and method != "HEAD" and status >= 200 and status not in (204, 304):
            if self.scope["http_version"] == "1.1":
                self.is_chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        if not self.keep_alive or not self.is_complete or self.conn.server.is_closing:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs one app call per request, in order.

    Timers (one at a time): a new connection has `header_timeout_s` for its first head; a request's
    head, once its first byte arrived, `header_timeout_s`; its body `body_timeout_s` after the head; an
    idle keep-alive connection `keep_alive_s`. While a request runs with its body read, none runs (a
    pipelined request's head is timed from the end of the answer before it). Writes have their own
    timer: `write_timeout_s` while the transport's buffer is full.
    """

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.parser = httptools.HttpRequestParser(self)
        self.cycles: deque[_Cycle] = deque()  # the running request first, then pipelined ones
        self.parsing: _Cycle | None = None  # the request whose body is being parsed
        self.url: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = True  # no request's body is being parsed: the bytes that come are a head
        self.head_bytes = 0  # bytes of the head being received
        self.head_counted = 0  # the same, as the parser reports it (url, names, values)
        self.timer: asyncio.TimerHandle | None = None
        self.is_idle_timer = False  # the armed timer is the keep-alive one
        self.write_timer: asyncio.TimerHandle | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.is_write_paused = False
        self.is_read_paused = False
        self.is_closed = False  # closing or closed by us: nothing more is read or written
        self.is_lost = False  # connection_lost ran
        self.is_refused = False  # an error was found in the bytes: nothing more is parsed
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= self.limits.max_connections or server.is_closing:
            self.is_closed = True
            server.event("connection_limit")
            self.transport.write(_REFUSED)
            self.transport.close()
            return
        server.connections.add(self)
        self.client = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = self.is_lost = True
        self.server.connections.discard(self)
        self._disarm()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        for cycle in self.cycles:
            cycle.is_disconnected = True
            cycle.wake()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.is_write_paused = True
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.limits.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self.is_write_paused = False
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.is_closed or self.is_refused:
            return
        if self.in_head:
            if self.is_idle_timer:  # the first byte of a keep-alive request: no longer idle
                self._disarm()
            room = self.limits.max_header_bytes - self.head_bytes
            if len(data) > room:  # feed only what the limit allows: the parser never sees more
                self.head_bytes += room
                if not self._feed(data[:room]):
                    return
                if self.in_head:
                    self._refuse(431, _TOO_LARGE.format(self.limits.max_header_bytes), "header_too_large")
                    return
                data = data[room:]
            else:
                self.head_bytes += len(data)
        parsing = self.parsing
        if parsing is not None:
            parsing.fed_after_head += len(data)
        if not self._feed(data):
            return
        parsing = self.parsing
        if parsing is not None:
            allowed = self.limits.max_header_bytes + CHUNK_OVERHEAD_BYTES * (parsing.chunks + 1)
            if parsing.fed_after_head - parsing.received_body > allowed:
                self._refuse(400, "request framing too large", "malformed")
                return
            if self.timer is None and self.cycles and parsing is self.cycles[0]:
                self._arm(self.limits.body_timeout_s, self._body_timed_out)
        elif self.head_bytes and self.timer is None and not self.cycles:
            # a head begun and not complete: timed from now (a whole request in one read, the
            # usual case, never needs this timer)
            self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def _feed(self, data: bytes) -> bool:
        """Parse; False when the connection was refused for what the data held."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # no protocol upgrades: answer, then close
            for cycle in self.cycles:
                cycle.keep_alive = False
            self.is_refused = True
            self.pause_reading()
            return False
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause.status, cause.message, cause.reason)
            else:
                log.error("HTTP server: a request could not be parsed: %r", cause or exc)
                self._refuse(400, "invalid HTTP request", "malformed")
            return False
        except httptools.HttpParserError:
            self._refuse(400, "invalid HTTP request", "malformed")
            return False
        return not (self.is_closed or self.is_refused)

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = []
        self.headers = []
        self.head_counted = 0

    def on_url(self, url: bytes) -> None:
        self.url.append(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        if self.in_head:
            self._count_head(size)
            self.headers.append((name.lower(), value.rstrip(b" \t")))
        elif self.parsing is not None:  # a trailer of a chunked body: bounded like a head, dropped
            self.parsing.trailer_bytes += size
            if self.parsing.trailer_bytes > self.limits.max_header_bytes:
                raise _Refusal(400, "request trailers too large", "malformed")

    def _count_head(self, num_bytes: int) -> None:
        self.head_counted += num_bytes
        if self.in_head and self.head_counted > self.limits.max_header_bytes:
            raise _Refusal(431, _TOO_LARGE.format(self.limits.max_header_bytes), "header_too_large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head = False
        self.head_bytes = 0
        raw_url = b"".join(self.url)
        try:
            parsed = httptools.parse_url(raw_url)
        except httptools.HttpParserInvalidURLError:
            raise _Refusal(400, "invalid request target", "malformed") from None
        raw_path = parsed.path or b"/"
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        headers = self.headers
        expects = any(n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "server": self.local,
            "client": self.client,
            "scheme": "http",
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": parsed.query or b"",
            "headers": headers,
            "state": {},
        }
        cycle = _Cycle(self, scope, parser.should_keep_alive() and not self.server.is_closing, expects)
        self.parsing = cycle
        self.cycles.append(cycle)
        if len(self.cycles) == 1:
            self._disarm()
            self.server.start_cycle(cycle)
        else:
            self.pause_reading()  # a pipelined request waits for the answers before it

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None:
            return
        cycle.body.append(body)
        cycle.body_bytes += len(body)
        cycle.received_body += len(body)
        cycle.wake()
        if cycle.body_bytes > BODY_HIGH_WATER_BYTES:
            self.pause_reading()

    def on_chunk_header(self) -> None:
        if self.parsing is not None:
            self.parsing.chunks += 1

    def on_message_complete(self) -> None:
        cycle = self.parsing
        self.parsing = None
        self.in_head = True  # whatever comes next starts another request
        self.head_bytes = 0
        if cycle is None:
            return
        cycle.is_complete = True
        cycle.wake()
        if self.cycles and cycle is self.cycles[0]:
            self._disarm()  # its body timer

    # ---- timers

    def _arm(self, delay_s: float, callback: Callable[[], None], *, is_idle: bool = False) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay_s, callback)
        self.is_idle_timer = is_idle

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.is_idle_timer = False

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.cycles or self.is_closed:
            return
        self.server.event("header_timeout")
        if self.head_bytes == 0:
            self.close()  # nothing sent at all: no answer
        else:
            self._answer_and_close(408, "request head not received in time", "timeout")

    def _body_timed_out(self) -> None:
        self.timer = None
        cycle = self.parsing
        if cycle is None or cycle.is_complete or self.is_closed:
            return
        self.server.event("body_timeout")
        self.is_refused = True
        cycle.is_disconnected = True
        cycle.wake()
        if cycle.response_started:
            self.abort()
        else:
            self._answer_and_close(408, "request body not received in time", "timeout")

    def _idle_timed_out(self) -> None:
        self.timer = None
        self.is_idle_timer = False
        if not self.cycles and self.head_bytes == 0:
            self.close()

    def _write_timed_out(self) -> None:
        self.write_timer = None
        if self.is_write_paused and not self.is_lost:
            self.server.event("write_timeout")
            self.abort()

    # ---- used by cycles and the server

    def write(self, data: bytes) -> None:
        if not self.is_closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if not self.is_write_paused or self.is_lost:
            return
        self.drain_waiter = self.loop.create_future()
        try:
            await self.drain_waiter
        finally:
            self.drain_waiter = None

    def pause_reading(self) -> None:
        if not self.is_read_paused and not self.is_closed:
            self.is_read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.is_read_paused and not self.is_closed and not self.is_refused:
            self.is_read_paused = False
            self.transport.resume_reading()

    def resume_body(self) -> None:
        """The app took the buffered body: read on, unless a pipelined request is waiting."""
        if len(self.cycles) <= 1:
            self.resume_reading()

    def response_done(self, cycle: _Cycle) -> None:
        """An answer's last byte was written: the next request, keep-alive, or close."""
        if self.cycles and self.cycles[0] is cycle:
            self.cycles.popleft()
        cycle.wake()  # a pending receive answers disconnect
        if self.is_closed:
            return
        if not cycle.keep_alive or not cycle.is_complete or self.is_refused:
            for queued in self.cycles:
                queued.is_disconnected = True
            self.cycles.clear()
            if cycle.is_complete:
                self.close()
            else:
                self._answer_and_close(0)  # its body was not read: let the client read the answer first
            return
        if self.cycles:
            following = self.cycles[0]
            self.server.start_cycle(following)
            if len(self.cycles) == 1:
                self.resume_reading()
                if not following.is_complete:
                    self._arm(self.limits.body_timeout_s, self._body_timed_out)
        elif self.server.is_closing:
            self.close()
        else:
            if self.head_bytes:  # a pipelined head began: it has header_timeout_s from now
                self._arm(self.limits.header_timeout_s, self._head_timed_out)
            else:
                self._arm(self.limits.keep_alive_s, self._idle_timed_out, is_idle=True)
            self.resume_reading()

    def app_ended(self, cycle: _Cycle) -> None:
        """The app's call returned (or failed) for `cycle`."""
        if cycle.response_complete or self.is_closed:
            return
        if not cycle.response_started and not cycle.is_disconnected:
            cycle.response_started = cycle.response_complete = True
            self.server.event("app_error")
            self._answer_and_close(500, "internal server error", "internal_error")
        else:
            self.abort()  # an answer cut short (or the client gone): never taken as whole

    def _refuse(self, status: int, message: str, reason: str) -> None:
        """An error in the client's bytes: answer it and close, reading nothing more."""
        self.server.event(reason)
        self.is_refused = True
        self.pause_reading()
        running = self.cycles[0] if self.cycles else None
        if running is not None and running is not self.parsing:
            # the error is in a pipelined request: the running one answers, then the connection closes
            for queued in list(self.cycles)[1:]:
                queued.is_disconnected = True
            while len(self.cycles) > 1:
                self.cycles.pop()
            running.keep_alive = False
            return
        if running is not None:  # in the running request's own body
            running.is_disconnected = True
            running.wake()
            if running.response_started:
                self.abort()
                return
            running.response_started = running.response_complete = True
        self._answer_and_close(status, message, "timeout" if status == 408 else "invalid_request_error")

    def _answer_and_close(self, status: int, message: str = "", kind: str = "") -> None:
        """Stop reading, send an error answer (`status` 0: none) and a FIN, and close a moment later
        (closing at once would reset the connection and the client could lose the answer)."""
        if self.is_closed:
            return
        self.is_refused = True
        self._disarm()
        self.pause_reading()
        if status:
            self.transport.write(error_answer(status, message, kind))
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self.timer = self.loop.call_later(LINGER_S, self.abort)

    def close(self) -> None:
        """Close once the written answer is out; a client that does not take it within
        `write_timeout_s` is cut off."""
        if self.is_closed:
            return
        self.is_closed = True
        self._disarm()
        self.transport.close()
        self.timer = self.loop.call_later(self.limits.write_timeout_s, self.abort)

    def abort(self) -> None:
        """Drop the connection with a reset: the kernel discards what the client did not take (a plain
        close would keep sending it, orphaned, as slowly as a stalled client's window allows)."""
        self.is_closed = True
        if self.is_lost:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.transport.abort()

    def shut_down(self) -> None:
        """The server stops: an idle (or lingering) connection closes now, a busy one after its answer."""
        if self.is_refused:
            self.abort()
        elif not self.cycles and self.head_bytes == 0:
            self.close()
        for cycle in self.cycles:
            cycle.keep_alive = False


class _Refusal(Exception):
    """Raised in a parser callback: answer `status` and close."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None


class HttpServer:
    """Serves an ASGI app (with its lifespan) on one listening socket."""

    def __init__(
        self,
        app: Any,
        limits: ServerLimits,
        *,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_event = on_event
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.is_closing = False
        self._server: asyncio.AbstractServer | None = None
        self._lifespan: _Lifespan | None = None
        self.port = 0

    def event(self, reason: str) -> None:
        if self.on_event is not None:
            self.on_event(reason)

    async def start(self, host: str, port: int, *, backlog: int = 2048) -> None:
        """Run the app's lifespan startup, then listen (`port` 0: any free port, see `self.port`)."""
        self.loop = asyncio.get_running_loop()
        self._lifespan = _Lifespan(self.app)
        await self._lifespan.startup()
        try:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
            )
        except OSError as exc:
            await self._lifespan.shutdown()
            raise ListenError(f"cannot listen on {_url_host(host)}:{port}: {exc.strerror or exc}") from exc
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else port

    def start_cycle(self, cycle: _Cycle) -> None:
        task = self.loop.create_task(self._run(cycle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, cycle: _Cycle) -> None:
        try:
            await self.app(cycle.scope, cycle.receive, cycle.send)
        except asyncio.CancelledError:
            pass
        except BaseException:  # the edge: an app failure is one 500 (or an aborted answer) and a log line
            log.exception("HTTP server: the app failed on %s %s", cycle.scope["method"], cycle.scope["path"])
        finally:
            cycle.conn.app_ended(cycle)

    async def stop(self) -> None:
        """Stop listening, finish running requests (at most `shutdown_timeout_s`), run the lifespan's
        shutdown."""
        self.is_closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shut_down()
        deadline = self.loop.time() + self.limits.shutdown_timeout_s
        while (self.tasks or self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._lifespan is not None:
            await self._lifespan.shutdown()

    async def serve(self, host: str, port: int) -> None:
        """`start`, then serve until SIGINT or SIGTERM, then `stop` (a second signal stops at once)."""
        await self.start(host, port)
        stopping = asyncio.Event()
        loop = self.loop

        def on_signal() -> None:
            if stopping.is_set():
                for conn in list(self.connections):
                    conn.abort()
                for task in list(self.tasks):
                    task.cancel()
            stopping.set()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
        log.info("eldr serve listening on http://%s:%d", _url_host(host), self.port)
        try:
            await stopping.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Lifespan:
    """The ASGI lifespan protocol: startup before listening, shutdown after."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        return await self._events.get()

    async def _send(self, message: dict[str, Any]) -> None:
        await self._done.put(message)

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": {}}
        try:
            await self.app(scope, self._receive, self._send)
        finally:
            await self._done.put({"type": "lifespan.ended"})

    async def startup(self) -> None:
        self._task = asyncio.ensure_future(self._main())
        await self._events.put({"type": "lifespan.startup"})
        message = await self._done.get()
        if message["type"] != "lifespan.startup.complete":
            await self._task  # the app's own exception, when it raised one
            raise RuntimeError(f"the app's startup failed: {message.get('message', message['type'])}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._events.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._done.get(), 30)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._task, 5)
