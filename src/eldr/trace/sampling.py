"""Draw one token's top-k experts from a routing distribution, without replacement.

A token id's real routing in a domain is a count per expert whose sum is k x its occurrences, and an
expert is chosen at most once per occurrence, so `pi[e] = count[e] / occurrences` is the probability
that one occurrence routes to `e`: `0 <= pi[e] <= 1` and `sum(pi) = k`. Randomised systematic
sampling (Madow 1949) draws exactly k distinct experts whose inclusion probabilities are exactly `pi`:
shuffle the experts, lay the `pi` end to end on [0, k], and take the experts whose interval holds one
of the points u, u + 1, ..., u + k - 1 (u uniform in (0, 1)). For a token seen once `pi` is 0/1 and the
draw is its recorded top-k exactly. The same draw turns a request's decode counts over T tokens into
one plausible decode step (`pi = counts / T`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError

TopK = npt.NDArray[np.int64]


def systematic_topk(
    probabilities: npt.ArrayLike, top_k: int, rng: np.random.Generator, *, chunk: int = 65_536
) -> TopK:
    """Draw `top_k` distinct experts per row of `probabilities` [M, E] (rows sum to top_k, each in [0, 1])."""
    pi = np.asarray(probabilities, dtype=np.float64)
    if pi.ndim != 2:
        raise InvalidInputError(f"inclusion probabilities must be [rows, experts], got shape {pi.shape}")
    num_rows, num_experts = pi.shape
    if not 1 <= top_k <= num_experts:
        raise InvalidInputError(f"top_k must lie in [1, {num_experts}], got {top_k}")
    if np.any(pi < -1e-9) or np.any(pi > 1 + 1e-9):
        raise InvalidInputError("inclusion probabilities must lie in [0, 1]")
    sums = pi.sum(axis=1)
    if np.any(np.abs(sums - top_k) > 1e-6 * top_k):
        raise InvalidInputError(f"inclusion probabilities must sum to top_k = {top_k} in every row")
    out = np.empty((num_rows, top_k), dtype=np.int64)
    is_fixed = np.all((pi < 1e-9) | (pi > 1 - 1e-9), axis=1)  # 0/1 rows: the draw is certain
    fixed = np.flatnonzero(is_fixed)
    if fixed.size:
        _, cols = np.nonzero(pi[fixed] > 0.5)
        out[fixed] = cols.reshape(fixed.size, top_k)
    random_rows = np.flatnonzero(~is_fixed)
    for start in range(0, random_rows.size, chunk):
        rows = random_rows[start : start + chunk]
        out[rows] = _draw(pi[rows], top_k, rng)
    return out


def _draw(pi: npt.NDArray[np.float64], top_k: int, rng: np.random.Generator) -> TopK:
    num_rows, num_experts = pi.shape
    experts = np.broadcast_to(np.arange(num_experts, dtype=np.int64), (num_rows, num_experts))
    order = rng.permuted(experts, axis=1)  # a random expert order per row
    flat = order + (np.arange(num_rows, dtype=np.int64) * num_experts)[:, None]  # row-major positions
    cum = np.cumsum(np.clip(np.ascontiguousarray(pi).ravel()[flat], 0.0, 1.0), axis=1)
    cum *= top_k / cum[:, -1:]  # exact total k despite rounding
    u = rng.random((num_rows, 1))
    u[u == 0.0] = 0.5
    # floor(cum - u) + 1 counts the points u + j (j = 0..k-1) at or below cum; an expert is chosen when
    # that count steps up across its interval (>= -1 since cum >= 0 > u - 1; <= k - 1 since cum <= k,
    # enforced against rounding)
    level = np.minimum(np.floor(cum - u), top_k - 1)
    chosen = np.empty((num_rows, num_experts), dtype=bool)
    chosen[:, 0] = level[:, 0] >= 0
    np.greater(level[:, 1:], level[:, :-1], out=chosen[:, 1:])
    rows, cols = np.nonzero(chosen)
    if rows.size != num_rows * top_k:  # pragma: no cover - guarded by the pi checks above
        raise InvalidInputError("systematic sampling did not draw exactly top_k experts per row")
    return np.sort(order[rows, cols].reshape(num_rows, top_k), axis=1)


def topk_from_counts(
    counts: npt.NDArray[np.integer], num_tokens: npt.NDArray[np.integer], top_k: int, rng: np.random.Generator
) -> TopK:
    """One decode step per request: top-k per layer drawn from counts [M, L, E] over num_tokens [M].

    Returns [M, L, k]. Every request needs `num_tokens >= 1`; counts must satisfy the conservation
    `counts[m, l].sum() == num_tokens[m] * top_k` and `counts <= num_tokens`.
    """
    counts = np.asarray(counts)
    tokens = np.asarray(num_tokens, dtype=np.float64)
    if counts.ndim != 3 or tokens.shape != counts.shape[:1]:
        raise InvalidInputError(f"counts {counts.shape} and num_tokens {tokens.shape} do not match")
    if np.any(tokens < 1):
        raise InvalidInputError("every request needs at least one token to draw a step from")
    num_rows, num_layers, num_experts = counts.shape
    pi = counts.astype(np.float64) / tokens[:, None, None]
    flat = systematic_topk(pi.reshape(num_rows * num_layers, num_experts), top_k, rng)
    return flat.reshape(num_rows, num_layers, top_k)
