"""`eldr.calibrate.fit_partition` against the independent reference in `tests/reference/formulas.py`.

On small random calibration sets (balanced and plain k-means, with and without decode counts): the
partition's IDF is the reference IDF, its transform gives the reference signatures, every centroid is
the unit mean of its members' reference signatures (members: the assignment the k-means returned,
recorded by wrapping `spherical_kmeans`), cluster sizes sum to N and stay within ceil(N / K) when
balanced, and the returned assignment is optimal (balanced: same cost as scipy's own capacitated
assignment; plain: every point at its most similar centroid).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import optimize
from tests.reference import formulas as ref

import eldr.calibrate
from eldr.calibrate import FitConfig, fit_partition
from eldr.kmeans import KMeansResult
from eldr.partition import Partition

NUM_LAYERS, NUM_EXPERTS, TOP_K = 4, 6, 2


def calibration_set(
    seed: int, num_requests: int, num_clusters: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Prefill and decode counts `[N, L, E]` of planted clusters, with the IDF extremes built in.

    Expert 0 of layer 0 is used by every request (idf exactly 0), expert 5 of every layer by none
    (idf log(N + 1)), and request 3 uses only expert (0, 0), so its signature is zero.
    """
    rng = np.random.default_rng(seed)
    prefs = rng.dirichlet(np.full(NUM_EXPERTS - 1, 0.3), size=(num_clusters, NUM_LAYERS))  # [C, L, E-1]
    prefill = np.zeros((num_requests, NUM_LAYERS, NUM_EXPERTS), dtype=np.int64)
    decode = np.zeros_like(prefill)
    for i in range(num_requests):
        cluster = i % num_clusters
        for layer in range(NUM_LAYERS):
            for out, tokens in ((prefill, int(rng.integers(2, 12))), (decode, int(rng.integers(4, 20)))):
                for _ in range(tokens):
                    chosen = rng.choice(NUM_EXPERTS - 1, size=TOP_K, replace=False, p=prefs[cluster, layer])
                    out[i, layer, chosen] += 1
    prefill[:, 0, 0] = np.maximum(prefill[:, 0, 0], 1)
    prefill[3] = 0
    prefill[3, 0, 0] = 5
    return prefill, decode


class Recorded:
    """Wraps `spherical_kmeans` as `calibrate` calls it, keeping the result (its assignment)."""

    def __init__(self) -> None:
        self.results: list[KMeansResult] = []
        self._inner = eldr.calibrate.spherical_kmeans

    def __call__(self, *args: Any, **kwargs: Any) -> KMeansResult:
        result = self._inner(*args, **kwargs)
        self.results.append(result)
        return result


FITS = [
    (1, 40, 4, True, True),
    (2, 41, 3, True, False),
    (3, 30, 4, False, True),
    (4, 36, 3, False, False),
    (5, 25, 5, True, True),
    (6, 25, 2, False, True),
    (8, 60, 6, True, True),
    (9, 48, 6, False, False),
]
FIT_IDS = [
    f"seed{seed}-n{n}-k{k}-{'balanced' if balanced else 'plain'}-{'decode' if decode else 'prefill-only'}"
    for seed, n, k, balanced, decode in FITS
]


@pytest.mark.parametrize(("seed", "num_requests", "k", "is_balanced", "with_decode"), FITS, ids=FIT_IDS)
def test_fit_partition_matches_reference(
    seed: int,
    num_requests: int,
    k: int,
    is_balanced: bool,
    with_decode: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefill, decode = calibration_set(seed, num_requests, num_clusters=3)
    recorded = Recorded()
    monkeypatch.setattr(eldr.calibrate, "spherical_kmeans", recorded)
    config = FitConfig(num_workers=k, seed=seed, is_balanced=is_balanced, max_iter=300, num_pairs=2000)
    part = fit_partition(prefill, config, decode_counts=decode if with_decode else None, top_k=TOP_K)
    assert len(recorded.results) == 1
    labels = recorded.results[0].labels

    # IDF, layers, signatures
    expected_idf = ref.idf(prefill)
    np.testing.assert_allclose(part.transform.idf, expected_idf, rtol=0, atol=1e-6)
    assert part.transform.idf[0, 0] == 0.0
    np.testing.assert_allclose(part.transform.idf[:, 5], math.log(num_requests + 1), rtol=0, atol=1e-6)
    if not with_decode:
        assert part.transform.layers == tuple(range(NUM_LAYERS))
    layers = part.transform.layers
    signatures = part.transform.apply(prefill)
    reference = np.zeros(signatures.shape, dtype=np.float64)
    for i in range(num_requests):
        sig = ref.signature(prefill[i], expected_idf, layers)
        if sig is not None:
            reference[i] = sig
    np.testing.assert_allclose(signatures, reference, rtol=0, atol=1e-5)
    assert not reference[3].any()

    # the assignment and the centroids it implies
    sizes = part.meta["cluster_sizes"]
    assert sizes == np.bincount(labels, minlength=k).tolist()
    assert sum(sizes) == num_requests
    if is_balanced:
        assert max(sizes) <= math.ceil(num_requests / k)
    assert part.meta["is_converged"], "fit did not converge within max_iter=300"
    centroids = part.worker_centroids().astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=0, atol=1e-5)
    for c in range(k):
        mean = ref.unit_mean(reference[labels == c])
        assert mean is not None, f"cluster {c} has no non-zero member"
        np.testing.assert_allclose(centroids[c], mean, rtol=0, atol=1e-5, err_msg=f"centroid {c}")
    check_assignment_is_optimal(reference, centroids, labels, is_balanced)


def check_assignment_is_optimal(
    signatures: npt.NDArray[np.float64], centroids: npt.NDArray[np.float64], labels: Any, is_balanced: bool
) -> None:
    n, k = signatures.shape[0], centroids.shape[0]
    cost = 1.0 - signatures @ centroids.T  # [N, K] cosine distance
    chosen = float(cost[np.arange(n), labels].sum())
    if is_balanced:
        capacity = math.ceil(n / k)
        slots = np.repeat(cost, capacity, axis=1)  # [N, K * capacity]: cluster c owns its capacity slots
        rows, cols = optimize.linear_sum_assignment(slots)
        assert chosen == pytest.approx(float(slots[rows, cols].sum()), abs=1e-4)
    else:
        best = cost.min(axis=1)
        assert np.all(cost[np.arange(n), labels] <= best + 1e-5)


def test_saved_partition_keeps_the_reference_arrays(tmp_path: Any) -> None:
    prefill, decode = calibration_set(7, 30, num_clusters=3)
    part = fit_partition(prefill, FitConfig(num_workers=3, num_pairs=2000), decode_counts=decode, top_k=TOP_K)
    path = tmp_path / "part.npz"
    part.save(path)
    raw = ref.load_partition(path)
    np.testing.assert_allclose(raw["idf"], ref.idf(prefill), rtol=0, atol=1e-6)
    assert tuple(raw["layers"]) == part.transform.layers
    assert raw["meta"]["num_requests"] == 30
    loaded = Partition.load(path)
    np.testing.assert_array_equal(
        ref.worker_order(raw["centroids"], raw["worker_of"]), loaded.worker_centroids()
    )
