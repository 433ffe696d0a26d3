"""What the proxy sends back to a client: a whole answer, or a decode stream relayed as it arrives.

Both are written straight to the ASGI server (no response objects on the hot path). A relayed stream
holds the decode leg's lease until its last byte; an upstream failure half-way ends it with an SSE
error event and `[DONE]`, a client gone half-way stops it (and closes the upstream connection), and
whatever way it ends the lease is released exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from starlette.types import Send

from eldr.proxy.disconnect import DisconnectWatch
from eldr.proxy.metrics import Metrics
from eldr.proxy.upstream import UpstreamError, UpstreamResponse

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

    def discard(self) -> None:
        """Drop it unsent (the request was cancelled before the relay started)."""
        self.upstream.close()
        self.release("cancelled")

    async def send(self, send: Send, watch: DisconnectWatch, metrics: Metrics) -> None:
        """Relay the stream to the client; never raises for the client's or the engine's failures."""
        outcome = "cancelled"
        last = self.first
        try:
            start = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *self.headers]
            await send({"type": "http.response.start", "status": self.status, "headers": start})
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
            try:
                while chunk := await self.upstream.next_chunk(self.idle_timeout_s):
                    last = chunk
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                outcome = "ok"
            except UPSTREAM_ERRORS as exc:
                outcome = "error"
                metrics.stream_errors.labels("timeout" if isinstance(exc, TimeoutError) else "upstream").inc()
                self.upstream.close()
                self.release(outcome)
                await send({"type": "http.response.body", "body": _error_event(exc, last), "more_body": True})
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


def _error_event(exc: BaseException, last: bytes) -> bytes:
    event = {
        "error": {
            "message": f"decode instance failed mid-stream ({type(exc).__name__})",
            "type": "upstream_error",
            "code": 502,
        }
    }
    sep = b"" if last.endswith(b"\n\n") else b"\n\n"
    return sep + b"data: " + orjson.dumps(event) + b"\n\ndata: [DONE]\n\n"
