"""Online refit (the authors' artifact, later than the paper): track drift in the signature mix.

Balanced centroids are refitted from a rolling window of recent signatures, then aligned to the old
centroids by Hungarian matching on cosine similarity, so that worker w keeps (as far as the data
allows) the region of signature space it served before, and with it the experts its batches use.

One owner: `Refitter`, a plain synchronous object (no clock, no event loop, no thread of its own),
is the window, the "is a refit due" rule and the guard that a refit computed for one pool is never
installed on another. Both users drive it the same way:

    refitter.observe(signature)                 # every routed signature
    job = refitter.due(centroids)               # a `RefitJob` when one is due, else None
    result = job.compute()                      # pure CPU work: inline (simulator) or in a thread (proxy)
    if refitter.accept(result): centroids = result.centroids

Every change of the pool's membership (a worker added, removed) calls `membership_changed()`, which
moves the *generation* on: a result whose job was cut for an older generation is refused, even when
its shape happens to match the new pool (remove one worker and add another while a refit runs).
The simulator uses it through `RefittingPolicy` (`eldr simulate --refit-every`); the proxy through
`eldr.proxy.routing.DecodeRouter` (`eldr serve --refit-every`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from eldr.errors import ConfigError
from eldr.kmeans import normalize_rows, spherical_kmeans
from eldr.limits import MAX_REFIT_WINDOW
from eldr.policy.base import Decision, RequestView, StatelessPolicy, WorkersView
from eldr.policy.locality_band import LocalityBandPolicy
from eldr.signature import FloatArray

DEFAULT_REFIT_WINDOW = 2000
REFIT_POLICY = "eldr-refit"  # the simulator's name for eldr with online refit


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


@dataclass(frozen=True)
class RefitResult:
    """Refitted centroids, row w for worker w of the pool of `generation`."""

    centroids: FloatArray
    generation: int


@dataclass(frozen=True)
class RefitJob:
    """What one refit needs, copied out of the router: safe to compute in another thread."""

    signatures: FloatArray  # [M, D] the window when the job was cut
    centroids: FloatArray  # [K, D] the centroids then, row w for worker w
    generation: int  # the pool membership they belong to
    seed: int

    def compute(self) -> RefitResult:
        return RefitResult(refit_centroids(self.signatures, self.centroids, seed=self.seed), self.generation)


class Refitter:
    """The window of recent signatures, when a refit is due, and which results may be installed."""

    def __init__(self, *, window: int = DEFAULT_REFIT_WINDOW, every: int = 500, seed: int = 1) -> None:
        if not 1 <= window <= MAX_REFIT_WINDOW:
            raise ConfigError(f"refit window must be in [1, {MAX_REFIT_WINDOW}], got {window}")
        if every < 1:
            raise ConfigError(f"refit_every must be >= 1, got {every}")
        self.every = every
        self.seed = seed
        self.generation = 0  # moved on by every membership change
        self.num_refits = 0  # results installed
        self.num_refused = 0  # results computed for an older generation
        self.is_running = False  # a job is out (cut by `due`, not yet `accept`ed or `abandon`ed)
        self._window: deque[FloatArray] = deque(maxlen=window)
        self._since = 0

    def recent(self) -> list[FloatArray]:
        """The window: the last signatures observed, oldest first."""
        return list(self._window)

    def observe(self, signature: FloatArray | None) -> None:
        """A routed request's signature (`None`: it had none; nothing to record)."""
        if signature is not None:
            self._window.append(signature)
            self._since += 1

    def due(self, centroids: FloatArray) -> RefitJob | None:
        """A job when `every` signatures arrived since the last one and the window holds one per
        worker, none while a job is out. Cutting it restarts the count."""
        if self.is_running or self._since < self.every or len(self._window) < centroids.shape[0]:
            return None
        self._since = 0
        self.is_running = True
        return RefitJob(np.stack(list(self._window)), centroids.copy(), self.generation, self.seed)

    def accept(self, result: RefitResult) -> bool:
        """Whether `result` may replace the centroids: only for the pool it was computed for."""
        self.is_running = False
        if result.generation != self.generation:
            self.num_refused += 1
            return False
        self.num_refits += 1
        return True

    def abandon(self) -> None:
        """The job out failed (no result): allow the next one."""
        self.is_running = False

    def membership_changed(self) -> None:
        """A worker was added or removed: results of jobs cut before are stale."""
        self.generation += 1


class RefittingPolicy(StatelessPolicy):
    """Locality band whose centroids are refitted inline every `refit_every` routed signatures
    (the simulator's online refit; the pool never changes there)."""

    name = REFIT_POLICY

    def __init__(
        self,
        inner: LocalityBandPolicy,
        *,
        window: int = DEFAULT_REFIT_WINDOW,
        refit_every: int = 500,
        seed: int = 1,
    ) -> None:
        num_workers = inner.centroids.shape[0]
        if window < num_workers:
            raise ConfigError(f"refit window {window} must hold at least K={num_workers} requests")
        self.inner = inner
        self.refitter = Refitter(window=window, every=refit_every, seed=seed)

    @property
    def num_refits(self) -> int:
        return self.refitter.num_refits

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        vec = self.inner.signature(request)
        self.refitter.observe(vec)
        decision = self.inner.choose_signature(vec, workers)
        job = self.refitter.due(self.inner.centroids)
        if job is not None:
            result = job.compute()
            if self.refitter.accept(result):
                self.inner.centroids = result.centroids
        return decision
