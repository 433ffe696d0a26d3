"""Synthetic traces for simulator tests, built from `eldr.synthetic.planted_clusters`."""

from __future__ import annotations

import numpy as np
import pytest

from eldr.synthetic import planted_clusters
from eldr.trace.format import Trace


def synthetic_trace(
    num_requests: int = 400,
    *,
    num_clusters: int = 4,
    num_layers: int = 3,
    num_experts: int = 64,
    top_k: int = 8,
    output_tokens: int = 64,
    rate: float = 20.0,
    seed: int = 0,
) -> Trace:
    syn = planted_clusters(
        num_requests,
        num_clusters=num_clusters,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        informative_layers=tuple(range(num_layers)),
        decode_tokens=output_tokens,
        seed=seed,
    )
    rng = np.random.default_rng(seed + 1)
    arrival = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    return Trace(
        prefill_counts=syn.prefill_counts,
        decode_counts=syn.decode_counts,
        prompt_tokens=syn.prompt_tokens,
        output_tokens=np.full(num_requests, output_tokens, dtype=np.int64),
        arrival_s=arrival - arrival[0],
        top_k=top_k,
        layers=np.arange(num_layers, dtype=np.int64),
        num_model_layers=num_layers,
        domain=np.array([f"d{x}" for x in syn.labels]),
    )


@pytest.fixture(scope="session")
def small_trace() -> Trace:
    """1,000 calibration + 300 measured requests of 4 planted clusters, 32 output tokens each."""
    return synthetic_trace(1300, output_tokens=32)
