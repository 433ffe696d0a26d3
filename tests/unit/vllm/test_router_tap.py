"""The capture buffers: what the router callback records, how a step folds, when a step is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from eldr.vllm.router_tap import UNWRITTEN, RouterTap, TapSet, chain_capture, record_topk  # noqa: E402

PATHS = pytest.mark.parametrize("path", ["host", "device"])


def _tapset(num_layers: int, top_k: int, num_experts: int, path: str = "host", rows: int = 16) -> TapSet:
    """`path="device"`: CPU tensors through the accelerator code (arm with `fill_`, fold in torch)."""
    buffers = [torch.full((rows, top_k), UNWRITTEN, dtype=torch.int32) for _ in range(num_layers)]
    taps = TapSet([RouterTap(i, None, buf, lambda ids: None) for i, buf in enumerate(buffers)], num_experts)
    if path == "device":
        taps.is_host, taps.views = False, []
    return taps


@PATHS
def test_tokens_fold_into_their_blocks_and_slot_zero_marks_fresh(path: str) -> None:
    # block size 4: slots 8, 9 -> block 2 (slot 8 is its first slot), slot 13 -> block 3 (not first)
    taps = _tapset(num_layers=2, top_k=2, num_experts=3, path=path)
    taps.arm(3)
    record_topk(taps.taps[0].buffer, torch.tensor([[0, 1], [0, 2], [1, 2]]))
    record_topk(taps.taps[1].buffer, torch.tensor([[2, 1], [2, 0], [0, 1]]))
    delta = taps.fold(torch.tensor([8, 9, 13]), block_size=4)
    assert delta is not None
    assert delta.block_ids.tolist() == [2, 3] and delta.is_fresh.tolist() == [True, False]
    assert delta.counts.tolist() == [[[2, 1, 1], [1, 1, 2]], [[0, 1, 1], [1, 1, 0]]]
    assert delta.counts.dtype == np.uint8


@PATHS
def test_padded_tokens_are_ignored(path: str) -> None:
    taps = _tapset(num_layers=1, top_k=1, num_experts=2, path=path)
    taps.arm(3)
    record_topk(taps.taps[0].buffer, torch.tensor([[0], [1], [1], [0]]))  # the 4th row is padding
    delta = taps.fold(torch.tensor([0, 1, 2, -1]), block_size=4)
    assert delta is not None and delta.counts.tolist() == [[[1, 2]]]


@PATHS
@pytest.mark.parametrize("short_layer", [0, 1])
def test_a_router_that_missed_a_token_refuses_the_step(short_layer: int, path: str) -> None:
    taps = _tapset(num_layers=2, top_k=1, num_experts=2, path=path)
    for layer in range(2):  # an earlier forward filled every row
        record_topk(taps.taps[layer].buffer, torch.zeros((8, 1), dtype=torch.int64))
    taps.arm(3)
    for layer in range(2):
        record_topk(taps.taps[layer].buffer, torch.zeros((2 if layer == short_layer else 3, 1)))
    assert taps.fold(torch.tensor([0, 1, 2]), block_size=4) is None


@PATHS
def test_a_forward_whose_routers_never_ran_is_refused_not_counted_from_stale_rows(path: str) -> None:
    taps = _tapset(num_layers=1, top_k=1, num_experts=2, path=path)
    record_topk(taps.taps[0].buffer, torch.ones((4, 1), dtype=torch.int64))  # the previous step
    taps.arm(2)
    assert taps.fold(torch.tensor([4, 5]), block_size=4) is None


@PATHS
def test_a_token_beyond_the_armed_rows_is_refused(path: str) -> None:
    taps = _tapset(num_layers=1, top_k=1, num_experts=2, path=path)
    taps.arm(2)
    record_topk(taps.taps[0].buffer, torch.zeros((3, 1), dtype=torch.int64))
    assert taps.fold(torch.tensor([0, 1, 2]), block_size=4) is None


class _Router:
    """What the capture needs from vLLM's BaseRouter: `capture_fn`, `set_capture_fn`, the branch."""

    def __init__(self) -> None:
        self.capture_fn: Any = None

    def set_capture_fn(self, fn: Any) -> None:
        self.capture_fn = fn

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        topk_ids = torch.topk(logits, 2, dim=-1).indices
        if self.capture_fn is not None:  # as in BaseRouter._select_experts
            self.capture_fn(topk_ids)
        return topk_ids


def test_the_recording_callback_survives_torch_compile_with_guards_dropped() -> None:
    from functools import partial

    router = _Router()
    buffer = torch.full((64, 2), UNWRITTEN, dtype=torch.int32)
    chain_capture(router, partial(record_topk, buffer))
    compiled = torch.compile(
        router.route,
        fullgraph=True,  # vLLM compiles with fullgraph: the callback must not break the graph
        dynamic=True,
        backend="aot_eager",
        options={"guard_filter_fn": lambda entries: [False for _ in entries]},  # vLLM drops all guards
    )
    for num_tokens in (5, 9, 3):  # one trace, replayed with other token counts
        buffer.fill_(UNWRITTEN)
        logits = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(num_tokens))
        ids = compiled(logits)
        assert torch.equal(buffer[:num_tokens], ids.to(torch.int32))
        assert bool((buffer[num_tokens:] == UNWRITTEN).all())


def test_a_callback_set_after_the_trace_is_never_called_by_the_compiled_graph() -> None:
    # the reason the plugin installs its buffers while the model is built (eldr.vllm.plugin)
    router = _Router()
    compiled = torch.compile(
        router.route,
        fullgraph=True,
        backend="aot_eager",
        options={"guard_filter_fn": lambda entries: [False for _ in entries]},
    )
    compiled(torch.randn(4, 8))
    calls: list[int] = []
    router.set_capture_fn(lambda ids: calls.append(int(ids.shape[0])))
    compiled(torch.randn(4, 8))
    assert calls == []


def test_chained_callbacks_both_run() -> None:
    router = _Router()
    seen: list[str] = []
    chain_capture(router, lambda ids: seen.append("first"))
    chain_capture(router, lambda ids: seen.append("second"))
    router.route(torch.randn(2, 4))
    assert seen == ["first", "second"]


def test_a_replaced_callback_is_chained_again_in_eager_mode() -> None:
    pytest.importorskip("vllm")  # the buffer's device comes from vLLM's platform
    from eldr.vllm import router_tap as capture

    router = _Router()
    router.top_k = 2  # type: ignore[attr-defined]
    tap = capture.install_tap(0, router, max_num_tokens=8)
    assert tap.is_installed
    router.set_capture_fn(lambda ids: None)  # e.g. another capturer bound after the model was built
    assert not tap.is_installed
    again = capture.install_tap(0, router, max_num_tokens=8)
    assert again.is_installed and again.buffer is tap.buffer
    ids = router.route(torch.randn(3, 4))
    assert torch.equal(again.buffer[:3], ids.to(torch.int32))


def test_a_wrapped_callback_stays_installed_and_still_records() -> None:
    pytest.importorskip("vllm")
    from eldr.vllm import router_tap as capture

    router = _Router()
    router.top_k = 2  # type: ignore[attr-defined]
    tap = capture.install_tap(0, router, max_num_tokens=8)
    calls: list[int] = []

    def counted(fn: capture.Callback) -> capture.Callback:
        def callback(ids: torch.Tensor) -> None:
            calls.append(int(ids.shape[0]))
            fn(ids)

        return callback

    tap.wrap(counted)
    assert tap.is_installed and capture.install_tap(0, router, max_num_tokens=8) is tap
    ids = router.route(torch.randn(3, 4))
    assert calls == [3] and torch.equal(tap.buffer[:3], ids.to(torch.int32))
