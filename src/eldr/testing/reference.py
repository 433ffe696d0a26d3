"""Reference expert counts from Hugging Face transformers, for checking the engine plugin exactly.

Runs the same checkpoint with `output_router_logits=True` and takes each token's top-k experts per
MoE layer from the router logits (top-k of the logits equals top-k of the softmax the model routes by).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.signature import counts_from_topk


class ReferenceModel:
    """A transformers model loaded once; `counts(token_ids)` -> `[L, E]` int64 prompt counts."""

    def __init__(self, model_dir: Path) -> None:
        import importlib

        import torch

        transformers: Any = importlib.import_module("transformers")
        torch.manual_seed(0)
        auto = transformers.AutoModelForCausalLM
        self.model: Any = auto.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        config = self.model.config
        self.top_k = int(config.num_experts_per_tok)
        self.num_experts = int(getattr(config, "num_experts", None) or config.num_local_experts)

    def topk_ids(self, token_ids: list[int]) -> npt.NDArray[np.int64]:
        """`[T, L, k]` expert ids chosen for each prompt token in each MoE layer."""
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([token_ids]), output_router_logits=True, use_cache=False)
        per_layer = [logits.reshape(len(token_ids), -1) for logits in out.router_logits]  # L x [T, E]
        ids = [torch.topk(logits, self.top_k, dim=-1).indices for logits in per_layer]
        return torch.stack(ids, dim=1).numpy().astype(np.int64)

    def counts(self, token_ids: list[int]) -> npt.NDArray[np.int64]:
        return counts_from_topk(self.topk_ids(token_ids), self.num_experts)
