"""The one routing interface: `choose(request, workers) -> Decision`, over plain frozen data.

A policy never sees an HTTP request or a simulator object, so the proxy, the simulator and the tests
run the very same decisions. Policies may keep private state (a round-robin cursor, a seeded RNG), never
global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError, InvalidInputError, NoHealthyWorkerError


@dataclass(frozen=True)
class RequestView:
    """What a policy may know of a request."""

    request_id: str = ""
    counts: npt.NDArray[np.integer] | None = None  # [L, E] prefill expert counts, if captured
    label: str | None = None  # workload label (domain, language), for the `domain` baseline
    decode_counts: npt.NDArray[np.integer] | None = None  # simulation only: true decode usage


@dataclass(frozen=True)
class WorkersView:
    """What a policy may know of the decode workers, index-aligned."""

    in_flight: npt.NDArray[np.int64]  # [W] decode requests dispatched and not finished
    healthy: npt.NDArray[np.bool_]  # [W]

    def __post_init__(self) -> None:
        if self.in_flight.shape != self.healthy.shape or self.in_flight.ndim != 1:
            raise InvalidInputError(
                f"in_flight {self.in_flight.shape} and healthy {self.healthy.shape} must be "
                "1-D arrays of the same length"
            )
        if self.in_flight.size == 0:
            raise InvalidInputError("there are no decode workers")

    @classmethod
    def of(cls, in_flight: npt.ArrayLike, healthy: npt.ArrayLike | None = None) -> WorkersView:
        loads = np.asarray(in_flight, dtype=np.int64)
        ok = np.ones(loads.shape, dtype=np.bool_) if healthy is None else np.asarray(healthy, bool)
        return cls(loads, ok)

    @property
    def num_workers(self) -> int:
        return int(self.in_flight.shape[0])

    def healthy_indices(self) -> npt.NDArray[np.int64]:
        idx = np.flatnonzero(self.healthy)
        if idx.size == 0:
            raise NoHealthyWorkerError("no healthy decode worker")
        return idx


@dataclass(frozen=True)
class Decision:
    """A routing decision and why it was made."""

    worker: int
    is_fallback: bool = False  # routed by JSQ because the request had no usable signature
    similarities: npt.NDArray[np.float32] | None = field(default=None, compare=False)  # [W]
    band: tuple[int, ...] = ()  # workers in the locality band (eldr policies)


class Policy(Protocol):
    name: str

    def choose(self, request: RequestView, workers: WorkersView) -> Decision:
        """Pick a worker; a stateful policy also records the dispatch of `request.request_id`."""
        ...

    def release(self, request_id: str) -> None:
        """The request's decode ended (finished, failed, cancelled, moved): forget its dispatch.

        Every end path calls it; an unknown or already released id is a no-op."""
        ...


class StatelessPolicy:
    """A policy that keeps nothing per request: `release` has nothing to forget."""

    def release(self, request_id: str) -> None:
        return None


def check_weight(name: str, value: float) -> float:
    """A policy parameter (tau, lam) as a float if it is finite and >= 0, else a ConfigError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number, got {value!r}") from exc
    if not (math.isfinite(number) and number >= 0.0):
        raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
    return number


def least_loaded(candidates: npt.NDArray[np.int64], workers: WorkersView, rng: np.random.Generator) -> int:
    """The candidate with the fewest in-flight requests, ties broken uniformly at random."""
    loads = workers.in_flight[candidates]
    ties = candidates[loads == loads.min()]
    return int(ties[0]) if ties.size == 1 else int(ties[rng.integers(ties.size)])
