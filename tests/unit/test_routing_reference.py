"""Every public routing entry point against the independent reference in `tests/reference/formulas.py`.

Each check compares (a) the similarities with the reference's float64 ones (1e-5 absolute), (b) the
band and the pick with the reference rule applied to the implementation's own similarities (exact),
and (c) the band and the pick with the reference rule on the reference similarities, unless a near-tie
(two relevant similarities, or one and the band edge, closer than 1e-5) lets float rounding decide.
A request without a usable signature must be a fallback to one of the least-loaded healthy workers.

The generated partitions span IDF ranges of 500x with exact zeros, dropped layers kept in non-sorted
greedy order, non-identity `worker_of`, duplicate centroid rows, ties in load, unhealthy workers, and
counts of every dtype, including all-zero, zero-after-weighting, negative, NaN, inf and misshapen ones.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from tests.reference import formulas as ref

from eldr.cli import build_parser, main
from eldr.errors import ConfigError
from eldr.partition import Partition
from eldr.policy import Decision, LocalityBandPolicy, OraclePolicy, Policy, RequestView, WorkersView
from eldr.policy.refit import RefittingPolicy
from eldr.proxy.config import ServeConfig, build_config, read_yaml
from eldr.proxy.routing import DecodeRouter
from eldr.proxy.workers import Pool, Worker
from eldr.signature import SignatureTransform
from eldr.sim.costmodel import CostModel, bind
from eldr.sim.engine import PoolConfig, Requests, simulate
from eldr.sim.experiment import Experiment
from eldr.sim.tokens import TokenPlan, topk_to_masks

SIM_ATOL = 1e-5  # similarities: implementation (float32) vs reference (float64)
TIE_EPS = 1e-5  # closer than this, float rounding may order two similarities either way

VALID_KINDS = ("int", "float", "uint", "sparse", "big")
INVALID_KINDS = ("zero", "zero-weight", "negative", "nan", "inf", "wrong-shape")
TAUS = (0.0, 1e-6, 0.01, 0.1, 1.0, 2.0)
BAD_TAUS = (float("nan"), -0.1, float("inf"), float("-inf"))
BAD_TAU_IDS = ("nan", "negative", "inf", "minus-inf")


# ---------------------------------------------------------------------------------------------------
# generated cases


@dataclass(frozen=True)
class Setup:
    """A partition's raw arrays, as a producer would write them."""

    idf: npt.NDArray[np.float32]  # [L, E]
    layers: tuple[int, ...]  # kept layers, greedy (not sorted) order
    rows: npt.NDArray[np.float32]  # [K, D] partition rows: row k serves worker worker_of[k]
    worker_of: tuple[int, ...]

    @property
    def num_workers(self) -> int:
        return int(self.rows.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.idf.shape[0]), int(self.idf.shape[1])

    def partition(self) -> Partition:
        transform = SignatureTransform(idf=self.idf, layers=self.layers)
        return Partition(transform=transform, centroids=self.rows, top_k=None, worker_of=self.worker_of)

    def worker_centroids(self) -> npt.NDArray[np.float64]:
        return ref.worker_order(self.rows, self.worker_of)


@dataclass(frozen=True)
class Case:
    setup: Setup
    counts: npt.NDArray[Any]
    kind: str
    loads: list[int]
    healthy: list[bool]
    tau: float


def random_idf(rng: np.random.Generator, shape: tuple[int, int], style: str) -> npt.NDArray[np.float32]:
    if style == "extreme":  # only the two ends of a 500x range, and zeros
        values = rng.choice([0.0, 0.01, 5.0], size=shape, p=[0.2, 0.4, 0.4])
    elif style == "constant":
        values = np.full(shape, 0.7)
    else:  # log-uniform over [0.01, 5] with exact zeros
        values = np.exp(rng.uniform(np.log(0.01), np.log(5.0), size=shape))
        values[rng.random(shape) < 0.15] = 0.0
    return values.astype(np.float32)


def random_rows(rng: np.random.Generator, k: int, dim: int, style: str, duplicates: int) -> npt.NDArray[Any]:
    if style == "signed":
        raw = rng.standard_normal((k, dim))
    elif style == "sparse":
        raw = rng.random((k, dim)) * (rng.random((k, dim)) < 0.4)
    else:
        raw = rng.random((k, dim)) ** 3
    raw[np.linalg.norm(raw, axis=1) == 0, 0] = 1.0
    for _ in range(duplicates if k > 1 else 0):
        src, dst = rng.choice(k, size=2, replace=False)
        raw[dst] = raw[src]
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


def random_counts(rng: np.random.Generator, kind: str, setup: Setup, dtype: str) -> npt.NDArray[Any]:
    num_layers, num_experts = setup.shape
    shape = (num_layers, num_experts)
    if kind == "wrong-shape":
        bad = [(num_layers + 1, num_experts), (num_layers, num_experts + 1), (num_layers * num_experts,)]
        return rng.integers(0, 5, size=bad[int(rng.integers(len(bad)))]).astype(dtype)
    if kind == "zero":
        return np.zeros(shape, dtype=dtype)
    if kind == "zero-weight":  # counts only where the weight is zero: a dropped layer or idf == 0
        weight = np.zeros(shape, dtype=np.float64)
        kept = sorted(setup.layers)
        weight[kept] = setup.idf[kept]
        counts = rng.integers(1, 9, size=shape) * (weight == 0)
        return counts.astype(dtype)
    if kind in ("float", "nan", "inf"):
        counts_f = rng.random(shape) * 20.0 * (rng.random(shape) < 0.6)
        if kind != "float":
            counts_f.flat[int(rng.integers(counts_f.size))] = np.nan if kind == "nan" else np.inf
        return counts_f.astype(dtype if dtype.startswith("float") else "float64")
    if kind == "sparse":
        counts = np.zeros(shape, dtype=np.int64)
        counts.flat[int(rng.integers(counts.size))] = int(rng.integers(1, 4))
        return counts.astype(dtype)
    if kind == "big":
        return rng.integers(0, 100_000, size=shape).astype("int64" if dtype == "uint16" else dtype)
    counts = rng.integers(0, 12, size=shape) * (rng.random(shape) < 0.7)
    if kind == "negative":
        counts[np.unravel_index(int(rng.integers(counts.size)), shape)] = -int(rng.integers(1, 5))
        return counts.astype("float32" if dtype == "uint16" else dtype)
    return counts.astype(dtype)


@st.composite
def setups(draw: st.DrawFn, max_workers: int = 6) -> Setup:
    num_layers = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, max_workers))
    order = draw(st.permutations(range(num_layers)))
    layers = tuple(order[: draw(st.integers(1, num_layers))])
    worker_of = tuple(draw(st.permutations(range(k))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idf = random_idf(rng, (num_layers, num_experts), draw(st.sampled_from(["wide", "extreme", "constant"])))
    dim = len(layers) * num_experts
    rows = random_rows(
        rng, k, dim, draw(st.sampled_from(["dense", "sparse", "signed"])), draw(st.integers(0, 2))
    )
    return Setup(idf, layers, rows, worker_of)


taus = st.one_of(st.sampled_from(TAUS), st.floats(0.0, 3.0, allow_nan=False))


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...] = VALID_KINDS + INVALID_KINDS) -> Case:
    setup = draw(setups())
    k = setup.num_workers
    # valid counts twice as often as each invalid kind
    kind = draw(st.sampled_from([x for x in kinds for _ in range(2 if x in VALID_KINDS else 1)]))
    dtype = draw(st.sampled_from(["int64", "int32", "uint16", "float32", "float64"]))
    if kind in ("nan", "inf"):
        dtype = draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    counts = random_counts(rng, kind, setup, dtype)
    loads = draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))
    healthy = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    if not any(healthy):
        healthy[draw(st.integers(0, k - 1))] = True
    return Case(setup, counts, kind, loads, healthy, draw(taus))


# ---------------------------------------------------------------------------------------------------
# checks


def is_ambiguous(sims: npt.NDArray[np.float64], healthy: list[bool], tau: float, members: list[int]) -> bool:
    """Whether a near-tie lets float rounding change the band or the pick under `sims`."""
    ok = [k for k in range(len(sims)) if healthy[k]]
    best_k = max(ok, key=lambda k: (sims[k], -k))
    best = sims[best_k]
    edge = best - tau
    if any(k != best_k and abs(sims[k] - edge) < TIE_EPS for k in ok):
        return True  # a worker on the band's edge
    # a band member (a runner-up included) nearly tied with another healthy worker: the band, the
    # runner-up or the pick among equal loads may go either way
    return any(i != j and abs(sims[i] - sims[j]) < TIE_EPS for i in members for j in ok)


def check_decision(
    decision: Decision,
    counts: Any,
    idf: npt.ArrayLike,
    layers: tuple[int, ...] | list[int],
    centroids: npt.ArrayLike,
    loads: npt.ArrayLike,
    healthy: npt.ArrayLike,
    tau: float,
) -> None:
    """`decision` agrees with the reference routing of `counts` (centroids in worker order)."""
    loads_list = [int(x) for x in np.asarray(loads)]
    healthy_list = [bool(x) for x in np.asarray(healthy)]
    expected = ref.route(counts, idf, layers, centroids, loads_list, healthy_list, tau)
    if expected is None:
        assert decision.is_fallback, "no usable signature: the decision must be a fallback"
        assert decision.worker in ref.least_loaded_healthy(loads_list, healthy_list)
        assert decision.band == ()
        return
    worker, sims, members = expected
    assert not decision.is_fallback
    assert decision.similarities is not None
    got = np.asarray(decision.similarities, dtype=np.float64)
    np.testing.assert_allclose(got, sims, rtol=0, atol=SIM_ATOL, err_msg="similarities differ")
    assert list(decision.band) == ref.band(got, healthy_list, tau), "band rule on its own similarities"
    assert decision.worker == ref.pick(list(decision.band), got, loads_list), "pick rule"
    if is_ambiguous(sims, healthy_list, tau, members):
        if currently_in_test_context():
            event("near-tie: band compared on the implementation's similarities only")
        return
    assert list(decision.band) == members, "band differs from the reference"
    assert decision.worker == worker, "pick differs from the reference"


def check_case(decision: Decision, case: Case, centroids: npt.ArrayLike | None = None) -> None:
    setup = case.setup
    check_decision(
        decision,
        case.counts,
        setup.idf,
        setup.layers,
        setup.worker_centroids() if centroids is None else centroids,
        case.loads,
        case.healthy,
        case.tau,
    )


def view_of(case: Case) -> WorkersView:
    return WorkersView.of(case.loads, case.healthy)


def reference_signature(case: Case) -> npt.NDArray[np.float64] | None:
    num_layers, num_experts = case.setup.shape
    values = ref.usable_counts(case.counts, num_layers, num_experts)
    return None if values is None else ref.signature(values, case.setup.idf, case.setup.layers)


# ---------------------------------------------------------------------------------------------------
# the policy objects


@settings(max_examples=1500, deadline=None)
@given(case=cases())
def test_locality_band_choose_matches_reference(case: Case) -> None:
    policy = LocalityBandPolicy(case.setup.partition(), tau=case.tau)
    check_case(policy.choose(RequestView(counts=case.counts), view_of(case)), case)


@settings(max_examples=600, deadline=None)
@given(case=cases())
def test_signature_and_choose_signature_match_reference(case: Case) -> None:
    part = case.setup.partition()
    policy = LocalityBandPolicy(part, tau=case.tau)
    expected = reference_signature(case)
    vec = policy.signature(RequestView(counts=case.counts))
    if expected is None:
        assert vec is None
    else:
        assert vec is not None
        np.testing.assert_allclose(vec, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(part.transform.apply(case.counts), expected, rtol=0, atol=1e-5)
    usable = ref.usable_counts(case.counts, *case.setup.shape) is not None
    applied = part.transform.apply(case.counts) if usable else None
    check_case(policy.choose_signature(applied, view_of(case)), case)


@settings(max_examples=300, deadline=None)
@given(case=cases(), refit_every=st.sampled_from([1, 10_000]))
def test_refitting_policy_matches_reference(case: Case, refit_every: int) -> None:
    inner = LocalityBandPolicy(case.setup.partition(), tau=case.tau)
    policy = RefittingPolicy(inner, window=max(8, case.setup.num_workers), refit_every=refit_every)
    rng = np.random.default_rng(3)
    warmup = [random_counts(rng, "int", case.setup, "int64") for _ in range(12)]
    for counts in warmup:  # fills the window; with refit_every=1 the centroids are refitted too
        policy.choose(RequestView(counts=counts), WorkersView.of([0] * case.setup.num_workers))
    current = inner.centroids.astype(np.float64)  # row w for worker w, as refitted
    if refit_every > 1:
        assert policy.num_refits == 0
        np.testing.assert_allclose(current, case.setup.worker_centroids(), rtol=0, atol=0)
    else:
        usable = sum(ref.signature(c, case.setup.idf, case.setup.layers) is not None for c in warmup)
        assert policy.num_refits == max(0, usable - case.setup.num_workers + 1)
    check_case(policy.choose(RequestView(counts=case.counts), view_of(case)), case, current)


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_oracle_routes_by_decode_counts(case: Case) -> None:
    policy = OraclePolicy(case.setup.partition(), tau=case.tau)
    decoy = np.ones(case.setup.shape, dtype=np.int64)  # prefill counts the oracle must ignore
    check_case(policy.choose(RequestView(counts=decoy, decode_counts=case.counts), view_of(case)), case)
    assert policy.choose(RequestView(counts=case.counts), view_of(case)).is_fallback


# ---------------------------------------------------------------------------------------------------
# the simulator


class Recorder:
    """Delegates to a policy and records every call: (request, workers, centroids used, decision)."""

    def __init__(self, inner: Policy, centroids: Callable[[], npt.NDArray[np.float32]]) -> None:
        self.inner = inner
        self.name = inner.name
        self._centroids = centroids
        self.calls: list[tuple[RequestView, WorkersView, npt.NDArray[np.float64], Decision]] = []

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        frozen = WorkersView(workers.in_flight.copy(), workers.healthy.copy())
        centroids = self._centroids().astype(np.float64)  # before a refit inside `choose`
        decision = self.inner.choose(request, workers)
        self.calls.append((request, frozen, centroids, decision))
        return decision

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def tiny_requests(rng: np.random.Generator, setup: Setup, num_requests: int) -> Requests:
    num_layers, num_experts = setup.shape
    kinds = rng.choice(["int", "float", "sparse", "zero", "zero-weight", "nan"], size=num_requests)
    views = [
        RequestView(request_id=str(i), counts=random_counts(rng, str(kind), setup, "int64"))
        if kind not in ("float", "nan")
        else RequestView(request_id=str(i), counts=random_counts(rng, str(kind), setup, "float32"))
        for i, kind in enumerate(kinds)
    ]
    out = rng.integers(0, 6, size=num_requests)
    offsets = np.zeros(num_requests + 1, dtype=np.int64)
    np.cumsum(out, out=offsets[1:])
    top_k = min(2, num_experts)
    topk = np.array(
        [[rng.permutation(num_experts)[:top_k] for _ in range(num_layers)] for _ in range(int(offsets[-1]))]
    ).reshape(int(offsets[-1]), num_layers, top_k)
    arrival = np.cumsum(rng.exponential(0.004, size=num_requests))
    return Requests(
        arrival_s=arrival - arrival[0],
        prompt_tokens=rng.integers(4, 40, size=num_requests),
        output_tokens=out.astype(np.int64),
        views=views,
        plan=TokenPlan(topk_to_masks(topk, num_experts), offsets),
    )


def tiny_cost(setup: Setup) -> CostModel:
    num_layers, num_experts = setup.shape
    return CostModel(
        name="tiny",
        num_layers=num_layers,
        num_experts=num_experts,
        base_s=0.01,
        per_request_s=0.001,
        moe_layer_s=0.001,
        per_expert_s=0.002,
        attn_per_token_s=0.0,
        prefill_base_s=0.0,
        prefill_per_token_s=0.0001,
        kv_transfer_per_token_s=0.0,
        num_prefill_workers=2,
        max_batch=3,
        kv_capacity_tokens=10_000,
    )


@settings(max_examples=60, deadline=None)
@given(setup=setups(), tau=taus, seed=st.integers(0, 2**16), is_refit=st.booleans())
def test_simulator_decisions_match_reference(setup: Setup, tau: float, seed: int, is_refit: bool) -> None:
    rng = np.random.default_rng(seed)
    requests = tiny_requests(rng, setup, 40)
    band = LocalityBandPolicy(setup.partition(), tau=tau, seed=seed)
    policy: Policy = band
    if is_refit:
        policy = RefittingPolicy(band, window=max(6, setup.num_workers), refit_every=5)
    recorder = Recorder(policy, lambda: band.centroids)
    num_layers, num_experts = setup.shape
    step_cost = bind(tiny_cost(setup), np.arange(num_layers), num_layers, num_experts)
    run = simulate(requests, recorder, step_cost, PoolConfig(setup.num_workers, 3, 10_000))
    assert len(recorder.calls) == requests.num_requests
    assert run.num_fallbacks == sum(decision.is_fallback for *_, decision in recorder.calls)
    assert max(int(view.in_flight.max()) for _, view, _, _ in recorder.calls) >= 1  # loads did vary
    for request, view, centroids, decision in recorder.calls:
        assert run.worker[int(request.request_id)] == decision.worker
        check_decision(
            decision, request.counts, setup.idf, setup.layers, centroids, view.in_flight, view.healthy, tau
        )


# ---------------------------------------------------------------------------------------------------
# the proxy


@settings(max_examples=400, deadline=None)
@given(
    case=cases(),
    refit_every=st.sampled_from([0, 8]),
    draining=st.lists(st.booleans(), min_size=6, max_size=6),
    excluded=st.sets(st.integers(0, 5), max_size=2),
)
def test_decode_router_matches_reference(
    case: Case, refit_every: int, draining: list[bool], excluded: set[int]
) -> None:
    k = case.setup.num_workers
    pool = Pool("decode", tuple(f"http://decode-{w}:8000" for w in range(k)))
    for w, worker in enumerate(pool.workers):
        worker.in_flight = case.loads[w]
        worker.is_healthy = case.healthy[w]
        worker.is_draining = draining[w] and case.healthy[w]
    routable = [case.healthy[w] and not draining[w] and w not in excluded for w in range(k)]
    if not any(routable):  # keep one routable worker: let the first healthy one stay
        first = case.healthy.index(True)
        pool.workers[first].is_draining = False
        excluded = excluded - {first}
        routable[first] = True
    router = DecodeRouter(
        pool, "eldr", case.setup.partition(), tau=case.tau, seed=0, refit_every=refit_every, refit_window=8
    )
    decision = router.choose(RequestView(counts=case.counts), {pool.workers[w] for w in excluded if w < k})
    check_decision(
        decision,
        case.counts,
        case.setup.idf,
        case.setup.layers,
        case.setup.worker_centroids(),
        case.loads,
        routable,
        case.tau,
    )
    expected = reference_signature(case)
    if not refit_every:
        assert router.refitter is None
    elif expected is not None:
        assert router.refitter is not None and len(router.refitter.recent()) == 1
        np.testing.assert_allclose(router.refitter.recent()[0], expected, rtol=0, atol=1e-5)
    else:
        assert router.refitter is not None and router.refitter.recent() == []


# ---------------------------------------------------------------------------------------------------
# the command line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(kinds=("int", "float", "sparse", "big", "zero", "zero-weight")))
def test_cli_route_matches_reference(
    case: Case, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path_factory.mktemp("route")
    part_path, counts_path = folder / "part.npz", folder / "counts.npy"
    case.setup.partition().save(part_path)
    counts = np.round(case.counts)  # the CLI takes whole counts only
    np.save(counts_path, counts)
    loads = ",".join(str(x) for x in case.loads)
    capsys.readouterr()
    argv = ["route", "--partition", str(part_path), "--counts", str(counts_path), "--loads", loads]
    assert main([*argv, f"--tau={case.tau!r}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = ref.route_partition_file(part_path, counts, case.loads, [True] * len(case.loads), case.tau)
    if expected is None:
        assert out["is_fallback"] is True and out["similarities"] == [] and out["band"] == []
        assert out["worker"] in ref.least_loaded_healthy(case.loads, [True] * len(case.loads))
        return
    worker, sims, members = expected
    assert out["is_fallback"] is False
    np.testing.assert_allclose(out["similarities"], sims, rtol=0, atol=SIM_ATOL)
    assert out["worker"] in out["band"]
    assert case.loads[out["worker"]] == min(case.loads[w] for w in out["band"])
    if not is_ambiguous(sims, [True] * len(case.loads), case.tau, members):
        assert out["band"] == members
        assert out["worker"] == worker


@pytest.mark.parametrize("kind", ["negative", "nan", "wrong-shape"], ids=["negative", "nan", "wrong-shape"])
def test_cli_route_rejects_unusable_counts(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = _fixed_setup()
    setup.partition().save(tmp_path / "part.npz")
    counts = random_counts(np.random.default_rng(0), kind, setup, "float64")
    np.save(tmp_path / "counts.npy", counts)
    argv = ["route", "--partition", str(tmp_path / "part.npz"), "--counts", str(tmp_path / "counts.npy")]
    assert main([*argv, "--loads", "0,0,0"]) == 2
    assert "eldr route: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the band rule, by hand


def _fixed_setup() -> Setup:
    """3 workers over L=2 (layer 1 dropped), E=3; row k serves worker worker_of[k]."""
    idf = np.array([[0.01, 5.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    rows = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    return Setup(idf, (0,), rows, (2, 0, 1))


def _axis_setup(rows: list[list[float]]) -> Setup:
    """One layer, idf 1: the signature of counts c is c / ||c||, so similarities are exact."""
    arr = np.asarray(rows, dtype=np.float64)
    unit = (arr / np.linalg.norm(arr, axis=1, keepdims=True)).astype(np.float32)
    return Setup(np.ones((1, arr.shape[1]), dtype=np.float32), (0,), unit, tuple(range(arr.shape[0])))


# workers' centroids: e1, e2, e1 (a duplicate), e3; counts [4, 3, 0] -> similarities [.8, .6, .8, 0]
AXES = [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]
COUNTS = np.array([[4, 3, 0]])


@pytest.mark.parametrize(
    ("tau", "loads", "healthy", "band", "worker"),
    [
        (0.0, [5, 0, 5, 0], [True] * 4, (0, 2), 0),
        (0.0, [6, 0, 5, 0], [True] * 4, (0, 2), 2),
        (0.0, [0, 0, 0, 0], [False, True, True, True], (2,), 2),
        (0.0, [0, 0, 0, 0], [False, True, False, True], (1,), 1),
        (0.1, [0, 0, 0, 0], [False, True, False, True], (1, 3), 1),
        (0.1, [3, 0, 0, 0], [False, True, False, True], (1, 3), 1),
        (0.1, [3, 2, 0, 1], [False, True, False, True], (1, 3), 3),
        (0.1, [1, 0, 1, 0], [True] * 4, (0, 2), 0),
        (0.25, [1, 0, 1, 0], [True] * 4, (0, 1, 2), 1),
        (0.25, [1, 1, 1, 0], [True] * 4, (0, 1, 2), 0),
        (0.7, [1, 1, 1, 1], [True] * 4, (0, 1, 2), 0),
        (0.81, [1, 1, 1, 1], [True] * 4, (0, 1, 2, 3), 0),
        (0.81, [1, 1, 1, 0], [True] * 4, (0, 1, 2, 3), 3),
    ],
    ids=[
        "tau0-exact-tie-both-in-band-lower-index-on-load-tie",
        "tau0-exact-tie-lighter-one",
        "tau0-best-unhealthy-its-twin-alone",
        "tau0-single-member-no-runner-up",
        "tau-single-member-runner-up-joins",
        "runner-up-lighter-wins",
        "runner-up-heavier-loses",
        "load-tie-equal-sims-lower-index",
        "wider-band-least-loaded",
        "load-tie-more-similar-then-lower-index",
        "band-edge-excludes-orthogonal",
        "band-edge-includes-orthogonal",
        "wide-band-jsq",
    ],
)
def test_band_rule_examples(
    tau: float, loads: list[int], healthy: list[bool], band: tuple[int, ...], worker: int
) -> None:
    setup = _axis_setup(AXES)
    decision = LocalityBandPolicy(setup.partition(), tau=tau).choose(
        RequestView(counts=COUNTS), WorkersView.of(loads, healthy)
    )
    assert decision.similarities is not None
    np.testing.assert_allclose(decision.similarities, [0.8, 0.6, 0.8, 0.0], rtol=0, atol=1e-6)
    assert (decision.band, decision.worker) == (band, worker)
    expected = ref.route(COUNTS, setup.idf, setup.layers, setup.worker_centroids(), loads, healthy, tau)
    assert expected is not None
    assert (tuple(expected[2]), expected[0]) == (band, worker)


def test_runner_up_ties_go_to_the_lower_index() -> None:
    # workers: e2, e1, e2 -> similarities [.6, .8, .6]; the band {1} takes the runner-up 0, not 2
    setup = _axis_setup([[0, 1, 0], [1, 0, 0], [0, 1, 0]])
    policy = LocalityBandPolicy(setup.partition(), tau=0.05)
    decision = policy.choose(RequestView(counts=COUNTS), WorkersView.of([5, 5, 0]))
    assert (decision.band, decision.worker) == ((0, 1), 1)  # load tie: the more similar of the two
    sick = policy.choose(RequestView(counts=COUNTS), WorkersView.of([5, 5, 0], [False, True, True]))
    assert (sick.band, sick.worker) == ((1, 2), 2)


def test_tau_one_includes_an_orthogonal_worker() -> None:
    # counts on expert 0 only: similarities exactly [1, 0, 0]; tau = 1 is JSQ over all three
    setup = _axis_setup([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    decision = LocalityBandPolicy(setup.partition(), tau=1.0).choose(
        RequestView(counts=np.array([[5, 0, 0]])), WorkersView.of([2, 1, 1])
    )
    assert decision.band == (0, 1, 2)
    assert decision.worker == 1


def test_partition_rows_are_used_in_worker_order() -> None:
    # row 0 (e2) serves worker 2, row 1 (e1) worker 0, row 2 (e3) worker 1; idf 0.01 / 5 / 0 on layer 0
    setup = _fixed_setup()
    policy = LocalityBandPolicy(setup.partition(), tau=0.0)
    counts = np.array([[0, 3, 7], [9, 9, 9]])  # expert 2 has idf 0, layer 1 is dropped: only e2 counts
    decision = policy.choose(RequestView(counts=counts), WorkersView.of([0, 0, 0]))
    assert decision.band == (2,) and decision.worker == 2
    np.testing.assert_allclose(decision.similarities, [0.0, 0.0, 1.0], rtol=0, atol=1e-6)
    check_decision(
        decision, counts, setup.idf, setup.layers, setup.worker_centroids(), [0, 0, 0], [True] * 3, 0.0
    )


def test_idf_weights_the_counts_once() -> None:
    # weighted counts [500 x 0.01, 1 x 5, 7 x 0] = [5, 5, 0] (layer 1 dropped): the signature is
    # (e1 + e2) / sqrt(2) whatever the idf of those dimensions; weighting the centroids again (the old
    # double-IDF formula) would make e2's worker 500x more similar than e1's
    setup = _fixed_setup()
    part = setup.partition()
    policy = LocalityBandPolicy(part, tau=0.0)
    counts = np.array([[500, 1, 7], [9, 9, 9]])
    view = WorkersView.of([0, 0, 0])
    for decision in (
        policy.choose(RequestView(counts=counts), view),
        policy.choose_signature(part.transform.apply(counts), view),
    ):
        np.testing.assert_allclose(decision.similarities, [0.5**0.5, 0.0, 0.5**0.5], rtol=0, atol=1e-6)
        assert decision.band == (0, 2) and decision.worker == 0


@settings(max_examples=200, deadline=None)
@given(case=cases(kinds=VALID_KINDS), tau=st.floats(1.0, 50.0))
def test_tau_at_least_one_is_jsq_among_healthy_workers(case: Case, tau: float) -> None:
    setup = case.setup
    rows = np.abs(setup.rows)  # non-negative centroids: similarities lie in [0, 1]
    setup = Setup(setup.idf, setup.layers, rows, setup.worker_of)
    decision = LocalityBandPolicy(setup.partition(), tau=tau).choose(
        RequestView(counts=case.counts), view_of(case)
    )
    healthy = [w for w in range(setup.num_workers) if case.healthy[w]]
    if decision.is_fallback:
        assert reference_signature(case) is None
        return
    assert list(decision.band) == healthy
    assert case.loads[decision.worker] == min(case.loads[w] for w in healthy)


def test_unusable_counts_fall_back_to_the_least_loaded_healthy_worker() -> None:
    setup = _fixed_setup()
    policy = LocalityBandPolicy(setup.partition(), tau=0.1)
    view = WorkersView.of([0, 2, 0], [False, True, True])
    for counts in (
        np.zeros((2, 3)),
        np.array([[0, 0, 4], [1, 1, 1]]),  # weight only on idf 0 and a dropped layer
        np.array([[0, -1, 0], [0, 0, 0]]),
        np.array([[0, np.nan, 0], [0, 0, 0]]),
        np.array([[0, np.inf, 0], [0, 0, 0]]),
        np.ones((3, 2)),
        None,
    ):
        decision = policy.choose(RequestView(counts=counts), view)
        assert decision.is_fallback and decision.worker == 2 and decision.band == ()


def test_duplicate_centroids_tie() -> None:
    """Identical centroid rows may score an ulp apart in float32 (BLAS sums rows in different orders);
    they must still tie: both in the band at tau = 0, and equal loads go to the lower index."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_experts, k = int(rng.integers(3, 40)), int(rng.integers(2, 9))
        raw = rng.random((k, 2 * num_experts))
        raw[k - 1] = raw[0]
        rows = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
        setup = Setup(np.ones((2, num_experts), dtype=np.float32), (1, 0), rows, tuple(range(k)))
        counts = rng.integers(1, 5, size=(2, num_experts))
        for tau in (0.0, 0.1):
            decision = LocalityBandPolicy(setup.partition(), tau=tau).choose(
                RequestView(counts=counts), WorkersView.of([0] * k)
            )
            assert decision.similarities is not None
            assert abs(float(decision.similarities[0]) - float(decision.similarities[k - 1])) < 1e-6
            if float(decision.similarities.max()) - float(decision.similarities[0]) < 1e-6:
                assert 0 in decision.band and k - 1 in decision.band  # the best twins are both in
                if tau == 0.0:
                    assert decision.worker == 0  # equal load, equal similarity: the lower index


def test_new_decode_instance_shares_its_clone_region() -> None:
    """The proxy's add_centroid twin: an idle new instance gets the busy original's requests."""
    raw = np.array(
        [
            [8, 7, 8, 7, 9, 8, 5, 9],
            [7, 7, 4, 4, 3, 1, 6, 9],
            [9, 4, 8, 7, 3, 6, 3, 9],
            [7, 6, 7, 9, 8, 5, 2, 9],
        ],
        dtype=np.float64,
    )
    rows = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    part = Partition(
        transform=SignatureTransform(idf=np.ones((1, 8), np.float32), layers=(0,)),
        centroids=rows,
        top_k=None,
        worker_of=(0, 1, 2, 3),
    )
    pool = Pool("decode", tuple(f"http://d{i}:1" for i in range(4)))
    router = DecodeRouter(pool, "eldr", part, tau=0.0, seed=0)
    pool.workers[3].in_flight = 5
    pool.workers.append(Worker("http://d4:1", "decode"))
    router.add_centroid()
    decision = router.choose(RequestView(counts=np.array([[5, 4, 2, 2, 9, 3, 1, 9]])), set())
    assert decision.band == (3, 4) and decision.worker == 4


# ---------------------------------------------------------------------------------------------------
# tau validation


@pytest.mark.parametrize("tau", BAD_TAUS, ids=BAD_TAU_IDS)
def test_policy_and_experiment_reject_bad_tau(tau: float) -> None:
    with pytest.raises(ConfigError, match="tau"):
        LocalityBandPolicy(_fixed_setup().partition(), tau=tau)
    with pytest.raises(ConfigError, match="tau"):
        Experiment(policies=("eldr",), tau=tau)


def test_policy_and_experiment_accept_tau_zero() -> None:
    assert LocalityBandPolicy(_fixed_setup().partition(), tau=0.0).tau == 0.0
    assert Experiment(policies=("eldr",), tau=0.0).tau == 0.0


SERVE_YAML = "prefill: [http://p:1]\ndecode: [http://d:1]\npartition: part.npz\n"


@pytest.mark.parametrize(
    ("tau", "yaml_value"),
    list(zip(BAD_TAUS, [".nan", "-0.1", ".inf", "-.inf"], strict=True)),
    ids=BAD_TAU_IDS,
)
def test_serve_config_rejects_bad_tau(tau: float, yaml_value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tau"):
        ServeConfig(prefill=("http://p:1",), decode=("http://d:1",), partition="part.npz", tau=tau)
    path = tmp_path / "serve.yaml"
    path.write_text(f"{SERVE_YAML}tau: {yaml_value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tau"):
        build_config(read_yaml(path), {})
    from eldr.commands.serve import load_config

    with pytest.raises(ConfigError, match="tau"):
        load_config(build_parser().parse_args(["serve", "--config", str(path)]))


def test_serve_config_accepts_tau_zero(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(f"{SERVE_YAML}tau: 0\n", encoding="utf-8")
    assert build_config(read_yaml(path), {}).tau == 0.0
    flags = {"prefill": ["http://p:1"], "decode": ["http://d:1"], "partition": "p", "tau": 0.0}
    assert build_config({}, flags).tau == 0.0


def _parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc_info:
        build_parser().parse_args(argv)
    assert exc_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("text", ["nan", "-1", "inf", "-inf", "-0.1", "abc"])
@pytest.mark.parametrize("command", ["route", "simulate", "serve"])
def test_cli_rejects_bad_tau_when_parsing(
    command: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    required = {
        "route": ["--partition", "p.npz", "--counts", "c.npy", "--loads", "0"],
        "simulate": ["--trace", "t.npz"],
        "serve": [],
    }[command]
    err = _parse_error([command, *required, f"--tau={text}"], capsys)
    assert "--tau" in err and text in err


def test_cli_main_exits_2_on_bad_tau(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["route", "--partition", "p.npz", "--counts", "c.npy", "--loads", "0", "--tau", "nan"],
        ["simulate", "--trace", "t.npz", "--tau", "-1"],
        ["serve", "--tau", "inf"],
    ):
        with pytest.raises(SystemExit) as exc_info:
            main(argv)
        assert exc_info.value.code == 2
        assert "--tau" in capsys.readouterr().err


def test_cli_accepts_tau_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup = _fixed_setup()
    setup.partition().save(tmp_path / "part.npz")
    np.save(tmp_path / "counts.npy", np.array([[1, 3, 0], [0, 0, 0]]))
    argv = ["route", "--partition", str(tmp_path / "part.npz"), "--counts", str(tmp_path / "counts.npy")]
    assert main([*argv, "--loads", "0,0,0", "--tau", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["band"] == [2] and out["worker"] == 2
    for command, required in (("simulate", ["--trace", "t.npz"]), ("serve", [])):
        args: argparse.Namespace = build_parser().parse_args([command, *required, "--tau", "0"])
        assert args.tau == 0.0
