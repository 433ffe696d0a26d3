from __future__ import annotations

import numpy as np
import pytest

from eldr.errors import InvalidInputError
from eldr.vllm.blockcache import BlockDelta, BlockSignatureCache, row_dtype


def _delta(blocks: list[int], fresh: list[bool], counts: np.ndarray) -> BlockDelta:
    return BlockDelta(np.asarray(blocks, dtype=np.int64), np.asarray(fresh, dtype=np.bool_), counts)


def test_fresh_block_resets_old_counts() -> None:
    cache = BlockSignatureCache(num_blocks=4, num_layers=2, num_experts=3, block_size=16)
    first = np.ones((1, 2, 3), dtype=np.uint8)
    cache.apply(_delta([1], [True], first * 5))
    cache.apply(_delta([1], [False], first))
    assert cache.sum_rows([1]).tolist() == (first[0] * 6).tolist()
    cache.apply(_delta([1], [True], first * 2))  # block reused for new content
    assert cache.sum_rows([1]).tolist() == (first[0] * 2).tolist()


def test_never_written_or_invalidated_block_is_refused() -> None:
    cache = BlockSignatureCache(num_blocks=4, num_layers=1, num_experts=2, block_size=16)
    assert cache.sum_rows([0]) is None
    cache.apply(_delta([0, 2], [True, True], np.ones((2, 1, 2), dtype=np.uint8)))
    assert cache.sum_rows([0, 2]).tolist() == [[2, 2]]
    cache.invalidate([2])
    assert cache.sum_rows([0, 2]) is None
    assert cache.sum_rows([0]).tolist() == [[1, 1]]
    assert cache.sum_rows([]).tolist() == [[0, 0]]


def test_bytes_per_block_and_row_type() -> None:
    cache = BlockSignatureCache(num_blocks=2, num_layers=48, num_experts=128, block_size=16)
    assert cache.num_bytes_per_block == 6 * 1024  # the paper's <= 6 KiB per block for Qwen3-30B-A3B
    assert row_dtype(256) == np.uint16
    assert row_dtype(255) == np.uint8


@pytest.mark.parametrize(
    ("blocks", "fresh", "shape"),
    [([0], [True, False], (1, 1, 2)), ([0, 1], [True, True], (1, 1, 2)), ([0], [True], (1, 2))],
    ids=["fresh-length", "count-rows", "counts-ndim"],
)
def test_malformed_delta_is_rejected(blocks: list[int], fresh: list[bool], shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError):
        _delta(blocks, fresh, np.zeros(shape, dtype=np.uint8))


def test_delta_outside_cache_or_wrong_shape_is_rejected() -> None:
    cache = BlockSignatureCache(num_blocks=2, num_layers=1, num_experts=2, block_size=16)
    with pytest.raises(InvalidInputError, match="outside"):
        cache.apply(_delta([5], [True], np.zeros((1, 1, 2), dtype=np.uint8)))
    with pytest.raises(InvalidInputError, match=r"\[L, E\]"):
        cache.apply(_delta([0], [True], np.zeros((1, 1, 3), dtype=np.uint8)))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_pickled_delta_is_the_same_delta_and_applies_alike(dtype: type) -> None:
    import pickle

    delta = _delta([3, 0, 2], [True, False, True], np.arange(3 * 2 * 4, dtype=dtype).reshape(3, 2, 4))
    back = pickle.loads(pickle.dumps(delta, protocol=pickle.HIGHEST_PROTOCOL))
    assert back.block_ids.tolist() == [3, 0, 2] and back.is_fresh.tolist() == [True, False, True]
    assert back.counts.dtype == dtype and back.counts.tolist() == delta.counts.tolist()
    sent, received = (BlockSignatureCache(4, 2, 4, 300) for _ in range(2))
    sent.apply(delta)
    received.apply(back)
    np.testing.assert_array_equal(sent.rows, received.rows)
    np.testing.assert_array_equal(sent.is_valid, received.is_valid)
