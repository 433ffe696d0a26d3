"""Online refit (the authors' artifact, later than the paper): track drift in the signature mix.

Balanced centroids are refitted from a rolling window of recent signatures, then aligned to the old
centroids by Hungarian matching on cosine similarity, so that worker w keeps (as far as the data
allows) the region of signature space it served before, and with it the experts its batches use.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy import optimize

from eldr.errors import ConfigError
from eldr.kmeans import normalize_rows, spherical_kmeans
from eldr.policy.base import Decision, RequestView, StatelessPolicy, WorkersView
from eldr.policy.locality_band import LocalityBandPolicy
from eldr.signature import FloatArray


def align_centroids(old: FloatArray, new: FloatArray) -> FloatArray:
    """Rows of `new` permuted so that row w best matches `old[w]` (max total cosine similarity)."""
    sims = normalize_rows(old) @ normalize_rows(new).T  # [K, K]
    rows, cols = optimize.linear_sum_assignment(sims, maximize=True)
    out = np.empty_like(new)
    out[rows] = new[cols]
    return out


def refit_centroids(
    signatures: FloatArray, old: FloatArray, *, seed: int = 1, max_iter: int = 50
) -> FloatArray:
    """Balanced k-means on recent signatures `[M, D]`, seeded at and aligned to `old [K, D]`."""
    result = spherical_kmeans(signatures, old.shape[0], seed=seed, max_iter=max_iter, init=old)
    return align_centroids(old, result.centroids)


class RefittingPolicy(StatelessPolicy):
    """Locality band whose centroids are refitted every `refit_every` routed signatures.

    `choose` records signatures; with `is_auto=True` it also refits inline when due (simulation).
    A server sets `is_auto=False` and runs `refit()` off the event loop when `is_refit_due()`.
    """

    name = "eldr-refit"

    def __init__(
        self,
        inner: LocalityBandPolicy,
        *,
        window: int = 2000,
        refit_every: int = 500,
        is_auto: bool = True,
        seed: int = 1,
    ) -> None:
        num_workers = inner.centroids.shape[0]
        if window < num_workers:
            raise ConfigError(f"refit window {window} must hold at least K={num_workers} requests")
        if refit_every < 1:
            raise ConfigError(f"refit_every must be >= 1, got {refit_every}")
        self.inner = inner
        self.refit_every = refit_every
        self.is_auto = is_auto
        self.seed = seed
        self.num_refits = 0
        self._window: deque[FloatArray] = deque(maxlen=window)
        self._since_refit = 0

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        vec = self.inner.signature(request)
        if vec is not None:
            self._window.append(vec)
            self._since_refit += 1
        decision = self.inner.choose_signature(vec, workers)
        if self.is_auto and self.is_refit_due():
            self.refit()
        return decision

    def is_refit_due(self) -> bool:
        num_workers = self.inner.centroids.shape[0]
        return self._since_refit >= self.refit_every and len(self._window) >= num_workers

    def refit(self) -> None:
        """Refit from the window and swap the centroids in one assignment."""
        self._since_refit = 0
        recent = np.stack(list(self._window))
        self.inner.centroids = refit_centroids(recent, self.inner.centroids, seed=self.seed)
        self.num_refits += 1
