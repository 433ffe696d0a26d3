"""`eldr.proxy.forwarding` on its own: failover across attempts with the legs stubbed, no engines.

`Forwarder.handle` chooses a prefill instance, runs the prefill leg, routes the decode leg by the
answer's signature and runs it; a leg that fails is retried on another instance (a failed decode
re-runs a prefill). The legs (`run_prefill`, `run_decode`) are replaced here by stubs that record
which instance they were sent to and fail on command.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from eldr.errors import LegFailed, ProxyError, UpstreamRefused
from eldr.partition import Partition
from eldr.proxy.answer_signature import Extracted
from eldr.proxy.answers import ParsedAnswer
from eldr.proxy.config import ServeConfig
from eldr.proxy.forwarding import ClientRequest
from eldr.proxy.relay import Reply
from eldr.proxy.state import ProxyState
from eldr.proxy.workers import Worker

PREFILL = ("http://127.0.0.1:8001", "http://127.0.0.1:8002")
DECODE = tuple(f"http://127.0.0.1:{8100 + w}" for w in range(4))


class Legs:
    """Stub legs: every call is recorded; URLs in `failing` fail with LegFailed."""

    def __init__(self, state: ProxyState, counts: np.ndarray[Any, Any] | None) -> None:
        self.state, self.counts = state, counts
        self.calls: list[tuple[str, str, str]] = []  # (leg, url, request id header)
        self.failing: set[str] = set()
        self.refusing: set[str] = set()

    async def prefill(self, worker: Worker, request: ClientRequest, headers: dict[str, str]) -> ParsedAnswer:
        self.calls.append(("prefill", worker.url, headers["X-Request-Id"]))
        if worker.url in self.refusing:
            raise UpstreamRefused(Reply(400, b'{"error": "bad prompt"}'))
        if worker.url in self.failing:
            raise LegFailed("HTTP 500", f"HTTP 500 from {worker.url}")
        params = {"remote_block_ids": [1, 2], "eldr": {"v": 1}}
        return ParsedAnswer(
            params, Extracted(self.counts, "eldr" if self.counts is not None else "none"), 0.0
        )

    async def decode(
        self, worker: Worker, request: ClientRequest, body: dict[str, Any], headers: dict[str, str], leg: str
    ) -> Reply:
        self.calls.append(("decode", worker.url, headers["X-Request-Id"]))
        self.state.router.release(leg)
        if worker.url in self.failing:
            raise LegFailed("connection reset", f"connection reset by {worker.url}")
        assert "eldr" not in body["kv_transfer_params"]  # the signature never reaches the decode engine
        return Reply(200, b'{"choices": []}')


def _setup(
    partition: Partition, counts: np.ndarray[Any, Any] | None, **config: Any
) -> tuple[ProxyState, Legs]:
    settings: dict[str, Any] = {"partition": "p.npz", "max_attempts": 3, **config}
    state = ProxyState(ServeConfig(prefill=PREFILL, decode=DECODE, **settings), partition)
    from eldr.proxy.forwarding import Forwarder

    state.forwarder = Forwarder(
        state.config,
        state.prefill,
        state.chooser,
        state.router,
        state.metrics,
        client=None,  # type: ignore[arg-type]
    )
    legs = Legs(state, counts)
    state.forwarder.run_prefill = legs.prefill  # type: ignore[method-assign]
    state.forwarder.run_decode = legs.decode  # type: ignore[method-assign]
    return state, legs


def _request(request_id: str = "req-1") -> ClientRequest:
    return ClientRequest("/v1/completions", {"prompt": "hello", "max_tokens": 4}, request_id, None)


def _counts(partition: Partition, worker: int) -> np.ndarray[Any, Any]:
    """Synthetic counts that eldr (tau 0, idle pool) sends to `worker`."""
    from eldr.policy import LocalityBandPolicy, RequestView, WorkersView
    from eldr.synthetic import planted_clusters

    band = LocalityBandPolicy(partition, tau=0.0)
    syn = planted_clusters(240, num_clusters=4, num_layers=6, num_experts=16, top_k=2, seed=5)
    idle = WorkersView.of([0] * partition.num_workers)
    for counts in syn.prefill_counts:
        if band.choose(RequestView(counts=counts), idle).worker == worker:
            return np.asarray(counts, dtype=np.int64)
    raise AssertionError(f"no synthetic request goes to worker {worker}")


def test_a_decode_that_fails_reruns_the_prefill_and_avoids_the_failed_instance(partition: Partition) -> None:
    state, legs = _setup(partition, _counts(partition, 2), tau=0.0)
    legs.failing.add(DECODE[2])  # the signature's own worker fails
    reply = asyncio.run(state.forwarder.handle(_request()))  # type: ignore[union-attr]
    assert isinstance(reply, Reply) and reply.status == 200
    kinds = [(leg, url) for leg, url, _ in legs.calls]
    assert kinds[0][0] == "prefill" and kinds[1] == ("decode", DECODE[2])
    assert kinds[2][0] == "prefill" and kinds[3][0] == "decode" and kinds[3][1] != DECODE[2]
    # one id per attempt, the same on both legs of an attempt
    ids = [rid for _, _, rid in legs.calls]
    assert ids == ["req-1", "req-1", "req-1-retry1", "req-1-retry1"]
    assert all(w.in_flight == 0 for w in state.all_workers())
    assert state.metrics.retries.labels("decode").value == 1


def test_exclusion_follows_the_instance_when_a_drained_one_is_removed(partition: Partition) -> None:
    """Positions shift when a drained instance is reaped between two attempts; the failed instance
    must stay excluded, not the one that moved into its position."""
    state, legs = _setup(partition, _counts(partition, 2), tau=0.0)
    state.decode.workers[0].is_draining = True  # drained, idle: reaped at the next health check
    legs.failing.add(DECODE[2])

    original = legs.decode

    async def decode_then_reap(*args: Any) -> Reply:
        try:
            return await original(*args)
        finally:
            state.reap_drained()  # DECODE[0] leaves: DECODE[2] moves from position 2 to 1

    state.forwarder.run_decode = decode_then_reap  # type: ignore[union-attr, method-assign]
    reply = asyncio.run(state.forwarder.handle(_request()))  # type: ignore[union-attr]
    assert isinstance(reply, Reply) and reply.status == 200
    decodes = [url for leg, url, _ in legs.calls if leg == "decode"]
    assert decodes[0] == DECODE[2] and DECODE[2] not in decodes[1:]
    assert [w.url for w in state.decode.workers] == list(DECODE[1:])


def test_every_attempt_failing_is_a_503_that_names_no_engine(partition: Partition) -> None:
    state, legs = _setup(partition, _counts(partition, 1))
    legs.failing.update(PREFILL)
    with pytest.raises(ProxyError) as caught:
        asyncio.run(state.forwarder.handle(_request()))  # type: ignore[union-attr]
    error = caught.value
    assert error.status == 503 and "prefill: HTTP 500" in error.message
    assert "127.0.0.1" not in error.message  # addresses go to the log only
    assert sorted(url for _, url, _ in legs.calls) == sorted(
        PREFILL
    )  # each prefill tried once, then no healthy one
    assert all(w.in_flight == 0 for w in state.all_workers())


def test_a_refused_prefill_is_relayed_not_retried(partition: Partition) -> None:
    state, legs = _setup(partition, _counts(partition, 0))
    legs.refusing.update(PREFILL)
    with pytest.raises(UpstreamRefused) as caught:
        asyncio.run(state.forwarder.handle(_request()))  # type: ignore[union-attr]
    assert caught.value.reply.status == 400 and len(legs.calls) == 1


def test_without_a_signature_the_decode_is_routed_by_load(partition: Partition) -> None:
    state, legs = _setup(partition, None)
    for w, load in enumerate((3, 0, 5, 2)):
        state.decode.workers[w].in_flight = load
    reply = asyncio.run(state.forwarder.handle(_request()))  # type: ignore[union-attr]
    assert isinstance(reply, Reply)
    assert [url for leg, url, _ in legs.calls if leg == "decode"] == [DECODE[1]]
    assert state.metrics.fallbacks.labels("no_signature").value == 1


def test_a_signature_of_another_shape_is_counted_as_malformed(partition: Partition) -> None:
    state, legs = _setup(partition, np.ones((1, 3), dtype=np.int64))
    reply = asyncio.run(state.forwarder.handle(_request()))  # type: ignore[union-attr]
    assert isinstance(reply, Reply) and reply.status == 200
    assert state.metrics.fallbacks.labels("malformed").value == 1
    assert state.metrics.malformed.labels(legs.calls[0][1]).value == 1


@pytest.mark.parametrize(
    ("forward_auth", "expected"),
    [("none", None), ("client", "Bearer client-key"), ("engine-key", "Bearer engine-secret")],
)
def test_authorization_forwarding(partition: Partition, forward_auth: str, expected: str | None) -> None:
    extra = {"engine_api_key": "engine-secret"} if forward_auth == "engine-key" else {}
    state, _ = _setup(partition, None, forward_auth=forward_auth, **extra)
    request = ClientRequest("/v1/completions", {"prompt": "x"}, "id-7", "Bearer client-key")
    headers = state.forwarder.headers(request, "id-7")  # type: ignore[union-attr]
    assert headers.get("Authorization") == expected and headers["X-Request-Id"] == "id-7"
