"""Choosing instances: the decode policy (unchanged `eldr.policy` objects) and the prefill choice.

Decode: the configured policy over the decode pool. With `eldr`, centroid row w belongs to
`decode.workers[w]`; adding an instance at run time gives it a copy of the centroid of the busiest
instance (it splits the hottest region of signature space: both are in that region's band and share
its load by JSQ), removing one deletes its row (its requests go to the next most similar region). With
online refit on, a `eldr.policy.refit.Refitter` keeps the recent signatures and cuts refit jobs that
the proxy computes off the event loop (re-clustered into one centroid per instance, aligned to the old
rows by Hungarian matching); every pool change moves its generation on, so a job cut for the old pool
is never installed on the new one. With
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
from collections.abc import Callable, Set

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
from eldr.policy.refit import DEFAULT_REFIT_WINDOW, RefitJob, RefitResult, Refitter
from eldr.proxy.workers import Pool, Worker


class DecodeRouter:
    """The decode policy plus what the proxy adds: online refit and pool changes."""

    def __init__(
        self,
        pool: Pool,
        policy_name: str,
        partition: Partition | None,
        *,
        tau: float,
        seed: int,
        refit_every: int = 0,
        refit_window: int = DEFAULT_REFIT_WINDOW,
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
        self.refitter: Refitter | None = (
            Refitter(window=refit_window, every=refit_every, seed=seed)
            if refit_every > 0 and self.band is not None
            else None
        )

    @property
    def num_experts(self) -> int | None:
        """E of the signatures the policy expects, when it knows (decodes expert ids into counts)."""
        if self.band is not None:
            return self.band.transform.num_experts
        if self.overlap is not None and self.overlap.shape is not None:
            return self.overlap.shape[1]
        return None

    def choose(self, request: RequestView, excluded: Set[Worker]) -> Decision:
        """The decode instance (its pool index) for `request`, never one of `excluded`."""
        view = self.pool.view(excluded)
        if self.band is None:
            return self.policy.choose(request, view)
        if self.refitter is None:
            return self.band.choose(request, view)
        vec = self.band.signature(request)
        self.refitter.observe(vec)
        return self.band.choose_signature(vec, view)

    def release(self, request_id: str) -> None:
        """A decode leg routed as `request_id` ended (exactly once per leg; unknown ids: no-op)."""
        self.policy.release(request_id)

    def add_centroid(self) -> None:
        """Give a just-appended decode instance the busiest instance's centroid (or, for
        fewest-new-experts, an empty row)."""
        if self.refitter is not None:
            self.refitter.membership_changed()
        if self.overlap is not None:
            self.overlap.add_worker()
        if self.band is None:
            return
        old = self.band.centroids
        busiest = int(np.argmax(self.pool.loads()[: old.shape[0]]))
        self.band.centroids = np.vstack([old, old[busiest : busiest + 1]])

    def remove_centroid(self, index: int) -> None:
        """Drop the row of the decode instance at `index` (just removed from the pool)."""
        if self.refitter is not None:
            self.refitter.membership_changed()
        if self.band is not None:
            self.band.centroids = np.delete(self.band.centroids, index, axis=0)
        if self.overlap is not None:
            self.overlap.remove_worker(index)

    def refit_job(self) -> RefitJob | None:
        """A refit to compute (off the event loop) when one is due and none is out."""
        if self.refitter is None or self.band is None:
            return None
        return self.refitter.due(self.band.centroids)

    def install(self, result: RefitResult) -> bool:
        """Swap in refitted centroids, unless the pool changed since their job was cut."""
        if self.refitter is None or self.band is None or not self.refitter.accept(result):
            return False
        assert result.centroids.shape == self.band.centroids.shape  # same generation: same pool
        self.band.centroids = result.centroids
        return True

    def abandon_refit(self) -> None:
        """The refit out failed: keep the centroids, allow the next one."""
        if self.refitter is not None:
            self.refitter.abandon()


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

    def choose(self, prompt_key: Callable[[], bytes], excluded: Set[Worker]) -> int:
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
