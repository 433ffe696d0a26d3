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

    def router_logits(self, token_ids: list[int]) -> npt.NDArray[np.float32]:
        """`[T, L, E]` router logits of each prompt token in each MoE layer."""
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([token_ids]), output_router_logits=True, use_cache=False)
        per_layer = [logits.reshape(len(token_ids), -1) for logits in out.router_logits]  # L x [T, E]
        return torch.stack(per_layer, dim=1).numpy()

    def counts(self, token_ids: list[int]) -> npt.NDArray[np.int64]:
        return self.counts_and_ties(token_ids)[0]

    def counts_and_ties(
        self, token_ids: list[int], tie_margin: float = 1e-3
    ) -> tuple[npt.NDArray[np.int64], list[tuple[int, int, int]]]:
        """`[L, E]` counts and the near ties: `(layer, k-th expert, runner-up)` for every token whose
        k-th and (k+1)-th router logits are within `tie_margin` (either choice is numerically correct)."""
        logits = self.router_logits(token_ids)
        order = np.argsort(-logits, axis=-1, kind="stable")  # [T, L, E]
        ids = order[..., : self.top_k]
        kth, runner_up = order[..., self.top_k - 1], order[..., self.top_k]  # [T, L]
        gap = np.take_along_axis(logits, kth[..., None], -1) - np.take_along_axis(
            logits, runner_up[..., None], -1
        )
        ties = [
            (int(layer), int(kth[t, layer]), int(runner_up[t, layer]))
            for t, layer in zip(*np.nonzero(gap[..., 0] < tie_margin), strict=True)
        ]
        return counts_from_topk(ids, self.num_experts), ties


def explained_by_ties(
    actual: npt.NDArray[np.int64], reference: npt.NDArray[np.int64], ties: list[tuple[int, int, int]]
) -> int | None:
    """How many near ties (each used at most once) turn `reference` into `actual`; `None` if they cannot.

    Counts must match exactly except where a token's k-th and (k+1)-th experts were a near tie in the
    reference run; each such token may move one count from its k-th expert to its runner-up.
    """
    diff = actual.astype(np.int64) - reference
    num_used = 0
    for layer, kth, runner_up in ties:
        if diff[layer, kth] < 0 < diff[layer, runner_up]:
            diff[layer, kth] += 1
            diff[layer, runner_up] -= 1
            num_used += 1
    return num_used if not diff.any() else None
