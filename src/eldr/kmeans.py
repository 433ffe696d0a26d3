"""Balanced spherical k-means (paper §4.3.1).

One centroid per decode worker. Points and centroids are unit vectors and the distance is cosine
distance `1 - x.c`. Each iteration assigns points to clusters with an *optimal* assignment under a
capacity of `ceil(N / K)` points per cluster, then re-estimates each centroid as the normalised mean
of its points. Seeding is k-means++ with a fixed seed; iteration stops after `max_iter` rounds or when
assignments stop changing. `balanced=False` gives plain spherical k-means (the paper's ablation:
plain k-means follows dense modes and overloads some decoders).

The capacitated assignment is a transportation problem: N unit sources, K sinks of capacity
ceil(N / K). For small N it is solved as a linear-sum assignment over replicated slots
(`scipy.optimize.linear_sum_assignment`, O(N^3)); above `LSA_MAX_POINTS` as a linear program with
HiGHS' dual simplex, whose basic optimal solutions are integral because the constraint matrix is
totally unimodular. Both give the same optimal cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import optimize, sparse

from eldr.errors import InvalidInputError

LSA_MAX_POINTS = 1500

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class KMeansResult:
    centroids: FloatArray  # [K, D], unit rows
    labels: LabelArray  # [N]
    num_iterations: int
    is_converged: bool

    @property
    def cluster_sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.centroids.shape[0]).tolist()


def normalize_rows(x: npt.NDArray[np.floating]) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out = np.zeros(x.shape, dtype=np.float32)
    np.divide(x, norms, out=out, where=norms > 0)
    return out


def kmeans_pp_seed(points: FloatArray, k: int, rng: np.random.Generator) -> FloatArray:
    """k-means++ seeding under cosine distance; returns `[k, D]` unit centroids."""
    n = points.shape[0]
    chosen = [int(rng.integers(n))]
    dist = np.maximum(1.0 - points @ points[chosen[0]], 0.0)
    for _ in range(1, k):
        total = float(dist.sum())
        nxt = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        chosen.append(nxt)
        dist = np.minimum(dist, np.maximum(1.0 - points @ points[nxt], 0.0))
    return points[chosen].copy()


def balanced_assign(cost: npt.NDArray[np.floating], capacity: int) -> LabelArray:
    """Optimal assignment of N points to K clusters, at most `capacity` points each.

    `cost` is `[N, K]`; returns labels `[N]` minimising the summed cost.
    """
    n, k = cost.shape
    if capacity * k < n:
        raise InvalidInputError(f"capacity {capacity} x {k} clusters cannot hold {n} points")
    if n <= LSA_MAX_POINTS:
        slots = np.repeat(cost, min(capacity, n), axis=1)  # [N, K * capacity], cluster-major
        rows, cols = optimize.linear_sum_assignment(slots)
        labels = np.empty(n, dtype=np.int64)
        labels[rows] = cols // min(capacity, n)
        return labels
    return _transport_lp(cost, capacity)


def _transport_lp(cost: npt.NDArray[np.floating], capacity: int) -> LabelArray:
    n, k = cost.shape
    idx = np.arange(n * k)  # variable x[i, j] at i * k + j
    each_once = sparse.csr_array((np.ones(n * k), (idx // k, idx)), shape=(n, n * k))
    cap = sparse.csr_array((np.ones(n * k), (idx % k, idx)), shape=(k, n * k))
    res = optimize.linprog(
        cost.ravel().astype(np.float64),
        A_ub=cap,
        b_ub=np.full(k, capacity, dtype=np.float64),
        A_eq=each_once,
        b_eq=np.ones(n),
        bounds=(0, 1),
        method="highs-ds",
    )
    if res.status != 0:  # pragma: no cover - a feasible transportation LP always solves
        raise InvalidInputError(f"balanced assignment failed: {res.message}")
    return np.asarray(res.x.reshape(n, k).argmax(axis=1), dtype=np.int64)


def spherical_kmeans(
    points: npt.NDArray[np.floating],
    k: int,
    *,
    seed: int = 1,
    balanced: bool = True,
    max_iter: int = 50,
    init: FloatArray | None = None,
) -> KMeansResult:
    """Fit K unit centroids to unit-norm `points [N, D]` (see module docstring)."""
    x = normalize_rows(np.asarray(points, dtype=np.float32))
    n = x.shape[0]
    if n == 0:
        raise InvalidInputError("cannot cluster an empty set of signatures")
    if not 1 <= k <= n:
        raise InvalidInputError(f"number of clusters K={k} must be between 1 and N={n}")
    rng = np.random.default_rng(seed)
    centroids = kmeans_pp_seed(x, k, rng) if init is None else normalize_rows(init)
    capacity = math.ceil(n / k)
    labels = np.full(n, -1, dtype=np.int64)
    for iteration in range(1, max_iter + 1):
        cost = 1.0 - x @ centroids.T  # [N, K] cosine distance
        new = balanced_assign(cost, capacity) if balanced else cost.argmin(axis=1)
        is_converged = bool(np.array_equal(new, labels))
        labels = new
        if is_converged:
            return KMeansResult(centroids, labels, iteration, True)
        centroids = _update_centroids(x, labels, centroids, rng)
    return KMeansResult(centroids, labels, max_iter, False)


def _update_centroids(
    x: FloatArray, labels: LabelArray, old: FloatArray, rng: np.random.Generator
) -> FloatArray:
    k = old.shape[0]
    n = x.shape[0]
    onehot = sparse.csr_array((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ x, dtype=np.float32)  # [K, D]
    empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if empty.size:  # plain k-means only: re-seed an empty cluster at a random point
        sums[empty] = x[rng.integers(x.shape[0], size=empty.size)]
    unit = normalize_rows(sums)
    dead = np.linalg.norm(unit, axis=1) == 0  # all-zero points: keep the old centroid
    unit[dead] = old[dead]
    return unit
