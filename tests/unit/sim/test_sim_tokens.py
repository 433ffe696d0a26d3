from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import InvalidInputError
from eldr.sim.tokens import (
    distinct_per_layer,
    pack_bool,
    replay_plan,
    sample_plan,
    subset_plan,
    topk_to_masks,
)


@pytest.mark.parametrize("num_experts", [8, 64, 100, 128], ids=["e8", "e64", "e100", "e128"])
def test_masks_round_trip(num_experts: int) -> None:
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice(num_experts, 4, replace=False) for _ in range(30)]).reshape(10, 3, 4)
    masks = topk_to_masks(ids, num_experts)
    chosen = np.zeros((10, 3, num_experts), dtype=np.bool_)
    np.put_along_axis(chosen, ids, True, axis=-1)
    assert np.array_equal(masks, pack_bool(chosen))
    assert np.bitwise_count(masks).sum(axis=-1).tolist() == [[4] * 3] * 10


def test_distinct_is_the_union() -> None:
    # layer 0: {0,1} + {1,2} + {0,9} -> 4; layer 1: {5,6} three times -> 2
    ids = np.array([[[0, 1], [5, 6]], [[1, 2], [5, 6]], [[0, 9], [6, 5]]])
    assert distinct_per_layer(topk_to_masks(ids, 16)).tolist() == [4, 2]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), top_k=st.integers(1, 4), tokens=st.integers(0, 40))
def test_sampled_tokens_are_k_distinct_experts_of_the_support(seed: int, top_k: int, tokens: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(3, 2, 12)) * (rng.random((3, 2, 12)) < 0.6)
    counts[..., :top_k] += 1  # at least k experts in every support
    plan = sample_plan(counts, np.array([tokens, 1, 0]), top_k, seed)
    assert plan.offsets.tolist() == [0, tokens, tokens + 1, tokens + 1]
    assert (np.bitwise_count(plan.masks).sum(axis=-1) == top_k).all()
    for i in range(3):
        rows = plan.masks[plan.offsets[i] : plan.offsets[i + 1], :, 0]
        support = (counts[i] > 0) @ (np.uint64(1) << np.arange(12, dtype=np.uint64))
        assert ((rows & ~support[None, :].astype(np.uint64)) == 0).all()


def test_sampling_frequencies_follow_the_counts() -> None:
    # k = 1 is a categorical draw: frequencies ~ counts / sum
    counts = np.array([[[6, 3, 1, 0]]])
    plan = sample_plan(counts, np.array([20_000]), 1, seed=3)
    freq = np.bincount(np.log2(plan.masks[:, 0, 0].astype(np.float64)).astype(int), minlength=4) / 20_000
    assert freq == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.015)


def test_systematic_sampler_keeps_inclusion_probabilities() -> None:
    # 5 tokens of top-2: expert e is in a token with probability counts[e] / 5 under systematic
    # sampling; successive (Gumbel) sampling flattens that toward uniform
    counts = np.array([[[4, 3, 2, 1]]])
    freq = {}
    for sampler in ("systematic", "gumbel"):
        masks = sample_plan(counts, np.array([20_000]), 2, seed=5, sampler=sampler).masks[:, 0, 0]
        assert (np.bitwise_count(masks) == 2).all()
        freq[sampler] = [float(((masks >> np.uint64(e)) & np.uint64(1)).mean()) for e in range(4)]
    assert freq["systematic"] == pytest.approx([0.8, 0.6, 0.4, 0.2], abs=0.015)
    assert freq["gumbel"][0] < 0.75 and freq["gumbel"][3] > 0.22


def test_systematic_sampler_rejects_repeated_choices() -> None:
    with pytest.raises(InvalidInputError, match="at most once per token"):
        sample_plan(np.array([[[6, 3, 1, 0]]]), np.array([4]), 2, seed=0, sampler="systematic")


def test_sampling_is_deterministic_per_seed() -> None:
    counts = np.random.default_rng(0).integers(1, 5, size=(4, 3, 16))
    a = sample_plan(counts, np.array([5, 6, 7, 8]), 2, seed=9)
    b = sample_plan(counts, np.array([5, 6, 7, 8]), 2, seed=9)
    c = sample_plan(counts, np.array([5, 6, 7, 8]), 2, seed=10)
    assert np.array_equal(a.masks, b.masks) and not np.array_equal(a.masks, c.masks)


def test_replay_and_subset() -> None:
    topk = np.arange(5 * 2 * 2).reshape(5, 2, 2) % 16
    plan = replay_plan(topk, np.array([0, 2, 2, 5]), np.array([2, 0, 3]), 16)
    sub = subset_plan(plan, np.array([2, 0]))
    assert sub.offsets.tolist() == [0, 3, 5]
    assert np.array_equal(sub.masks, np.concatenate([plan.masks[2:5], plan.masks[0:2]]))
    with pytest.raises(InvalidInputError, match="decode_offsets"):
        replay_plan(topk, np.array([0, 2, 2, 5]), np.array([2, 1, 2]), 16)


def test_tokens_without_decode_counts_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="all-zero decode_counts"):
        sample_plan(np.zeros((1, 1, 4), dtype=np.int64), np.array([3]), 1, seed=0)
