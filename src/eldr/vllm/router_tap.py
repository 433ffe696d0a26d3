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
  its slot belongs to (the step's slot mapping: token -> block * block_size + offset; `fold.py`). A
  row still holding -1 means a router did not record that token in this forward (a compiled graph
  without the callback, a kernel that routes internally, ...): the whole step is refused, never
  guessed.

`RouterTap`s are created when the model is built (`eldr.vllm.plugin`, before torch.compile traces it)
or, in eager mode, when the connector starts; `taps_for` finds them by router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from eldr.vllm.blockcache import BlockDelta
from eldr.vllm.fold import fold_ids, fold_on_device

UNWRITTEN = -1  # rows armed for a step; a router overwrites them with expert ids >= 0
Callback = Callable[[torch.Tensor], None]  # a router capture callback: called with `[n, k]` top-k ids


def record_topk(buffer: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """The router callback: this forward's `[n, k]` ids into the buffer's first n rows."""
    buffer[: topk_ids.shape[0]].copy_(topk_ids)


@dataclass
class RouterTap:
    """One MoE router's capture buffer and the callback that fills it."""

    layer_id: int
    router: Any
    buffer: torch.Tensor  # [max tokens per forward, k] int32
    callback: Callback  # what `router.capture_fn` was set to (may chain another)

    @property
    def is_installed(self) -> bool:
        return self.router.capture_fn is self.callback

    def wrap(self, wrapper: Callable[[Callback], Callback]) -> None:
        """Make `wrapper(callback)` the router's callback (e.g. a benchmark's clock around it).

        Eager mode only: a compiled graph keeps running the callback it traced.
        """
        self.callback = wrapper(self.callback)
        self.router.set_capture_fn(self.callback)


_TAPS: dict[int, RouterTap] = {}  # id(router) -> tap, for this process's model(s)


def install_tap(layer_id: int, router: Any, max_num_tokens: int) -> RouterTap:
    """Give `router` a buffer of `max_num_tokens` rows and a recording callback (idempotent)."""
    tap = _TAPS.get(id(router))
    if tap is not None and tap.router is router:
        if tap.is_installed:
            return tap
        buffer = tap.buffer  # someone replaced the callback since: chain ours again (eager mode only)
    else:
        buffer = torch.full(
            (max_num_tokens, int(router.top_k)), UNWRITTEN, dtype=torch.int32, device=_device_of(router)
        )
    callback = chain_capture(router, partial(record_topk, buffer))
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

    On CPU the buffers are read and written through numpy views of the same memory (no torch
    dispatch) and folded on the host (`fold.fold_ids`, into a work array kept here); on an
    accelerator the rows are armed and folded on the device (`fold.fold_on_device`).
    """

    def __init__(self, taps: list[RouterTap], num_experts: int) -> None:
        self.taps = taps
        self.num_experts = num_experts
        self.num_rows = min(int(tap.buffer.shape[0]) for tap in taps)
        self.num_armed = 0
        self.is_host = all(tap.buffer.device.type == "cpu" for tap in taps)
        self.views = [tap.buffer.numpy() for tap in taps] if self.is_host else []
        self._work = np.empty(0, dtype=np.int64)  # host fold's bins: L x rows x k int64, at first use

    def arm(self, num_tokens: int) -> None:
        """Mark the rows of the next forward's `num_tokens` tokens as not yet recorded."""
        self.num_armed = min(num_tokens, self.num_rows)
        if self.is_host:
            for view in self.views:
                view[: self.num_armed] = UNWRITTEN
        else:
            for tap in self.taps:
                tap.buffer[: self.num_armed].fill_(UNWRITTEN)

    def fold(self, slots: torch.Tensor, block_size: int) -> BlockDelta | None:
        """The last forward's ids as per-block rows; `None` if a router missed a token of the step."""
        host_slots = (slots if slots.is_cpu else slots.cpu()).numpy().reshape(-1)
        num_tokens = int(host_slots.size)
        kept: npt.NDArray[np.int64] | None = None  # token rows, when padding (slot -1) is left out
        if num_tokens > self.num_armed or (num_tokens and int(host_slots.min()) < 0):
            kept = np.flatnonzero(host_slots >= 0)
            if kept.size and int(kept[-1]) >= self.num_armed:
                return None  # a token beyond the armed rows: its row may be stale
            host_slots = host_slots[kept]
        if not self.is_host:
            buffers = [tap.buffer for tap in self.taps]
            return fold_on_device(buffers, host_slots, block_size, self.num_experts, token_rows=kept)
        num_layers, top_k = len(self.views), int(self.views[0].shape[1])
        if self._work.size < num_layers * host_slots.size * top_k:
            self._work = np.empty(num_layers * self.num_rows * top_k, dtype=np.int64)
        ids = [view[:num_tokens] for view in self.views] if kept is None else [v[kept] for v in self.views]
        return fold_ids(ids, host_slots, block_size, self.num_experts, work=self._work)


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
