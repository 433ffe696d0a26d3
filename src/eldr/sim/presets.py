"""Cost-model presets, each with its source. docs/simulator.md has the derivations and checks.

`mi300x-qwen3-30b` — Qwen3-30B-A3B (48 MoE layers, 128 experts, top-8, bf16, TP = 1) on one MI300X.
Every term is bytes read per step divided by one *effective* HBM bandwidth, except the MoE layer's
expert-independent part, which is pinned by the paper's anchor:

    anchor 1 (paper §3): one MoE layer at batch 64 is 4.7x slower at 128 than at 16 active experts
        c0 + 128 c1 = 4.7 (c0 + 16 c1)  =>  c0 = (128 - 4.7 * 16) / 3.7 * c1 = 14.27 c1
    anchor 2 (paper §6 / artifact): round robin, 60 req/s, 16 decoders, 512-token outputs: median
        TPOT about 27 ms (artifact: RR 26.8 ms).

Byte counts come from the public model configuration (hidden 2048, MoE intermediate 768, 32 query
/ 4 KV heads of 128, vocab 151,936): one expert = 3 * 2048 * 768 * 2 B = 9.437 MB; attention + router
+ lm head read per step = 2.46 GB; KV per context token = 48 * 2 * 4 * 128 * 2 B = 98,304 B. The
effective bandwidth is the single free scale; `benchmarks/sweeps.py calibrate` solves it so that the
simulated RR median TPOT on the shipped demo trace at anchor 2's setting is 27 ms, and never looks at
any other policy (benchmarks/results/mi300x_calibration.md). The result, 2.62 TB/s (50% of MI300X's
5.3 TB/s peak), is plausible for decode-time grouped GEMMs: a check on the byte model, not an input.

`this-cpu` — one MoE layer measured on this machine by `benchmarks/cpu_moe_cost.py` (numpy fp32,
experts of 3 x 1024 x 512, 64 experts, far larger than cache), fitted as t = c0 + c1 * active +
c2 * batch; an OLMoE-shaped model (16 MoE layers, 64 experts) with no other per-step terms. A step
takes seconds here: simulate it at rates of a request every few seconds, not 60 req/s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from eldr.errors import ConfigError, InvalidInputError
from eldr.inputfile import read_text
from eldr.limits import MAX_COST_MODEL_BYTES
from eldr.sim.costmodel import CostModel

# anchor 1: MoE layer time ratio 128 vs 16 active experts at batch 64 (paper §3)
ANCHOR_RATIO = 4.7
MOE_FIXED_IN_EXPERTS = (128 - ANCHOR_RATIO * 16) / (ANCHOR_RATIO - 1)  # c0 / c1 = 14.27

# Qwen3-30B-A3B, bf16
QWEN3_EXPERT_BYTES = 3 * 2048 * 768 * 2
QWEN3_DENSE_BYTES = 48 * (2048 * 4096 * 2 + 2048 * 512 * 2 + 2048 * 128) * 2 + 151_936 * 2048 * 2
QWEN3_KV_BYTES_PER_TOKEN = 48 * 2 * 4 * 128 * 2
QWEN3_ACTIVE_PARAMS = 3.3e9

# MI300X
MI300X_PEAK_BF16_FLOPS = 1.307e15
PREFILL_MFU = 0.4  # assumption: a typical prefill utilisation; only TTFT depends on it
PREFILL_BASE_S = 0.010  # assumption: scheduling, launch and sampling overhead of one prefill
NIC_BYTES_S = 400e9 / 8  # 400 Gb/s InfiniBand (paper §6)
# vLLM 0.32 default max_num_seqs for devices with >= 160 GiB; 0.9 of 192 GB minus 61 GB weights
# and ~5 GB activations, in KV tokens
MI300X_MAX_BATCH = 1024
MI300X_KV_TOKENS = int((0.9 * 192e9 - 61e9 - 5e9) / QWEN3_KV_BYTES_PER_TOKEN)

# solved by `python benchmarks/sweeps.py calibrate` (RR only; benchmarks/results/mi300x_calibration.md)
MI300X_EFFECTIVE_BYTES_S = 2.624e12


def mi300x_qwen3_30b(effective_bytes_s: float = MI300X_EFFECTIVE_BYTES_S) -> CostModel:
    """Qwen3-30B-A3B on one MI300X, all bandwidth terms at `effective_bytes_s`."""
    per_expert_s = QWEN3_EXPERT_BYTES / effective_bytes_s
    return CostModel(
        name="mi300x-qwen3-30b",
        num_layers=48,
        num_experts=128,
        base_s=QWEN3_DENSE_BYTES / effective_bytes_s,
        per_request_s=0.0,  # paper §3: the MoE layer barely depends on batch size
        moe_layer_s=MOE_FIXED_IN_EXPERTS * per_expert_s,
        per_expert_s=per_expert_s,
        attn_per_token_s=QWEN3_KV_BYTES_PER_TOKEN / effective_bytes_s,
        prefill_base_s=PREFILL_BASE_S,
        prefill_per_token_s=2 * QWEN3_ACTIVE_PARAMS / (MI300X_PEAK_BF16_FLOPS * PREFILL_MFU),
        kv_transfer_per_token_s=QWEN3_KV_BYTES_PER_TOKEN / NIC_BYTES_S,
        num_prefill_workers=8,
        max_batch=MI300X_MAX_BATCH,
        kv_capacity_tokens=MI300X_KV_TOKENS,
        source=(
            "paper anchors (4.7x MoE layer at 128 vs 16 experts; RR median TPOT 27 ms at 60 req/s) "
            f"+ Qwen3-30B-A3B byte counts at {effective_bytes_s / 1e12:.2f} TB/s effective"
        ),
    )


# measured by `python benchmarks/cpu_moe_cost.py` (see benchmarks/results/cpu_moe_cost.md)
CPU_MOE_LAYER_S = 9.891e-3
CPU_PER_EXPERT_S = 7.1100e-3
CPU_PER_REQUEST_S = 1.0381e-3


def this_cpu() -> CostModel:
    """An OLMoE-shaped model whose MoE layer costs what `benchmarks/cpu_moe_cost.py` measured here."""
    return CostModel(
        name="this-cpu",
        num_layers=16,
        num_experts=64,
        base_s=0.0,
        per_request_s=16 * CPU_PER_REQUEST_S,
        moe_layer_s=CPU_MOE_LAYER_S,
        per_expert_s=CPU_PER_EXPERT_S,
        attn_per_token_s=0.0,
        prefill_base_s=0.005,
        prefill_per_token_s=16 * CPU_PER_REQUEST_S,
        kv_transfer_per_token_s=0.0,
        num_prefill_workers=8,
        max_batch=256,
        kv_capacity_tokens=1_000_000,
        source="one numpy MoE layer timed on this machine by benchmarks/cpu_moe_cost.py",
    )


PRESETS = {"mi300x-qwen3-30b": mi300x_qwen3_30b, "this-cpu": this_cpu}


def preset(name: str) -> CostModel:
    """A cost-model preset by name, or a cost model from a JSON file (a name ending in .json)."""
    if name.endswith(".json"):
        return load_cost_model(name)
    if name not in PRESETS:
        raise ConfigError(
            f"unknown cost model {name!r}; choose one of {', '.join(PRESETS)} or give a FILE.json"
        )
    return PRESETS[name]()


def load_cost_model(path: str | Path) -> CostModel:
    """A `CostModel` from a JSON object with exactly its fields (`name` and `source` optional), such as
    the one `benchmarks/real_engines.py` fits on real engines. Every time must be a finite number
    >= 0 in seconds, the counts whole numbers >= 1; anything else is one `InvalidInputError`."""
    text = read_text(path, "cost model", max_bytes=MAX_COST_MODEL_BYTES, limit_name="docs/limits.md")
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidInputError(f"cost model {path}: not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidInputError(f"cost model {path}: must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(CostModel)}
    unknown = sorted(set(raw) - set(fields))
    missing = sorted(set(fields) - set(raw) - {"name", "source"})
    if unknown or missing:
        raise InvalidInputError(f"cost model {path}: unknown keys {unknown}, missing keys {missing}")
    values: dict[str, Any] = {"name": Path(path).name, "source": f"file {path}"}
    for key, value in raw.items():
        if key in ("name", "source"):
            if not isinstance(value, str):
                raise InvalidInputError(f"cost model {path}: {key} must be a string")
        elif key in _COUNT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**40:
                raise InvalidInputError(f"cost model {path}: {key} must be a whole number in [1, 2^40]")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInputError(f"cost model {path}: {key} must be a finite number of seconds")
        values[key] = value
    try:
        return CostModel(**values)
    except ConfigError as exc:
        raise InvalidInputError(f"cost model {path}: {exc}") from exc


_COUNT_FIELDS = ("num_layers", "num_experts", "num_prefill_workers", "max_batch", "kv_capacity_tokens")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")
