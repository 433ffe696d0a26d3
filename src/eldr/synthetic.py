"""Synthetic expert counts with planted clusters, for tests, benchmarks and quick starts.

Each of `num_clusters` clusters prefers its own experts in the *informative* layers; every other
layer draws from one shared distribution, so it carries no cluster information. A request's prefill
and decode counts are multinomial draws of tokens x top-k choices from its cluster's per-layer
distribution (choices are drawn with replacement across a token's k slots: close enough for counts).
Real routing data lives in traces built by `eldr trace build`; this is only for controlled tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SyntheticCounts:
    prefill_counts: npt.NDArray[np.int64]  # [N, L, E]
    decode_counts: npt.NDArray[np.int64]  # [N, L, E]
    labels: npt.NDArray[np.int64]  # [N] planted cluster of each request
    prompt_tokens: npt.NDArray[np.int64]  # [N]
    informative_layers: tuple[int, ...]
    top_k: int


def planted_clusters(
    num_requests: int,
    *,
    num_clusters: int = 4,
    num_layers: int = 8,
    num_experts: int = 32,
    top_k: int = 4,
    informative_layers: tuple[int, ...] = (1, 3, 5),
    prompt_tokens: tuple[int, int] = (16, 128),
    decode_tokens: int = 64,
    concentration: float = 0.1,
    seed: int = 0,
) -> SyntheticCounts:
    rng = np.random.default_rng(seed)
    shared = rng.dirichlet(np.ones(num_experts), size=num_layers)  # [L, E]
    probs = np.broadcast_to(shared, (num_clusters, num_layers, num_experts)).copy()
    for layer in informative_layers:
        probs[:, layer] = rng.dirichlet(np.full(num_experts, concentration), size=num_clusters)
    labels = rng.integers(num_clusters, size=num_requests)
    tokens = rng.integers(prompt_tokens[0], prompt_tokens[1] + 1, size=num_requests)
    p = probs[labels]  # [N, L, E]
    prefill = rng.multinomial((tokens * top_k)[:, None], p)
    decode = rng.multinomial(np.full((num_requests, 1), decode_tokens * top_k), p)
    return SyntheticCounts(
        prefill.astype(np.int64),
        decode.astype(np.int64),
        labels.astype(np.int64),
        tokens.astype(np.int64),
        tuple(informative_layers),
        top_k,
    )
