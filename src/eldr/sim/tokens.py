"""Per-token decode expert choices as bitmasks: sampled from decode counts, or replayed exactly.

A request's t-th generated token activates a set of top-k experts at every recorded layer. The plan
stores each set as `ceil(E / 64)` uint64 words, so a decode step's distinct experts per layer are an
OR-reduction over the batch's rows followed by a popcount: no Python loop per token or layer.

Sampling (traces without per-token data): token t of request i draws k experts *without
replacement* from p[i, l, e] = decode_counts[i, l, e] / sum_e, by the Gumbel top-k trick in its
exponential-race form (the k smallest Exp(1) / p, i.e. the k largest log p + Gumbel noise),
vectorised over chunks of tokens. The plan depends only on the
trace and the seed, never on the policy, so every policy decodes the very same tokens (common random
numbers): differences between policies come from batching alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError
from eldr.trace.sampling import systematic_topk

CHUNK_TOKENS = 32_768
SAMPLERS = ("gumbel", "systematic")
WORD_BITS = 64


@dataclass(frozen=True)
class TokenPlan:
    masks: npt.NDArray[np.uint64]  # [T, L, W] expert bitmask of every generated token
    offsets: npt.NDArray[np.int64]  # [N + 1] request i owns rows offsets[i]:offsets[i + 1]

    @property
    def num_layers(self) -> int:
        return int(self.masks.shape[1])


def num_words(num_experts: int) -> int:
    return -(-num_experts // WORD_BITS)


def topk_to_masks(topk: npt.NDArray[np.integer], num_experts: int) -> npt.NDArray[np.uint64]:
    """`[T, L, k]` expert ids -> `[T, L, W]` bitmasks (ids < 0 are ignored)."""
    ids = np.asarray(topk, dtype=np.int64)
    valid = ids >= 0
    bits = np.left_shift(np.uint64(1), (np.where(valid, ids, 0) & (WORD_BITS - 1)).astype(np.uint64))
    bits = np.where(valid, bits, np.uint64(0))
    word = ids >> 6
    out = np.empty((*ids.shape[:2], num_words(num_experts)), dtype=np.uint64)
    for w in range(out.shape[2]):
        out[..., w] = np.bitwise_or.reduce(np.where(word == w, bits, np.uint64(0)), axis=-1)
    return out


def pack_bool(chosen: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """`[T, L, E]` booleans -> `[T, L, W]` bitmasks (bit e % 64 of word e // 64)."""
    num_experts = chosen.shape[-1]
    pad = num_words(num_experts) * WORD_BITS - num_experts
    if pad:
        chosen = np.concatenate([chosen, np.zeros((*chosen.shape[:-1], pad), dtype=np.bool_)], axis=-1)
    packed = np.packbits(chosen, axis=-1, bitorder="little")  # [T, L, 8 W] bytes, little-endian bits
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def distinct_per_layer(masks: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Distinct experts per layer `[L]` of a batch's token rows `[B, L, W]`."""
    union = np.bitwise_or.reduce(masks, axis=0)  # [L, W]
    return np.bitwise_count(union).sum(axis=-1, dtype=np.int64)


def sample_plan(
    decode_counts: npt.NDArray[np.integer],
    output_tokens: npt.NDArray[np.int64],
    top_k: int,
    seed: int,
    sampler: str = "gumbel",
) -> TokenPlan:
    """Sample `output_tokens[i]` tokens' top-k per layer from each request's decode counts.

    `gumbel`: successive sampling (Gumbel top-k) from p = counts / sum. `systematic`: randomised
    systematic sampling (`eldr.trace.sampling`) with inclusion probabilities pi = k * counts / sum,
    which keeps every expert's per-token frequency exactly; successive sampling flattens it (the
    trace helper measured +1.5-3.6% distinct experts in same-domain batches, docs/trace-format.md).
    """
    if sampler not in SAMPLERS:
        raise InvalidInputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    num_requests, _, num_experts = decode_counts.shape
    if top_k > num_experts:
        raise InvalidInputError(f"top_k {top_k} exceeds the {num_experts} experts of the trace")
    tokens = np.asarray(output_tokens, dtype=np.int64)
    has_tokens = tokens > 0
    empty = has_tokens & (decode_counts.reshape(num_requests, -1).sum(axis=1) == 0)
    if empty.any():
        raise InvalidInputError(
            f"{int(empty.sum())} requests generate tokens but have all-zero decode_counts "
            f"(first: request {int(np.flatnonzero(empty)[0])})"
        )
    offsets = np.zeros(num_requests + 1, dtype=np.int64)
    np.cumsum(tokens, out=offsets[1:])
    with np.errstate(divide="ignore"):
        inv_p = np.float32(1.0) / decode_counts.astype(np.float32)  # [N, L, E]; inf where never chosen
    owner = np.repeat(np.arange(num_requests), tokens)  # [T]
    masks = np.empty((int(offsets[-1]), decode_counts.shape[1], num_words(num_experts)), dtype=np.uint64)
    rng = np.random.default_rng(seed)
    if sampler == "systematic":
        totals = decode_counts.sum(axis=2, keepdims=True).astype(np.float64)  # [N, L, 1] = T_i * k
        pi = top_k * decode_counts / np.maximum(totals, 1.0)  # [N, L, E], rows sum to k
        if np.any(pi > 1 + 1e-9):
            raise InvalidInputError(
                "--sampler systematic needs decode counts that choose an expert at most once per token "
                "(counts <= tokens); these do not"
            )
        for start in range(0, owner.size, CHUNK_TOKENS):
            rows = owner[start : start + CHUNK_TOKENS]
            flat = pi[rows].reshape(-1, num_experts)  # [t * L, E]
            ids = systematic_topk(flat, top_k, rng).reshape(rows.size, pi.shape[1], top_k)
            masks[start : start + rows.size] = topk_to_masks(ids, num_experts)
        return TokenPlan(masks, offsets)
    for start in range(0, owner.size, CHUNK_TOKENS):
        rows = owner[start : start + CHUNK_TOKENS]
        # exponential race == Gumbel top-k: the k smallest Exp(1) / p are a draw without replacement
        keys = rng.standard_exponential((rows.size, *inv_p.shape[1:]), dtype=np.float32)
        with np.errstate(invalid="ignore"):  # 0 * inf = nan for never-chosen experts: never picked
            keys *= inv_p[rows]
        kth = np.partition(keys, top_k - 1, axis=-1)[..., top_k - 1 : top_k]  # [t, L, 1]
        chosen = (keys <= kth) & (keys < np.inf)  # [t, L, E]
        masks[start : start + rows.size] = pack_bool(chosen)
    return TokenPlan(masks, offsets)


def replay_plan(
    decode_topk: npt.NDArray[np.integer],
    decode_offsets: npt.NDArray[np.int64],
    output_tokens: npt.NDArray[np.int64],
    num_experts: int,
) -> TokenPlan:
    """The trace's exact per-token decode choices as a plan."""
    if not np.array_equal(np.diff(decode_offsets), output_tokens):
        raise InvalidInputError("decode_offsets do not match output_tokens: cannot replay decode_topk")
    if decode_topk.size and int(decode_topk.max()) >= num_experts:
        raise InvalidInputError(f"decode_topk has expert ids >= {num_experts}")
    masks = np.empty((decode_topk.shape[0], decode_topk.shape[1], num_words(num_experts)), np.uint64)
    for start in range(0, decode_topk.shape[0], CHUNK_TOKENS):
        masks[start : start + CHUNK_TOKENS] = topk_to_masks(
            decode_topk[start : start + CHUNK_TOKENS], num_experts
        )
    return TokenPlan(masks, np.asarray(decode_offsets, dtype=np.int64))


def subset_plan(plan: TokenPlan, index: npt.NDArray[np.int64]) -> TokenPlan:
    """The plan of requests `index` (in that order)."""
    lengths = np.diff(plan.offsets)[index]
    offsets = np.zeros(index.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    shift = np.repeat(plan.offsets[index] - offsets[:-1], lengths)  # [T'] old row - new row
    rows = np.arange(int(offsets[-1]), dtype=np.int64) + shift
    return TokenPlan(plan.masks[rows], offsets)
