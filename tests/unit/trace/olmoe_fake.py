"""Test data for trace tests: a tiny fake shared-data folder in the real layout, and a tiny trace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eldr.trace.format import Trace
from eldr.trace.olmoe import DOMAINS, LAYERS, NUM_EXPERTS, TOP_K

VOCAB_SIZE = 40
TEXT_TOKENS = 3000
MISSING_ID = 7  # a token id the fake routing files never mention (tokenizer drift)


@dataclass(frozen=True)
class FakeData:
    root: Path
    token_ids: dict[str, np.ndarray]  # domain -> [P] token ids of its text
    true_topk: dict[str, np.ndarray]  # domain -> [P, L, k] the "recorded" routing of every position


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    vocab["[UNK]"] = VOCAB_SIZE
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))


def make_fake_data(root: Path, seed: int = 0) -> FakeData:
    """The layout of ../shared/data with tiny texts: per domain, each id has a preferred expert set."""
    rng = np.random.default_rng(seed)
    (root / "olmoe" / "text").mkdir(parents=True)
    (root / "workloads").mkdir()
    _write_tokenizer(root / "olmoe" / "tokenizer.json")
    token_ids: dict[str, np.ndarray] = {}
    true_topk: dict[str, np.ndarray] = {}
    for d, domain in enumerate(DOMAINS):
        # ids 30..39 occur exactly once per text; the rest repeat
        ids = rng.integers(0, 30, size=TEXT_TOKENS)
        ids[rng.choice(TEXT_TOKENS, size=10, replace=False)] = np.arange(30, 40)
        token_ids[domain] = ids
        (root / "olmoe" / "text" / f"{domain}.txt").write_text(" ".join(f"w{i}" for i in ids) + "\n")
        topk = np.empty((TEXT_TOKENS, len(LAYERS), TOP_K), dtype=np.int64)
        for p, tid in enumerate(ids):
            for layer in range(len(LAYERS)):
                base = (tid * 3 + d * 11 + layer * 5) % (NUM_EXPERTS - 12)  # domain-specific expert range
                topk[p, layer] = base + rng.choice(12, size=TOP_K, replace=False)
        true_topk[domain] = topk
        arrays: dict[str, np.ndarray] = {"layers": np.array(LAYERS, dtype=np.int64)}
        keep = ids != MISSING_ID
        for layer_idx, layer in enumerate(LAYERS):
            flat = ids[keep, None] * NUM_EXPERTS + topk[keep, layer_idx]
            pairs, counts = np.unique(flat.ravel(), return_counts=True)
            arrays[f"layer{layer}_token_id"] = (pairs // NUM_EXPERTS).astype(np.int32)
            arrays[f"layer{layer}_expert_id"] = (pairs % NUM_EXPERTS).astype(np.int16)
            arrays[f"layer{layer}_count"] = counts.astype(np.int32)
        np.savez(root / "olmoe" / f"token_routing_{domain}.npz", **arrays)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(50):
        lines.append(f"2023-11-16 18:15:{i:02d}.5000000,{20 + 37 * i % 300},{5 + 13 * i % 120}")
    (root / "workloads" / "azure2023_conv.csv").write_text("\n".join(lines) + "\n")
    (root / "workloads" / "azure2023_code.csv").write_text("\n".join(lines[:10]) + "\n")
    return FakeData(root=root, token_ids=token_ids, true_topk=true_topk)


def tiny_trace(**overrides: object) -> Trace:
    """Two requests, one layer, four experts, top-2, exact decode choices."""
    decode_topk = np.array([[[0, 1]], [[0, 2]], [[2, 3]]], dtype=np.uint8)  # request 0: 2 tokens, 1: 1 token
    fields: dict[str, object] = {
        "prefill_counts": np.array([[[2, 1, 1, 0]], [[0, 0, 1, 1]]]),
        "decode_counts": np.array([[[2, 1, 1, 0]], [[0, 0, 1, 1]]]),
        "prompt_tokens": np.array([2, 1]),
        "output_tokens": np.array([2, 1]),
        "arrival_s": np.array([0.0, 0.5]),
        "top_k": 2,
        "layers": np.array([3]),
        "num_model_layers": 4,
        "domain": np.array(["a", "b"]),
        "calibration": np.array([True, False]),
        "decode_topk": decode_topk,
        "decode_offsets": np.array([0, 2, 3]),
    }
    fields.update(overrides)
    return Trace(**fields)  # type: ignore[arg-type]
