"""OpenAI-style error answers: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from eldr.proxy.relay import Reply, json_reply


class ProxyError(Exception):
    """An error the proxy answers itself, with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.retry_after_s = param, retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


def error_reply(error: ProxyError) -> Reply:
    """The error as a hot-path reply (generate endpoints)."""
    headers = [(b"retry-after", str(error.retry_after_s).encode())] if error.retry_after_s is not None else []
    return json_reply(error.status, error.body(), headers)


def error_response(error: ProxyError) -> JSONResponse:
    """The error as a Starlette response (the other routes)."""
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(error.body(), error.status, headers=headers)
