"""Choosing instances: the decode policy (unchanged `eldr.policy` objects) and the prefill choice.

Decode: the configured policy over the decode pool. With `eldr`, centroid row w belongs to
`decode.workers[w]`; adding an instance at run time gives it a copy of the centroid of the busiest
instance (it splits the hottest region of signature space: both are in that region's band and share
its load by JSQ), removing one deletes its row (its requests go to the next most similar region). With
online refit on, the recent signatures are re-clustered into one centroid per instance, off the event
loop, and aligned to the old rows by Hungarian matching (`eldr.policy.refit`). With
`fewest-new-experts` the policy holds every dispatched decode leg's experts until `release` (the
forwarder's decode lease calls it once, however the leg ends); an added instance starts empty, a
removed one (only once drained) takes its row with it.

Prefill: least in-flight, or (prefix-hash) a consistent hash of the prompt's first bytes over virtual
nodes, falling back to least-loaded when the hashed instance is above `load_factor` x the mean load —
the paper's proxy (§5, artifact).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import deque
from collections.abc import Callable

import numpy as np

from eldr.partition import Partition
from eldr.policy import (
    DEFAULT_LAM,
    Decision,
    FewestNewExpertsPolicy,
    LocalityBandPolicy,
    Policy,
    RequestView,
    make_policy,
)
from eldr.policy.base import least_loaded
from eldr.policy.refit import refit_centroids
from eldr.proxy.workers import Pool
from eldr.signature import FloatArray


class DecodeRouter:
    """The decode policy plus what the proxy adds: the signature window and pool changes."""

    def __init__(
        self,
        pool: Pool,
        policy_name: str,
        partition: Partition | None,
        *,
        tau: float,
        seed: int,
        refit_window: int = 0,
        top_k: int | None = None,
        lam: float = DEFAULT_LAM,
    ) -> None:
        self.pool = pool
        self.policy: Policy = make_policy(
            policy_name,
            partition=partition,
            tau=tau,
            seed=seed,
            num_workers=len(pool),
            top_k=top_k,
            lam=lam,
        )
        self.band: LocalityBandPolicy | None = (
            self.policy if isinstance(self.policy, LocalityBandPolicy) else None
        )
        self.overlap: FewestNewExpertsPolicy | None = (
            self.policy if isinstance(self.policy, FewestNewExpertsPolicy) else None
        )
        self.window: deque[FloatArray] = deque(maxlen=max(refit_window, 1))
        self.is_recording = refit_window > 0 and self.band is not None
        self.since_refit = 0

    @property
    def num_experts(self) -> int | None:
        """E of the signatures the policy expects, when it knows (decodes expert ids into counts)."""
        if self.band is not None:
            return self.band.transform.num_experts
        if self.overlap is not None and self.overlap.shape is not None:
            return self.overlap.shape[1]
        return None

    def choose(self, request: RequestView, excluded: set[int]) -> Decision:
        view = self.pool.view(excluded)
        if self.band is None:
            return self.policy.choose(request, view)
        if not self.is_recording:
            return self.band.choose(request, view)
        vec = self.band.signature(request)
        if vec is not None:
            self.window.append(vec)
            self.since_refit += 1
        return self.band.choose_signature(vec, view)

    def release(self, request_id: str) -> None:
        """A decode leg routed as `request_id` ended (exactly once per leg; unknown ids: no-op)."""
        self.policy.release(request_id)

    def add_centroid(self) -> None:
        """Give a just-appended decode instance the busiest instance's centroid (or, for
        fewest-new-experts, an empty row)."""
        if self.overlap is not None:
            self.overlap.add_worker()
        if self.band is None:
            return
        old = self.band.centroids
        busiest = int(np.argmax(self.pool.loads()[: old.shape[0]]))
        self.band.centroids = np.vstack([old, old[busiest : busiest + 1]])

    def remove_centroid(self, index: int) -> None:
        if self.band is not None:
            self.band.centroids = np.delete(self.band.centroids, index, axis=0)
        if self.overlap is not None:
            self.overlap.remove_worker(index)

    def refit_input(self) -> tuple[FloatArray, FloatArray] | None:
        """(recent signatures, current centroids) when enough were seen; resets the counter."""
        if self.band is None or len(self.window) < self.band.centroids.shape[0]:
            return None
        self.since_refit = 0
        return np.stack(list(self.window)), self.band.centroids.copy()

    def install(self, new: FloatArray, based_on: FloatArray) -> bool:
        """Swap in refitted centroids unless the pool changed while they were computed."""
        if self.band is None or self.band.centroids.shape != based_on.shape:
            return False
        self.band.centroids = new
        return True


def compute_refit(signatures: FloatArray, old: FloatArray, seed: int) -> FloatArray:
    """Balanced k-means on the window, aligned to `old` (CPU work: run it in a thread)."""
    return refit_centroids(signatures, old, seed=seed)


class PrefillChooser:
    """Least-loaded or prefix-hash choice of a prefill instance."""

    def __init__(
        self, pool: Pool, mode: str, *, prefix_bytes: int, virtual_nodes: int, load_factor: float, seed: int
    ) -> None:
        self.pool = pool
        self.mode = mode
        self.prefix_bytes = prefix_bytes
        self.virtual_nodes = virtual_nodes
        self.load_factor = load_factor
        self._rng = np.random.default_rng(seed)
        self._ring: list[tuple[int, str]] = []
        self._ring_keys: list[int] = []
        self.rebuild_ring()

    def rebuild_ring(self) -> None:
        ring = sorted(
            (_hash(f"{w.url}#{v}".encode()), w.url)
            for w in self.pool.workers
            for v in range(self.virtual_nodes)
        )
        self._ring, self._ring_keys = ring, [k for k, _ in ring]

    def choose(self, prompt_key: Callable[[], bytes], excluded: set[int]) -> int:
        """The prefill instance; `prompt_key` is only called (it serializes chat messages) when hashing."""
        if self.mode == "least-loaded":
            return self.pool.least_loaded(excluded, self._rng)
        view = self.pool.view(excluded)
        healthy = view.healthy_indices()
        if healthy.size == 1:
            return int(healthy[0])
        start = bisect.bisect(self._ring_keys, _hash(prompt_key()[: self.prefix_bytes]))
        mean_load = float(view.in_flight[healthy].mean())
        for step in range(len(self._ring)):
            index = self.pool.index_of(self._ring[(start + step) % len(self._ring)][1])
            if index is not None and view.healthy[index]:
                if view.in_flight[index] <= self.load_factor * max(mean_load, 1.0):
                    return index
                break
        return least_loaded(healthy, view, self._rng)


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
