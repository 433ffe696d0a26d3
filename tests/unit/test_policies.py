from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import ConfigError, NoHealthyWorkerError, PartitionMismatchError
from eldr.partition import Partition
from eldr.policy import (
    DomainPolicy,
    LocalityBandPolicy,
    OraclePolicy,
    RequestView,
    WorkersView,
    make_policy,
)
from eldr.policy.domain import split_pools
from eldr.synthetic import SyntheticCounts

loads_strategy = st.lists(st.integers(0, 6), min_size=4, max_size=4)
healthy_strategy = st.lists(st.booleans(), min_size=4, max_size=4).filter(any)


def _request(synthetic: SyntheticCounts, index: int) -> RequestView:
    return RequestView(request_id=str(index), counts=synthetic.prefill_counts[index])


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 239), loads=loads_strategy, healthy=healthy_strategy)
def test_tau_zero_picks_the_most_similar_healthy_worker(
    partition: Partition, synthetic: SyntheticCounts, index: int, loads: list[int], healthy: list[bool]
) -> None:
    policy = LocalityBandPolicy(partition, tau=0.0)
    decision = policy.choose(_request(synthetic, index), WorkersView.of(loads, healthy))
    assert decision.similarities is not None
    best = max(s for s, ok in zip(decision.similarities, healthy, strict=True) if ok)
    assert decision.similarities[decision.worker] == best
    assert healthy[decision.worker]


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 239), loads=loads_strategy, healthy=healthy_strategy, tau=st.floats(1.0, 5.0))
def test_tau_at_least_one_is_jsq(
    partition: Partition,
    synthetic: SyntheticCounts,
    index: int,
    loads: list[int],
    healthy: list[bool],
    tau: float,
) -> None:
    decision = LocalityBandPolicy(partition, tau=tau).choose(
        _request(synthetic, index), WorkersView.of(loads, healthy)
    )
    jsq = make_policy("jsq").choose(_request(synthetic, index), WorkersView.of(loads, healthy))
    assert (
        loads[decision.worker]
        == loads[jsq.worker]
        == min(load for load, ok in zip(loads, healthy, strict=True) if ok)
    )
    assert sorted(decision.band) == [w for w in range(4) if healthy[w]]


@settings(max_examples=80, deadline=None)
@given(index=st.integers(0, 239), loads=loads_strategy, healthy=healthy_strategy, tau=st.floats(0.0, 1.0))
def test_chosen_worker_is_in_the_band_and_least_loaded_there(
    partition: Partition,
    synthetic: SyntheticCounts,
    index: int,
    loads: list[int],
    healthy: list[bool],
    tau: float,
) -> None:
    decision = LocalityBandPolicy(partition, tau=tau).choose(
        _request(synthetic, index), WorkersView.of(loads, healthy)
    )
    sims = decision.similarities
    assert sims is not None
    assert decision.worker in decision.band
    assert all(healthy[w] for w in decision.band)
    best = max(sims[w] for w in range(4) if healthy[w])
    within = {w for w in range(4) if healthy[w] and sims[w] >= best - tau}
    assert within <= set(decision.band)
    if tau > 0 and len(within) == 1 and sum(healthy) > 1:
        assert len(decision.band) == 2  # the runner-up joins a band of one
    assert loads[decision.worker] == min(loads[w] for w in decision.band)


def test_ties_in_load_go_to_the_more_similar_worker(partition: Partition, synthetic: SyntheticCounts) -> None:
    policy = LocalityBandPolicy(partition, tau=1.0)
    decision = policy.choose(_request(synthetic, 0), WorkersView.of([0, 0, 0, 0]))
    assert decision.similarities is not None
    assert decision.worker == int(np.argmax(decision.similarities))


@pytest.mark.parametrize(
    "counts",
    [
        None,
        np.zeros((6, 16), dtype=int),
        np.ones((5, 16), dtype=int),
        -np.ones((6, 16)),
        np.full((6, 16), np.nan),
    ],
    ids=["missing", "zeros", "wrong-shape", "negative", "nan"],
)
def test_unusable_signature_falls_back_to_jsq(partition: Partition, counts: np.ndarray | None) -> None:
    decision = LocalityBandPolicy(partition).choose(RequestView(counts=counts), WorkersView.of([3, 1, 2, 1]))
    assert decision.is_fallback
    assert decision.worker in (1, 3)


def test_pool_size_mismatch_is_an_error(partition: Partition, synthetic: SyntheticCounts) -> None:
    with pytest.raises(PartitionMismatchError, match="partition has 4 decode workers, the pool has 3"):
        LocalityBandPolicy(partition).choose(_request(synthetic, 0), WorkersView.of([0, 0, 0]))


@pytest.mark.parametrize("name", ["random", "rr", "jsq", "p2c", "eldr"])
def test_no_healthy_worker_is_an_error(partition: Partition, synthetic: SyntheticCounts, name: str) -> None:
    policy = make_policy(name, partition=partition)
    with pytest.raises(NoHealthyWorkerError):
        policy.choose(_request(synthetic, 0), WorkersView.of([0, 0, 0, 0], [False] * 4))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["random", "rr", "jsq", "p2c"]), healthy=healthy_strategy, loads=loads_strategy)
def test_load_balancers_only_pick_healthy_workers(name: str, healthy: list[bool], loads: list[int]) -> None:
    policy = make_policy(name, seed=3)
    for _ in range(10):
        assert healthy[policy.choose(RequestView(), WorkersView.of(loads, healthy)).worker]


def test_round_robin_cycles_and_skips_unhealthy() -> None:
    policy = make_policy("rr")
    view = WorkersView.of([0] * 4, [True, False, True, True])
    assert [policy.choose(RequestView(), view).worker for _ in range(6)] == [0, 2, 3, 0, 2, 3]


def test_jsq_breaks_ties_at_random_among_the_least_loaded() -> None:
    policy = make_policy("jsq", seed=1)
    picks = {policy.choose(RequestView(), WorkersView.of([1, 0, 0, 2])).worker for _ in range(50)}
    assert picks == {1, 2}


def test_p2c_never_picks_the_more_loaded_of_its_pair() -> None:
    policy = make_policy("p2c", seed=2)
    picks = [policy.choose(RequestView(), WorkersView.of([0, 5, 9])).worker for _ in range(200)]
    assert 2 not in picks and {0, 1} == set(picks)


def test_unknown_policy_and_missing_partition_are_config_errors(partition: Partition) -> None:
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ConfigError, match="needs a partition"):
        make_policy("eldr")
    with pytest.raises(ConfigError, match="tau must be finite and >= 0"):
        make_policy("eldr", partition=partition, tau=-1.0)


@pytest.mark.parametrize(
    ("label_counts", "workers", "expected"),
    [
        (
            {"legal": 3600, "code": 2779, "math": 2744, "medical": 2545},
            16,
            {"legal": 5, "code": 4, "math": 4, "medical": 3},
        ),
        ({"a": 90, "b": 10}, 4, {"a": 3, "b": 1}),
        ({"a": 999, "b": 1}, 4, {"a": 3, "b": 1}),
        ({"a": 1, "b": 1, "c": 1}, 2, {"a": 1, "b": 1, "c": 1}),
    ],
    ids=["paper-task", "skewed", "tiny-share", "more-labels-than-workers"],
)
def test_domain_pools_are_proportional(
    label_counts: dict[str, int], workers: int, expected: dict[str, int]
) -> None:
    pools = split_pools(label_counts, workers)
    assert {name: len(pool) for name, pool in pools.items()} == expected
    covered = sorted(w for pool in pools.values() for w in pool)
    assert set(covered) <= set(range(workers))


def test_domain_routes_within_its_pool_and_falls_back_for_unknown_labels() -> None:
    policy = DomainPolicy({"a": 50, "b": 50}, 4)
    view = WorkersView.of([0, 0, 0, 0])
    assert policy.choose(RequestView(label="a"), view).worker in policy.pools["a"]
    assert policy.choose(RequestView(label="b"), view).worker in policy.pools["b"]
    assert policy.choose(RequestView(label="zzz"), view).is_fallback
    sick = WorkersView.of([0, 0, 0, 0], [w not in policy.pools["a"] for w in range(4)])
    assert policy.choose(RequestView(label="a"), sick).is_fallback


def test_oracle_uses_decode_counts(partition: Partition, synthetic: SyntheticCounts) -> None:
    oracle = OraclePolicy(partition, tau=0.0)
    view = WorkersView.of([0, 0, 0, 0])
    assert oracle.choose(RequestView(counts=synthetic.prefill_counts[0]), view).is_fallback
    with_decode = oracle.choose(RequestView(decode_counts=synthetic.decode_counts[0]), view)
    assert not with_decode.is_fallback
