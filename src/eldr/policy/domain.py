"""Baselines that know more than a router can: `domain` (oracle labels) and `oracle` (decode usage).

`domain` (paper §6): decode workers are split into pools in proportion to each label's share of the
calibration set (largest remainder, at least one worker per label while workers last); a request
goes to the least-loaded worker of its label's pool. Unknown labels fall back to JSQ.

`oracle` (simulation only): the locality band over the request's *true decode-time* counts with a
partition fitted on decode counts — an upper bound on what any prefill signature can achieve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError, PartitionMismatchError
from eldr.policy.base import Decision, RequestView, StatelessPolicy, WorkersView, least_loaded
from eldr.policy.locality_band import LocalityBandPolicy


def split_pools(label_counts: Mapping[str, int], num_workers: int) -> dict[str, tuple[int, ...]]:
    """Contiguous worker pools per label, sized by share (largest remainder, >= 1 each)."""
    labels = sorted(label_counts, key=lambda name: (-label_counts[name], name))
    if not labels or sum(label_counts.values()) <= 0:
        raise ConfigError("the domain policy needs labelled calibration requests")
    if len(labels) >= num_workers:  # more labels than workers: one worker each, cyclically
        return {name: (i % num_workers,) for i, name in enumerate(labels)}
    total = sum(label_counts.values())
    quotas = {name: label_counts[name] * num_workers / total for name in labels}
    sizes = {name: max(1, math.floor(q)) for name, q in quotas.items()}
    by_remainder = sorted(labels, key=lambda n: (-(quotas[n] - math.floor(quotas[n])), n))
    while sum(sizes.values()) < num_workers:
        sizes[by_remainder.pop(0) if by_remainder else labels[0]] += 1
    while sum(sizes.values()) > num_workers:
        biggest = max(labels, key=lambda n: (sizes[n], -labels.index(n)))
        sizes[biggest] -= 1
    pools: dict[str, tuple[int, ...]] = {}
    start = 0
    for name in labels:
        pools[name] = tuple(range(start, start + sizes[name]))
        start += sizes[name]
    return pools


class DomainPolicy(StatelessPolicy):
    name = "domain"

    def __init__(self, label_counts: Mapping[str, int], num_workers: int, seed: int = 0) -> None:
        self.pools = {
            name: np.asarray(pool, dtype=np.int64)
            for name, pool in split_pools(label_counts, num_workers).items()
        }
        self.num_workers = num_workers
        self._rng = np.random.default_rng(seed)

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        if workers.num_workers != self.num_workers:
            raise PartitionMismatchError(
                f"domain pools were built for {self.num_workers} workers, the pool has {workers.num_workers}"
            )
        healthy = workers.healthy_indices()
        pool = self.pools.get(request.label) if request.label is not None else None
        if pool is not None:
            alive = pool[workers.healthy[pool]]
            if alive.size:
                return Decision(least_loaded(alive, workers, self._rng), band=tuple(pool.tolist()))
        return Decision(least_loaded(healthy, workers, self._rng), is_fallback=True)


class OraclePolicy(LocalityBandPolicy):
    """Locality band over true decode counts; needs a partition fitted on decode counts."""

    name = "oracle"

    def counts_of(self, request: RequestView) -> npt.NDArray[np.generic] | None:
        return request.decode_counts


def label_counts_of(labels: npt.ArrayLike) -> dict[str, int]:
    names, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}
