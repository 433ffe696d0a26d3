"""The request path: prefill leg, signature, decode choice, decode leg relayed to the client.

vLLM's disaggregation protocol (its example proxy, NixlConnector pull mode): the prefill instance gets
a copy of the body with `max_tokens: 1`, `stream: false` and `kv_transfer_params` asking for a remote
decode; its answer's `kv_transfer_params` go with the original body to the decode instance, which pulls
the KV cache. Both legs of one attempt carry the same `X-Request-Id`: the proxy's own id for the
request (`uuid4().hex`), `<id>-retry<n>` for the n-th failover, so no two live legs an engine sees
share an id even when clients reuse theirs (an engine keys its KV transfer by it). A client's own
`X-Request-Id` is not sent to the engines: it is logged with the proxy's id and echoed back.

Failover: a failed prefill is retried on another prefill instance; a decode that fails before its
first byte re-runs the prefill (the old `kv_transfer_params` name blocks the failed attempt may have
freed, so they are never replayed) and picks another decode instance; a stream that fails half-way
ends with an SSE error event and `[DONE]` (`relay.py`). In-flight counts are held until the last byte
or the error. Upstream requests go through the proxy's own keep-alive client (`upstream.py`).

Each decode leg is routed under its own id (`<X-Request-Id>#<n>`, unique even when clients reuse
their ids or a request fails over), and its lease releases that id from the decode policy when the leg
ends — answer, refusal, engine failure, timeout, oversize answer, failover, client gone — exactly once
(a stateful policy such as `fewest-new-experts` forgets the leg's experts then).

A prefill answer larger than `offload_answer_bytes` (vLLM's routed-expert lists of a long prompt run
to tens of MB) is parsed and its signature decoded in a worker process (`answers.py`), so that the
event loop keeps serving everyone else meanwhile.

Failures carry two texts: a public one for the client (`timed out`, `HTTP 500`, `answer too large`,
...) and the detail with the engine's address for the log; a request that ends in 503 logs every
attempt's detail in one line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from eldr.errors import (
    AnswerTooLarge,
    LegFailed,
    NoHealthyWorkerError,
    ParserFailed,
    ProxyError,
    UpstreamRefused,
)
from eldr.policy import RequestView
from eldr.proxy.answer_signature import strip_payload
from eldr.proxy.answers import AnswerParser, ParsedAnswer
from eldr.proxy.config import ServeConfig
from eldr.proxy.metrics import Metrics
from eldr.proxy.relay import UPSTREAM_ERRORS, Reply, StreamReply
from eldr.proxy.routing import DecodeRouter, PrefillChooser
from eldr.proxy.upstream import UpstreamClient, UpstreamResponse
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


@dataclass(frozen=True)
class ClientRequest:
    path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any]
    request_id: str  # the proxy's own, unique per client request
    authorization: str | None
    client_id: str | None = None  # the client's X-Request-Id, for the log and the answer

    @property
    def echo_id(self) -> str:
        """The X-Request-Id of the answer: the client's, or the proxy's when the client sent none."""
        return self.client_id or self.request_id

    @property
    def is_stream(self) -> bool:
        return bool(self.body.get("stream"))

    def prompt_key(self) -> bytes:
        prompt = self.body.get("prompt", self.body.get("messages", ""))
        return prompt.encode() if isinstance(prompt, str) else orjson.dumps(prompt)


class Lease:
    """One in-flight slot on a worker, released exactly once (`on_release` runs then, once)."""

    __slots__ = ("_metrics", "_on_release", "is_released", "started", "worker")

    def __init__(
        self, worker: Worker, metrics: Metrics, on_release: Callable[[], None] | None = None
    ) -> None:
        self.worker, self._metrics, self._on_release = worker, metrics, on_release
        self.is_released = False
        self.started = time.perf_counter()
        worker.in_flight += 1
        metrics.in_flight.labels(worker.role, worker.url).inc()

    def release(self, outcome: str) -> None:
        if self.is_released:
            return
        self.is_released = True
        w = self.worker
        w.in_flight -= 1
        if self._on_release is not None:
            self._on_release()
        m = self._metrics
        m.in_flight.labels(w.role, w.url).dec()
        m.legs.labels(w.role, w.url, outcome).inc()
        m.leg_seconds.labels(w.role, w.url, outcome).observe(time.perf_counter() - self.started)


class Forwarder:
    """Runs one client request through prefill and decode with failover."""

    def __init__(
        self,
        config: ServeConfig,
        prefill: Pool,
        chooser: PrefillChooser,
        router: DecodeRouter,
        metrics: Metrics,
        client: UpstreamClient,
        answers: AnswerParser | None = None,
    ) -> None:
        self.config, self.prefill, self.chooser, self.router = config, prefill, chooser, router
        self.metrics, self.client = metrics, client
        self.answers = answers or AnswerParser(config.offload_answer_bytes)
        self.policy_name = config.policy
        self.on_routed: Callable[[], None] = _nothing  # called after each decision (refit trigger)
        self._legs = itertools.count()  # numbers the decode legs: the policy's request ids
        band, overlap = router.band, router.overlap
        self.expected_shape = (  # signatures of another shape are counted as malformed
            (band.transform.num_layers, band.transform.num_experts)
            if band
            else (overlap.shape if overlap is not None else None)
        )

    def headers(self, request: ClientRequest, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.config.forward_auth == "client" and request.authorization:
            headers["Authorization"] = request.authorization
        elif self.config.forward_auth == "engine-key":
            headers["Authorization"] = f"Bearer {self.config.engine_api_key}"
        return headers

    async def handle(self, request: ClientRequest) -> Reply | StreamReply:
        """The client's answer: JSON, an SSE stream to relay, or an OpenAI-style error."""
        failed_prefill: set[Worker] = set()  # instances, not positions (a drained one may be removed)
        failed_decode: set[Worker] = set()
        reasons: list[str] = []  # for the client: no addresses
        details: list[str] = []  # for the log
        for attempt in range(self.config.max_attempts):
            request_id = request.request_id if attempt == 0 else f"{request.request_id}-retry{attempt}"
            headers = self.headers(request, request_id)
            try:
                p_index = self.chooser.choose(request.prompt_key, failed_prefill)
            except NoHealthyWorkerError:
                break
            p_worker = self.prefill.workers[p_index]
            try:
                answer = await self.run_prefill(p_worker, request, headers)
            except LegFailed as exc:
                failed_prefill.add(p_worker)
                reasons.append(f"prefill: {exc.public}")
                details.append(f"prefill {p_worker.url} as {request_id}: {exc.detail}")
                self.metrics.retries.labels("prefill").inc()
                continue
            try:
                d_index, body, leg = self.route(request, answer, p_worker, failed_decode)
            except NoHealthyWorkerError:
                break
            worker = self.router.pool.workers[d_index]
            try:
                return await self.run_decode(worker, request, body, headers, leg)
            except LegFailed as exc:
                failed_decode.add(worker)
                reasons.append(f"decode: {exc.public}")
                details.append(f"decode {worker.url} as {request_id}: {exc.detail}")
                self.metrics.retries.labels("decode").inc()
        log.warning(
            "request %s (client id %r) answered 503: %s",
            request.request_id,
            request.client_id,
            "; ".join(details) or "no healthy instance",
        )
        reason = "; ".join(reasons[-3:]) or "no healthy instance"
        raise ProxyError(
            503,
            f"no prefill/decode instance could serve the request ({reason})",
            "service_unavailable",
            retry_after_s=1,
        )

    async def run_prefill(
        self, worker: Worker, request: ClientRequest, headers: dict[str, str]
    ) -> ParsedAnswer:
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
        response: UpstreamResponse | None = None
        deadline = asyncio.get_running_loop().time() + self.config.prefill_timeout_s
        try:
            response = await self.client.request(
                self.client.endpoint(worker.url), "POST", request.path, headers, orjson.dumps(body), deadline
            )
            content = await response.read(deadline, self.config.max_answer_bytes)
            status = response.status
            if status >= 500:
                raise LegFailed(f"HTTP {status}")
            if status >= 400:
                outcome = "refused"
                raise UpstreamRefused(Reply(status, content, response.content_type))
            answer = await self.answers.parse(content, self.router.num_experts, deadline)
            outcome = "ok"
            return answer
        except (LegFailed, UpstreamRefused):  # raised just above and final: not wrapped as below
            raise
        except TimeoutError as exc:
            outcome = "timeout"
            raise LegFailed("timed out") from exc
        except (*UPSTREAM_ERRORS, orjson.JSONDecodeError) as exc:
            raise LegFailed(_public(exc), _why(exc)) from exc
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if response is not None:
                response.close()
            lease.release(outcome)

    def route(
        self, request: ClientRequest, answer: ParsedAnswer, p_worker: Worker, failed_decode: set[Worker]
    ) -> tuple[int, dict[str, Any], str]:
        """The decode instance, the decode body (original + the engine's kv_transfer_params) and the
        leg's id in the decode policy (`run_decode` releases it)."""
        started = answer.parse_started
        extracted = answer.signature
        counts, error = extracted.counts, extracted.error
        if counts is not None and self.expected_shape is not None and counts.shape != self.expected_shape:
            error = (
                f"signature has L x E = {counts.shape[0]} x {counts.shape[1]}, the partition expects "
                f"{self.expected_shape[0]} x {self.expected_shape[1]}"
            )
            counts = None
        m = self.metrics
        m.signature_sources.labels(extracted.source).inc()
        if error is not None:
            self.note_malformed(p_worker, error)
        body = dict(request.body)
        body["kv_transfer_params"] = strip_payload(answer.kv_transfer_params)
        leg = f"{request.request_id}#{next(self._legs)}"
        decision = self.router.choose(RequestView(leg, counts), failed_decode)
        try:
            self.on_routed()
            m.decision_seconds.observe(time.perf_counter() - started)
            worker = self.router.pool.workers[decision.worker]
            m.decisions.labels(self.policy_name, worker.url).inc()
            if decision.is_fallback:
                m.fallbacks.labels("malformed" if error else "no_signature").inc()
            if decision.band:
                m.band_size.observe(len(decision.band))
            if decision.similarities is not None:
                m.similarity.observe(float(decision.similarities[decision.worker]))
        except BaseException:  # no lease holds the leg yet: release it here
            self.router.release(leg)
            raise
        return decision.worker, body, leg

    def note_malformed(self, worker: Worker, error: str) -> None:
        self.metrics.malformed.labels(worker.url).inc()
        if not worker.is_malformed_logged:
            worker.is_malformed_logged = True
            log.warning("unusable signature from %s (routing by JSQ; logged once): %s", worker.url, error)

    async def run_decode(
        self,
        worker: Worker,
        request: ClientRequest,
        body: dict[str, Any],
        headers: dict[str, str],
        leg: str,
    ) -> Reply | StreamReply:
        # first, before any await: the lease owns the leg's dispatch in the policy from here on
        lease = Lease(worker, self.metrics, partial(self.router.release, leg))
        is_stream = request.is_stream
        response: UpstreamResponse | None = None
        loop = asyncio.get_running_loop()
        # decode_timeout_s bounds the wait for the first byte (streams) or the whole answer (JSON)
        deadline = loop.time() + self.config.decode_timeout_s
        try:
            response = await self.client.request(
                self.client.endpoint(worker.url),
                "POST",
                request.path,
                headers,
                orjson.dumps(body),
                deadline,
                is_replayable=False,  # a decode that failed is re-run from a new prefill, never replayed
            )
            status = response.status
            if status >= 500:
                raise LegFailed(f"HTTP {status}")
            if status >= 400 or not is_stream:
                content = await response.read(deadline, self.config.max_answer_bytes)
                lease.release("refused" if status >= 400 else "ok")
                return Reply(status, content, response.content_type, [])
            idle_s = self.config.stream_idle_timeout_s
            first = await response.next_chunk(max(min(deadline - loop.time(), idle_s), 0.0))
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
            raise LegFailed(_public(exc), _why(exc)) from exc
        except BaseException:
            _close(response)
            lease.release("cancelled")
            raise
        return StreamReply(status, first, response, lease.release, idle_s, [], self.config.max_answer_bytes)


def _close(response: UpstreamResponse | None) -> None:
    """Drop an upstream answer; its connection goes back to the pool only if it was read to the end."""
    if response is not None:
        response.close()


def _public(exc: BaseException) -> str:
    """What went wrong, for the client: no address, no errno."""
    if isinstance(exc, AnswerTooLarge):
        return "answer too large"
    if isinstance(exc, orjson.JSONDecodeError):
        return "malformed answer"
    if isinstance(exc, ParserFailed):
        return "answer could not be parsed"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return "engine connection failed"


def _why(exc: BaseException) -> str:
    """`AnswerTooLarge: answer over 262144 bytes`; the class name alone when there is no message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _nothing() -> None:
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = ["ClientRequest", "Forwarder", "new_request_id"]
