"""What the proxy sends back to a client: a whole answer, or a decode stream relayed as it arrives.

Both are written straight to the ASGI server (no response objects on the hot path). A relayed stream
holds the decode leg's lease until its last byte and passes on whole SSE events only; an upstream
failure half-way ends it with an SSE error event and `[DONE]`, a client gone half-way (or one that
stopped reading: the HTTP server disconnects it after `client_write_timeout_s`, `eldr.proxy.server`)
stops it and closes the upstream connection, and whatever way it ends the lease is released exactly
once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from starlette.types import Send

from eldr.errors import AnswerTooLarge, UpstreamConnectionError, UpstreamError, UpstreamProtocolError
from eldr.proxy.disconnect import DisconnectWatch
from eldr.proxy.metrics import Metrics
from eldr.proxy.upstream import UpstreamResponse

Headers = list[tuple[bytes, bytes]]
UPSTREAM_ERRORS = (UpstreamError, OSError, TimeoutError)


@dataclass(frozen=True)
class Reply:
    """A whole answer."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: Headers = field(default_factory=list)

    async def send(self, send: Send) -> None:
        headers = [
            (b"content-type", self.content_type),
            (b"content-length", str(len(self.body)).encode()),
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def json_reply(status: int, content: object, headers: Headers | None = None) -> Reply:
    return Reply(status, orjson.dumps(content), headers=headers or [])


@dataclass
class StreamReply:
    """A decode stream whose first bytes have arrived; `release(outcome)` ends the decode leg."""

    status: int
    first: bytes
    upstream: UpstreamResponse
    release: Callable[[str], None]
    idle_timeout_s: float
    headers: Headers = field(default_factory=list)
    max_event_bytes: int | None = None  # an SSE event held back longer than this ends the stream

    async def send(self, send: Send, watch: DisconnectWatch, metrics: Metrics) -> None:
        """Relay the stream to the client; never raises for the client's or the engine's failures.

        Only whole SSE events go out (an event cut by an engine failure never reaches the client
        half-way); a client that stopped reading is disconnected by the server (`watch` sees it)."""
        outcome = "cancelled"
        idle_s = self.idle_timeout_s
        cutter = _EventCutter(self.max_event_bytes)
        try:
            start = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *self.headers]
            await send({"type": "http.response.start", "status": self.status, "headers": start})
            chunk = self.first
            try:
                while chunk:
                    whole = cutter.whole_events(chunk)
                    if whole:
                        await send({"type": "http.response.body", "body": whole, "more_body": True})
                    chunk = await self.upstream.next_chunk(idle_s)
                outcome = "ok"
                if cutter.tail:  # the engine ended without a blank line: pass the rest on as it is
                    await send({"type": "http.response.body", "body": cutter.tail, "more_body": True})
            except UPSTREAM_ERRORS as exc:
                if cutter.is_done:  # [DONE] went out: the answer is complete, only its framing broke
                    outcome = "ok"
                else:
                    outcome = "error"
                    metrics.stream_errors.labels(
                        "timeout" if isinstance(exc, TimeoutError) else "upstream"
                    ).inc()
                    self.upstream.close()
                    self.release(outcome)
                    event = _error_event(exc)
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.has_cancelled():
                raise
        except OSError:  # the client's connection broke while sending
            pass
        finally:
            if outcome == "cancelled":
                metrics.disconnects.inc()
            self.upstream.close()
            self.release(outcome)


class _EventCutter:
    """Splits a relayed SSE stream at its last event boundary (a blank line), keeping the rest."""

    __slots__ = ("is_done", "max_bytes", "tail")

    def __init__(self, max_bytes: int | None = None) -> None:
        self.tail = b""  # the start of an event whose end has not arrived
        self.is_done = False  # the last whole event sent was `data: [DONE]`
        self.max_bytes = max_bytes  # longest event held back; beyond: AnswerTooLarge

    def whole_events(self, chunk: bytes) -> bytes:
        data = self.tail + chunk if self.tail else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:  # no boundary yet
            if self.max_bytes is not None and len(data) > self.max_bytes:
                raise AnswerTooLarge(f"SSE event over {self.max_bytes} bytes")
            self.tail = data
            return b""
        self.tail = data[end:]
        whole = data[:end] if self.tail else data
        self.is_done = whole[-20:].rstrip().endswith(b"data: [DONE]")
        return whole


def _error_event(exc: BaseException) -> bytes:
    event = {
        "error": {
            "message": f"decode instance failed mid-stream ({_failure_name(exc)})",
            "type": "upstream_error",
            "code": 502,
        }
    }
    return b"data: " + orjson.dumps(event) + b"\n\ndata: [DONE]\n\n"


def _failure_name(exc: BaseException) -> str:
    """The failure as the error event has always named it: the classes of `eldr.errors` that are
    newer than the event keep the names of the ones they refine (`UpstreamTimeout` is `TimeoutError`,
    a connection or protocol failure `UpstreamError`), so what clients match on does not change."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError"
    if isinstance(exc, UpstreamConnectionError | UpstreamProtocolError):
        return "UpstreamError"
    return type(exc).__name__
