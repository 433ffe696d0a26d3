"""Worker side: capture the MoE routers' real top-k ids and fold them into per-KV-block count rows.

vLLM's MoE routers call a capture callback with the logical `topk_ids` [num_tokens, k] of every
forward (`BaseRouter.set_capture_fn`, the hook vLLM's own routed-experts capture uses); nothing is
recomputed. The tokens of a forward are in the same order as the step's slot mapping
(`ForwardContext.slot_mapping`: token -> physical KV slot = block * block_size + offset), so each
token's choices are added to the row of the block its KV is written to — no request bookkeeping on
the worker. `StepFold` accumulates one step; `BlockDelta` is what travels back to the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from eldr.vllm.blockcache import BlockDelta, row_dtype


class StepFold:
    """One engine step's router ids folded into `[touched blocks, L, E]` counts."""

    def __init__(self, slots: torch.Tensor, block_size: int, num_layers: int, num_experts: int) -> None:
        slots = slots.reshape(-1).to(torch.int64)
        self.num_tokens = int(slots.numel())
        self.block_size = block_size
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.is_token_kept = slots >= 0  # [num_tokens] padded tokens have slot -1
        kept = slots[self.is_token_kept]
        self.block_ids, self.token_block = torch.unique(kept // block_size, return_inverse=True)
        self.is_fresh = torch.zeros(self.block_ids.numel(), dtype=torch.bool, device=slots.device)
        self.is_fresh[self.token_block[kept % block_size == 0]] = True
        # [num_blocks_touched, L, E] int32 on the ids' device
        self.counts = torch.zeros(
            (self.block_ids.numel(), num_layers, num_experts), dtype=torch.int32, device=slots.device
        )
        self.num_captured = [0] * num_layers  # tokens seen per layer (chunked MoE calls add up)
        self.is_broken = False

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Fold one router call's `[n, k]` ids (the next n tokens of the step) into the rows."""
        start = self.num_captured[layer]
        n = min(int(topk_ids.shape[0]), self.num_tokens - start)
        if n <= 0:
            if topk_ids.shape[0] > 0:
                self.is_broken = True  # more ids than tokens: the step's layout is not understood
            return
        self.num_captured[layer] = start + n
        kept = self.is_token_kept[start : start + n]
        ids = topk_ids[:n][kept].to(torch.int64)  # [kept tokens, k]
        # index of each kept token among all kept tokens of the step
        offset = int(self.is_token_kept[:start].sum().item()) if start else 0
        rows = self.token_block[offset : offset + ids.shape[0]]
        flat = (rows[:, None] * self.num_experts + ids).reshape(-1)
        binned = torch.bincount(flat, minlength=self.counts.shape[0] * self.num_experts)
        self.counts[:, layer, :] += binned.view(-1, self.num_experts).to(torch.int32)

    def delta(self) -> BlockDelta | None:
        """The step's rows, or `None` if some layer did not see every token (never a partial count)."""
        num_seen = self.num_captured[0]
        if self.is_broken or any(n != num_seen for n in self.num_captured):
            return None
        if num_seen < self.num_tokens and bool(self.is_token_kept[num_seen:].any()):
            return None  # routers saw fewer tokens than the step wrote (only padding may be unseen)
        return BlockDelta(
            block_ids=self.block_ids.cpu().numpy().astype(np.int64),
            is_fresh=self.is_fresh.cpu().numpy(),
            counts=self.counts.cpu().numpy().astype(row_dtype(self.block_size)),
        )


def find_moe_routers(static_forward_context: dict[str, Any]) -> list[tuple[int, Any]]:
    """`(model layer index, router)` of every MoE layer, sorted by layer index."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    found: list[tuple[int, Any]] = []
    for module in static_forward_context.values():
        if isinstance(module, MoERunner) and isinstance(getattr(module, "router", None), BaseRouter):
            found.append((int(module.layer_id), module.router))
    return sorted(found, key=lambda item: item[0])


def chain_capture(router: Any, fn: Callable[[torch.Tensor], None]) -> None:
    """Install `fn` as the router's capture callback, keeping any callback already installed."""
    previous = router.capture_fn
    if previous is None:
        router.set_capture_fn(fn)
        return

    def both(topk_ids: torch.Tensor) -> None:
        previous(topk_ids)
        fn(topk_ids)

    router.set_capture_fn(both)
