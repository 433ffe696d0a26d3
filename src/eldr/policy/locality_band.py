"""ELDR's online policy: locality-band routing (paper §4.3.2).

    s_k  = cos(signature, centroid_k)                 for every healthy worker k
    band = {k : s_k >= max(s) - tau}                   (+ the runner-up if tau > 0 and |band| = 1)
    pick = the band member with the fewest in-flight decode requests

Ties in load go to the more similar worker, then the lower index, so a decision is deterministic.
tau = 0 is pure locality; tau >= 1 (cosine similarities of non-negative vectors lie in [0, 1]) puts
every healthy worker in the band, which is JSQ. A request without a usable signature (none captured,
wrong shape, all zeros, negative or non-finite counts) is routed by JSQ and marked as a fallback.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError, PartitionMismatchError
from eldr.partition import Partition
from eldr.policy.base import Decision, RequestView, WorkersView, least_loaded
from eldr.signature import FloatArray, SignatureTransform

DEFAULT_TAU = 0.1


def band_members(
    similarities: FloatArray, healthy: npt.NDArray[np.int64], tau: float
) -> npt.NDArray[np.int64]:
    """Healthy workers within `tau` of the best similarity (runner-up added when tau > 0)."""
    sims = similarities[healthy]
    best = sims.max()
    members = healthy[sims >= best - tau]
    if tau > 0 and members.size == 1 and healthy.size > 1:
        order = np.argsort(-sims, kind="stable")
        members = healthy[order[:2]]
    return members


def pick_in_band(
    members: npt.NDArray[np.int64], similarities: FloatArray, in_flight: npt.NDArray[np.int64]
) -> int:
    loads = in_flight[members]
    lightest = members[loads == loads.min()]
    if lightest.size == 1:
        return int(lightest[0])
    # ties: most similar first, then lowest index (argmax returns the first maximum)
    return int(lightest[np.argmax(similarities[lightest])])


class LocalityBandPolicy:
    """`eldr`: route to the least-loaded worker among those whose centroid best matches."""

    name = "eldr"

    def __init__(self, partition: Partition, tau: float = DEFAULT_TAU, seed: int = 0) -> None:
        if not tau >= 0.0:
            raise ConfigError(f"tau must be >= 0, got {tau}")
        self.transform: SignatureTransform = partition.transform
        self.centroids: FloatArray = partition.worker_centroids()  # [W, D], row w for worker w
        self.tau = tau
        self._rng = np.random.default_rng(seed)

    def signature(self, request: RequestView) -> FloatArray | None:
        """The request's unit signature, or None when it has no usable one."""
        counts = request.counts
        if counts is None or counts.shape != (
            self.transform.num_layers,
            self.transform.num_experts,
        ):
            return None
        if counts.dtype.kind == "f" and not np.all(np.isfinite(counts)):
            return None
        if counts.dtype.kind != "u" and np.any(counts < 0):
            return None
        vec = self.transform.apply(counts)
        return vec if vec.any() else None

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        vec = self.signature(request)
        return self.choose_signature(vec, workers)

    def choose_signature(self, vec: FloatArray | None, workers: WorkersView) -> Decision:
        centroids = self.centroids  # one read: a refit may swap the attribute concurrently
        if workers.num_workers != centroids.shape[0]:
            raise PartitionMismatchError(
                f"partition has {centroids.shape[0]} decode workers, the pool has {workers.num_workers}"
            )
        healthy = workers.healthy_indices()
        if vec is None:
            return Decision(least_loaded(healthy, workers, self._rng), is_fallback=True)
        sims = centroids @ vec  # [W]
        members = band_members(sims, healthy, self.tau)
        worker = pick_in_band(members, sims, workers.in_flight)
        return Decision(worker, similarities=sims, band=tuple(members.tolist()))
