"""Fold one forward's recorded router ids into per-KV-block expert counts (a step's `BlockDelta`).

Input: the ids each MoE layer's router chose for the step's T tokens (L arrays `[T, k]`, read from the
capture buffers, see `capture.py`) and the step's slot mapping (token -> physical KV slot,
`block * block_size + offset`). Output: for every KV block the step wrote, the `[L, E]` counts of its
tokens' choices, and whether the step wrote the block's first slot (`blockcache` then resets the
block's row first). Exact: an id outside `[0, E)` (-1 is a row a router did not write this forward)
refuses the whole step (`None`).

How: vLLM writes a request's tokens in position order, so the tokens of one KV block are one run of
consecutive tokens; runs are numbered by comparing neighbours (`block_runs`; a block met in two runs
is merged through `np.unique`, never seen in practice). Token t's choice of expert e at layer l is
counted in bin `(row(t) * L + l) * E + e`: one `np.bincount` over all L x T x k choices on the host,
one `scatter_add_` on an accelerator (`fold_on_device`, where the ids already are; only the
`[blocks, L, E]` rows are copied back).

Why it is written this way: inside a busy engine worker each numpy call costs ~5 µs, several times
its cost in a quiet process, so the host fold is ~15 calls whatever the step's size; and at the
paper's scale (T = 1,024, L = 48, E = 128, k = 8) its int64 bins are 3 MiB, which a fresh array per
step pays again in page faults, so they live in a work array the caller keeps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from eldr.vllm.blockcache import BlockDelta, row_dtype


def block_runs(
    slots: npt.NDArray[np.int64], block_size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """`(block ids [n], is_fresh [n], row of each token [T])` of the blocks that `slots` [T] write.

    Blocks come in order of their tokens' runs; `is_fresh[i]`: the step wrote block i's slot 0.
    `slots` must be non-empty and >= 0.
    """
    blocks, offsets = np.divmod(slots, block_size)
    is_start = np.empty(blocks.size, dtype=np.bool_)  # [T] token t starts a run
    np.not_equal(blocks[1:], blocks[:-1], out=is_start[1:])
    is_start[0] = False
    token_row = is_start.cumsum()  # 0 for the first run's tokens
    is_start[0] = True
    starts = is_start.nonzero()[0]
    block_ids = blocks[starts]
    is_fresh = np.minimum.reduceat(offsets, starts) == 0
    if len(set(block_ids.tolist())) < block_ids.size:  # a block in two runs: one row for both
        block_ids, run_row = np.unique(block_ids, return_inverse=True)
        token_row = run_row[token_row]
        is_fresh = np.bincount(run_row, weights=is_fresh, minlength=block_ids.size) > 0
    return block_ids, is_fresh, token_row


def fold_ids(
    ids: Sequence[npt.NDArray[np.integer]] | npt.NDArray[np.integer],
    slots: npt.NDArray[np.int64],
    block_size: int,
    num_experts: int,
    work: npt.NDArray[np.int64] | None = None,
) -> BlockDelta | None:
    """Host fold: L arrays `[T, k]` of expert ids (or one `[L, T, k]`) of tokens written to `slots` [T].

    `work`: a reusable int64 array of at least L x T x k elements (one is allocated if absent or short).
    `None` when an id is outside `[0, num_experts)`.
    """
    num_layers, num_tokens = len(ids), int(slots.size)
    if num_tokens == 0:
        return empty_delta(num_layers, num_experts, block_size)
    top_k = int(ids[0].shape[1])
    size = num_layers * num_tokens * top_k
    flat = work[:size] if work is not None and work.size >= size else np.empty(size, dtype=np.int64)
    np.concatenate(ids, out=flat.reshape(num_layers * num_tokens, top_k), casting="same_kind")
    if int(flat.view(np.uint64).max()) >= num_experts:  # -1 reads as 2**64 - 1
        return None
    block_ids, is_fresh, token_row = block_runs(slots, block_size)
    num_blocks, layer_bins = int(block_ids.size), num_layers * num_experts
    bins = flat.reshape(num_layers, num_tokens * top_k)
    bins += np.repeat(token_row * layer_bins, top_k)  # two long passes: a [L, T, 1] broadcast runs k-wide
    bins += _layer_offsets(num_layers, num_experts)
    counts = np.bincount(flat, minlength=num_blocks * layer_bins)
    return BlockDelta(
        block_ids=block_ids,
        is_fresh=is_fresh,
        counts=counts.reshape(num_blocks, num_layers, num_experts).astype(_row_dtype(block_size)),
    )


def fold_on_device(
    buffers: Sequence[torch.Tensor],
    slots: npt.NDArray[np.int64],
    block_size: int,
    num_experts: int,
    token_rows: npt.NDArray[np.int64] | None = None,
) -> BlockDelta | None:
    """Accelerator fold: the ids stay where the routers wrote them, only the block rows come back.

    `buffers`: each layer's capture buffer `[rows, k]` (any device); tokens are their first
    `len(slots)` rows, or the rows `token_rows` (padding left out). Written for CUDA/ROCm, tested
    here on CPU tensors only (no GPU).
    """
    num_layers, num_tokens = len(buffers), int(slots.size)
    if num_tokens == 0:
        return empty_delta(num_layers, num_experts, block_size)
    device = buffers[0].device
    block_ids, is_fresh, token_row = block_runs(slots, block_size)
    num_blocks, layer_bins = int(block_ids.size), num_layers * num_experts
    if token_rows is None:
        ids = torch.stack([buffer[:num_tokens] for buffer in buffers])  # [L, T, k] int32
    else:
        index = torch.from_numpy(token_rows).to(device)
        ids = torch.stack([buffer.index_select(0, index) for buffer in buffers])
    low_high = torch.stack(torch.aminmax(ids))  # checked on the host below, with the counts
    offsets = torch.from_numpy(token_row * layer_bins).to(device)[None, :, None] + torch.arange(
        0, layer_bins, num_experts, device=device
    ).view(-1, 1, 1)
    # clamped: an index out of range is fatal on GPU (out-of-range ids were caught by low_high)
    bins = (ids.clamp(0, num_experts - 1) + offsets).view(-1)
    counts = torch.zeros(num_blocks * layer_bins, dtype=torch.int32, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.int32))
    dtype = _row_dtype(block_size)
    narrow = counts.to(torch.uint8) if dtype == np.uint8 else counts
    host = narrow.cpu().numpy()
    low, high = (int(v) for v in low_high.tolist())
    if low < 0 or high >= num_experts:
        return None
    return BlockDelta(
        block_ids=block_ids,
        is_fresh=is_fresh,
        counts=host.reshape(num_blocks, num_layers, num_experts).astype(dtype, copy=False),
    )


@functools.cache
def empty_delta(num_layers: int, num_experts: int, block_size: int) -> BlockDelta:
    """A step without tokens (one shared, read-only object per shape)."""
    delta = BlockDelta(
        block_ids=np.zeros(0, dtype=np.int64),
        is_fresh=np.zeros(0, dtype=np.bool_),
        counts=np.zeros((0, num_layers, num_experts), dtype=_row_dtype(block_size)),
    )
    for array in (delta.block_ids, delta.is_fresh, delta.counts):
        array.flags.writeable = False
    return delta


@functools.cache
def _row_dtype(block_size: int) -> np.dtype[np.unsignedinteger]:
    return row_dtype(block_size)


@functools.cache
def _layer_offsets(num_layers: int, num_experts: int) -> npt.NDArray[np.int64]:
    offsets = np.arange(0, num_layers * num_experts, num_experts, dtype=np.int64)[:, None]  # [L, 1]
    offsets.flags.writeable = False
    return offsets
