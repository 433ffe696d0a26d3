"""The proxy's instance pools and prefill choice (pure code, no network)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from eldr.errors import NoHealthyWorkerError
from eldr.proxy.routing import PrefillChooser
from eldr.proxy.workers import Pool

URLS = ("http://a", "http://b", "http://c")


def pool(in_flight: tuple[int, ...], *, is_blended: bool = False) -> Pool:
    p = Pool("prefill", URLS, is_blended=is_blended)
    for w, n in zip(p.workers, in_flight, strict=True):
        w.in_flight = n
    return p


def test_least_loaded_agrees_with_the_policy_view() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        loads = tuple(int(x) for x in rng.integers(0, 4, 3))
        p = pool(loads)
        p.workers[int(rng.integers(3))].is_healthy = bool(rng.integers(2))
        excluded = {p.workers[int(rng.integers(3))]} if rng.integers(2) else set()
        view = p.view(excluded)
        routable = [i for i in range(3) if view.healthy[i]]
        if not routable:
            with pytest.raises(NoHealthyWorkerError, match="prefill"):
                p.least_loaded(excluded, rng)
            continue
        lowest = min(int(view.in_flight[i]) for i in routable)
        assert p.least_loaded(excluded, rng) in {i for i in routable if view.in_flight[i] == lowest}


def test_least_loaded_breaks_ties_at_random_and_skips_draining() -> None:
    p = pool((1, 1, 1))
    p.workers[2].is_draining = True
    rng = np.random.default_rng(1)
    picks = Counter(p.least_loaded(set(), rng) for _ in range(400))
    assert set(picks) == {0, 1} and min(picks.values()) > 150


def test_least_loaded_uses_the_engine_load_when_blended() -> None:
    p = pool((0, 1, 2), is_blended=True)
    p.workers[0].engine_load = 9  # another router replica's requests
    assert p.least_loaded(set(), np.random.default_rng(0)) == 1
    assert pool((0, 1, 2)).least_loaded(set(), np.random.default_rng(0)) == 0


def test_prefix_hash_only_serializes_the_prompt_when_hashing() -> None:
    calls: list[int] = []

    def key() -> bytes:
        calls.append(1)
        return b"same prefix"

    least = PrefillChooser(
        pool((2, 0, 1)), "least-loaded", prefix_bytes=8, virtual_nodes=16, load_factor=2.0, seed=0
    )
    assert least.choose(key, set()) == 1 and not calls
    hashed = PrefillChooser(
        pool((0, 0, 0)), "prefix-hash", prefix_bytes=8, virtual_nodes=16, load_factor=2.0, seed=0
    )
    first = hashed.choose(key, set())
    assert all(hashed.choose(key, set()) == first for _ in range(5)) and len(calls) == 6
