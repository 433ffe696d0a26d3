"""The one exception tree of eldr.

Everything the package raises on purpose derives from `EldrError`, grouped the way callers catch
them; a class that callers also catch as a builtin derives from that builtin too (in brackets):

    EldrError
    ├── ConfigError [ValueError]            a configuration value: flag, config file, serve setting
    ├── DataError                           input data, its files, and partitions
    │   ├── InvalidInputError [ValueError]
    │   ├── InputFileError [OSError]
    │   ├── OutputFileError [OSError]
    │   └── PartitionMismatchError
    ├── RoutingError                        a routing decision that cannot be made
    │   ├── NoHealthyWorkerError
    │   └── DuplicateRequestError [ValueError]
    ├── ServeError                          `eldr serve` itself and the answers it gives on its own
    │   ├── ListenError [OSError]
    │   ├── Rejected                        admission refused (429 queue full, 503 waited too long)
    │   ├── ProxyError                      an OpenAI-style error answer with its HTTP status
    │   ├── PoolChangeError                 a decode-pool change refused (duplicate, full, last one)
    │   └── UnknownWorkerError [LookupError] no instance of the pool has that URL
    └── UpstreamError                       a leg to an engine: the request to it or its answer
        ├── UpstreamConnectionError         cannot connect; connection refused, reset or closed
        ├── UpstreamTimeout [TimeoutError]  no answer head, body or next stream chunk in time
        ├── UpstreamProtocolError           the engine's answer is not valid HTTP
        ├── AnswerTooLarge                  an answer, its head or one SSE event over its limit
        ├── ParserFailed                    the process parsing a large answer died before answering
        ├── UpstreamRefused                 the engine answered 4xx: relayed to the client as it is
        └── LegFailed                       a leg failed as another engine may not: fail over

The CLI turns an `EldrError` into one line on stderr and exit status 2. The proxy answers a
`ProxyError` or `Rejected` with its status, relays an `UpstreamRefused`, fails a leg over on the
other upstream errors (`eldr.proxy.forwarding`), and turns any other `EldrError` into a 500. A
private exception that never leaves its module (`eldr.proxy.server._Refusal`, control flow out of a
parser callback) is no part of the tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eldr.proxy.relay import Reply


class EldrError(Exception):
    """Base class of every error eldr raises on purpose."""


# ---- configuration


class ConfigError(EldrError, ValueError):
    """A configuration value is invalid."""


# ---- data and partitions


class DataError(EldrError):
    """Input data, an input or output file, or a partition is unusable."""


class InvalidInputError(DataError, ValueError):
    """Input data has the wrong shape, type or values (negative counts, NaN, empty arrays...)."""


class InputFileError(DataError, OSError):
    """A file could not be read or does not hold what it should."""


class OutputFileError(DataError, OSError):
    """An output file could not be written (the previous file, if any, is left as it was)."""


class PartitionMismatchError(DataError):
    """A partition does not fit the setup it is loaded into (L, E or number of workers differ)."""


# ---- routing


class RoutingError(EldrError):
    """A routing decision cannot be made."""


class NoHealthyWorkerError(RoutingError):
    """A routing decision was asked for while no worker is healthy."""


class DuplicateRequestError(RoutingError, ValueError):
    """A stateful policy was asked to route a request id that is still in flight."""


# ---- eldr serve


class ServeError(EldrError):
    """`eldr serve` cannot serve, or answers a client with an error of its own."""


class ListenError(ServeError, OSError):
    """`eldr serve` could not listen on its host and port (in use, not an address of this machine)."""


class Rejected(ServeError):
    """Admission refused; `status` is 429 (queue full, body budget) or 503 (waited too long)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason  # the `eldr_rejections_total` label


class ProxyError(ServeError):
    """An error the proxy answers itself, with an HTTP status (`eldr.proxy.openai_errors`)."""

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


class PoolChangeError(ServeError):
    """A change of the decode pool was refused (the instance is in it already, the pool is full, or it
    would leave no instance to route to)."""


class UnknownWorkerError(ServeError, LookupError):
    """No instance of the pool has that URL."""


# ---- upstream engines


class UpstreamError(EldrError):
    """A leg to an engine failed: the request could not be sent, or the answer is unusable."""


class UpstreamConnectionError(UpstreamError):
    """No connection to the engine (refused, unreachable, TLS refused), or it was reset or closed."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The engine's answer head, body or next stream chunk did not come in time."""


class UpstreamProtocolError(UpstreamError):
    """The engine's answer is not valid HTTP (or a second answer came to one request)."""


class AnswerTooLarge(UpstreamError):
    """An engine's answer (or its head, or one SSE event of it) is larger than the proxy's limit."""


class ParserFailed(UpstreamError):
    """The worker process that parses large answers died, or was stopped, before it answered."""


class UpstreamRefused(UpstreamError):
    """The engine answered 4xx: the request itself is at fault; relay the answer, do not retry."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class LegFailed(UpstreamError):
    """An upstream leg failed in a way another instance may not (connection, timeout, 5xx): `public`
    says how without naming the engine (for the client), `detail` with it (for the log)."""

    def __init__(self, public: str, detail: str | None = None) -> None:
        super().__init__(public)
        self.public = public
        self.detail = detail or public
