from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import InvalidInputError
from eldr.kmeans import _transport_lp, balanced_assign, spherical_kmeans
from eldr.synthetic import planted_clusters


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI from the contingency table (Hubert & Arabie 1985)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return float((index - expected) / ((rows + cols) / 2 - expected))


def brute_force_cost(cost: np.ndarray, capacity: int) -> float:
    n, k = cost.shape
    best = math.inf
    for labels in itertools.product(range(k), repeat=n):
        if max(np.bincount(labels, minlength=k)) <= capacity:
            best = min(best, float(cost[np.arange(n), labels].sum()))
    return best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7), k=st.integers(1, 3))
def test_balanced_assignment_is_optimal_and_capacitated(seed: int, n: int, k: int) -> None:
    cost = np.random.default_rng(seed).random((n, k))
    capacity = math.ceil(n / k)
    labels = balanced_assign(cost, capacity)
    assert np.bincount(labels, minlength=k).max() <= capacity
    assert cost[np.arange(n), labels].sum() == pytest.approx(brute_force_cost(cost, capacity))


@pytest.mark.parametrize("n", [40, 203], ids=["small", "odd"])
def test_linear_program_matches_linear_sum_assignment(n: int) -> None:
    cost = np.random.default_rng(n).random((n, 6))
    capacity = math.ceil(n / 6)
    lsa = balanced_assign(cost, capacity)
    lp = _transport_lp(cost, capacity)
    assert np.bincount(lp, minlength=6).max() <= capacity
    assert cost[np.arange(n), lp].sum() == pytest.approx(cost[np.arange(n), lsa].sum(), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60), k=st.integers(1, 9))
def test_cluster_sizes_never_exceed_ceil_n_over_k(seed: int, n: int, k: int) -> None:
    k = min(k, n)
    points = np.random.default_rng(seed).random((n, 5)).astype(np.float32)
    result = spherical_kmeans(points, k, seed=seed)
    assert max(result.cluster_sizes) <= math.ceil(n / k)
    assert sum(result.cluster_sizes) == n
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)


def test_same_seed_same_result() -> None:
    points = np.random.default_rng(3).random((120, 8)).astype(np.float32)
    a = spherical_kmeans(points, 5, seed=7)
    b = spherical_kmeans(points, 5, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "plain"])
def test_recovers_planted_expert_usage_clusters(balanced: bool) -> None:
    data = planted_clusters(400, num_clusters=4, num_layers=6, num_experts=32, seed=11)
    x = data.prefill_counts.reshape(400, -1).astype(np.float32)
    result = spherical_kmeans(x, 4, seed=1, balanced=balanced)
    assert adjusted_rand_index(result.labels, data.labels) >= 0.9


def test_plain_kmeans_can_be_unbalanced_where_balanced_is_not() -> None:
    # one dense mode of 90 points and a small one of 10: plain k-means with K=2 splits by mode
    rng = np.random.default_rng(0)
    dense = np.abs(rng.normal([5, 1, 0], 0.1, size=(90, 3)))
    small = np.abs(rng.normal([0, 1, 5], 0.1, size=(10, 3)))
    points = np.vstack([dense, small]).astype(np.float32)
    assert max(spherical_kmeans(points, 2, balanced=False).cluster_sizes) == 90
    assert max(spherical_kmeans(points, 2, balanced=True).cluster_sizes) == 50


@pytest.mark.parametrize(("n", "k"), [(0, 1), (3, 4), (3, 0)], ids=["empty", "k>n", "k=0"])
def test_rejects_bad_sizes(n: int, k: int) -> None:
    with pytest.raises(InvalidInputError):
        spherical_kmeans(np.ones((n, 3), dtype=np.float32), k)
