"""The paper's load-balancing baselines: random, round robin, JSQ, power of two choices."""

from __future__ import annotations

import numpy as np

from eldr.policy.base import Decision, RequestView, StatelessPolicy, WorkersView, least_loaded


class RandomPolicy(StatelessPolicy):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        healthy = workers.healthy_indices()
        return Decision(int(healthy[self._rng.integers(healthy.size)]))


class RoundRobinPolicy(StatelessPolicy):
    name = "rr"

    def __init__(self, seed: int = 0) -> None:
        self._next = 0

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        healthy = workers.healthy_indices()
        # the first healthy worker at or after the cursor, cycling over all workers
        pos = int(np.searchsorted(healthy, self._next % workers.num_workers))
        worker = int(healthy[pos % healthy.size])
        self._next = worker + 1
        return Decision(worker)


class JsqPolicy(StatelessPolicy):
    """Join the shortest queue: fewest in-flight decode requests, random tie-break."""

    name = "jsq"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        return Decision(least_loaded(workers.healthy_indices(), workers, self._rng))


class PowerOfTwoPolicy(StatelessPolicy):
    """Sample two distinct healthy workers, take the less loaded one."""

    name = "p2c"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        healthy = workers.healthy_indices()
        if healthy.size == 1:
            return Decision(int(healthy[0]))
        pair = healthy[self._rng.choice(healthy.size, size=2, replace=False)]
        return Decision(least_loaded(pair, workers, self._rng))
