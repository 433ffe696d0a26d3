"""The fold of recorded router ids into per-KV-block counts: host (numpy) and device (torch) paths."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from eldr.vllm.blockcache import BlockDelta  # noqa: E402
from eldr.vllm.fold import block_runs, empty_delta, fold_ids, fold_on_device  # noqa: E402


def _step_slots(rng: np.random.Generator, kind: str, block: int) -> np.ndarray:
    """Slot mappings as vLLM builds them (`requests`) and adversarial ones (`shuffled`)."""
    if kind == "one token":
        return np.array([int(rng.integers(0, 50)) * block + int(rng.integers(0, block))])
    if kind == "requests":  # chunks of several requests, each from some position, in scattered blocks
        free = list(rng.permutation(64))
        slots: list[int] = []
        for _ in range(int(rng.integers(1, 5))):
            start, length = int(rng.integers(0, 3 * block)), int(rng.integers(1, 3 * block))
            table = [free.pop() for _ in range((start + length) // block + 1)]
            slots += [table[p // block] * block + p % block for p in range(start, start + length)]
        return np.array(slots)
    assert kind == "shuffled"  # tokens of one block far apart: blocks met in several runs
    return rng.permutation(8 * block)[: 5 * block]


def _expected(ids: np.ndarray, slots: np.ndarray, block: int, num_experts: int) -> dict[int, tuple]:
    """block -> (counts [L, E], is_fresh), one token at a time."""
    rows: dict[int, np.ndarray] = {}
    fresh: dict[int, bool] = {}
    for t, slot in enumerate(slots.tolist()):
        row = rows.setdefault(slot // block, np.zeros((ids.shape[0], num_experts), dtype=np.int64))
        fresh[slot // block] = fresh.get(slot // block, False) or slot % block == 0
        for layer in range(ids.shape[0]):
            row[layer, ids[layer, t]] += 1
    return {b: (rows[b], fresh[b]) for b in rows}


def _as_dict(delta: BlockDelta) -> dict[int, tuple]:
    assert len(set(delta.block_ids.tolist())) == delta.block_ids.size  # one row per block
    return {
        int(b): (delta.counts[i].astype(np.int64), bool(delta.is_fresh[i]))
        for i, b in enumerate(delta.block_ids)
    }


def _assert_same(delta: BlockDelta | None, expected: dict[int, tuple]) -> None:
    assert delta is not None
    got = _as_dict(delta)
    assert sorted(got) == sorted(expected)
    for block, (counts, is_fresh) in expected.items():
        np.testing.assert_array_equal(got[block][0], counts)
        assert got[block][1] == is_fresh, f"block {block}"


def _ids(rng: np.random.Generator, layers: int, tokens: int, top_k: int, experts: int) -> np.ndarray:
    return np.stack(
        [[rng.permutation(experts)[:top_k] for _ in range(tokens)] for _ in range(layers)]
    ).astype(np.int32)  # [L, T, k]


@pytest.mark.parametrize("kind", ["one token", "requests", "shuffled"])
@pytest.mark.parametrize("block", [4, 16, 300], ids=["block4", "block16", "block300-uint16"])
@pytest.mark.parametrize("path", ["host", "device"])
def test_fold_matches_a_per_token_loop(kind: str, block: int, path: str) -> None:
    rng = np.random.default_rng([block, len(kind)])
    num_layers, top_k, num_experts = 3, 4, 16
    slots = _step_slots(rng, kind, block).astype(np.int64)
    ids = _ids(rng, num_layers, slots.size, top_k, num_experts)
    if path == "host":
        delta = fold_ids(list(ids), slots, block, num_experts)
    else:
        buffers = [torch.from_numpy(np.concatenate([layer, -np.ones((7, top_k), np.int32)])) for layer in ids]
        delta = fold_on_device(buffers, slots, block, num_experts)
    _assert_same(delta, _expected(ids, slots, block, num_experts))
    assert delta is not None and delta.counts.dtype == (np.uint8 if block <= 255 else np.uint16)


def test_a_reused_work_array_gives_the_same_rows_for_every_step() -> None:
    rng = np.random.default_rng(1)
    work = np.empty(3 * 40 * 2, dtype=np.int64)
    for num_tokens in (40, 3, 17, 40):  # shorter and longer steps through the same work array
        slots = np.arange(100, 100 + num_tokens, dtype=np.int64)
        ids = _ids(rng, 3, num_tokens, 2, 8)
        _assert_same(fold_ids(list(ids), slots, 8, 8, work=work), _expected(ids, slots, 8, 8))
    short = np.empty(5, dtype=np.int64)  # too short: the fold allocates its own
    slots = np.arange(8, dtype=np.int64)
    _assert_same(fold_ids(ids[:, :8], slots, 8, 8, work=short), _expected(ids[:, :8], slots, 8, 8))


@pytest.mark.parametrize("bad", [-1, 8, 200], ids=["unwritten", "id-E", "garbage"])
@pytest.mark.parametrize("path", ["host", "device"])
def test_an_id_outside_the_experts_refuses_the_step(bad: int, path: str) -> None:
    ids = np.zeros((2, 6, 2), dtype=np.int32)
    ids[1, 4, 1] = bad
    slots = np.arange(6, dtype=np.int64)
    if path == "host":
        assert fold_ids(list(ids), slots, 4, 8) is None
    else:
        assert fold_on_device([torch.from_numpy(layer) for layer in ids], slots, 4, 8) is None


def test_device_fold_reads_only_the_kept_rows() -> None:
    rng = np.random.default_rng(2)
    ids = _ids(rng, 2, 6, 2, 8)
    ids[:, [1, 4]] = -1  # padded tokens: their rows were never written
    kept = np.array([0, 2, 3, 5])
    slots = np.array([9, 10, 11, 12], dtype=np.int64)
    delta = fold_on_device([torch.from_numpy(layer) for layer in ids], slots, 4, 8, token_rows=kept)
    _assert_same(delta, _expected(ids[:, kept], slots, 4, 8))


def test_runs_follow_token_order_and_merge_a_block_met_twice() -> None:
    block_ids, is_fresh, rows = block_runs(np.array([13, 14, 4, 5, 6, 15, 0]), 4)
    assert block_ids.tolist() == [0, 1, 3] and is_fresh.tolist() == [True, True, False]
    assert rows.tolist() == [2, 2, 1, 1, 1, 2, 0]
    block_ids, is_fresh, rows = block_runs(np.array([13, 14, 4, 5, 6]), 4)  # runs in token order
    assert block_ids.tolist() == [3, 1] and is_fresh.tolist() == [False, True]
    assert rows.tolist() == [0, 0, 1, 1, 1]


def test_an_empty_step_is_one_shared_read_only_delta() -> None:
    delta = empty_delta(4, 32, 128)
    assert delta is empty_delta(4, 32, 128) and delta.counts.shape == (0, 4, 32)
    assert fold_ids([np.zeros((0, 2), np.int32)] * 4, np.zeros(0, np.int64), 128, 32) is delta
    with pytest.raises(ValueError, match="read-only"):
        delta.counts[...] = 1
