"""Faults at the edges of the request path, against fake engines on loopback: odd bodies, clients
gone while queued, timeouts mid-stream and before the first byte, and that nothing is left held."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from cluster_rig import Cluster, body, sse_texts, wait_for


def num_in_use(c: Cluster) -> int:
    return c.proxy.call(lambda: c.state.client.num_in_use)  # type: ignore[no-any-return]


def test_a_deeply_nested_body_is_a_client_error() -> None:
    """A body nested deeper than the proxy can write again for the legs (orjson reads 1024
    levels, writes 254) is a 400, not an internal error."""
    c = Cluster(num_prefill=1)
    try:
        nested = "[" * 300 + "]" * 300
        raw = json.dumps(body()).encode()[:-1] + b', "extra": ' + nested.encode() + b"}"
        r = httpx.post(c.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert c.in_flight() == [0, 0, 0] and num_in_use(c) == 0
    finally:
        c.close()


def test_a_client_gone_while_queued_frees_its_queue_place() -> None:
    """A client that leaves while its request waits for an admission slot frees its queue place
    (and its request is never sent)."""
    c = Cluster(num_prefill=1, max_concurrency=1, max_queue=1, queue_timeout_s=5.0)
    try:
        for engine in c.decode:
            engine.delay_s = 1.0
        results: dict[str, int] = {}

        def first() -> None:
            results["a"] = httpx.post(c.url + "/v1/completions", json=body(), timeout=10).status_code

        thread = threading.Thread(target=first)
        thread.start()
        time.sleep(0.3)  # a is inside
        with pytest.raises(httpx.ReadTimeout):  # b queues, then its client gives up
            httpx.post(c.url + "/v1/completions", json=body(), timeout=0.2)
        time.sleep(0.2)
        third = httpx.post(c.url + "/v1/completions", json=body(), timeout=10)
        thread.join()
        assert results["a"] == 200
        assert third.status_code == 200, third.text  # not 429: the queue place of the client gone is free
        assert sum(len(e.received) for e in c.prefill) == 2  # the gone client's request was never sent
    finally:
        c.close()


def test_a_stream_idle_timeout_ends_with_one_error_event() -> None:
    """A gap longer than stream_idle_timeout_s between chunks ends the relayed stream with one
    error event and [DONE], counted as a timeout; nothing is left held."""
    c = Cluster(num_prefill=1, stream_idle_timeout_s=0.3)
    try:
        c.decode[0].token_delay_s = 1.0
        r = httpx.post(c.url + "/v1/completions", json=body(stream=True), timeout=10)
        assert r.status_code == 200
        events, is_done = sse_texts(r.text)
        assert is_done and len(events) == 2  # the first token, then the error
        assert events[-1]["error"]["type"] == "upstream_error" and events[-1]["error"]["code"] == 502
        # an UpstreamTimeout is named as the TimeoutError it refines: the event's text is unchanged
        assert events[-1]["error"]["message"] == "decode instance failed mid-stream (TimeoutError)"
        assert c.metric("eldr_stream_errors_total", reason="timeout") == 1
        wait_for(lambda: c.in_flight() == [0, 0, 0] and num_in_use(c) == 0)
    finally:
        c.close()


def test_a_stream_decode_timeout_before_the_first_byte_fails_over() -> None:
    """A streaming decode that does not answer within decode_timeout_s fails before the first
    byte: the prefill is re-run and another decode serves the stream."""
    c = Cluster(num_prefill=1, decode_timeout_s=0.3)
    try:
        c.decode[0].fail_next = ["hang"]
        r = httpx.post(c.url + "/v1/completions", json=body(stream=True), timeout=10)
        assert r.status_code == 200
        events, is_done = sse_texts(r.text)
        assert is_done and all("error" not in e for e in events) and len(events) == 6
        assert len(c.prefill[0].received) == 2 and len(c.decode[1].received) == 1
        assert (
            c.metric("eldr_leg_requests_total", role="decode", worker=c.config.decode[0], outcome="timeout")
            == 1
        )
        wait_for(lambda: c.in_flight() == [0, 0, 0] and num_in_use(c) == 0)
    finally:
        c.close()


def test_every_upstream_connection_is_given_back() -> None:
    """After answers, refusals, failures before the first byte, failures mid-stream and clients
    that left half-way, no upstream connection is in use and no lease or slot is held."""
    c = Cluster()
    try:
        c.prefill[0].fail_next = ["500", "drop"]
        c.decode[0].fail_next = ["drop", "midstream", "500"]
        for i in range(8):
            r = httpx.post(c.url + "/v1/completions", json=body(stream=i % 2 == 1), timeout=10)
            assert r.status_code == 200
        assert httpx.post(c.url + "/v1/completions", json=body(model="other")).status_code == 404
        c.decode[0].token_delay_s = 0.2
        c.decode[1].token_delay_s = 0.2
        with httpx.stream("POST", c.url + "/v1/completions", json=body(stream=True, max_tokens=40)) as r:
            next(r.iter_raw())
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(c.url + "/v1/completions", json=body(max_tokens=40, stream=True), timeout=0.05)
        wait_for(
            lambda: (
                c.in_flight() == [0, 0, 0, 0]
                and num_in_use(c) == 0
                and c.proxy.call(lambda: c.state.admission.active) == 0
            )
        )
    finally:
        c.close()
