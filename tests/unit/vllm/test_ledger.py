"""The scheduler-side ledger and the worker-side fold against a small simulated paged KV cache.

The simulation mimics what vLLM does around the plugin: a block pool with prefix caching (full blocks
keyed by their token prefix, evicted when reallocated), chunked prefill of two requests per step,
`request_finished` called before the step's worker data arrives. Each token's expert choices are a
deterministic function of its prefix, so a prefix served from cache must give exactly the cold counts.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.payload import DECODE_PAYLOAD_KEY, PAYLOAD_KEY, decode_counts
from eldr.signature import counts_from_topk
from eldr.vllm.ledger import SignatureLedger

torch = pytest.importorskip("torch")
from eldr.vllm.router_tap import RouterTap, TapSet, record_topk  # noqa: E402

BLOCK, NUM_BLOCKS, LAYERS, EXPERTS, TOP_K = 4, 16, 2, 6, 2


def _choices(prefix: tuple[int, ...]) -> np.ndarray:
    """[L, k] experts of the last token of `prefix` (a pure function of the prefix)."""
    rng = random.Random(hash(prefix))
    return np.array([rng.sample(range(EXPERTS), TOP_K) for _ in range(LAYERS)], dtype=np.int64)


class Pool:
    def __init__(self) -> None:
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(NUM_BLOCKS))
        self.cached: dict[tuple[int, ...], int] = {}
        self.key_of: dict[int, tuple[int, ...]] = {}

    def hits(self, prompt: list[int]) -> list[int]:
        found: list[int] = []
        for j in range((len(prompt) - 1) // BLOCK):
            block = self.cached.get(tuple(prompt[: (j + 1) * BLOCK]))
            if block is None:
                break
            found.append(block)
            self.free.pop(block, None)
        return found

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cached[key]
        return block

    def release(self, prompt: list[int], blocks: list[int]) -> None:
        for j, block in enumerate(blocks):
            if (j + 1) * BLOCK <= len(prompt) and tuple(prompt[: (j + 1) * BLOCK]) not in self.cached:
                key = tuple(prompt[: (j + 1) * BLOCK])
                self.cached[key], self.key_of[block] = block, key
            self.free[block] = None


def _taps() -> TapSet:
    """Capture buffers as the plugin gives each router (the callbacks are called by hand here)."""
    buffers = [torch.full((4096, TOP_K), -1, dtype=torch.int32) for _ in range(LAYERS)]
    return TapSet(
        [RouterTap(layer, None, buf, lambda ids: None) for layer, buf in enumerate(buffers)], EXPERTS
    )


def _run(prompts: list[list[int]], chunk: int, num_decode: int = 0) -> list[dict[str, object]]:
    pool, ledger = Pool(), SignatureLedger(NUM_BLOCKS, BLOCK, is_recording_decode=num_decode > 0)
    taps = _taps()
    answers: list[dict[str, object]] = [{} for _ in prompts]
    pending = list(range(len(prompts)))
    running: dict[int, dict[str, object]] = {}
    while pending or running:
        while pending and len(running) < 2:
            i = pending.pop(0)
            hits = pool.hits(prompts[i])
            ledger.track(str(i), len(prompts[i]))
            running[i] = {"seq": list(prompts[i]), "blocks": hits, "done": len(hits) * BLOCK, "out": 0}
        step_slots: list[int] = []
        step_ids: list[np.ndarray] = []
        total = sum(min(chunk, len(r["seq"]) - r["done"]) for r in running.values())  # type: ignore[arg-type]
        step = ledger.begin_step(total)
        finishing: list[int] = []
        for i, r in running.items():
            seq, blocks, done = r["seq"], r["blocks"], r["done"]
            assert isinstance(seq, list) and isinstance(blocks, list) and isinstance(done, int)
            n = min(chunk, len(seq) - done)
            while len(blocks) * BLOCK < done + n:
                blocks.append(pool.allocate())
            if done < len(prompts[i]) <= done + n:
                ledger.prefill_due(step, str(i), blocks[: -(-len(prompts[i]) // BLOCK)])
            for p in range(done, done + n):
                step_slots.append(blocks[p // BLOCK] * BLOCK + p % BLOCK)
                step_ids.append(_choices(tuple(seq[: p + 1])))
            r["done"] = done + n
            if r["done"] == len(seq):  # the token sampled now is fed back next step, or the request ends
                if r["out"] == num_decode:
                    finishing.append(i)
                else:
                    seq.append(1000 + int(r["out"]))  # type: ignore[call-overload]
                    r["out"] = int(r["out"]) + 1  # type: ignore[call-overload]
        taps.arm(len(step_slots))  # the worker, before the forward
        ids = torch.from_numpy(np.stack(step_ids))  # [tokens, L, k]
        for layer in range(LAYERS):  # the routers' callbacks, during it
            record_topk(taps.taps[layer].buffer, ids[:, layer, :])
        for i in finishing:  # vLLM: request_finished before update_connector_output
            r = running.pop(i)
            blocks = r["blocks"]
            assert isinstance(blocks, list)
            ledger.finish(str(i), list(blocks), int(r["done"]), answers[i])  # type: ignore[call-overload]
            pool.release(prompts[i], blocks)
        ledger.apply(step, taps.fold(torch.tensor(step_slots), BLOCK), TOP_K)
    assert ledger.num_tracked == 0
    return answers


def _expected(prompt: list[int]) -> np.ndarray:
    ids = np.stack([_choices(tuple(prompt[: p + 1])) for p in range(len(prompt))])
    return counts_from_topk(ids, EXPERTS)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=6),
    st.lists(st.integers(1, 14), min_size=6, max_size=6),
    st.integers(1, 9),
)
def test_counts_exact_under_prefix_caching_chunking_and_reuse(
    prefix_ids: list[int], lengths: list[int], chunk: int
) -> None:
    stems = [[7, 7, 7, 7, 7, 7, 7, 7, 7], [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [5]]
    prompts = [
        stems[s] + [10 + (k * 5 + s) % 13 for k in range(lengths[j % 6])] for j, s in enumerate(prefix_ids)
    ]
    answers = _run(prompts * 2, chunk)  # the second round hits the prefix cache (or reused blocks)
    for prompt, answer in zip(prompts * 2, answers, strict=True):
        assert PAYLOAD_KEY in answer
        np.testing.assert_array_equal(decode_counts(answer[PAYLOAD_KEY]), _expected(prompt))


def test_decode_recording_counts_generated_tokens() -> None:
    prompt = [4, 4, 2, 9, 1, 3]
    (answer,) = _run([prompt], chunk=4, num_decode=5)
    np.testing.assert_array_equal(decode_counts(answer[PAYLOAD_KEY]), _expected(prompt))
    full = [*prompt, 1000, 1001, 1002, 1003, 1004]
    decode = decode_counts(answer[DECODE_PAYLOAD_KEY])
    np.testing.assert_array_equal(decode, _expected(full) - _expected(prompt))
    assert decode.sum() == 5 * LAYERS * TOP_K


def test_missing_step_data_withholds_payload() -> None:
    ledger = SignatureLedger(NUM_BLOCKS, BLOCK)
    ledger.track("a", 3)
    first = ledger.begin_step(3)
    ledger.prefill_due(first, "a", [0])
    params: dict[str, object] = {}
    assert ledger.finish("a", [0], 3, params)
    ledger.apply(first, None, TOP_K)  # the worker could not fold this step
    assert params == {}


def test_external_kv_gives_no_payload() -> None:
    ledger = SignatureLedger(NUM_BLOCKS, BLOCK)
    ledger.track("a", 8)
    ledger.mark_external("a", [0, 1])
    assert not ledger.finish("a", [0, 1], 8, {})
