from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import ConfigError
from eldr.kmeans import normalize_rows
from eldr.partition import Partition
from eldr.policy import LocalityBandPolicy, RequestView, WorkersView
from eldr.policy.refit import Refitter, RefittingPolicy, align_centroids, refit_centroids
from eldr.synthetic import SyntheticCounts


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 12), data=st.data())
def test_alignment_keeps_identities_under_any_permutation(seed: int, k: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    old = normalize_rows(np.abs(rng.normal(size=(k, 10))) + np.eye(k, 10) * 5)
    perm = data.draw(st.permutations(list(range(k))))
    noisy = normalize_rows(old + rng.normal(scale=0.01, size=old.shape).astype(np.float32))
    aligned = align_centroids(old, noisy[perm])
    np.testing.assert_allclose(aligned, noisy, atol=1e-6)


def test_refit_follows_drift_and_keeps_roles(partition: Partition, synthetic: SyntheticCounts) -> None:
    policy = LocalityBandPolicy(partition)
    old = policy.centroids.copy()
    signatures = partition.transform.apply(synthetic.prefill_counts)
    new = refit_centroids(signatures, old, seed=1)
    # same data, seeded at the old centroids: every worker keeps a centroid close to its own
    assert np.all(np.sum(new * old, axis=1) > 0.95)


def test_refitting_policy_refits_every_n_signatures(partition: Partition, synthetic: SyntheticCounts) -> None:
    wrapper = RefittingPolicy(LocalityBandPolicy(partition), window=100, refit_every=50)
    view = WorkersView.of([0, 0, 0, 0])
    for i in range(120):
        decision = wrapper.choose(RequestView(counts=synthetic.prefill_counts[i]), view)
        assert 0 <= decision.worker < 4
    assert wrapper.num_refits == 2
    wrapper.choose(RequestView(counts=None), view)  # no signature: routed, not recorded
    assert wrapper.num_refits == 2


def test_refitter_cuts_one_job_at_a_time_and_counts_from_the_cut(synthetic: SyntheticCounts) -> None:
    refitter = Refitter(window=50, every=10)
    centroids = np.eye(4, 8, dtype=np.float32)
    signatures = synthetic.prefill_counts.reshape(len(synthetic.prefill_counts), -1)[:, :8].astype(np.float32)
    for i in range(9):
        refitter.observe(signatures[i])
        refitter.observe(None)  # a request without a signature is not counted
    assert refitter.due(centroids) is None  # 9 < every
    refitter.observe(signatures[9])
    job = refitter.due(centroids)
    assert job is not None and job.signatures.shape == (10, 8) and job.generation == 0
    for i in range(10, 30):
        refitter.observe(signatures[i])
    assert refitter.due(centroids) is None  # one job out at a time
    centroids[0, 0] = 7.0  # the job holds a copy of the centroids of its cut
    assert job.centroids[0, 0] == 1.0
    assert refitter.accept(job.compute()) and refitter.num_refits == 1
    later = refitter.due(centroids)
    assert later is not None and later.signatures.shape == (30, 8)  # the window, up to its size
    refitter.abandon()  # a failed job frees the slot, installs nothing
    assert refitter.num_refits == 1 and not refitter.is_running


def test_a_refit_cut_before_a_pool_change_is_never_installed(partition: Partition) -> None:
    """Remove one decode instance and add another while a refit runs: same shape, other pool."""
    from eldr.proxy.config import ServeConfig
    from eldr.proxy.state import ProxyState

    urls = tuple(f"http://127.0.0.1:{8100 + w}" for w in range(4))
    config = ServeConfig(
        prefill=("http://127.0.0.1:8000",), decode=urls, partition="p.npz", refit_every=4, refit_window=8
    )
    state = ProxyState(config, partition)
    router = state.router
    assert router.band is not None
    rng = np.random.default_rng(3)
    for _ in range(8):
        counts = rng.integers(0, 5, size=(partition.num_layers, partition.num_experts))
        router.choose(RequestView(counts=counts), set())
    job = router.refit_job()
    assert job is not None and router.refit_job() is None
    before = router.band.centroids.copy()
    state.decode.workers[1].in_flight = 3  # the busiest: an added instance copies its centroid
    state.drain_decode(urls[0])  # idle: removed at once, with its row
    assert [w.url for w in state.decode.workers] == list(urls[1:])
    added = state.add_decode("http://127.0.0.1:8200")
    assert state.decode.workers[-1] is added
    assert router.band.centroids.shape == job.centroids.shape  # only the generation tells them apart
    expected = np.vstack([before[1:], before[1:2]])
    np.testing.assert_array_equal(router.band.centroids, expected)
    assert not router.install(job.compute())  # computed for the old pool: dropped
    np.testing.assert_array_equal(router.band.centroids, expected)
    assert router.refitter is not None and router.refitter.num_refused == 1
    # the next refit is cut for the new pool and is installed
    for _ in range(4):
        counts = rng.integers(0, 5, size=(partition.num_layers, partition.num_experts))
        router.choose(RequestView(counts=counts), set())
    fresh = router.refit_job()
    assert fresh is not None and fresh.generation == job.generation + 2
    assert router.install(fresh.compute())
    assert router.refitter.num_refits == 1


def test_pool_changes_are_checked(partition: Partition) -> None:
    from eldr.errors import EldrError, PoolChangeError, UnknownWorkerError
    from eldr.proxy.config import ServeConfig
    from eldr.proxy.state import ProxyState

    urls = tuple(f"http://127.0.0.1:{8100 + w}" for w in range(4))
    state = ProxyState(ServeConfig(prefill=("http://127.0.0.1:8000",), decode=urls, partition="p"), partition)
    with pytest.raises(PoolChangeError, match="already in the pool"):
        state.add_decode("http://localhost:8101/")  # another spelling of one in the pool
    with pytest.raises(UnknownWorkerError, match="no decode instance"):
        state.drain_decode("http://127.0.0.1:9999")
    for w in range(3):
        state.decode.workers[w].in_flight = 1  # busy: drained but kept until idle
        state.drain_decode(urls[w])
    assert len(state.decode) == 4 and all(w.is_draining for w in state.decode.workers[:3])
    assert state.drain_decode(urls[0]).is_draining  # draining again: no error
    with pytest.raises(PoolChangeError, match="last decode instance"):
        state.drain_decode(urls[3])
    assert issubclass(PoolChangeError, EldrError) and issubclass(UnknownWorkerError, EldrError)
    state.decode.workers[0].in_flight = 0
    assert [w.url for w in state.reap_drained()] == [urls[0]]
    assert len(state.decode) == 3


def test_refit_settings_are_validated(partition: Partition) -> None:
    with pytest.raises(ConfigError, match="window 2 must hold at least K=4"):
        RefittingPolicy(LocalityBandPolicy(partition), window=2)
    with pytest.raises(ConfigError, match="refit_every"):
        RefittingPolicy(LocalityBandPolicy(partition), refit_every=0)
    with pytest.raises(ConfigError, match="window"):
        Refitter(window=0)
