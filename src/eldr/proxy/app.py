"""The ASGI app: OpenAI-compatible endpoints in front of vLLM prefill and decode instances.

POST /v1/completions and /v1/chat/completions are served by a direct ASGI handler (the hot path: no
middleware stack, no per-request Request object); GET /v1/models, /health, /metrics and /admin/* (only
with an admin token) go through a Starlette router. Every failure the proxy answers itself is an
OpenAI-style error body that names no engine address (those go to the log); broad exceptions are
caught only here, at the edge, and counted. With an `api_key`, /v1/models needs it too, and so do
/health and /metrics unless `public_health_metrics` is set.

Each request gets the proxy's own id (`X-Request-Id` towards the engines, unique per attempt: see
`forwarding.py`); a client's `X-Request-Id` is kept for the log and echoed back in the answer.
`server_for` wraps the app in the proxy's HTTP server (`eldr.proxy.server`) with the configured limits.
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

from eldr.errors import EldrError, ProxyError, Rejected, UpstreamRefused
from eldr.partition import Partition
from eldr.proxy.admin import admin_routes
from eldr.proxy.admission import Reservation
from eldr.proxy.config import ServeConfig
from eldr.proxy.disconnect import DisconnectWatch
from eldr.proxy.forwarding import ClientRequest, new_request_id
from eldr.proxy.openai_errors import error_reply, error_response
from eldr.proxy.relay import Reply, StreamReply
from eldr.proxy.server import HttpServer, ServerLimits
from eldr.proxy.state import ProxyState, state_of

log = logging.getLogger("eldr.proxy")

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_CLIENT_ID_CHARS = 256  # a client's X-Request-Id longer than this (or not plain text) is not echoed


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


def server_for(app: ProxyApp) -> HttpServer:
    """The proxy's HTTP server around `app`, with the configured client limits; its protocol errors
    are counted in `eldr_client_protocol_errors_total`."""
    config, state = app.proxy.config, app.proxy
    limits = ServerLimits(
        max_header_bytes=config.max_header_bytes,
        header_timeout_s=config.client_header_timeout_s,
        body_timeout_s=config.client_body_timeout_s,
        write_timeout_s=config.client_write_timeout_s,
        keep_alive_s=config.keep_alive_s,
        max_connections=config.max_connections,
        shutdown_timeout_s=config.shutdown_timeout_s,
    )
    errors = state.metrics.client_errors
    server = HttpServer(app, limits, on_event=lambda reason: errors.labels(reason).inc())
    state.server = server
    return server


async def _generate(state: ProxyState, scope: Scope, receive: Receive, send: Send) -> None:
    endpoint: str = scope["path"]
    started = time.perf_counter()
    reply: Reply | StreamReply
    reservation = state.bodies.reserve()  # this request's body bytes, held until it ends
    try:
        try:
            client_request = await _parse(scope, receive, state, reservation)
        except ProxyError as exc:
            reply = error_reply(exc)
        except ClientDisconnect:
            state.metrics.disconnects.inc()
            return
        else:
            # one watcher for the whole request: a client gone while queued, during the legs or the
            # relay cancels this task
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
                            reply.headers.append((b"x-request-id", client_request.echo_id.encode()))
                            await reply.send(send, watch, state.metrics)
                            _observe(state, endpoint, reply.status, started)
                            return
                    finally:
                        state.admission.release()
            finally:
                watch.stop()
            reply.headers.append((b"x-request-id", client_request.echo_id.encode()))
        _observe(state, endpoint, reply.status, started)
        await reply.send(send)
    finally:
        reservation.release()


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
        log.error(
            "request %s (client id %r) failed: %s", client_request.request_id, client_request.client_id, exc
        )
        return error_reply(ProxyError(500, "internal proxy error", "internal_error"))
    except Exception:  # the edge: one clear error and a log line, never a dropped connection
        log.exception(
            "request %s (client id %r) failed unexpectedly",
            client_request.request_id,
            client_request.client_id,
        )
        return error_reply(ProxyError(500, "internal proxy error", "internal_error"))


def _has_key(config: ServeConfig, authorization: str) -> bool:
    """Whether a request may pass: no api_key configured, or the right one given."""
    if config.api_key is None:
        return True
    return hmac.compare_digest(authorization.encode("latin-1"), f"Bearer {config.api_key}".encode())


_NO_KEY = ProxyError(
    401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error"
)


def _body_budget_error(state: ProxyState) -> ProxyError:
    state.metrics.rejections.labels("body_budget").inc()
    return ProxyError(
        429, "too many request bytes in flight, retry later", "rate_limit_exceeded", retry_after_s=1
    )


async def _parse(
    scope: Scope, receive: Receive, state: ProxyState, reservation: Reservation
) -> ClientRequest:
    config = state.config
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if not _has_key(config, headers.get("authorization", "")):
        raise _NO_KEY
    text = headers.get("content-length")
    declared = int(text) if text is not None and text.isdigit() else None
    if declared is not None:
        if declared > config.max_body_bytes:
            raise ProxyError(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
        _charge(state, reservation, declared)  # before a byte of the body is read
    message = await receive()
    raw = message.get("body", b"")
    charge_to = (state, reservation) if declared is None else None  # a chunked body: as it arrives
    if charge_to is not None:
        _charge(state, reservation, len(raw))
    if message.get("more_body", False) or message["type"] == "http.disconnect":
        raw = await _rest_of_body(receive, raw, config.max_body_bytes, message, charge_to)
    if len(raw) > config.max_body_bytes:
        raise ProxyError(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}", "invalid_request_error") from None
    del raw  # the parsed body is what the request holds from here on
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
    client_id = headers.get("x-request-id")
    if client_id is not None and not (0 < len(client_id) <= MAX_CLIENT_ID_CHARS and _is_plain(client_id)):
        client_id = None
    return ClientRequest(scope["path"], body, new_request_id(), headers.get("authorization"), client_id)


def _is_plain(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _charge(state: ProxyState, reservation: Reservation, num_bytes: int) -> None:
    try:
        reservation.grow(num_bytes)
    except Rejected:
        raise _body_budget_error(state) from None


async def _rest_of_body(
    receive: Receive,
    first: bytes,
    limit: int,
    message: Message,
    charge_to: tuple[ProxyState, Reservation] | None,
) -> bytes | bytearray:
    """The body of a request that arrived in several ASGI messages, in one buffer that orjson reads as
    it is (no second copy); a chunked one is charged to the body budget (`charge_to`) as it arrives."""
    raw = bytearray(first)
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if len(raw) > limit:
            raise ProxyError(413, f"request body over {limit} bytes", "invalid_request_error")
        if not message.get("more_body", False):
            return raw
        message = await receive()
        piece = message.get("body", b"")
        if piece:
            if charge_to is not None:
                _charge(*charge_to, len(piece))
            raw += piece


def _observe(state: ProxyState, endpoint: str, status: int, started: float) -> None:
    m = state.metrics
    m.requests.labels(endpoint, str(status)).inc()
    m.request_seconds.labels(endpoint, str(status)).observe(time.perf_counter() - started)


def _needs_key(request: Request, *, is_public: bool = False) -> Response | None:
    """The 401 answer for a request without the API key (None: it may pass)."""
    config = state_of(request).config
    if is_public or _has_key(config, request.headers.get("authorization", "")):
        return None
    return error_response(_NO_KEY)


async def _models(request: Request) -> Response:
    if (denied := _needs_key(request)) is not None:
        return denied
    created = int(time.time())
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": "eldr"}
        for m in state_of(request).known_models()
    ]
    return JSONResponse({"object": "list", "data": data})


async def _health(request: Request) -> Response:
    state = state_of(request)
    if (denied := _needs_key(request, is_public=state.config.public_health_metrics)) is not None:
        return denied
    prefill, decode = state.prefill.num_healthy(), state.decode.num_healthy()
    body = {
        "status": "ok" if prefill and decode else "unavailable",
        "prefill": {"healthy": prefill, "total": len(state.prefill)},
        "decode": {"healthy": decode, "total": len(state.decode)},
    }
    return JSONResponse(body, 200 if prefill and decode else 503)


async def _metrics(request: Request) -> Response:
    state = state_of(request)
    if (denied := _needs_key(request, is_public=state.config.public_health_metrics)) is not None:
        return denied
    m = state.metrics
    m.body_bytes_in_flight.set(state.bodies.in_use)
    m.requests_inside.set(state.admission.active)
    m.requests_queued.set(state.admission.waiting)
    if state.server is not None:
        m.client_connections.set(len(state.server.connections))
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
