"""The ASGI app: OpenAI-compatible endpoints in front of vLLM prefill and decode instances.

POST /v1/completions and /v1/chat/completions are served by a direct ASGI handler (the hot path: no
middleware stack, no per-request Request object); GET /v1/models, /health, /metrics and /admin/* (only
with an admin token) go through a Starlette router. Every failure the proxy answers itself is an
OpenAI-style error body; broad exceptions are caught only here, at the edge, and counted.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from eldr.errors import EldrError
from eldr.partition import Partition
from eldr.proxy.admin import admin_routes
from eldr.proxy.admission import Rejected
from eldr.proxy.config import ServeConfig
from eldr.proxy.disconnect import DisconnectWatch
from eldr.proxy.forwarding import ClientRequest, UpstreamRefused, new_request_id
from eldr.proxy.openai_errors import ProxyError, error_reply
from eldr.proxy.relay import Reply, StreamReply
from eldr.proxy.state import ProxyState

log = logging.getLogger("eldr.proxy")

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class ProxyApp:
    """The ASGI callable: the generate endpoints directly, everything else (and lifespan) by Starlette."""

    def __init__(self, proxy: ProxyState, routes: Starlette) -> None:
        self.proxy, self.routes = proxy, routes

    @property
    def state(self) -> State:
        return self.routes.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATE_PATHS:
            await _generate(self.proxy, scope, receive, send)
        else:
            await self.routes(scope, receive, send)


def build_app(config: ServeConfig, partition: Partition | None) -> ProxyApp:
    """The ASGI app; its lifespan opens the shared HTTP client and starts the health checks."""
    state = ProxyState(config, partition)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        # everything alive now (numpy, scipy, the partition, the app) lives as long as the process: keep
        # it out of the cyclic GC, whose full passes over it took ~18 ms (a p99 spike) on this VM
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await state.stop()

    routes = [
        Route("/v1/completions", _post_only, methods=["POST"]),
        Route("/v1/chat/completions", _post_only, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        *admin_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.proxy = state
    return ProxyApp(state, app)


async def _post_only(request: Request) -> Response:  # pragma: no cover - POSTs never reach Starlette
    raise AssertionError("generate requests are served by ProxyApp")


def _state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


async def _generate(state: ProxyState, scope: Scope, receive: Receive, send: Send) -> None:
    endpoint: str = scope["path"]
    started = time.perf_counter()
    reply: Reply | StreamReply
    try:
        client_request = await _parse(scope, receive, state)
    except ProxyError as exc:
        reply = error_reply(exc)
    except ClientDisconnect:
        state.metrics.disconnects.inc()
        return
    else:
        # one watcher for the whole request: a client gone while queued, during the legs or the relay
        # cancels this task
        watch = DisconnectWatch(receive)
        try:
            refused = await _queue(watch, state)
            if refused is _GONE:
                return
            if refused is not None:
                reply = refused
            else:
                try:
                    reply = await _admitted(watch, state, client_request)
                    if isinstance(reply, StreamReply):  # the slot and the timing end with the stream
                        await reply.send(send, watch, state.metrics)
                        _observe(state, endpoint, reply.status, started)
                        return
                finally:
                    state.admission.release()
        finally:
            watch.stop()
    _observe(state, endpoint, reply.status, started)
    await reply.send(send)


_GONE = Reply(499, b"")  # `_queue`: the client left while it waited (nothing is sent or observed)


async def _queue(watch: DisconnectWatch, state: ProxyState) -> Reply | None:
    """Wait for an admission slot: `None` once admitted (the caller releases it), else the refusal
    (429 queue full, 503 waited too long) or `_GONE`."""
    try:
        await state.admission.acquire()
    except Rejected as exc:
        state.metrics.rejections.labels(exc.reason).inc()
        message = "too many requests queued" if exc.status == 429 else "timed out waiting for a free slot"
        return error_reply(ProxyError(exc.status, message, "rate_limit_exceeded", retry_after_s=1))
    except asyncio.CancelledError:
        if watch.has_cancelled():
            state.metrics.disconnects.inc()
            return _GONE
        raise
    return None


async def _admitted(
    watch: DisconnectWatch, state: ProxyState, client_request: ClientRequest
) -> Reply | StreamReply:
    assert state.forwarder is not None
    try:
        return await state.forwarder.handle(client_request)
    except asyncio.CancelledError:
        if watch.has_cancelled():
            state.metrics.disconnects.inc()
            return Reply(499, b"")
        raise
    except ProxyError as exc:
        return error_reply(exc)
    except UpstreamRefused as exc:
        return exc.reply
    except EldrError as exc:
        log.error("request %s failed: %s", client_request.request_id, exc)
        return error_reply(ProxyError(500, str(exc), "internal_error"))
    except Exception:  # the edge: one clear error and a log line, never a dropped connection
        log.exception("request %s failed unexpectedly", client_request.request_id)
        return error_reply(ProxyError(500, "internal proxy error", "internal_error"))


async def _parse(scope: Scope, receive: Receive, state: ProxyState) -> ClientRequest:
    config = state.config
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if config.api_key is not None:
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ProxyError(
                401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error"
            )
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise ProxyError(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
    message = await receive()
    raw = message.get("body", b"")
    if message.get("more_body", False) or message["type"] == "http.disconnect":
        raw = await _rest_of_body(receive, bytearray(raw), config.max_body_bytes, message)
    if len(raw) > config.max_body_bytes:
        raise ProxyError(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object", "invalid_request_error")
    try:
        orjson.dumps(body)  # it is written again for each leg: orjson reads deeper nesting than it writes
    except orjson.JSONEncodeError as exc:
        raise ProxyError(400, f"request body cannot be forwarded: {exc}", "invalid_request_error") from None
    model = body.get("model")
    known = state.known_models()
    if model is not None and known and model not in known:
        raise ProxyError(404, f"The model `{model}` does not exist.", "NotFoundError", param="model")
    body.pop("kv_transfer_params", None)  # the protocol's field is the proxy's to set
    request_id = headers.get("x-request-id") or new_request_id()
    return ClientRequest(scope["path"], body, request_id, headers.get("authorization"))


async def _rest_of_body(receive: Receive, raw: bytearray, limit: int, message: Message) -> bytes:
    """The body of a request that arrived in several ASGI messages."""
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if len(raw) > limit:
            raise ProxyError(413, f"request body over {limit} bytes", "invalid_request_error")
        if not message.get("more_body", False):
            return bytes(raw)
        message = await receive()
        raw += message.get("body", b"")


def _observe(state: ProxyState, endpoint: str, status: int, started: float) -> None:
    m = state.metrics
    m.requests.labels(endpoint, str(status)).inc()
    m.request_seconds.labels(endpoint, str(status)).observe(time.perf_counter() - started)


async def _models(request: Request) -> Response:
    created = int(time.time())
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": "eldr"}
        for m in _state(request).known_models()
    ]
    return JSONResponse({"object": "list", "data": data})


async def _health(request: Request) -> Response:
    state = _state(request)
    prefill, decode = state.prefill.num_healthy(), state.decode.num_healthy()
    body = {
        "status": "ok" if prefill and decode else "unavailable",
        "prefill": {"healthy": prefill, "total": len(state.prefill)},
        "decode": {"healthy": decode, "total": len(state.decode)},
    }
    return JSONResponse(body, 200 if prefill and decode else 503)


async def _metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
