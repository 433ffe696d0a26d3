"""`fewest-new-experts`: its formula against a from-scratch reference, and its state's bookkeeping."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import ConfigError, DuplicateRequestError, NoHealthyWorkerError, PartitionMismatchError
from eldr.policy import (
    DEFAULT_LAM,
    FewestNewExpertsPolicy,
    RequestView,
    WorkersView,
    expert_overlap,
    make_policy,
)
from eldr.policy.expert_overlap import P_MAX, SCORE_TIE, activation, lam_of
from eldr.sim.presets import mi300x_qwen3_30b

L, E, K = 3, 8, 2


def random_counts(rng: np.random.Generator, tokens: int | None = None) -> npt.NDArray[np.int64]:
    """Counts `[L, E]` of `tokens` prompt tokens, each choosing K distinct experts per layer."""
    tokens = int(rng.integers(1, 12)) if tokens is None else tokens
    counts = np.zeros((L, E), dtype=np.int64)
    for _ in range(tokens):
        for layer in range(L):
            counts[layer, rng.choice(E, size=K, replace=False)] += 1
    return counts


def reference_scores(
    live: list[npt.NDArray[np.int64]],
    owners: list[int],
    counts: npt.NDArray[np.int64],
    loads: list[int],
    lam: float,
    weights: npt.NDArray[np.float64],
    num_workers: int,
) -> npt.NDArray[np.float64]:
    """score_w = D_w + (B_w + 1) m_w + lam B_w, recomputed from the live requests' counts."""

    def prob(c: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        tokens = c.sum(axis=1, keepdims=True) / K
        return np.minimum(c / tokens, P_MAX)

    p = prob(counts)
    out = np.empty(num_workers)
    for w in range(num_workers):
        absent = np.ones((L, E))
        for c, owner in zip(live, owners, strict=True):
            if owner == w:
                absent *= 1 - prob(c)
        distinct = float((weights[:, None] * (1 - absent)).sum())
        added = float((weights[:, None] * p * absent).sum())
        out[w] = distinct + (loads[w] + 1) * added + lam * loads[w]
    return out


def test_activation_is_the_share_of_tokens_that_chose_each_expert() -> None:
    counts = np.array([[3, 1, 0, 0], [2, 2, 0, 0]])  # 2 tokens, top-2 per layer
    p = activation(counts, 2)
    assert p is not None
    np.testing.assert_allclose(p.reshape(2, 4), [[P_MAX, 0.5, 0, 0], [1.0, 1.0, 0, 0]], atol=1e-6)
    assert (p <= P_MAX).all()
    for bad in (np.zeros((2, 4)), -np.ones((2, 4)), np.full((2, 4), np.nan), np.ones(4)):
        assert activation(bad, 2) is None


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_workers=st.integers(1, 4), lam=st.floats(0.0, 30.0))
def test_incremental_state_equals_a_from_scratch_recomputation(
    seed: int, num_workers: int, lam: float
) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 3.0, size=L)
    policy = FewestNewExpertsPolicy(num_workers, K, lam=lam, layer_weights=weights, shape=(L, E))
    live: dict[str, tuple[npt.NDArray[np.int64], int]] = {}
    for step in range(30):
        if live and rng.random() < 0.4:  # release a random live request (sometimes twice)
            rid = list(live)[int(rng.integers(len(live)))]
            policy.release(rid)
            if rng.random() < 0.3:
                policy.release(rid)
            del live[rid]
            continue
        counts = random_counts(rng)
        loads = rng.integers(0, 6, size=num_workers).tolist()
        view = WorkersView.of(loads)
        expected = reference_scores(
            [c for c, _ in live.values()],
            [w for _, w in live.values()],
            counts,
            loads,
            lam,
            weights,
            num_workers,
        )
        got = policy.scores(RequestView(str(step), counts), view)
        assert got is not None
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
        decision = policy.choose(RequestView(str(step), counts), view)
        best = float(got.min())  # scores within SCORE_TIE (relative) of the lowest tie: the lower index
        tied = np.flatnonzero(got <= best + SCORE_TIE * max(abs(best), 1.0))
        assert decision.worker == int(tied[0]) and not decision.is_fallback
        live[str(step)] = (counts, decision.worker)
        assert policy.live_ids == frozenset(live)
    for rid in list(live):
        policy.release(rid)
    assert policy.live_ids == frozenset()
    probe = RequestView("x", random_counts(rng, 1))
    empty = policy.scores(probe, WorkersView.of([0] * num_workers))
    assert empty is not None  # every row back to "nothing in flight": equal scores, ties to worker 0
    np.testing.assert_allclose(empty, empty[0], rtol=1e-6)
    assert policy.choose(probe, WorkersView.of([0] * num_workers)).worker == 0


def test_a_request_joins_the_batch_that_already_uses_its_experts() -> None:
    policy = FewestNewExpertsPolicy(2, K, lam=0.0, shape=(L, E))
    a, b = np.zeros((L, E), np.int64), np.zeros((L, E), np.int64)
    a[:, :2] = 5
    b[:, 4:6] = 5
    assert policy.choose(RequestView("a1", a), WorkersView.of([0, 0])).worker == 0  # tie: lower index
    assert policy.choose(RequestView("b1", b), WorkersView.of([1, 0])).worker == 1
    assert policy.choose(RequestView("a2", a), WorkersView.of([1, 1])).worker == 0
    assert policy.choose(RequestView("b2", b), WorkersView.of([2, 1])).worker == 1
    # a load term large enough sends the next one to the idle worker instead
    heavy = FewestNewExpertsPolicy(3, K, lam=1000.0, shape=(L, E))
    heavy.choose(RequestView("a1", a), WorkersView.of([0, 0, 0]))
    assert heavy.choose(RequestView("a2", a), WorkersView.of([1, 0, 0])).worker == 1


def test_only_healthy_workers_are_picked() -> None:
    policy = FewestNewExpertsPolicy(3, K, shape=(L, E))
    counts = random_counts(np.random.default_rng(0))
    assert (
        policy.choose(RequestView("r", counts), WorkersView.of([0, 0, 0], [False, False, True])).worker == 2
    )
    with pytest.raises(NoHealthyWorkerError):
        policy.choose(RequestView("s", counts), WorkersView.of([0, 0, 0], [False] * 3))
    assert policy.live_ids == frozenset({"r"})


def test_a_duplicate_live_id_is_an_error_and_release_is_idempotent() -> None:
    policy = FewestNewExpertsPolicy(2, K, shape=(L, E))
    counts = random_counts(np.random.default_rng(1))
    policy.choose(RequestView("r", counts), WorkersView.of([0, 0]))
    with pytest.raises(DuplicateRequestError, match="'r' is already in flight"):
        policy.choose(RequestView("r", counts), WorkersView.of([1, 0]))
    policy.release("r")
    policy.release("r")
    policy.release("never-seen")
    assert policy.live_ids == frozenset()
    policy.choose(RequestView("r", counts), WorkersView.of([0, 0]))  # a released id may come back
    assert policy.live_ids == frozenset({"r"})


def test_requests_without_usable_counts_are_counted_fallbacks_and_still_released() -> None:
    policy = FewestNewExpertsPolicy(3, K, shape=(L, E), seed=0)
    for rid, counts in (("none", None), ("zeros", np.zeros((L, E))), ("shape", np.ones((L + 1, E)))):
        decision = policy.choose(RequestView(rid, counts), WorkersView.of([2, 0, 1]))
        assert decision.is_fallback and decision.worker == 1
    assert policy.live_ids == frozenset({"none", "zeros", "shape"})
    for rid in ("none", "zeros", "shape"):
        policy.release(rid)
    assert policy.live_ids == frozenset()


def test_the_shape_is_learned_from_the_first_usable_counts() -> None:
    policy = FewestNewExpertsPolicy(2, K)
    assert policy.choose(RequestView("z", np.zeros((L, E))), WorkersView.of([0, 0])).is_fallback
    assert policy.shape is None
    assert not policy.choose(
        RequestView("a", random_counts(np.random.default_rng(2))), WorkersView.of([0, 0])
    ).is_fallback
    assert policy.shape == (L, E)
    assert policy.choose(RequestView("b", np.ones((L, E + 1))), WorkersView.of([0, 0])).is_fallback


def test_near_certain_experts_neither_underflow_nor_stick() -> None:
    """Hundreds of requests that all use the same experts: a product would underflow to 0 and a
    division never bring it back; the log-space state returns to exactly empty."""
    policy = FewestNewExpertsPolicy(1, K, shape=(L, E))
    counts = np.zeros((L, E), np.int64)
    counts[:, :K] = 7  # every token chose experts 0 and 1
    for i in range(400):
        policy.choose(RequestView(str(i), counts), WorkersView.of([i]))
    one = policy.scores(RequestView("x", counts), WorkersView.of([0]))
    for i in range(1, 400):
        policy.release(str(i))
    again = policy.scores(RequestView("x", counts), WorkersView.of([0]))
    fresh = FewestNewExpertsPolicy(1, K, shape=(L, E))
    fresh.choose(RequestView("0", counts), WorkersView.of([0]))
    expected = fresh.scores(RequestView("x", counts), WorkersView.of([0]))
    assert one is not None and again is not None and expected is not None
    np.testing.assert_allclose(again, expected, rtol=1e-6)


def test_rows_are_recomputed_from_the_live_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expert_overlap, "RECOMPUTE_EVERY", 3)
    rng = np.random.default_rng(3)
    policy = FewestNewExpertsPolicy(1, K, shape=(L, E))
    requests = {str(i): random_counts(rng) for i in range(12)}
    for rid, counts in requests.items():
        policy.choose(RequestView(rid, counts), WorkersView.of([0]))
    for rid in list(requests)[:7]:
        policy.release(rid)
    rest = list(requests)[7:]
    probe = random_counts(rng)
    expected = reference_scores(
        [requests[r] for r in rest], [0] * len(rest), probe, [5], policy.lam, np.ones(L), 1
    )
    got = policy.scores(RequestView("p", probe), WorkersView.of([5]))
    assert got is not None
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_workers_can_join_and_leave() -> None:
    rng = np.random.default_rng(4)
    policy = FewestNewExpertsPolicy(2, K, shape=(L, E))
    policy.choose(RequestView("a", random_counts(rng)), WorkersView.of([0, 0]))  # worker 0
    with pytest.raises(PartitionMismatchError, match="tracks 2 decode workers, the pool has 3"):
        policy.choose(RequestView("b", random_counts(rng)), WorkersView.of([0, 0, 0]))
    policy.add_worker()
    assert policy.choose(RequestView("b", random_counts(rng)), WorkersView.of([1, 0, 0])).worker == 1
    assert policy.choose(RequestView("c", random_counts(rng)), WorkersView.of([1, 1, 0])).worker == 2
    policy.remove_worker(1)  # b is forgotten, c's worker becomes 1
    assert policy.live_ids == frozenset({"a", "c"})
    probe = random_counts(rng)
    got = policy.scores(RequestView("p", probe), WorkersView.of([1, 1]))
    expected = reference_scores([], [], probe, [1, 1], policy.lam, np.ones(L), 2)
    assert got is not None and got[0] > expected[0] and got[1] > expected[1]  # both rows still hold one
    with pytest.raises(ConfigError):
        policy.remove_worker(5)


def test_lam_is_the_cost_models_load_weight() -> None:
    m = mi300x_qwen3_30b()
    derived = lam_of(
        per_request_s=m.per_request_s,
        attn_per_token_s=m.attn_per_token_s,
        per_expert_s=m.per_expert_s,
        expert_scale=1.0,
        context=1000.0,
    )
    assert derived == pytest.approx(DEFAULT_LAM) and pytest.approx(20.83, abs=0.01) == DEFAULT_LAM
    with pytest.raises(ConfigError, match="lam must be finite and >= 0"):
        FewestNewExpertsPolicy(2, K, lam=-1.0)
    with pytest.raises(ConfigError, match="lam must be finite"):
        FewestNewExpertsPolicy(2, K, lam=float("nan"))


def test_make_policy_needs_workers_and_top_k() -> None:
    with pytest.raises(ConfigError, match="needs the number of decode workers and top_k"):
        make_policy("fewest-new-experts", num_workers=2)
    policy = make_policy("fewest-new-experts", num_workers=2, top_k=K, lam=3.0)
    assert isinstance(policy, FewestNewExpertsPolicy) and policy.lam == 3.0


@pytest.mark.parametrize("name", ["random", "rr", "jsq", "p2c"])
def test_stateless_policies_release_nothing(name: str) -> None:
    policy = make_policy(name)
    policy.choose(RequestView("r"), WorkersView.of([0, 0]))
    policy.release("r")
    policy.release("unknown")
