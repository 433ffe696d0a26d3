"""Every request path of `eldr serve` against fake engines on loopback ports."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from cluster_rig import WORD_OF_DECODE, Cluster, body, fake_partition, sse_texts, wait_for
from fakes import FakeEngine, answer_words

from eldr.errors import PartitionMismatchError
from eldr.proxy.app import build_app
from eldr.proxy.config import ServeConfig
from eldr.proxy.health import parse_engine_load


def test_non_streaming_follows_the_protocol(cluster: Cluster) -> None:
    r = httpx.post(
        cluster.url + "/v1/completions",
        json=body(stream_options={"x": 1}, min_tokens=2),
        headers={"X-Request-Id": "req-42"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "".join(answer_words(body()))
    prefill_bodies = [b for e in cluster.prefill for b in e.received]
    assert len(prefill_bodies) == 1
    p = prefill_bodies[0]
    assert (
        p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p and "min_tokens" not in p
    )
    assert p["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    decoded = cluster.decode[0].received
    assert len(decoded) == 1 and decoded[0]["max_tokens"] == 6 and decoded[0]["min_tokens"] == 2
    assert "eldr" not in decoded[0]["kv_transfer_params"]
    assert decoded[0]["kv_transfer_params"]["remote_block_ids"] == [1, 2, 3]
    ids = [h["x-request-id"] for e in (*cluster.prefill, *cluster.decode) for h in e.headers_seen]
    # the engines see the proxy's own id (both legs of the attempt); the client gets its own back
    assert len(ids) == 2 and ids[0] == ids[1] and "req-42" not in ids
    assert r.headers["x-request-id"] == "req-42"
    assert cluster.in_flight() == [0, 0, 0, 0]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"], ids=["completions", "chat"])
def test_streaming_is_relayed_as_sse(cluster: Cluster, path: str) -> None:
    payload = body(stream=True)
    if path.endswith("chat/completions"):
        payload = {
            "model": "fake-moe",
            "messages": [{"role": "user", "content": "d hi"}],
            "max_tokens": 5,
            "stream": True,
        }
    with httpx.stream("POST", cluster.url + path, json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events, is_done = sse_texts(text)
    assert is_done
    key = "delta" if "chat" in path else "text"
    pieces = [e["choices"][0][key]["content"] if key == "delta" else e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == "".join(answer_words(payload))
    assert cluster.in_flight() == [0, 0, 0, 0]


@pytest.mark.parametrize("signature", ["eldr", "prompt_routed_experts", "routed_experts"])
def test_signature_routes_to_the_matching_decode(signature: str) -> None:
    c = Cluster(signature=signature)
    try:
        for _ in range(3):
            for decode, word in WORD_OF_DECODE.items():
                r = httpx.post(c.url + "/v1/completions", json=body(f"{word} tell me more"))
                assert r.status_code == 200
                assert r.json()["served_by"] == f"d{decode}"
        assert c.metric("eldr_signature_sources_total", source=signature) == 6
        assert c.metric("eldr_routing_fallbacks_total", reason="no_signature") == 0
        assert c.metric("eldr_band_size_count") == 6
    finally:
        c.close()


def test_malformed_signature_falls_back_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    c = Cluster(num_prefill=1, signature="malformed")
    try:
        with caplog.at_level(logging.WARNING, logger="eldr.proxy"):
            for _ in range(4):
                assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200
        assert c.metric("eldr_routing_fallbacks_total", reason="malformed") == 4
        assert c.metric("eldr_malformed_signatures_total", worker=c.config.prefill[0]) == 4
        assert sum("unusable signature" in r.message for r in caplog.records) == 1
    finally:
        c.close()


def test_wrong_layer_count_is_a_counted_fallback() -> None:
    c = Cluster(num_prefill=1, engine_layers=3)  # the partition expects 4 layers
    try:
        assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200
        assert c.metric("eldr_routing_fallbacks_total", reason="malformed") == 1
    finally:
        c.close()


def test_no_signature_routes_by_jsq() -> None:
    c = Cluster(signature="none")
    try:
        assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200
        assert c.metric("eldr_routing_fallbacks_total", reason="no_signature") == 1
    finally:
        c.close()


@pytest.mark.parametrize("failure", ["500", "drop", "hang", "huge"])
def test_prefill_failure_is_retried_on_another_prefill(failure: str) -> None:
    c = Cluster(prefill_timeout_s=0.5, max_answer_bytes=64 * 1024)  # "huge": an answer over the limit
    try:
        c.prefill[0].fail_next = [failure] * 6
        for _ in range(6):
            r = httpx.post(c.url + "/v1/completions", json=body())
            assert r.status_code == 200, r.text
        failed = len(c.prefill[0].received)
        assert failed >= 1 and len(c.prefill[1].received) == 6
        assert c.metric("eldr_retries_total", role="prefill") == failed
        assert c.in_flight() == [0, 0, 0, 0]
    finally:
        c.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("failure", ["500", "drop"])
def test_decode_failure_before_first_byte_reruns_prefill(failure: str, stream: bool) -> None:
    c = Cluster(num_prefill=1)
    try:
        c.decode[0].fail_next = [failure]
        r = httpx.post(c.url + "/v1/completions", json=body(stream=stream))
        assert r.status_code == 200, r.text
        if stream:
            assert sse_texts(r.text)[1]
        else:
            assert r.json()["served_by"] == "d1"
        assert len(c.prefill[0].received) == 2  # prefill re-run, old kv_transfer_params not replayed
        assert len(c.decode[0].received) == 1 and len(c.decode[1].received) == 1
        assert c.metric("eldr_retries_total", role="decode") == 1
        ids = [h["x-request-id"] for h in c.prefill[0].headers_seen]
        assert ids[0] != ids[1] and [h["x-request-id"] for h in c.decode[1].headers_seen] == ids[1:]
        assert c.in_flight() == [0, 0, 0]
    finally:
        c.close()


def test_mid_stream_failure_ends_with_error_event_and_done(cluster: Cluster) -> None:
    cluster.decode[0].fail_next = ["midstream"]
    r = httpx.post(cluster.url + "/v1/completions", json=body(stream=True))
    assert r.status_code == 200
    events, is_done = sse_texts(r.text)
    assert is_done
    assert events[-1]["error"]["type"] == "upstream_error"
    # an UpstreamConnectionError is named as the UpstreamError it refines: the text is unchanged
    assert events[-1]["error"]["message"] == "decode instance failed mid-stream (UpstreamError)"
    assert 0 < len(events) - 1 < 6  # some tokens came before the failure
    assert cluster.metric("eldr_stream_errors_total", reason="upstream") == 1
    assert cluster.in_flight() == [0, 0, 0, 0]


def test_client_disconnect_cancels_upstream(cluster: Cluster) -> None:
    decode = cluster.decode[0]
    decode.token_delay_s = 0.2
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body(stream=True, max_tokens=50)) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"data: ")
    wait_for(lambda: decode.active == 0 and cluster.in_flight() == [0, 0, 0, 0])
    assert len(decode.received) == 1
    assert cluster.metric("eldr_client_disconnects_total") == 1


def test_client_disconnect_during_json_decode_cancels_it(cluster: Cluster) -> None:
    for engine in cluster.decode:
        engine.delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.url + "/v1/completions", json=body(), timeout=0.5)
    wait_for(lambda: sum(e.cancelled for e in cluster.decode) == 1 and cluster.in_flight() == [0, 0, 0, 0])
    assert cluster.metric("eldr_client_disconnects_total") == 1
    assert cluster.proxy.call(lambda: cluster.state.admission.active) == 0


def test_client_disconnect_during_prefill_cancels_it(cluster: Cluster) -> None:
    for engine in cluster.prefill:
        engine.delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.url + "/v1/completions", json=body(), timeout=0.5)
    wait_for(lambda: sum(e.cancelled for e in cluster.prefill) == 1 and cluster.in_flight() == [0, 0, 0, 0])
    assert cluster.metric("eldr_client_disconnects_total") == 1


def test_all_instances_failing_gives_a_clear_503() -> None:
    c = Cluster(max_attempts=2)
    try:
        for engine in c.prefill:
            engine.fail_rate = 1.0
        r = httpx.post(c.url + "/v1/completions", json=body())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "prefill" in r.json()["error"]["message"]
        assert c.in_flight() == [0, 0, 0, 0]
    finally:
        c.close()


def test_a_prefill_refusal_is_relayed_and_not_retried() -> None:
    """A prefill 4xx (`UpstreamRefused`) goes back to the client as the engine sent it, with no
    retry, though it is an `UpstreamError` like the failures that fail over."""
    c = Cluster(max_attempts=2)
    try:
        for engine in c.prefill:
            engine.fail_next = ["400"]
        r = httpx.post(c.url + "/v1/completions", json=body())
        assert r.status_code == 400 and r.json()["error"]["message"] == "injected refusal"
        assert sum(len(e.received) for e in c.prefill) == 1 and not any(e.received for e in c.decode)
        assert c.metric("eldr_retries_total", role="prefill") == 0
        url = next(u for u, e in zip(c.config.prefill, c.prefill, strict=True) if e.received)
        assert c.metric("eldr_leg_requests_total", role="prefill", worker=url, outcome="refused") == 1
        assert c.in_flight() == [0, 0, 0, 0]
    finally:
        c.close()


def test_a_prefill_5xx_is_named_by_its_status() -> None:
    """The 503 after failed legs names each failure as it happened (`HTTP 500`), not as a
    connection failure: a `LegFailed` raised in a leg is final, never wrapped again."""
    c = Cluster(max_attempts=2)
    try:
        for engine in c.prefill:
            engine.fail_next = ["500"]
        r = httpx.post(c.url + "/v1/completions", json=body())
        assert r.status_code == 503
        assert "(prefill: HTTP 500; prefill: HTTP 500)" in r.json()["error"]["message"]
    finally:
        c.close()


def test_answers_over_the_size_limit_fail_clearly() -> None:
    c = Cluster(max_attempts=2, max_answer_bytes=64 * 1024)
    try:
        for engine in c.prefill:
            engine.fail_next = ["huge"]  # one each: both attempts fail
        r = httpx.post(c.url + "/v1/completions", json=body())
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "prefill: answer too large" in message and "127.0.0.1" not in message
        assert c.in_flight() == [0, 0, 0, 0]
        assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200  # the next is fine
    finally:
        c.close()


def test_decode_timeout_fails_over() -> None:
    c = Cluster(num_prefill=1, decode_timeout_s=0.3)
    try:
        c.decode[0].fail_next = ["hang"]
        r = httpx.post(c.url + "/v1/completions", json=body())
        assert r.status_code == 200 and r.json()["served_by"] == "d1"
        assert (
            c.metric("eldr_leg_requests_total", role="decode", worker=c.config.decode[0], outcome="timeout")
            == 1
        )
    finally:
        c.close()


def test_admission_limits_answer_429_and_503() -> None:
    c = Cluster(max_concurrency=1, max_queue=1, queue_timeout_s=0.3)
    try:
        for engine in c.decode:
            engine.delay_s = 1.0
        results: list[httpx.Response] = []

        def send() -> None:
            results.append(httpx.post(c.url + "/v1/completions", json=body(), timeout=10))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 429, 503]
        assert all(r.headers.get("retry-after") == "1" for r in results if r.status_code != 200)
        assert c.metric("eldr_admission_rejections_total", reason="queue_full") == 1
        assert c.metric("eldr_admission_rejections_total", reason="queue_timeout") == 1
    finally:
        c.close()


@pytest.mark.parametrize(
    ("content", "status", "kind"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1, 2]", 400, "invalid_request_error"),
        (b'{"model": "other", "prompt": "x"}', 404, "NotFoundError"),
        (b'{"prompt": "' + b"x" * 5000 + b'"}', 413, "invalid_request_error"),
    ],
    ids=["invalid-json", "not-an-object", "unknown-model", "too-large"],
)
def test_bad_input_gets_an_openai_error(content: bytes, status: int, kind: str) -> None:
    c = Cluster(max_body_bytes=4096)
    try:
        r = httpx.post(
            c.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == status
        assert r.json()["error"]["type"] == kind and r.json()["error"]["code"] == status
        assert sum(len(e.received) for e in c.prefill) == 0
    finally:
        c.close()


def test_chunked_request_bodies_are_reassembled_and_limited() -> None:
    c = Cluster(max_body_bytes=4096)
    try:
        raw = json.dumps(body()).encode()
        pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]  # no Content-Length: chunked encoding
        r = httpx.post(
            c.url + "/v1/completions", content=iter(pieces), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "".join(answer_words(body()))
        big = [b'{"prompt": "', *([b"x" * 1000] * 5), b'"}']
        r = httpx.post(
            c.url + "/v1/completions", content=iter(big), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert sum(len(e.received) for e in c.prefill) == 1
    finally:
        c.close()


def test_a_chunked_body_is_charged_to_the_body_budget_as_it_arrives() -> None:
    c = Cluster(num_prefill=1, max_body_bytes=4096, max_body_bytes_in_flight=4096)
    try:
        c.prefill[0].delay_s = 1.0
        held: list[int] = []
        first = threading.Thread(
            target=lambda: held.append(
                httpx.post(c.url + "/v1/completions", json=body("d " + "x" * 3000), timeout=10).status_code
            )
        )
        first.start()
        wait_for(lambda: c.proxy.call(lambda: c.state.bodies.in_use) > 3000)  # the first is inside
        pieces = [json.dumps(body("d " + "y" * 1500)).encode()]  # no Content-Length: chunked
        r = httpx.post(
            c.url + "/v1/completions", content=iter(pieces), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        first.join()
        assert held == [200] and c.proxy.call(lambda: c.state.bodies.in_use) == 0
    finally:
        c.close()


def test_api_key_and_authorization_forwarding() -> None:
    c = Cluster(api_key="sekret", forward_auth="client")
    try:
        assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 401
        bad = httpx.post(c.url + "/v1/completions", json=body(), headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(c.url + "/v1/completions", json=body(), headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        seen = [h.get("authorization") for e in (*c.prefill, *c.decode) for h in e.headers_seen]
        assert seen == ["Bearer sekret", "Bearer sekret"]
    finally:
        c.close()
    c = Cluster(forward_auth="engine-key", engine_api_key="engine-key-1")
    try:
        ok = httpx.post(c.url + "/v1/completions", json=body(), headers={"Authorization": "Bearer client"})
        assert ok.status_code == 200
        seen = [h.get("authorization") for e in (*c.prefill, *c.decode) for h in e.headers_seen]
        assert seen == ["Bearer engine-key-1", "Bearer engine-key-1"]
    finally:
        c.close()


def test_authorization_is_not_forwarded_by_default(cluster: Cluster) -> None:
    r = httpx.post(cluster.url + "/v1/completions", json=body(), headers={"Authorization": "Bearer client"})
    assert r.status_code == 200
    assert all("authorization" not in h for e in (*cluster.prefill, *cluster.decode) for h in e.headers_seen)


def test_health_checks_eject_and_recover(cluster: Cluster) -> None:
    cluster.decode[0].is_healthy = False
    wait_for(lambda: not cluster.state.decode.workers[0].is_healthy)
    assert cluster.metric("eldr_worker_healthy", role="decode", worker=cluster.config.decode[0]) == 0
    for _ in range(3):  # even requests whose signature points at decode 0 go elsewhere
        r = httpx.post(cluster.url + "/v1/completions", json=body("d more"))
        assert r.json()["served_by"] == "d1"
    health = httpx.get(cluster.url + "/health").json()
    assert health["decode"] == {"healthy": 1, "total": 2}
    cluster.decode[1].is_healthy = False
    wait_for(lambda: httpx.get(cluster.url + "/health").status_code == 503)
    r = httpx.post(cluster.url + "/v1/completions", json=body())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    cluster.decode[0].is_healthy = True
    wait_for(lambda: httpx.get(cluster.url + "/health").status_code == 200)
    assert httpx.post(cluster.url + "/v1/completions", json=body()).json()["served_by"] == "d0"


def test_models_and_metrics_endpoints(cluster: Cluster) -> None:
    models = httpx.get(cluster.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-moe"]
    httpx.post(cluster.url + "/v1/completions", json=body())
    text = httpx.get(cluster.url + "/metrics").text
    for name in (
        "eldr_requests_total",
        "eldr_leg_duration_seconds_bucket",
        "eldr_routing_decisions_total",
        "eldr_band_size_bucket",
        "eldr_chosen_similarity_bucket",
        "eldr_in_flight",
        "eldr_worker_healthy",
        "eldr_routing_decision_seconds_bucket",
    ):
        assert name in text
    assert cluster.metric("eldr_requests_total", endpoint="/v1/completions", status="200") == 1
    assert cluster.metric("eldr_chosen_similarity_sum") == pytest.approx(1.0, abs=1e-5)


def test_admin_endpoints_add_and_drain_decode() -> None:
    c = Cluster(admin_token="tok")
    extra = FakeEngine("decode", name="d2")
    try:
        with _server(extra) as server:
            auth = {"Authorization": "Bearer tok"}
            assert httpx.get(c.url + "/admin/workers").status_code == 401
            r = httpx.post(c.url + "/admin/decode", json={"url": server.url}, headers=auth)
            assert r.status_code == 200 and r.json()["decode"] == 3
            assert (
                httpx.post(c.url + "/admin/decode", json={"url": "ftp://x"}, headers=auth).status_code == 400
            )
            # the new instance copied a centroid: domain-0 prompts now share d0 and d2 by load
            c.decode[0].delay_s = 0.5
            threads = [
                threading.Thread(
                    target=httpx.post, args=(c.url + "/v1/completions",), kwargs={"json": body("d x")}
                )
                for _ in range(2)
            ]
            for t in threads:
                t.start()
                time.sleep(0.1)
            for t in threads:
                t.join()
            assert len(extra.received) == 1 and len(c.decode[0].received) == 1
            r = httpx.post(c.url + "/admin/decode/drain", json={"url": c.config.decode[0]}, headers=auth)
            assert r.status_code == 200
            wait_for(lambda: len(c.state.decode) == 2)
            urls = [w["url"] for w in httpx.get(c.url + "/admin/workers", headers=auth).json()["workers"]]
            assert c.config.decode[0] not in urls and server.url in urls
            r = httpx.post(c.url + "/v1/completions", json=body("d x"))
            assert r.status_code == 200 and r.json()["served_by"] == "d2"
    finally:
        c.close()


def test_public_health_metrics_opens_health_and_metrics_but_not_the_api() -> None:
    c = Cluster(api_key="sekret", public_health_metrics=True)
    try:
        assert httpx.get(c.url + "/health").status_code == 200
        assert httpx.get(c.url + "/metrics").status_code == 200
        assert httpx.get(c.url + "/v1/models").status_code == 401
        assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 401
    finally:
        c.close()


def test_admin_add_stops_at_the_engine_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("eldr.proxy.state.MAX_ENGINES", 2)
    c = Cluster(admin_token="tok")
    try:
        r = httpx.post(
            c.url + "/admin/decode",
            json={"url": "http://127.0.0.1:9"},
            headers={"Authorization": "Bearer tok"},
        )
        assert r.status_code == 409 and "2 decode instances" in r.json()["error"]["message"]
        assert len(c.state.decode) == 2
    finally:
        c.close()


def test_admin_is_disabled_without_token(cluster: Cluster) -> None:
    assert httpx.get(cluster.url + "/admin/workers").status_code == 404


def test_prefix_hash_keeps_a_prompt_on_one_prefill() -> None:
    c = Cluster(num_prefill=3, prefill_policy="prefix-hash")
    try:
        for _ in range(4):
            assert httpx.post(c.url + "/v1/completions", json=body("d the same prompt")).status_code == 200
        assert sorted(len(e.received) for e in c.prefill) == [0, 0, 4]
    finally:
        c.close()


@pytest.mark.parametrize("policy", ["rr", "random", "jsq", "p2c"])
def test_load_balancing_policies_need_no_partition(policy: str) -> None:
    c = Cluster(policy=policy)
    try:
        for _ in range(4):
            assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200
        if policy == "rr":
            assert [len(e.received) for e in c.decode] == [2, 2]
    finally:
        c.close()


def test_online_refit_runs_off_the_loop() -> None:
    c = Cluster(refit_every=4, refit_window=8)
    try:
        for i in range(12):
            word = WORD_OF_DECODE[i % 2]
            assert httpx.post(c.url + "/v1/completions", json=body(f"{word} q{i}")).status_code == 200
        wait_for(lambda: c.metric("eldr_refits_total") >= 1)
        for decode, word in WORD_OF_DECODE.items():  # still routes by locality after refits
            assert (
                httpx.post(c.url + "/v1/completions", json=body(f"{word} z")).json()["served_by"]
                == f"d{decode}"
            )
    finally:
        c.close()


def test_partition_must_match_the_decode_count() -> None:
    config = ServeConfig(prefill=("http://127.0.0.1:1",), decode=("http://127.0.0.1:2",), partition="p")
    with pytest.raises(PartitionMismatchError, match="K=2"):
        build_app(config, fake_partition(FakeEngine("prefill"), 2))


def test_engine_load_is_parsed_from_vllm_metrics() -> None:
    text = (
        b'# HELP vllm:num_requests_running x\nvllm:num_requests_running{model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{model_name="m"} 2.0\nvllm:other 9\n'
    )
    assert parse_engine_load(text) == 5
    assert parse_engine_load(b"nothing here") is None


def test_blended_load_uses_engine_counts() -> None:
    c = Cluster(load_signal="blend", policy="jsq")
    try:
        c.decode[0].active = 7  # as if another router replica had sent it 7 requests
        wait_for(lambda: c.state.decode.workers[0].engine_load == 7)
        for _ in range(3):
            assert httpx.post(c.url + "/v1/completions", json=body()).json()["served_by"] == "d1"
        assert np.array_equal(c.state.decode.loads(), [7, 0])
    finally:
        c.close()


def _server(engine: FakeEngine) -> Any:
    from fakes import ServerThread

    return ServerThread(engine.app())
