"""The request path: prefill leg, signature, decode choice, decode leg relayed to the client.

vLLM's disaggregation protocol (its example proxy, NixlConnector pull mode): the prefill instance gets
a copy of the body with `max_tokens: 1`, `stream: false` and `kv_transfer_params` asking for a remote
decode; its answer's `kv_transfer_params` go with the original body to the decode instance, which pulls
the KV cache. Both legs carry the same `X-Request-Id`.

Failover: a failed prefill is retried on another prefill instance; a decode that fails before its
first byte re-runs the prefill (the old `kv_transfer_params` name blocks the failed attempt may have
freed, so they are never replayed) and picks another decode instance; a stream that fails half-way
ends with an SSE error event and `[DONE]`. In-flight counts are held until the last byte or the error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.responses import Response, StreamingResponse
from yarl import URL

from eldr.errors import NoHealthyWorkerError
from eldr.policy import RequestView
from eldr.proxy.config import ServeConfig
from eldr.proxy.disconnect import DisconnectWatch
from eldr.proxy.metrics import Metrics
from eldr.proxy.openai_errors import ProxyError, error_response
from eldr.proxy.routing import DecodeRouter, PrefillChooser
from eldr.proxy.signatures import extract_signature, strip_payload
from eldr.proxy.workers import Pool, Worker

log = logging.getLogger("eldr.proxy")

REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, ValueError)


class LegFailed(Exception):
    """An upstream leg failed in a way another instance may not (connection, timeout, 5xx)."""


class UpstreamRefused(Exception):
    """The engine answered 4xx: the request itself is at fault; relay the answer, do not retry."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@dataclass(frozen=True)
class ClientRequest:
    path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any]
    request_id: str
    authorization: str | None

    @property
    def is_stream(self) -> bool:
        return bool(self.body.get("stream"))

    def prompt_key(self) -> bytes:
        prompt = self.body.get("prompt", self.body.get("messages", ""))
        return (prompt if isinstance(prompt, str) else json.dumps(prompt)).encode()


class Lease:
    """One in-flight slot on a worker, released exactly once."""

    __slots__ = ("_metrics", "is_released", "started", "worker")

    def __init__(self, worker: Worker, metrics: Metrics) -> None:
        self.worker, self._metrics = worker, metrics
        self.is_released = False
        self.started = time.perf_counter()
        worker.in_flight += 1
        metrics.child(metrics.in_flight, worker.role, worker.url).inc()

    def release(self, outcome: str) -> None:
        if self.is_released:
            return
        self.is_released = True
        w = self.worker
        w.in_flight -= 1
        m = self._metrics
        m.child(m.in_flight, w.role, w.url).dec()
        m.child(m.legs, w.role, w.url, outcome).inc()
        m.child(m.leg_seconds, w.role, w.url, outcome).observe(time.perf_counter() - self.started)


class Forwarder:
    """Runs one client request through prefill and decode with failover."""

    def __init__(
        self,
        config: ServeConfig,
        prefill: Pool,
        chooser: PrefillChooser,
        router: DecodeRouter,
        metrics: Metrics,
        client: aiohttp.ClientSession,
    ) -> None:
        self.config, self.prefill, self.chooser, self.router = config, prefill, chooser, router
        self.metrics, self.client = metrics, client
        connect = config.connect_timeout_s
        self.prefill_timeout = aiohttp.ClientTimeout(total=config.prefill_timeout_s, sock_connect=connect)
        # per read of a stream (idle timeout) / of a JSON answer; decode_timeout_s bounds the wait for
        # the first byte (streams) or the whole answer (JSON) on top
        self.stream_timeout = aiohttp.ClientTimeout(
            sock_connect=connect, sock_read=config.stream_idle_timeout_s
        )
        self.json_timeout = aiohttp.ClientTimeout(sock_connect=connect, sock_read=config.decode_timeout_s)
        self.policy_name = config.policy
        self._urls: dict[tuple[str, str], URL] = {}
        self.on_routed: Callable[[], None] = _nothing  # called after each decision (refit trigger)
        band = router.band
        self.expected_shape = (band.transform.num_layers, band.transform.num_experts) if band else None

    def url_of(self, worker: Worker, path: str) -> URL:
        """The parsed upstream URL (parsed once per instance and endpoint, not per request)."""
        key = (worker.url, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(worker.url + path)
        return url

    def headers(self, request: ClientRequest, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.config.forward_auth == "client" and request.authorization:
            headers["Authorization"] = request.authorization
        elif self.config.forward_auth == "engine-key":
            headers["Authorization"] = f"Bearer {self.config.engine_api_key}"
        return headers

    async def handle(self, request: ClientRequest) -> Response:
        """The client's answer: JSON, an SSE stream, or an OpenAI-style error."""
        failed_prefill: set[int] = set()
        failed_decode: set[int] = set()
        reasons: list[str] = []
        for attempt in range(self.config.max_attempts):
            request_id = request.request_id if attempt == 0 else f"{request.request_id}-retry{attempt}"
            headers = self.headers(request, request_id)
            try:
                p_index = self.chooser.choose(request.prompt_key, failed_prefill)
            except NoHealthyWorkerError:
                break
            try:
                answer = await self.run_prefill(self.prefill.workers[p_index], request, headers)
            except LegFailed as exc:
                failed_prefill.add(p_index)
                reasons.append(f"prefill {self.prefill.workers[p_index].url}: {exc}")
                self.metrics.retries.labels("prefill").inc()
                continue
            try:
                d_index, body = self.route(request, answer, p_index, failed_decode)
            except NoHealthyWorkerError:
                break
            worker = self.router.pool.workers[d_index]
            try:
                return await self.run_decode(worker, request, body, headers)
            except LegFailed as exc:
                failed_decode.add(d_index)
                reasons.append(f"decode {worker.url}: {exc}")
                self.metrics.retries.labels("decode").inc()
        detail = "; ".join(reasons[-3:]) or "no healthy instance"
        raise ProxyError(
            503,
            f"no prefill/decode instance could serve the request ({detail})",
            "service_unavailable",
            retry_after_s=1,
        )

    async def run_prefill(self, worker: Worker, request: ClientRequest, headers: dict[str, str]) -> Any:
        body = dict(request.body)
        body["kv_transfer_params"] = dict(REMOTE_DECODE)
        body["stream"] = False
        body["max_tokens"] = 1
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        body.pop("stream_options", None)
        body.pop("min_tokens", None)
        lease = Lease(worker, self.metrics)
        outcome = "error"
        try:
            async with self.client.post(
                self.url_of(worker, request.path),
                data=json.dumps(body),
                headers=headers,
                timeout=self.prefill_timeout,
            ) as response:
                status = response.status
                content = await response.read()
                if status >= 500:
                    raise LegFailed(f"HTTP {status}")
                if status >= 400:
                    outcome = "refused"
                    raise UpstreamRefused(Response(content, status, media_type=_media_type(response)))
            answer = json.loads(content)
            outcome = "ok"
            return answer
        except TimeoutError as exc:
            outcome = "timeout"
            raise LegFailed("timed out") from exc
        except UPSTREAM_ERRORS as exc:
            raise LegFailed(type(exc).__name__) from exc
        finally:
            lease.release(outcome)

    def route(
        self, request: ClientRequest, answer: Any, p_index: int, failed_decode: set[int]
    ) -> tuple[int, dict[str, Any]]:
        """The decode instance and the decode body (original + the engine's kv_transfer_params)."""
        started = time.perf_counter()
        extracted = extract_signature(answer, self.router.num_experts)
        counts, error = extracted.counts, extracted.error
        if counts is not None and self.expected_shape is not None and counts.shape != self.expected_shape:
            error = (
                f"signature has L x E = {counts.shape[0]} x {counts.shape[1]}, the partition expects "
                f"{self.expected_shape[0]} x {self.expected_shape[1]}"
            )
            counts = None
        m = self.metrics
        m.child(m.signature_sources, extracted.source).inc()
        if error is not None:
            self.note_malformed(self.prefill.workers[p_index], error)
        decision = self.router.choose(RequestView(request.request_id, counts), failed_decode)
        self.on_routed()
        m.decision_seconds.observe(time.perf_counter() - started)
        worker = self.router.pool.workers[decision.worker]
        m.child(m.decisions, self.policy_name, worker.url).inc()
        if decision.is_fallback:
            m.fallbacks.labels("malformed" if error else "no_signature").inc()
        if decision.band:
            m.band_size.observe(len(decision.band))
        if decision.similarities is not None:
            m.similarity.observe(float(decision.similarities[decision.worker]))
        body = dict(request.body)
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        body["kv_transfer_params"] = strip_payload(params)
        return decision.worker, body

    def note_malformed(self, worker: Worker, error: str) -> None:
        self.metrics.malformed.labels(worker.url).inc()
        if not worker.is_malformed_logged:
            worker.is_malformed_logged = True
            log.warning("unusable signature from %s (routing by JSQ; logged once): %s", worker.url, error)

    async def run_decode(
        self, worker: Worker, request: ClientRequest, body: dict[str, Any], headers: dict[str, str]
    ) -> Response:
        is_stream = request.is_stream
        lease = Lease(worker, self.metrics)
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self.config.decode_timeout_s):
                response = await self.client.post(
                    self.url_of(worker, request.path),
                    data=json.dumps(body),
                    headers=headers,
                    timeout=self.stream_timeout if is_stream else self.json_timeout,
                )
                status = response.status
                if status >= 500:
                    raise LegFailed(f"HTTP {status}")
                if status >= 400 or not is_stream:
                    content = await response.read()
                    lease.release("refused" if status >= 400 else "ok")
                    return Response(
                        content,
                        status,
                        media_type=_media_type(response),
                        headers={"X-Request-Id": headers["X-Request-Id"]},
                    )
                first = await response.content.readany()
                if not first:
                    raise LegFailed("empty stream")
        except TimeoutError as exc:
            _close(response)
            lease.release("timeout")
            raise LegFailed("timed out") from exc
        except LegFailed:
            _close(response)
            lease.release("error")
            raise
        except UPSTREAM_ERRORS as exc:
            _close(response)
            lease.release("error")
            raise LegFailed(type(exc).__name__) from exc
        except BaseException:
            _close(response)
            lease.release("cancelled")
            raise
        relay = RelayResponse(
            self.relay(response, first, lease),
            status,
            media_type="text/event-stream",
            headers={"X-Request-Id": headers["X-Request-Id"], "Cache-Control": "no-cache"},
        )
        relay.on_close.append(lambda: lease.release("cancelled"))
        relay.upstream = response
        return relay

    async def relay(
        self, response: aiohttp.ClientResponse, first: bytes, lease: Lease
    ) -> AsyncIterator[bytes]:
        """The decode stream as it arrives; an upstream failure ends it with an error event + [DONE]."""
        outcome = "cancelled"
        last = first
        try:
            yield first
            async for chunk in response.content.iter_any():
                last = chunk
                yield chunk
            outcome = "ok"
        except UPSTREAM_ERRORS as exc:
            outcome = "error"
            reason = "timeout" if isinstance(exc, TimeoutError) else "upstream"
            self.metrics.stream_errors.labels(reason).inc()
            lease.release(outcome)
            sep = b"" if last.endswith(b"\n\n") else b"\n\n"
            event = {
                "error": {
                    "message": f"decode instance failed mid-stream ({type(exc).__name__})",
                    "type": "upstream_error",
                    "code": 502,
                }
            }
            yield sep + b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            if outcome == "cancelled":
                self.metrics.disconnects.inc()
            lease.release(outcome)
            _close(response)


class RelayResponse(StreamingResponse):
    """A relayed SSE stream: sent as it arrives, stopped when the client leaves, cleaned up however it
    ends (even if it never started)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_close: list[Callable[[], None]] = []
        self.upstream: aiohttp.ClientResponse | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # plain asyncio instead of Starlette's task group: one watcher task cancels this one on disconnect
        watch = DisconnectWatch(receive)
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.has_cancelled():
                raise
        except OSError:  # the client's connection broke while sending
            pass
        finally:
            watch.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # runs the relay's own clean-up if the loop above was cut short
            self.discard()

    def discard(self) -> None:
        """Release everything this response holds (idempotent callbacks, upstream closed)."""
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            callback()
        _close(self.upstream)


def _close(response: aiohttp.ClientResponse | None) -> None:
    """Drop an upstream response; its connection goes back to the pool only if it was read to the end."""
    if response is not None:
        response.close()


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "application/json")


def _nothing() -> None:
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = ["ClientRequest", "Forwarder", "LegFailed", "UpstreamRefused", "error_response", "new_request_id"]
