"""Step-cost model of one decode worker, and the map from a trace's layers/experts to the model's.

One decode step of a batch of B requests takes

    step_s = base_s + per_request_s * B
             + sum over the model's MoE layers m of (moe_layer_s + per_expert_s * active_m)
             + attn_per_token_s * (sum of the batch's context lengths)

where active_m is the number of *distinct* experts the batch activates at model layer m (paper §3:
the MoE layer's latency grows about linearly with distinct active experts, barely with batch size).

A trace records L of the model's layers and E_trace experts; the cost model describes a model with
M MoE layers and E_model experts. `LayerMap` makes the mapping explicit:

- layers: every model layer m is driven by one recorded layer (`nearest`: the recorded layer of
  nearest relative depth; `uniform`: M/L model layers per recorded layer, in order). Its weights
  `[L]` count how many model layers each recorded layer stands for (they sum to M).
- experts: active_m = distinct_trace * E_model / E_trace, i.e. the *fraction* of the expert pool a
  batch touches is carried over. With top-8 of 64 (OLMoE) driving top-8 of 128 (Qwen3), a single
  request maps 8/64 -> 16/128 and a saturated batch 64/64 -> 128/128 — exactly the 16..128 range of
  the paper's 4.7x anchor. See docs/simulator.md for why this is fair.

The prefill side is deliberately simple: `num_prefill_workers` FCFS servers, each request takes
`prefill_base_s + prefill_per_token_s * prompt_tokens` plus the KV transfer
`kv_transfer_per_token_s * prompt_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError

LAYER_MAPS = ("nearest", "uniform")


@dataclass(frozen=True)
class CostModel:
    """Per-step decode cost and per-request prefill cost of one modelled deployment (seconds)."""

    name: str
    num_layers: int  # MoE layers of the modelled model
    num_experts: int  # experts per MoE layer of the modelled model
    base_s: float  # per step: dense weights, lm head, launch overhead
    per_request_s: float  # per request in the batch
    moe_layer_s: float  # per MoE layer per step, independent of active experts
    per_expert_s: float  # per distinct active expert per MoE layer
    attn_per_token_s: float  # per context token of every request in the batch
    prefill_base_s: float
    prefill_per_token_s: float
    kv_transfer_per_token_s: float
    num_prefill_workers: int
    max_batch: int  # default decode batch limit (vLLM max_num_seqs)
    kv_capacity_tokens: int  # default KV-cache capacity of one decode worker, in tokens
    source: str = ""  # where the numbers come from (docs/simulator.md has the derivation)

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1:
            raise ConfigError(f"cost model {self.name}: num_layers and num_experts must be >= 1")
        times = (
            self.base_s,
            self.per_request_s,
            self.moe_layer_s,
            self.per_expert_s,
            self.attn_per_token_s,
            self.prefill_base_s,
            self.prefill_per_token_s,
            self.kv_transfer_per_token_s,
        )
        if not all(np.isfinite(t) and t >= 0 for t in times):
            raise ConfigError(f"cost model {self.name}: every time must be finite and >= 0")
        if self.num_prefill_workers < 1 or self.max_batch < 1 or self.kv_capacity_tokens < 1:
            raise ConfigError(f"cost model {self.name}: pool limits must be >= 1")

    def moe_layer_time_s(self, active_experts: float) -> float:
        """One MoE layer at `active_experts` distinct experts (batch-independent part)."""
        return self.moe_layer_s + self.per_expert_s * active_experts

    def prefill_s(self, prompt_tokens: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Prefill compute time of each prompt `[N]`, without queueing or KV transfer."""
        return self.prefill_base_s + self.prefill_per_token_s * prompt_tokens.astype(np.float64)


@dataclass(frozen=True)
class StepCost:
    """A cost model bound to a trace's layout: distinct experts per recorded layer -> step seconds."""

    model: CostModel
    layer_weights: npt.NDArray[np.float64]  # [L] model layers each recorded layer stands for
    expert_scale: float  # E_model / E_trace

    def step_s(self, batch_size: int, distinct: npt.NDArray[np.integer], context_tokens: int) -> float:
        """Duration of one decode step; `distinct` is `[L]` distinct experts per recorded layer."""
        m = self.model
        active = float(self.layer_weights @ distinct) * self.expert_scale  # summed over model layers
        return (
            m.base_s
            + m.per_request_s * batch_size
            + m.num_layers * m.moe_layer_s
            + m.per_expert_s * active
            + m.attn_per_token_s * context_tokens
        )


def layer_weights(
    layers: npt.NDArray[np.int64], trace_model_layers: int, num_model_layers: int, how: str = "nearest"
) -> npt.NDArray[np.float64]:
    """How many of the cost model's `num_model_layers` each recorded layer stands for `[L]`."""
    num_recorded = int(layers.shape[0])
    if how == "uniform":
        owner = np.arange(num_model_layers) * num_recorded // num_model_layers
    elif how == "nearest":
        depth = layers / max(trace_model_layers - 1, 1)  # relative depth of the recorded layers
        model_depth = np.arange(num_model_layers) / max(num_model_layers - 1, 1)
        owner = np.abs(model_depth[:, None] - depth[None, :]).argmin(axis=1)  # lowest on ties
    else:
        raise ConfigError(f"unknown layer map {how!r}; choose one of {', '.join(LAYER_MAPS)}")
    return np.bincount(owner, minlength=num_recorded).astype(np.float64)


def bind(
    model: CostModel,
    layers: npt.NDArray[np.int64],
    trace_model_layers: int,
    trace_experts: int,
    how: str = "nearest",
) -> StepCost:
    """Bind `model` to a trace that records `layers` of `trace_model_layers`, `trace_experts` wide."""
    weights = layer_weights(layers, trace_model_layers, model.num_layers, how)
    return StepCost(model, weights, model.num_experts / trace_experts)
