"""Engine instances as the proxy sees them: URL, in-flight count, health, engine-reported load.

A `Pool` is the ordered list of one role's instances. The decode pool's order is the partition's
worker order (centroid row w serves `pool.workers[w]`). All mutation happens on the event loop. An
instance is found by its identity (`engineurl.url_identity`), so `http://localhost:8200` and
`http://127.0.0.1:8200/` name one instance.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from eldr.engineurl import url_identity
from eldr.errors import NoHealthyWorkerError
from eldr.policy import WorkersView
from eldr.policy.base import least_loaded


@dataclass(eq=False)
class Worker:
    """One engine instance."""

    url: str
    role: str  # "prefill" | "decode"
    in_flight: int = 0  # requests dispatched by this proxy and not finished (last byte or error)
    is_healthy: bool = True  # optimistic until the first check says otherwise
    is_draining: bool = False  # admin drain: takes no new requests, removed once idle
    engine_load: int | None = None  # running + waiting, scraped from the engine's /metrics
    failed_checks: int = 0
    good_checks: int = 0
    is_malformed_logged: bool = False  # a malformed signature from it was logged once
    models: tuple[str, ...] = ()
    layers_experts: tuple[int, int] | None = None  # (L, E) of the first valid signature payload
    labels: dict[str, str] = field(default_factory=dict)
    identity: str = ""  # url_identity(url), set on creation

    def __post_init__(self) -> None:
        self.identity = url_identity(self.url)

    @property
    def is_routable(self) -> bool:
        return self.is_healthy and not self.is_draining


class Pool:
    """The instances of one role, index-aligned with the policy's view of them."""

    def __init__(self, role: str, urls: tuple[str, ...], *, is_blended: bool = False) -> None:
        self.role = role
        self.workers: list[Worker] = [Worker(url, role) for url in urls]
        self.is_blended = is_blended

    def __len__(self) -> int:
        return len(self.workers)

    def loads(self) -> npt.NDArray[np.int64]:
        """`[W]` the load signal: router in-flight, or max(in-flight, engine running + waiting).

        The engine's own count includes other router replicas' requests, so blending keeps several
        replicas roughly consistent; the max keeps our just-dispatched requests that a scrape has not
        seen yet.
        """
        if not self.is_blended:
            return np.fromiter((w.in_flight for w in self.workers), np.int64, len(self.workers))
        return np.fromiter(
            (max(w.in_flight, w.engine_load or 0) for w in self.workers), np.int64, len(self.workers)
        )

    def view(self, excluded: Set[Worker] = frozenset()) -> WorkersView:
        """Loads and routability, minus the instances this request already failed on (by instance, not
        position: a drained instance removed between two attempts shifts the positions)."""
        ok = np.fromiter((w.is_routable and w not in excluded for w in self.workers), np.bool_, len(self))
        return WorkersView(self.loads(), ok)

    def least_loaded(self, excluded: Set[Worker], rng: np.random.Generator) -> int:
        """The routable instance with the lowest load signal, ties broken at random (the policies' own
        `least_loaded` over this pool's view)."""
        routable = [i for i, w in enumerate(self.workers) if w.is_routable and w not in excluded]
        if not routable:
            raise NoHealthyWorkerError(f"no healthy {self.role} instance")
        if len(routable) == 1:  # the common single-instance pool: no arrays to build
            return routable[0]
        return least_loaded(np.asarray(routable, dtype=np.int64), self.view(excluded), rng)

    def index_of(self, url: str) -> int | None:
        """The position of the instance `url` names (in any of its spellings), or None."""
        for i, w in enumerate(self.workers):  # the spelling it was added with: no parsing
            if w.url == url:
                return i
        identity = url_identity(url)
        for i, w in enumerate(self.workers):
            if w.identity == identity:
                return i
        return None

    def num_healthy(self) -> int:
        return sum(w.is_routable for w in self.workers)
