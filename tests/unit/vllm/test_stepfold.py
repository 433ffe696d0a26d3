from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from eldr.vllm.capture import StepFold  # noqa: E402


def test_tokens_fold_into_their_blocks_and_slot_zero_marks_fresh() -> None:
    # block size 4: slots 8, 9 -> block 2 (slot 8 is its first slot), slot 13 -> block 3 (not first)
    fold = StepFold(torch.tensor([8, 9, 13]), block_size=4, num_layers=2, num_experts=3)
    fold.add(0, torch.tensor([[0, 1], [0, 2], [1, 2]]))
    fold.add(1, torch.tensor([[2, 1], [2, 0], [0, 1]]))
    delta = fold.delta()
    assert delta is not None
    assert delta.block_ids.tolist() == [2, 3] and delta.is_fresh.tolist() == [True, False]
    assert delta.counts.tolist() == [[[2, 1, 1], [1, 1, 2]], [[0, 1, 1], [1, 1, 0]]]
    assert delta.counts.dtype == np.uint8


def test_padded_tokens_are_ignored_and_chunked_router_calls_add_up() -> None:
    fold = StepFold(torch.tensor([0, 1, 2, -1]), block_size=4, num_layers=1, num_experts=2)
    fold.add(0, torch.tensor([[0], [1]]))
    fold.add(0, torch.tensor([[1], [0]]))  # the second chunk's last row is the padded token
    delta = fold.delta()
    assert delta is not None and delta.counts.tolist() == [[[1, 2]]]


@pytest.mark.parametrize("seen", [[2, 3], [3, 2]], ids=["layer0-short", "layer1-short"])
def test_a_layer_that_missed_tokens_gives_no_delta(seen: list[int]) -> None:
    fold = StepFold(torch.tensor([0, 1, 2]), block_size=4, num_layers=2, num_experts=2)
    for layer, num_tokens in enumerate(seen):
        fold.add(layer, torch.zeros((num_tokens, 1), dtype=torch.int64))
    assert fold.delta() is None


def test_more_router_rows_than_step_tokens_gives_no_delta() -> None:
    fold = StepFold(torch.tensor([0, 1]), block_size=4, num_layers=1, num_experts=2)
    fold.add(0, torch.zeros((2, 1), dtype=torch.int64))
    fold.add(0, torch.zeros((1, 1), dtype=torch.int64))
    assert fold.delta() is None
