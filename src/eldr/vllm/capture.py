"""Worker side: record the MoE routers' real top-k ids into fixed buffers, fold them per KV block after.

vLLM's MoE routers call a capture callback with the logical `topk_ids` [num_tokens, k] of every
forward (`BaseRouter.set_capture_fn`, the hook vLLM's own `RoutedExpertsCapturer` uses); nothing is
recomputed. The callback installed here (`record_topk`) does one thing: copy the ids into the first
rows of a buffer preallocated per router ([max tokens per step, k] int32). That is a single in-place
tensor op, so torch.compile traces it into the compiled graph (the router's `if self.capture_fn is not
None` branch is resolved at trace time) and a CUDA-graph replay repeats it. Everything else happens
on the host after the forward:

- before the forward, `TapSet.arm` fills the rows of the step's tokens with -1;
- after it, `TapSet.fold` reads the rows back and adds each token's choices to the row of the KV block
  its slot belongs to (the step's slot mapping: token -> block * block_size + offset). A row still
  holding -1 means a router did not record that token in this forward (a compiled graph without the
  callback, a kernel that routes internally, ...): the whole step is refused, never guessed.

`RouterTap`s are created when the model is built (`eldr.vllm.plugin`, before torch.compile traces it)
or, in eager mode, when the connector starts; `taps_for` finds them by router.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from eldr.vllm.blockcache import BlockDelta, row_dtype

UNWRITTEN = -1  # rows armed for a step; a router overwrites them with expert ids >= 0


def record_topk(buffer: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """The router callback: this forward's `[n, k]` ids into the buffer's first n rows."""
    buffer[: topk_ids.shape[0]].copy_(topk_ids)


@dataclass
class RouterTap:
    """One MoE router's capture buffer and the callback that fills it."""

    layer_id: int
    router: Any
    buffer: torch.Tensor  # [max tokens per forward, k] int32
    callback: Callable[[torch.Tensor], None]  # what `router.capture_fn` was set to (may chain another)

    @property
    def is_installed(self) -> bool:
        return self.router.capture_fn is self.callback


_TAPS: dict[int, RouterTap] = {}  # id(router) -> tap, for this process's model(s)


def install_tap(layer_id: int, router: Any, max_num_tokens: int, *, is_timed: bool = False) -> RouterTap:
    """Give `router` a buffer of `max_num_tokens` rows and a recording callback (idempotent).

    `is_timed` (eager mode with `ELDR_PLUGIN_TIMING=1` only) adds a host clock around the callback.
    """
    tap = _TAPS.get(id(router))
    if tap is not None and tap.router is router:
        if tap.is_installed:
            return tap
        buffer = tap.buffer  # someone replaced the callback since: chain ours again (eager mode only)
    else:
        buffer = torch.full(
            (max_num_tokens, int(router.top_k)), UNWRITTEN, dtype=torch.int32, device=_device_of(router)
        )
    record: Callable[[torch.Tensor], None] = partial(record_topk, buffer)
    if is_timed:
        from eldr.vllm.timing import timed_callback

        record = timed_callback(record)
    callback = chain_capture(router, record)
    tap = RouterTap(layer_id, router, buffer, callback)
    _TAPS[id(router)] = tap
    return tap


def taps_for(routers: list[tuple[int, Any]]) -> list[RouterTap | None]:
    """The tap of each `(layer id, router)`, `None` where none was installed in this process."""
    found: list[RouterTap | None] = []
    for _, router in routers:
        tap = _TAPS.get(id(router))
        found.append(tap if tap is not None and tap.router is router else None)
    return found


class TapSet:
    """The taps of one model's MoE layers in layer order: arm before a forward, fold after it.

    On CPU the buffers are read and written through numpy views of the same memory (a few µs per
    call, no torch dispatch); on an accelerator the rows are armed on the device and copied back once.
    """

    def __init__(self, taps: list[RouterTap], num_experts: int) -> None:
        self.taps = taps
        self.num_experts = num_experts
        self.num_rows = min(int(tap.buffer.shape[0]) for tap in taps)
        self.num_armed = 0
        self.is_host = all(tap.buffer.device.type == "cpu" for tap in taps)
        self.views = [tap.buffer.numpy() for tap in taps] if self.is_host else []

    def arm(self, num_tokens: int) -> None:
        """Mark the rows of the next forward's `num_tokens` tokens as not yet recorded."""
        self.num_armed = min(num_tokens, self.num_rows)
        if self.is_host:
            for view in self.views:
                view[: self.num_armed] = UNWRITTEN
        else:
            for tap in self.taps:
                tap.buffer[: self.num_armed].fill_(UNWRITTEN)

    def ids(self, num_tokens: int) -> npt.NDArray[np.int32]:
        """`[L, num_tokens, k]` recorded ids of the last forward (a copy)."""
        if self.is_host:
            return np.stack([view[:num_tokens] for view in self.views])
        return torch.stack([tap.buffer[:num_tokens] for tap in self.taps]).cpu().numpy()

    def fold(self, slots: torch.Tensor, block_size: int) -> BlockDelta | None:
        """The last forward's ids as per-block rows; `None` if a router missed a token of the step."""
        # every call below costs ~10x more inside a busy engine worker than in a quiet process: few calls
        host_slots = (slots if slots.device.type == "cpu" else slots.cpu()).numpy().reshape(-1)
        num_slots = int(host_slots.size)
        ids = self.ids(min(num_slots, self.num_armed))
        if num_slots <= self.num_armed and (num_slots == 0 or int(host_slots.min()) >= 0):
            return fold_ids(ids, host_slots, block_size, self.num_experts)  # no padding: all tokens kept
        kept = np.flatnonzero(host_slots >= 0)
        if kept.size and int(kept[-1]) >= self.num_armed:
            return None  # a token beyond the armed rows: its row may be stale
        return fold_ids(ids[:, kept], host_slots[kept], block_size, self.num_experts)


def fold_ids(
    ids: npt.NDArray[np.integer], slots: npt.NDArray[np.int64], block_size: int, num_experts: int
) -> BlockDelta | None:
    """`[L, T, k]` expert ids of T tokens written to KV `slots` [T] -> per-block `[n, L, E]` counts.

    `None` when an id is outside `[0, num_experts)`: -1 is a row a router never wrote.
    """
    num_layers = int(ids.shape[0])
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        return None
    slots = slots.astype(np.int64, copy=False)
    block_ids, token_block = np.unique(slots // block_size, return_inverse=True)
    num_blocks = int(block_ids.size)
    is_fresh = np.zeros(num_blocks, dtype=np.bool_)
    is_fresh[token_block[slots % block_size == 0]] = True
    layer = np.arange(num_layers, dtype=np.int64)[:, None, None]
    flat = (token_block.reshape(1, -1, 1) * num_layers + layer) * num_experts + ids  # [L, T, k]
    counts = np.bincount(flat.reshape(-1), minlength=num_blocks * num_layers * num_experts)
    return BlockDelta(
        block_ids=block_ids.astype(np.int64, copy=False),
        is_fresh=is_fresh,
        counts=counts.reshape(num_blocks, num_layers, num_experts).astype(_row_dtype(block_size)),
    )


@functools.cache
def _row_dtype(block_size: int) -> np.dtype[np.unsignedinteger]:
    return row_dtype(block_size)


def find_moe_routers(static_forward_context: dict[str, Any]) -> list[tuple[int, Any]]:
    """`(model layer index, router)` of every MoE layer, sorted by layer index."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    found = [
        (int(module.layer_id), module.router)
        for module in static_forward_context.values()
        if isinstance(module, MoERunner) and has_capture_callback(module.router)
    ]
    return sorted(found, key=lambda item: item[0])


def has_capture_callback(router: Any) -> bool:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    return isinstance(router, BaseRouter)


def chain_capture(router: Any, fn: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """Install `fn` as the router's capture callback, keeping any callback already installed."""
    previous = router.capture_fn
    if previous is None:
        router.set_capture_fn(fn)
        return fn

    def both(topk_ids: torch.Tensor) -> None:
        previous(topk_ids)
        fn(topk_ids)

    router.set_capture_fn(both)
    return both


def _device_of(router: Any) -> torch.device:
    from vllm.platforms import current_platform

    return torch.device(current_platform.device_type) if current_platform.device_type else torch.device("cpu")
