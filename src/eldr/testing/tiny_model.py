"""A tiny random-weight Qwen3-MoE checkpoint in Hugging Face format, made locally (no hub access).

Real-engine tests need an MoE model that vLLM serves and that Hugging Face transformers can run with
the same weights, small enough to start in minutes on two CPU cores. `write_tiny_moe(dir)` writes
`config.json`, `model.safetensors`, a BPE tokenizer trained here with the `tokenizers` library on
generated text, and a minimal chat template. Deterministic for a given seed.

The router weights get a larger scale than the default initialiser so that router logits are well
separated: a near tie between the k-th and (k+1)-th expert could flip between two numerically
different (but both correct) kernels and would make exact top-k comparisons flaky.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "was",
    "or",
    "an",
    "not",
    "which",
    "model",
    "expert",
    "router",
    "token",
    "prefill",
    "decode",
    "cache",
    "block",
    "layer",
    "signature",
    "request",
    "worker",
    "batch",
    "law",
    "court",
    "contract",
    "statute",
    "judge",
    "appeal",
    "code",
    "function",
    "loop",
    "compile",
    "array",
    "pointer",
    "math",
    "prime",
    "integral",
    "matrix",
    "vector",
    "proof",
    "medical",
    "patient",
    "dose",
    "symptom",
    "therapy",
    "clinic",
    "heart",
    "lung",
    "blood",
    "river",
    "mountain",
    "city",
    "music",
    "garden",
    "winter",
    "summer",
    "ocean",
    "forest",
    "bridge",
    "train",
    "story",
    "poem",
    "letter",
]


@dataclass(frozen=True)
class TinyMoeSpec:
    """Shape of the generated model (defaults: 4 layers, 32 experts, top-4, hidden 256)."""

    num_layers: int = 4
    num_experts: int = 32
    top_k: int = 4
    hidden_size: int = 256
    moe_intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    router_std: float = 0.25
    seed: int = 0


def sample_text(num_words: int, seed: int) -> str:
    """Deterministic pseudo-text over a small vocabulary (prompts for tests and benchmarks)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def _train_tokenizer(out_dir: Path, spec: TinyMoeSpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [sample_text(200, seed) for seed in range(200)]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": spec.max_position_embeddings,
        "chat_template": template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_tiny_moe(out_dir: Path, spec: TinyMoeSpec | None = None) -> Path:
    """Write the checkpoint and tokenizer into `out_dir` (created); returns `out_dir`."""
    import importlib

    import torch

    transformers: Any = importlib.import_module("transformers")

    spec = spec or TinyMoeSpec()
    out_dir.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out_dir, spec)
    vocab_size = len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.moe_intermediate_size * 2,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(spec.seed)
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, spec.router_std)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
