"""`eldr serve --policy fewest-new-experts`: every way a decode leg ends releases its experts once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cluster_rig import Cluster, body, sse_texts, wait_for

from eldr.errors import ConfigError
from eldr.policy import FewestNewExpertsPolicy, RequestView, WorkersView
from eldr.proxy.config import ServeConfig

POLICY = "fewest-new-experts"


def overlap_cluster(**config: Any) -> Cluster:
    return Cluster(policy=POLICY, top_k=2, **config)


class Events:
    """Records the policy's choose/release calls (leg ids) in order, on the proxy's loop."""

    def __init__(self, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
        policy = cluster.state.router.policy
        assert isinstance(policy, FewestNewExpertsPolicy)
        self.policy = policy
        self.log: list[tuple[str, str]] = []
        choose, release = policy.choose, policy.release

        def recording_choose(request: RequestView, workers: WorkersView) -> Any:
            decision = choose(request, workers)
            self.log.append(("choose", request.request_id))
            return decision

        def recording_release(request_id: str) -> None:
            self.log.append(("release", request_id))
            release(request_id)

        monkeypatch.setattr(policy, "choose", recording_choose)
        monkeypatch.setattr(policy, "release", recording_release)

    def check_released_once(self, cluster: Cluster) -> None:
        """Every chosen leg released exactly once, nothing live, no lease held."""
        wait_for(lambda: cluster.in_flight() == [0] * len(cluster.state.all_workers()))
        wait_for(lambda: cluster.proxy.call(lambda: self.policy.live_ids) == frozenset())
        chosen = [rid for kind, rid in self.log if kind == "choose"]
        released = [rid for kind, rid in self.log if kind == "release"]
        assert chosen and sorted(chosen) == sorted(released) and len(set(chosen)) == len(chosen)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = overlap_cluster()
    yield c
    c.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_finished_decode_releases_its_leg(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    events = Events(cluster, monkeypatch)
    for _ in range(3):
        r = httpx.post(cluster.url + "/v1/completions", json=body(stream=stream))
        assert r.status_code == 200, r.text
    events.check_released_once(cluster)
    assert len(events.log) == 6


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("failure", ["500", "drop", "hang"])
def test_failover_releases_the_failed_leg_before_choosing_again(
    monkeypatch: pytest.MonkeyPatch, failure: str, stream: bool
) -> None:
    c = overlap_cluster(num_prefill=1, decode_timeout_s=0.3)
    try:
        events = Events(c, monkeypatch)
        c.decode[0].fail_next = [failure]
        r = httpx.post(c.url + "/v1/completions", json=body(stream=stream), timeout=10)
        assert r.status_code == 200, r.text
        assert len(c.decode[0].received) == 1 and len(c.decode[1].received) == 1
        events.check_released_once(c)
        (k1, first), (k2, again), (k3, second), (k4, last) = events.log
        assert (k1, k2, k3, k4) == ("choose", "release", "choose", "release")
        assert first == again != second == last
    finally:
        c.close()


def test_a_mid_stream_failure_releases_its_leg(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events(cluster, monkeypatch)
    cluster.decode[0].fail_next = ["midstream"]
    r = httpx.post(cluster.url + "/v1/completions", json=body(stream=True))
    assert r.status_code == 200 and sse_texts(r.text)[0][-1]["error"]["type"] == "upstream_error"
    events.check_released_once(cluster)


def test_a_stream_idle_timeout_releases_its_leg(monkeypatch: pytest.MonkeyPatch) -> None:
    c = overlap_cluster(num_prefill=1, stream_idle_timeout_s=0.3)
    try:
        events = Events(c, monkeypatch)
        c.decode[0].token_delay_s = 1.0
        r = httpx.post(c.url + "/v1/completions", json=body(stream=True), timeout=10)
        assert r.status_code == 200 and c.metric("eldr_stream_errors_total", reason="timeout") == 1
        events.check_released_once(c)
    finally:
        c.close()


def test_a_client_gone_mid_stream_releases_its_leg(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events(cluster, monkeypatch)
    cluster.decode[0].token_delay_s = 0.2
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body(stream=True, max_tokens=50)) as r:
        assert next(r.iter_raw()).startswith(b"data: ")
    wait_for(lambda: cluster.metric("eldr_client_disconnects_total") == 1)
    events.check_released_once(cluster)


def test_a_client_gone_during_a_json_decode_releases_its_leg(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events(cluster, monkeypatch)
    for engine in cluster.decode:
        engine.delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.url + "/v1/completions", json=body(), timeout=0.5)
    wait_for(lambda: sum(e.cancelled for e in cluster.decode) == 1)
    events.check_released_once(cluster)


def test_oversize_answers_and_refusals_release_their_legs(monkeypatch: pytest.MonkeyPatch) -> None:
    c = overlap_cluster(max_attempts=2, max_answer_bytes=4096)
    try:
        events = Events(c, monkeypatch)
        r = httpx.post(c.url + "/v1/completions", json=body(max_tokens=2000))  # decode answers ~8 KB
        assert r.status_code == 503 and "answer too large" in r.json()["error"]["message"]
        for engine in c.decode:
            engine.model = "another-model"  # the engines refuse the request: 404, relayed
        r = httpx.post(c.url + "/v1/completions", json=body())
        assert r.status_code == 404
        events.check_released_once(c)
        assert sum(kind == "choose" for kind, _ in events.log) == 3
    finally:
        c.close()


def test_a_request_joins_the_decode_that_runs_its_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    c = overlap_cluster(num_prefill=1)
    try:
        events = Events(c, monkeypatch)
        for engine in c.decode:
            engine.delay_s = 1.0
        served: dict[str, str] = {}

        def post(name: str, prompt: str) -> None:
            served[name] = httpx.post(c.url + "/v1/completions", json=body(prompt), timeout=10).json()[
                "served_by"
            ]

        threads: list[threading.Thread] = []

        def all_arrived() -> bool:
            return sum(len(e.received) for e in c.decode) == len(threads)

        for name, prompt in (("d1", "d one"), ("b1", "b one"), ("d2", "d two")):
            thread = threading.Thread(target=post, args=(name, prompt))
            thread.start()
            threads.append(thread)
            wait_for(all_arrived)
            time.sleep(0.05)
        for thread in threads:
            thread.join()
        # d1 goes to the lower index; b1 (other experts) to the idle decode; d2 joins d1's batch
        assert served == {"d1": "d0", "b1": "d1", "d2": "d0"}
        events.check_released_once(c)
    finally:
        c.close()


def test_added_and_drained_decode_instances_keep_the_state_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes import FakeEngine, ServerThread

    c = overlap_cluster(admin_token="tok")
    extra = FakeEngine("decode", name="d2")
    try:
        events = Events(c, monkeypatch)
        auth = {"Authorization": "Bearer tok"}
        with ServerThread(extra.app(), c.loop_thread) as server:
            assert (
                httpx.post(c.url + "/admin/decode", json={"url": server.url}, headers=auth).status_code == 200
            )
            assert c.proxy.call(lambda: events.policy.num_workers) == 3
            assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200
            r = httpx.post(c.url + "/admin/decode/drain", json={"url": c.config.decode[0]}, headers=auth)
            assert r.status_code == 200
            wait_for(lambda: len(c.state.decode) == 2)
            assert c.proxy.call(lambda: events.policy.num_workers) == 2
            for _ in range(3):
                assert httpx.post(c.url + "/v1/completions", json=body()).status_code == 200
            events.check_released_once(c)
    finally:
        c.close()


def test_the_policy_needs_top_k() -> None:
    with pytest.raises(ConfigError, match="needs --top-k"):
        ServeConfig(prefill=("http://127.0.0.1:1",), decode=("http://127.0.0.1:2",), policy=POLICY)
    config = ServeConfig(
        prefill=("http://127.0.0.1:1",), decode=("http://127.0.0.1:2",), policy=POLICY, top_k=8
    )
    assert config.lam == pytest.approx(20.83, abs=0.01)


def test_serve_flags_select_the_policy() -> None:
    from eldr.cli import build_parser
    from eldr.commands.serve import load_config

    argv = ["serve", "--prefill", "http://a:1", "--decode", "http://d:2", "--decode", "http://d:3"]
    args = build_parser().parse_args([*argv, "--policy", POLICY, "--top-k", "8", "--lam", "3.5"])
    config = load_config(args)
    assert (config.policy, config.top_k, config.lam) == (POLICY, 8, 3.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--policy", POLICY, "--top-k", "8", "--lam", "-1"])
