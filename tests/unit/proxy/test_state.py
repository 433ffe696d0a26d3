"""`ProxyState` on its own: what it says at start about the pool it was given."""

from __future__ import annotations

import logging

import pytest

from eldr.partition import Partition
from eldr.proxy.config import ServeConfig
from eldr.proxy.state import ProxyState


def _fit(workers: int) -> Partition:
    from eldr.calibrate import FitConfig, fit_partition
    from eldr.synthetic import planted_clusters

    syn = planted_clusters(
        60, num_clusters=workers, num_layers=3, num_experts=8, top_k=2, informative_layers=(0, 1, 2), seed=1
    )
    return fit_partition(syn.prefill_counts, FitConfig(num_workers=workers), top_k=2)


@pytest.mark.parametrize(("workers", "tau", "warns"), [(2, 0.1, True), (2, 0.0, False), (3, 0.1, False)])
def test_two_decode_instances_with_a_band_are_a_load_balancer_and_say_so(
    caplog: pytest.LogCaptureFixture, workers: int, tau: float, warns: bool
) -> None:
    decode = tuple(f"http://127.0.0.1:{8100 + w}" for w in range(workers))
    config = ServeConfig(prefill=("http://127.0.0.1:8000",), decode=decode, partition="p.npz", tau=tau)
    with caplog.at_level(logging.WARNING, logger="eldr.proxy"):
        ProxyState(config, _fit(workers))
    said = [r.getMessage() for r in caplog.records if "balances by load" in r.getMessage()]
    assert bool(said) is warns
