"""Admin endpoints (enabled only with an admin token; send `Authorization: Bearer <token>`).

    GET  /admin/workers              every instance: URL, role, in-flight, health, draining
    POST /admin/decode        {"url"} add a decode instance (health-checked like the others)
    POST /admin/decode/drain  {"url"} stop routing to a decode instance; it is removed, with its
                                      centroid, once its in-flight requests finish

A new instance takes a copy of the busiest instance's centroid (see `eldr.proxy.routing`); with
online refit on, the next refit spreads the centroids over the enlarged pool.

An added URL must be on an allowed host (`admin_engine_hosts`: addresses, networks, host names,
`.domain`; by default only the hosts of the configured engines), else 403: a leaked admin token does
not turn the proxy into a client of any host. URLs are compared by `engineurl.url_identity`
(`localhost` = `127.0.0.1`, default port, case, trailing slash), so one engine cannot be added twice
under two spellings (409), and either spelling drains it. At most `MAX_ENGINES` decode instances (409).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldr.engineurl import url_identity
from eldr.errors import ConfigError, PoolChangeError, ProxyError, UnknownWorkerError
from eldr.proxy.config import (
    AllowedHost,
    ServeConfig,
    check_url,
    is_allowed_host,
    parse_allowed_host,
)
from eldr.proxy.openai_errors import error_response
from eldr.proxy.state import state_of
from eldr.proxy.workers import Worker


def admin_routes() -> list[Route]:
    return [
        Route("/admin/workers", _workers, methods=["GET"]),
        Route("/admin/decode", _add_decode, methods=["POST"]),
        Route("/admin/decode/drain", _drain_decode, methods=["POST"]),
    ]


def _authorized(request: Request) -> ProxyError | None:
    token = state_of(request).config.admin_token
    if token is None:
        return ProxyError(404, "admin endpoints are disabled (no admin token configured)", "not_found")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return ProxyError(401, "missing or wrong admin token", "authentication_error")
    return None


def _describe(worker: Worker) -> dict[str, Any]:
    return {
        "url": worker.url,
        "role": worker.role,
        "in_flight": worker.in_flight,
        "healthy": worker.is_healthy,
        "draining": worker.is_draining,
        "engine_load": worker.engine_load,
    }


async def _workers(request: Request) -> Response:
    if (denied := _authorized(request)) is not None:
        return error_response(denied)
    return JSONResponse({"workers": [_describe(w) for w in state_of(request).all_workers()]})


async def _url_of(request: Request) -> str:
    try:
        body = json.loads(await request.body())
        return check_url(str(body["url"]))
    except (ValueError, KeyError, TypeError) as exc:
        message = str(exc) if isinstance(exc, ConfigError) else 'body must be {"url": "http://host:port"}'
        raise ProxyError(400, message, "invalid_request_error") from None


async def _authorized_url(request: Request) -> str | Response:
    """The body's decode URL of an authorized admin request, or the error response to send."""
    if (denied := _authorized(request)) is not None:
        return error_response(denied)
    try:
        return await _url_of(request)
    except ProxyError as exc:
        return error_response(exc)


def identity_host(url: str) -> str:
    """The canonical host of an engine URL (as `url_identity` writes it)."""
    return url_identity(url).split("://", 1)[1].rsplit(":", 1)[0]


def allowed_hosts(config: ServeConfig) -> tuple[AllowedHost, ...]:
    """The allowlist of `admin_engine_hosts`, or the configured engines' own hosts."""
    if config.admin_engine_hosts:
        return tuple(parse_allowed_host(e) for e in config.admin_engine_hosts)
    return tuple(parse_allowed_host(identity_host(u)) for u in (*config.prefill, *config.decode))


async def _add_decode(request: Request) -> Response:
    url = await _authorized_url(request)
    if isinstance(url, Response):
        return url
    state = state_of(request)
    host = identity_host(url)
    if not is_allowed_host(host, allowed_hosts(state.config)):
        return error_response(
            ProxyError(403, f"host {host} is not in admin_engine_hosts", "permission_denied")
        )
    try:
        worker = state.add_decode(url)
    except PoolChangeError as exc:
        return error_response(ProxyError(409, str(exc), "conflict"))
    await state.check_health()
    return JSONResponse({"added": worker.url, "decode": len(state.decode)})


async def _drain_decode(request: Request) -> Response:
    url = await _authorized_url(request)
    if isinstance(url, Response):
        return url
    try:
        worker = state_of(request).drain_decode(url)
    except UnknownWorkerError as exc:
        return error_response(ProxyError(404, str(exc), "not_found"))
    except PoolChangeError as exc:
        return error_response(ProxyError(409, str(exc), "conflict"))
    return JSONResponse({"draining": worker.url, "in_flight": worker.in_flight})
