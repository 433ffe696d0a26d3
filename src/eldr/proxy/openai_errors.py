"""OpenAI-style error answers, `{"error": {"message", "type", "param", "code"}}`, from a `ProxyError`."""

from __future__ import annotations

from starlette.responses import JSONResponse

from eldr.errors import ProxyError
from eldr.proxy.relay import Reply, json_reply


def error_reply(error: ProxyError) -> Reply:
    """The error as a hot-path reply (generate endpoints)."""
    headers = [(b"retry-after", str(error.retry_after_s).encode())] if error.retry_after_s is not None else []
    return json_reply(error.status, error.body(), headers)


def error_response(error: ProxyError) -> JSONResponse:
    """The error as a Starlette response (the other routes)."""
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(error.body(), error.status, headers=headers)
