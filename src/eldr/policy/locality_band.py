"""ELDR's online policy: locality-band routing (paper §4.3.2).

The routing rule (the one statement of it; docs/partition-format.md#the-routing-rule repeats it):

    s_k  = centroid_k . signature                      for every worker k (`eldr.similarity`)
    band = {k healthy : s_k >= max(s over healthy) - tau}
           if tau > 0 and the band has one member, the most similar other healthy worker joins it
           (ties in similarity: the lower index)
    pick = the band member with the fewest in-flight decode requests;
           ties in load go to the more similar worker, then the lower index

tau must be finite and >= 0. tau = 0 is pure locality (the band is the most similar workers only; no
runner-up joins). Similarities of non-negative vectors lie in [0, 1], so tau >= 1 puts every healthy
worker in the band, which is JSQ with ties broken by similarity. A decision is deterministic. A request
without a usable signature (none captured, wrong shape, all zeros, negative or non-finite counts) is
routed to the least-loaded healthy worker (ties uniformly at random, seeded) and marked as a fallback.
Similarities within SIMILARITY_TIE (1e-6) of each other count as equal everywhere in this rule.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eldr.errors import NoHealthyWorkerError, PartitionMismatchError
from eldr.partition import Partition
from eldr.policy.base import Decision, RequestView, StatelessPolicy, WorkersView, check_weight, least_loaded
from eldr.signature import FloatArray, SignatureTransform
from eldr.similarity import CentroidSimilarity

DEFAULT_TAU = 0.1
# similarities this close count as equal: float32 dot products of identical centroid rows can differ by
# an ulp (BLAS sums rows in different orders), and twins must tie (the proxy clones a centroid for a new
# decode instance)
SIMILARITY_TIE = 1e-6


def check_tau(tau: float) -> float:
    """`tau` as a float if it is finite and >= 0, else a ConfigError."""
    return check_weight("tau", tau)


def band_members(
    similarities: FloatArray, healthy: npt.NDArray[np.bool_], tau: float
) -> npt.NDArray[np.int64]:
    """Healthy workers within `tau` of the best healthy similarity (runner-up added when tau > 0)."""
    sims = similarities if healthy.all() else np.where(healthy, similarities, -np.inf)
    top = int(sims.argmax())
    best = float(sims[top])
    if best == -np.inf:
        raise NoHealthyWorkerError("no healthy decode worker")
    members = np.flatnonzero(sims >= best - (tau + SIMILARITY_TIE))
    if tau > 0 and members.size == 1 and sims.size > 1:
        rest = sims.copy()
        rest[top] = -np.inf
        runner_up = float(rest.max())
        if runner_up > -np.inf:
            second = int((rest >= runner_up - SIMILARITY_TIE).argmax())  # first of the tied: lower index
            members = np.array([top, second] if top < second else [second, top], dtype=np.int64)
    return members


def pick_in_band(
    members: npt.NDArray[np.int64], similarities: FloatArray, in_flight: npt.NDArray[np.int64]
) -> int:
    """The least-loaded band member; ties go to the more similar, then the lower index."""
    if members.size == 1:
        return int(members[0])
    loads = in_flight[members]
    lightest = members[loads == loads.min()]  # ascending indices
    if lightest.size == 1:
        return int(lightest[0])
    sims = similarities[lightest]
    return int(lightest[(sims >= float(sims.max()) - SIMILARITY_TIE).argmax()])  # first of the tied


class LocalityBandPolicy(StatelessPolicy):
    """`eldr`: route to the least-loaded worker among those whose centroid best matches."""

    name = "eldr"

    def __init__(self, partition: Partition, tau: float = DEFAULT_TAU, seed: int = 0) -> None:
        self.transform: SignatureTransform = partition.transform
        self.tau = check_tau(tau)
        self._rng = np.random.default_rng(seed)
        self._shape = (self.transform.num_layers, self.transform.num_experts)
        self.centroids = partition.worker_centroids()

    @property
    def centroids(self) -> FloatArray:
        """Unit centroids `[W, D]`, row w for worker w."""
        return self._similarity.centroids

    @centroids.setter
    def centroids(self, value: FloatArray) -> None:
        self._similarity = CentroidSimilarity(self.transform, value)  # one atomic swap

    def signature(self, request: RequestView) -> FloatArray | None:
        """The request's unit signature `[D]`, or None when it has no usable one."""
        counts = self._usable_counts(self.counts_of(request))
        if counts is None:
            return None
        vec = self.transform.apply(counts)
        return vec if vec.any() else None

    def counts_of(self, request: RequestView) -> npt.NDArray[np.generic] | None:
        """The counts this policy routes by: the prefill counts."""
        return request.counts

    def _usable_counts(self, counts: npt.NDArray[np.generic] | None) -> npt.NDArray[np.generic] | None:
        if counts is None or counts.shape != self._shape:
            return None
        kind = counts.dtype.kind
        if kind == "f" and not np.isfinite(counts).all():
            return None
        if kind not in "biuf" or (kind != "u" and counts.min() < 0):
            return None
        return counts

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        similarity = self._similarity
        self._check_pool(similarity, workers)
        counts = self._usable_counts(self.counts_of(request))
        sims = None if counts is None else similarity.of_counts(counts)
        return self._fallback(workers) if sims is None else self._decide(sims, workers)

    def choose_signature(self, vec: FloatArray | None, workers: WorkersView) -> Decision:
        """Route a precomputed signature `[D]` (None: no usable signature)."""
        similarity = self._similarity
        self._check_pool(similarity, workers)
        sims = None if vec is None else similarity.of_signature(vec)
        return self._fallback(workers) if sims is None else self._decide(sims, workers)

    def _check_pool(self, similarity: CentroidSimilarity, workers: WorkersView) -> None:
        if workers.num_workers != similarity.num_centroids:
            raise PartitionMismatchError(
                f"partition has {similarity.num_centroids} decode workers, the pool has {workers.num_workers}"
            )

    def _fallback(self, workers: WorkersView) -> Decision:
        return Decision(least_loaded(workers.healthy_indices(), workers, self._rng), is_fallback=True)

    def _decide(self, sims: FloatArray, workers: WorkersView) -> Decision:
        # float rounding can leave [-1, 1] by ~1e-7; tau >= 1 must mean JSQ (np.clip costs twice this)
        np.minimum(sims, 1.0, out=sims)
        np.maximum(sims, -1.0, out=sims)
        members = band_members(sims, workers.healthy, self.tau)
        worker = pick_in_band(members, sims, workers.in_flight)
        return Decision(worker, similarities=sims, band=tuple(members.tolist()))
