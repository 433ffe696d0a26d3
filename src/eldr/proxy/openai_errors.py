"""OpenAI-style error answers: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from starlette.responses import JSONResponse


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


def error_response(error: ProxyError) -> JSONResponse:
    body = {
        "error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}
    }
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(body, error.status, headers=headers)
