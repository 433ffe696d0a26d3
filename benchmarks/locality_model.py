"""Train a small Qwen3-MoE with learned expert locality on generated domain text, for real-engine benchmarks.

eldr routes decode requests by expert signatures; a random-weight MoE has no locality to exploit. This
script makes one that has, deterministically for a given `--seed`, on two CPU cores, without downloads:

1. generated text in six domains (`eldr.testing.domain_text`: own vocabulary and templates per domain,
   shared function words) and a byte-level BPE tokenizer trained on it, with a chat template;
2. a `Qwen3MoeForCausalLM` (default 4 layers, 64 experts, top-4, hidden 256) trained from scratch with
   AdamW and the router load-balancing loss for `--minutes` of wall time (or exactly `--steps` steps);
3. optionally every expert widened to `--widen-intermediate` by zero padding (gate/up rows and down
   columns zero: silu(0) * 0 = 0, so the function is unchanged) so that expert weights dominate a CPU
   decode step; the script checks logits and top-k routing against the trained model;
4. held-out prompts `prompts-calibration.jsonl` and `prompts-workload.jsonl` ({"prompt", "label"});
5. the locality of a held-out set measured in transformers: prefill counts and the greedy decode's
   counts per layer and expert, cosines within and across domains, distinct experts per decode batch;
6. those requests as an eldr trace (`trace.npz`, Poisson arrivals at `--rate`);
7. `locality_model.md` and `.json` in `--results-dir`.

Training for wall time makes the number of steps depend on the machine; everything else (text,
tokenizer, initialisation, batch order) depends on `--seed` only, and the report records the steps, so
`--steps N` repeats a run exactly.

    .venv/bin/python benchmarks/locality_model.py [--minutes 18] [--out /tmp/eldr/locality-model]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from eldr.testing.domain_text import DOMAINS, classify, sentence
from eldr.testing.domain_text import documents as domain_documents
from eldr.trace.format import Trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine

EOS = "<|endoftext|>"
SPECIAL_TOKENS = ["<unk>", EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Seed offsets of the text sets: every set is drawn from its own random stream, so held-out text never
# repeats the training draws (the grammar is the same, which is the point).
TEXT_SETS = {"tokenizer": 0, "train": 1, "eval": 2, "calibration": 3, "workload": 4, "measure": 5, "check": 6}
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int = 4
    num_experts: int = 64
    top_k: int = 4
    hidden_size: int = 256
    moe_intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 4096
    router_aux_loss_coef: float = 0.01


def _transformers() -> Any:
    return importlib.import_module("transformers")


def text_seed(seed: int, text_set: str) -> int:
    return seed * 100 + TEXT_SETS[text_set]


# ---------------------------------------------------------------- tokenizer and text


def train_tokenizer(out_dir: Path, vocab_size: int, seed: int, docs_per_domain: int = 400) -> Any:
    """Train the byte-level BPE on generated text of every domain; writes tokenizer files into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        doc
        for domain in DOMAINS
        for doc in domain_documents(domain, docs_per_domain, text_seed(seed, "tokenizer"))
    ]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tokenizer, out_dir)
    return tokenizer


def write_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": ModelSpec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


TRAINED_SUBDIR = "trained"  # the checkpoint at its trained expert width, beside the widened one


def unwiden_checkpoint(src: Path, dst: Path, width: int | None = None) -> Path:
    """Write `src`'s checkpoint at its trained expert width (config `trained_moe_intermediate_size`) into
    `dst`: every expert's gate/up rows and down columns beyond that width are dropped, after checking
    they are all zeros (the padding `widen` added), so the two checkpoints compute the same function.
    A prefill engine may serve this one: its routing and KV are the widened model's, at a fraction of
    the cost (benchmarks/real_engines.py --prefill-model)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    if width is None:
        width = int(config.get("trained_moe_intermediate_size", config["moe_intermediate_size"]))
    tensors = load_file(str(src / "model.safetensors"))
    narrow: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".experts." in name and name.endswith(("gate_proj.weight", "up_proj.weight")):
            kept, dropped = tensor[:width], tensor[width:]
        elif ".experts." in name and name.endswith("down_proj.weight"):
            kept, dropped = tensor[:, :width], tensor[:, width:]
        else:
            kept, dropped = tensor, tensor[:0]
        if dropped.numel() and bool(dropped.abs().max() > 0):
            raise SystemExit(f"{src}: {name} has non-zero weights beyond width {width}: not a widened model")
        narrow[name] = kept.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(narrow, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": width}, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    return dst


def token_stream(tokenizer: Any, domain: str, num_tokens: int, seed: int) -> torch.Tensor:
    """Documents of `domain` separated by EOS, at least `num_tokens` tokens, as one int64 tensor."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    batch = 0
    while len(ids) < num_tokens:
        docs = domain_documents(domain, 200, seed * 1000 + batch)
        for enc in tokenizer.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(eos)
        batch += 1
    return torch.tensor(ids, dtype=torch.int64)


def make_prompt(tokenizer: Any, domain: str, rng: random.Random, min_tokens: int, max_tokens: int) -> str:
    """Sentences of `domain` until the prompt has a length drawn from [min_tokens, max_tokens] tokens."""
    target = rng.randint(min_tokens, max_tokens)
    sep = "" if domain == "code" else " "
    text = ""
    while True:
        candidate = (text + sep + sentence(domain, rng)) if text else sentence(domain, rng)
        length = len(tokenizer.encode(candidate).ids)
        if length > max_tokens:
            if text and len(tokenizer.encode(text).ids) >= min_tokens:
                return text
            continue  # this sentence overshoots: draw another one
        text = candidate
        if length >= target:
            return text


def make_prompts(
    tokenizer: Any, per_domain: int, seed: int, min_tokens: int, max_tokens: int
) -> list[tuple[str, str]]:
    """`per_domain` (prompt, domain) pairs per domain, shuffled deterministically."""
    pairs: list[tuple[str, str]] = []
    for domain in DOMAINS:
        rng = random.Random(f"prompt:{domain}:{seed}")
        pairs.extend(
            (make_prompt(tokenizer, domain, rng, min_tokens, max_tokens), domain) for _ in range(per_domain)
        )
    random.Random(f"shuffle:{seed}").shuffle(pairs)
    return pairs


def write_prompts(path: Path, pairs: list[tuple[str, str]]) -> None:
    with path.open("w") as fh:
        for prompt, label in pairs:
            fh.write(json.dumps({"prompt": prompt, "label": label}) + "\n")


# ---------------------------------------------------------------- model and training


def make_config(
    spec: ModelSpec, vocab_size: int, eos_id: int, moe_intermediate_size: int | None = None
) -> Any:
    return _transformers().Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.moe_intermediate_size * 2,  # dense MLP size: unused (every layer is MoE)
        moe_intermediate_size=moe_intermediate_size or spec.moe_intermediate_size,
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
        router_aux_loss_coef=spec.router_aux_loss_coef,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def set_experts(model: Any, implementation: str) -> None:
    """grouped_mm trains ~3x faster on CPU; eager (a loop over experts) is the reference for measuring."""
    model.set_experts_implementation(implementation)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    loss_curve: list[dict[str, float]]
    final_ce: float
    final_aux: float


def lr_at(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to peak / 10 over the progress [0, 1]."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def train(
    model: Any,
    streams: list[torch.Tensor],
    *,
    seconds: float,
    steps: int | None,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    seed: int,
    log_every_s: float,
) -> TrainResult:
    """AdamW on rows of `seq_len + 1` tokens, each from one domain's stream, domains in turn across rows."""
    gen = np.random.default_rng(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    coef = float(model.config.router_aux_loss_coef)
    model.train()
    start = time.monotonic()
    last_log = start
    curve: list[dict[str, float]] = []
    step = 0
    ce_avg = aux_avg = float("nan")
    while True:
        elapsed = time.monotonic() - start
        progress = step / steps if steps is not None else elapsed / seconds
        if progress >= 1.0:
            break
        rows = []
        for i in range(batch_size):
            stream = streams[(step * batch_size + i) % len(streams)]
            offset = int(gen.integers(0, stream.numel() - seq_len - 1))
            rows.append(stream[offset : offset + seq_len + 1])
        batch = torch.stack(rows)
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, step, lr, warmup)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach())
        ce = float(out.loss.detach()) - coef * aux
        ce_avg = ce if math.isnan(ce_avg) else 0.95 * ce_avg + 0.05 * ce
        aux_avg = aux if math.isnan(aux_avg) else 0.95 * aux_avg + 0.05 * aux
        step += 1
        now = time.monotonic()
        if now - last_log >= log_every_s or step == 1:
            last_log = now
            curve.append({"step": step, "seconds": round(now - start, 1), "ce": ce_avg, "aux": aux_avg})
            total = f"{steps} steps" if steps is not None else f"{seconds / 60:.1f} min"
            print(
                f"  train step {step:5d}  {(now - start) / 60:5.1f} min of {total}  ce {ce_avg:.3f}  "
                f"aux {aux_avg:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{step * batch_size * seq_len / (now - start):.0f} tok/s",
                flush=True,
            )
    seconds_used = time.monotonic() - start
    curve.append({"step": step, "seconds": round(seconds_used, 1), "ce": ce_avg, "aux": aux_avg})
    model.eval()
    return TrainResult(step, seconds_used, step * batch_size * seq_len, curve, ce_avg, aux_avg)


@torch.no_grad()
def domain_loss(model: Any, stream: torch.Tensor, rows: int, seq_len: int) -> float:
    """Mean next-token cross-entropy over `rows` consecutive windows at the start of `stream`."""
    n = min(rows, (stream.numel() - 1) // (seq_len + 1))
    batch = stream[: n * (seq_len + 1)].view(n, seq_len + 1)
    out = model(input_ids=batch, labels=batch, output_router_logits=False)
    return float(out.loss)


# ---------------------------------------------------------------- widening


def widen(model: Any, width: int) -> Any:
    """A copy of `model` whose experts have intermediate size `width`, zero padded (the same function)."""
    old = int(model.config.moe_intermediate_size)
    if width < old:
        raise ValueError(f"--widen-intermediate {width} is below the trained size {old}")
    config = copy.deepcopy(model.config)
    config.moe_intermediate_size = width
    wide_state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2 I, H]: gate rows then up rows
            num_experts, rows, hidden = tensor.shape
            if rows != 2 * old:
                raise ValueError(f"{name}: expected [E, {2 * old}, H], got {list(tensor.shape)}")
            padded = torch.zeros(num_experts, 2 * width, hidden, dtype=tensor.dtype)
            padded[:, :old] = tensor[:, :old]
            padded[:, width : width + old] = tensor[:, old:]
            wide_state[name] = padded
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            if tensor.shape[-1] != old:
                raise ValueError(f"{name}: expected [E, H, {old}], got {list(tensor.shape)}")
            padded = torch.zeros(*tensor.shape[:-1], width, dtype=tensor.dtype)
            padded[..., :old] = tensor
            wide_state[name] = padded
        elif ".mlp.experts." in name:
            raise ValueError(
                f"unexpected expert tensor layout {name} {list(tensor.shape)} (fused 3-D expected)"
            )
        else:
            wide_state[name] = tensor.clone()
    wide = _transformers().Qwen3MoeForCausalLM(config).to(torch.float32)
    wide.load_state_dict(wide_state, strict=True)
    return wide.eval()


def padding_nonzeros(wide: Any, old: int) -> int:
    """Non-zero entries in the padded part of every expert (0 when the widening is exact by construction)."""
    width = int(wide.config.moe_intermediate_size)
    total = 0
    for name, tensor in wide.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            total += int(torch.count_nonzero(tensor[:, old:width])) + int(
                torch.count_nonzero(tensor[:, width + old :])
            )
        elif name.endswith("mlp.experts.down_proj"):
            total += int(torch.count_nonzero(tensor[..., old:]))
    return total


@torch.no_grad()
def router_topk(model: Any, ids: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], top-k expert ids [T, L, k] sorted) of one prompt's forward pass."""
    out = model(input_ids=ids[None], output_router_logits=True, use_cache=False)
    topk = torch.stack([r.topk(top_k, dim=-1).indices.sort(dim=-1).values for r in out.router_logits], dim=1)
    return out.logits[0], topk


def check_widening(narrow: Any, wide: Any, prompts: list[torch.Tensor], atol: float = 1e-4) -> dict[str, Any]:
    """Compare the widened model with the trained one: padding zero, logits allclose, identical top-k."""
    top_k = int(narrow.config.num_experts_per_tok)
    max_diff = 0.0
    routing_equal = True
    logits_close = True
    for ids in prompts:
        logits_a, topk_a = router_topk(narrow, ids, top_k)
        logits_b, topk_b = router_topk(wide, ids, top_k)
        max_diff = max(max_diff, float((logits_a - logits_b).abs().max()))
        logits_close = logits_close and bool(torch.allclose(logits_a, logits_b, atol=atol, rtol=1e-5))
        routing_equal = routing_equal and bool(torch.equal(topk_a, topk_b))
    nonzeros = padding_nonzeros(wide, int(narrow.config.moe_intermediate_size))
    return {
        "prompts": len(prompts),
        "tokens": sum(int(p.numel()) for p in prompts),
        "padding_nonzeros": nonzeros,
        "max_abs_logit_diff": max_diff,
        "atol": atol,
        "logits_allclose": logits_close,
        "routing_identical": routing_equal,
        "ok": nonzeros == 0 and logits_close and routing_equal,
    }


# ---------------------------------------------------------------- locality


@dataclass
class Routed:
    prefill_topk: IntArray  # [P, L, k]
    decode_topk: IntArray  # [T, L, k]
    generated: list[int]


@torch.no_grad()
def route_request(model: Any, ids: torch.Tensor, decode_tokens: int) -> Routed:
    """Prefill `ids`, then greedy-decode `decode_tokens` tokens (EOS included, like ignore_eos), with the
    top-k of every prompt token and every generated token (routed when it is fed back) per layer."""
    top_k = int(model.config.num_experts_per_tok)

    def topk(out: Any) -> IntArray:
        ranks = [r.topk(top_k, dim=-1).indices.sort(dim=-1).values for r in out.router_logits]
        return torch.stack(ranks, dim=1).numpy().astype(np.int64)

    out = model(input_ids=ids[None], output_router_logits=True, use_cache=True)
    prefill = topk(out)
    generated: list[int] = []
    rows: list[IntArray] = []
    past = out.past_key_values
    token = int(out.logits[0, -1].argmax())
    for _ in range(decode_tokens):
        generated.append(token)
        out = model(
            input_ids=torch.tensor([[token]]), past_key_values=past, output_router_logits=True, use_cache=True
        )
        rows.append(topk(out))
        past = out.past_key_values
        token = int(out.logits[0, -1].argmax())
    num_layers = prefill.shape[1]
    decode = np.concatenate(rows) if rows else np.zeros((0, num_layers, top_k), dtype=np.int64)
    return Routed(prefill, decode, generated)


def counts(topk: IntArray, num_experts: int) -> IntArray:
    """[T, L, k] expert ids -> [L, E] counts."""
    num_layers = topk.shape[1]
    flat = (np.arange(num_layers)[None, :, None] * num_experts + topk).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def _cos(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """Cosine per layer of [L, E] arrays, averaged over layers (rows with a zero vector count as 0)."""
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)))


def locality_stats(
    prefill: IntArray,
    decode: IntArray,
    decode_topk: list[IntArray],
    labels: list[str],
    *,
    batch_size: int = 16,
    steps: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Cosines of prefill/decode expert frequencies within a request, its domain and other domains,
    and distinct experts per layer of a decode batch drawn from one domain or from all."""
    pf = prefill / np.maximum(prefill.sum(axis=-1, keepdims=True), 1)  # [N, L, E] per-token frequencies
    df = decode / np.maximum(decode.sum(axis=-1, keepdims=True), 1)
    lab = np.asarray(labels)
    domains = sorted(set(labels))
    sums = {d: (pf[lab == d].sum(axis=0), df[lab == d].sum(axis=0), int((lab == d).sum())) for d in domains}
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "prefill_vs_own_decode",
            "decode_vs_same_domain_prefill",
            "decode_vs_other_domain_prefill",
            "prefill_vs_same_domain_prefill",
            "prefill_vs_other_domain_prefill",
            "decode_vs_same_domain_decode",
            "decode_vs_other_domain_decode",
        )
    }
    per_domain: dict[str, dict[str, list[float]]] = {d: {k: [] for k in rows} for d in domains}
    for n, d in enumerate(labels):
        p_sum, d_sum, cnt = sums[d]
        same_p = (p_sum - pf[n]) / max(cnt - 1, 1)  # leave the request itself out
        same_d = (d_sum - df[n]) / max(cnt - 1, 1)
        others = [o for o in domains if o != d]
        values = {
            "prefill_vs_own_decode": _cos(pf[n], df[n]),
            "decode_vs_same_domain_prefill": _cos(df[n], same_p),
            "decode_vs_other_domain_prefill": float(
                np.mean([_cos(df[n], sums[o][0] / sums[o][2]) for o in others])
            )
            if others
            else float("nan"),
            "prefill_vs_same_domain_prefill": _cos(pf[n], same_p),
            "prefill_vs_other_domain_prefill": float(
                np.mean([_cos(pf[n], sums[o][0] / sums[o][2]) for o in others])
            )
            if others
            else float("nan"),
            "decode_vs_same_domain_decode": _cos(df[n], same_d),
            "decode_vs_other_domain_decode": float(
                np.mean([_cos(df[n], sums[o][1] / sums[o][2]) for o in others])
            )
            if others
            else float("nan"),
        }
        for key, value in values.items():
            rows[key].append(value)
            per_domain[d][key].append(value)
    num_experts = prefill.shape[-1]
    gen = np.random.default_rng(seed)

    def distinct(members: IntArray) -> float:
        chosen = gen.choice(members, size=batch_size, replace=members.size < batch_size)
        tokens = np.stack([decode_topk[i][gen.integers(0, len(decode_topk[i]))] for i in chosen])  # [B, L, k]
        return float(np.mean([np.unique(tokens[:, layer]).size for layer in range(tokens.shape[1])]))

    have_decode = np.array([len(t) > 0 for t in decode_topk])
    everyone = np.flatnonzero(have_decode)
    distinct_stats: dict[str, Any] = {"batch_size": batch_size, "steps": steps, "num_experts": num_experts}
    if everyone.size:
        mixed = [distinct(everyone) for _ in range(steps)]
        same_by_domain = {
            d: float(np.mean([distinct(np.flatnonzero((lab == d) & have_decode)) for _ in range(steps)]))
            for d in domains
        }
        same = float(np.mean(list(same_by_domain.values())))
        distinct_stats.update(
            mixed=float(np.mean(mixed)),
            same_domain=same,
            same_domain_by_domain=same_by_domain,
            reduction=1.0 - same / float(np.mean(mixed)),
        )
    return {
        "overall": {k: float(np.mean(v)) for k, v in rows.items()},
        "by_domain": {d: {k: float(np.mean(v)) for k, v in per_domain[d].items()} for d in domains},
        "distinct_experts_per_layer": distinct_stats,
    }


def build_trace(
    routed: list[Routed],
    labels: list[str],
    num_experts: int,
    top_k: int,
    *,
    rate: float,
    calibration_fraction: float,
    seed: int,
    meta: dict[str, Any],
) -> Trace:
    """The requests in a seeded random order with Poisson arrivals; the first fraction flagged calibration."""
    gen = np.random.default_rng(seed)
    order = gen.permutation(len(routed))
    arrival = np.cumsum(gen.exponential(1.0 / rate, size=len(routed)))
    arrival -= arrival[0]
    reqs = [routed[i] for i in order]
    num_layers = reqs[0].prefill_topk.shape[1]
    decode_rows = [r.decode_topk for r in reqs]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in decode_rows])]).astype(np.int64)
    empty = np.zeros((0, num_layers, top_k), dtype=np.int64)
    return Trace(
        prefill_counts=np.stack([counts(r.prefill_topk, num_experts) for r in reqs]).astype(np.int32),
        decode_counts=np.stack([counts(r.decode_topk, num_experts) for r in reqs]).astype(np.int32),
        prompt_tokens=np.array([len(r.prefill_topk) for r in reqs], dtype=np.int64),
        output_tokens=np.array([len(r.decode_topk) for r in reqs], dtype=np.int64),
        arrival_s=arrival.astype(np.float64),
        top_k=top_k,
        layers=np.arange(num_layers, dtype=np.int64),
        num_model_layers=num_layers,
        domain=np.array([labels[i] for i in order]),
        calibration=np.arange(len(reqs)) < round(calibration_fraction * len(reqs)),
        decode_topk=np.concatenate(decode_rows if decode_rows else [empty]).astype(np.uint8),
        decode_offsets=offsets,
        meta=meta,
    )


def cli_checks(trace_path: Path, workers: int = 4) -> dict[str, Any]:
    """Run `eldr trace info`, `eldr fit` and `eldr simulate` on the trace (the same venv's `eldr`)."""
    eldr = str(Path(sys.executable).parent / "eldr")

    def run(*cmd: str) -> dict[str, Any]:
        done = subprocess.run([eldr, *cmd, "--json"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(
                f"eldr {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        info = run("trace", "info", str(trace_path))
        part = str(Path(tmp) / "partition.npz")
        fit = run("fit", "--calibration", str(trace_path), "--workers", str(workers), "--out", part)
        sim = run(
            "simulate", "--trace", str(trace_path), "--workers", str(workers), "--cost-model", "this-cpu"
        )
    policies = {
        name: {k: v[k] for k in ("tpot_p50_ms", "tpot_p99_ms", "distinct_experts_per_step", "load_imbalance")}
        for name, v in sim["policies"].items()
    }
    return {
        "workers": workers,
        "trace_info_ok": True,
        "trace_info_keys": sorted(info),
        "fit_ok": True,
        "fit_keys": sorted(fit),
        "simulate_ok": True,
        "simulate_settings": sim["settings"],
        "simulate_policies": policies,
    }


# ---------------------------------------------------------------- report


def write_report(results_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "locality_model.json"
    md_path = results_dir / "locality_model.md"
    json_path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    md_path.write_text(render_markdown(report))
    return md_path, json_path


def render_markdown(r: dict[str, Any]) -> str:
    m, t, loc, w = r["model"], r["training"], r["locality"], r["widening"]
    o = loc["overall"]
    verdict = "PASS" if w.get("ok") else "FAIL" if w else "not widened"
    lines = [
        "# A small Qwen3-MoE with learned expert locality (benchmarks/locality_model.py)",
        "",
        f"- commit `{r['commit']}`; machine: {r['machine']}; "
        f"torch {r['torch']}, transformers {r['transformers']}",
        f"- command: `{r['command']}`",
        f"- total wall time {r['wall_s'] / 60:.1f} min; training {t['seconds'] / 60:.1f} min, "
        f"{t['steps']} steps "
        f"of {t['batch_size']} x {t['seq_len']} tokens ({t['tokens'] / 1e6:.2f} M tokens, "
        f"{t['tokens'] / max(t['seconds'], 1e-9):.0f} tok/s on {r['threads']} thread(s)); "
        f"repeat exactly with `--steps {t['steps']}`",
        f"- served checkpoint: `{r['out']}` ({r['checkpoint_mb']:.0f} MB safetensors), prompts "
        f"`prompts-calibration.jsonl` ({r['prompts']['calibration']}), `prompts-workload.jsonl` "
        f"({r['prompts']['workload']}), trace `trace.npz` ({r['trace']['requests']} requests)",
        "",
        "## Model",
        "",
        f"`Qwen3MoeForCausalLM`, float32: {m['num_layers']} layers, {m['num_experts']} experts per layer, "
        f"top-{m['top_k']} (norm_topk_prob), hidden {m['hidden_size']}, {m['num_heads']} heads / "
        f"{m['num_kv_heads']} "
        f"KV heads of {m['head_dim']}, vocabulary {m['vocab_size']} (byte-level BPE on the generated text), "
        f"router aux loss coefficient {m['router_aux_loss_coef']}. Trained with expert intermediate size "
        f"{m['trained_moe_intermediate_size']} ({m['trained_params'] / 1e6:.1f} M parameters); served with "
        f"{m['served_moe_intermediate_size']} ({m['served_params'] / 1e6:.1f} M parameters).",
        "",
        f"Domains: {', '.join(r['domains'])} (`eldr.testing.domain_text`). Optimiser: AdamW lr {t['lr']}, "
        f"betas (0.9, 0.95), weight decay 0.1, warmup {t['warmup']} steps, cosine to lr/10, clip 1.0.",
        "",
        "## Widening check",
        "",
        f"Every expert zero padded from {m['trained_moe_intermediate_size']} to "
        f"{m['served_moe_intermediate_size']} (gate/up rows, down columns). On {w.get('prompts', 0)} prompts "
        f"({w.get('tokens', 0)} tokens): padding non-zeros {w.get('padding_nonzeros', '-')}, "
        f"max |logit difference| {w.get('max_abs_logit_diff', 0):.2e} (allclose atol {w.get('atol', '-')}: "
        f"{w.get('logits_allclose', '-')}), top-k routing identical in every layer: "
        f"{w.get('routing_identical', '-')}. **{verdict}**",
        "",
        "## Loss per domain (next-token cross-entropy, nats)",
        "",
        "| domain | training text | held-out text |",
        "|---|---:|---:|",
    ]
    for d in r["domains"]:
        lines.append(f"| {d} | {t['loss_train'][d]:.3f} | {t['loss_heldout'][d]:.3f} |")
    lines += [
        "",
        f"## Locality ({loc['requests']} held-out requests, {loc['per_domain']} per domain, prompts "
        f"{loc['prompt_tokens_min']}-{loc['prompt_tokens_max']} tokens, "
        f"{loc['decode_tokens']} greedy decode tokens)",
        "",
        "Cosine of per-layer expert frequencies (counts / tokens), averaged over layers, then requests. "
        "Same-domain means leave the request itself out; other-domain values average the cosine with "
        "each other domain's mean.",
        "",
        "| statistic | all | " + " | ".join(r["domains"]) + " |",
        "|---|---:|" + "---:|" * len(r["domains"]),
    ]
    for key in o:
        by = [f"{loc['by_domain'][d][key]:.3f}" for d in r["domains"]]
        lines.append(f"| {key.replace('_', ' ')} | **{o[key]:.3f}** | " + " | ".join(by) + " |")
    dist = loc["distinct_experts_per_layer"]
    if "mixed" in dist:
        by_d = ", ".join(f"{d} {v:.1f}" for d, v in dist["same_domain_by_domain"].items())
        lines += [
            "",
            f"Distinct experts per layer in a decode batch of {dist['batch_size']} tokens "
            f"(one random generated token of each of {dist['batch_size']} requests; "
            f"{dist['steps']} batches; {dist['num_experts']} experts): "
            f"mixed domains **{dist['mixed']:.2f}**, "
            f"one domain **{dist['same_domain']:.2f}** "
            f"({by_d}): **{100 * dist['reduction']:.1f}% fewer**.",
        ]
    lines += [
        "",
        f"Greedy continuations classified by domain vocabulary (`domain_text.classify`): "
        f"{100 * loc['continuations_in_domain']:.1f}% in the prompt's domain.",
        "",
        "## Sample greedy continuations",
        "",
    ]
    for s in r["samples"]:
        lines.append(
            f"- **{s['domain']}**: …{json.dumps(s['prompt_tail'])} → {json.dumps(s['continuation'])}"
        )
    lines += [
        "",
        "## Training curve (smoothed)",
        "",
        "| step | minutes | cross-entropy | aux loss |",
        "|---:|---:|---:|---:|",
    ]
    curve = t["loss_curve"]
    stride = max(1, len(curve) // 12)
    for point in [*curve[::stride][:-1], curve[-1]] if len(curve) > 1 else curve:
        lines.append(
            f"| {point['step']:.0f} | {point['seconds'] / 60:.1f} | {point['ce']:.3f} | {point['aux']:.3f} |"
        )
    lines += [
        "",
        "## Trace",
        "",
        f"`{r['trace']['path']}`: the held-out requests above, "
        f"Poisson arrivals at {r['trace']['rate']} req/s, "
        f"first {r['trace']['calibration']} flagged calibration, exact decode top-k (`decode_topk`). "
        "It loads with `eldr.trace.format.Trace`.",
    ]
    checks = r.get("cli_checks")
    if checks:
        lines += [
            "",
            f"`eldr trace info`, `eldr fit --workers {checks['workers']}` and `eldr simulate --workers "
            f"{checks['workers']} --cost-model this-cpu` ran on it without error "
            "(the simulation is a smoke test on a small trace, not a result):",
            "",
            "| policy | TPOT p50 ms | TPOT p99 ms | distinct experts per step | load imbalance |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, v in checks["simulate_policies"].items():
            lines.append(
                f"| {name} | {v['tpot_p50_ms']:.0f} | {v['tpot_p99_ms']:.0f} | "
                f"{v['distinct_experts_per_step']:.1f} | {v['load_imbalance']:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Train a small Qwen3-MoE with learned expert locality on generated text in six domains, "
            "widen its experts by zero padding, write a vLLM-servable checkpoint, prompts, a trace and a "
            "locality report. Deterministic for a given --seed (up to the number of steps when training "
            "for wall time; --steps fixes that too)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/eldr/locality-model"), help="checkpoint directory")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="report directory",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the text, initialisation, batches and arrivals"
    )
    p.add_argument("--minutes", type=float, default=18.0, help="training wall time (ignored with --steps)")
    p.add_argument(
        "--steps", type=int, default=None, help="train exactly this many steps instead of --minutes"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--layers", type=int, default=ModelSpec.num_layers, help="MoE layers")
    p.add_argument("--experts", type=int, default=ModelSpec.num_experts, help="experts per layer")
    p.add_argument("--top-k", type=int, default=ModelSpec.top_k, help="experts per token")
    p.add_argument("--hidden", type=int, default=ModelSpec.hidden_size, help="hidden size")
    p.add_argument(
        "--moe-intermediate",
        type=int,
        default=ModelSpec.moe_intermediate_size,
        help="expert size while training",
    )
    p.add_argument("--heads", type=int, default=ModelSpec.num_heads, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=ModelSpec.num_kv_heads, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=ModelSpec.head_dim, help="attention head size")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument(
        "--aux-coef",
        type=float,
        default=ModelSpec.router_aux_loss_coef,
        help="router load-balancing loss weight",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument(
        "--train-tokens",
        type=int,
        default=400_000,
        help="generated training tokens per domain (sampled windows)",
    )
    p.add_argument(
        "--widen-intermediate",
        type=int,
        default=1024,
        help="zero-pad every expert to this intermediate size for the served checkpoint (0: do not widen)",
    )
    p.add_argument("--calibration-prompts", type=int, default=100, help="calibration prompts per domain")
    p.add_argument("--workload-prompts", type=int, default=200, help="workload prompts per domain")
    p.add_argument("--min-prompt", type=int, default=64, help="shortest prompt in tokens")
    p.add_argument("--max-prompt", type=int, default=256, help="longest prompt in tokens")
    p.add_argument("--measure-prompts", type=int, default=40, help="held-out requests per domain measured")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy decode tokens per measured request")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate of the trace, requests/s")
    p.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.25,
        help="trace requests flagged calibration (first ones)",
    )
    p.add_argument(
        "--cli-checks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run eldr trace info / fit / simulate on the written trace",
    )
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between training progress lines")
    p.add_argument(
        "--unwiden",
        type=int,
        metavar="WIDTH",
        help="only write OUT/trained: the widened checkpoint in --out at expert width WIDTH (checked to be "
        "zero padding), then exit; for checkpoints written before the script kept both",
    )
    args = p.parse_args(argv)
    if args.steps is None and args.minutes <= 0:
        p.error("--minutes must be > 0")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if not 1 <= args.min_prompt <= args.max_prompt:
        p.error("need 1 <= --min-prompt <= --max-prompt")
    if args.widen_intermediate and args.widen_intermediate < args.moe_intermediate:
        p.error("--widen-intermediate must be 0 or >= --moe-intermediate")
    if not 0.0 <= args.calibration_fraction < 1.0 or args.rate <= 0:
        p.error("need 0 <= --calibration-fraction < 1 and --rate > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.unwiden:
        unwiden_checkpoint(args.out, args.out / TRAINED_SUBDIR, args.unwiden)
        print(f"wrote {args.out / TRAINED_SUBDIR} at expert width {args.unwiden}")
        return {}
    wall_start = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        hidden_size=args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        router_aux_loss_coef=args.aux_coef,
    )

    def say(msg: str) -> None:
        print(f"[{(time.monotonic() - wall_start) / 60:5.1f} min] {msg}", flush=True)

    say("training the tokenizer and generating text")
    tokenizer = train_tokenizer(out, args.vocab_size, args.seed)
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(EOS)
    train_streams = [
        token_stream(tokenizer, d, args.train_tokens, text_seed(args.seed, "train") * 10 + i)
        for i, d in enumerate(DOMAINS)
    ]
    eval_rows = 8
    eval_streams = [
        token_stream(tokenizer, d, eval_rows * (args.seq_len + 1) + 1, text_seed(args.seed, "eval") * 10 + i)
        for i, d in enumerate(DOMAINS)
    ]

    torch.manual_seed(args.seed)
    model = transformers.Qwen3MoeForCausalLM(make_config(spec, vocab_size, eos_id)).to(torch.float32)
    trained_params = sum(p.numel() for p in model.parameters())
    say(f"model: {trained_params / 1e6:.1f} M parameters; training on {args.threads} threads")
    set_experts(model, "grouped_mm")
    result = train(
        model,
        train_streams,
        seconds=args.minutes * 60.0,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        log_every_s=args.log_every,
    )
    set_experts(model, "eager")
    loss_train = {
        d: domain_loss(model, s, eval_rows, args.seq_len) for d, s in zip(DOMAINS, train_streams, strict=True)
    }
    loss_heldout = {
        d: domain_loss(model, s, eval_rows, args.seq_len) for d, s in zip(DOMAINS, eval_streams, strict=True)
    }
    say(
        f"trained {result.steps} steps; held-out loss "
        + ", ".join(f"{d} {v:.3f}" for d, v in loss_heldout.items())
    )

    served = model
    widening: dict[str, Any] = {}
    if args.widen_intermediate:
        say(f"widening experts {args.moe_intermediate} -> {args.widen_intermediate}")
        served = widen(model, args.widen_intermediate)
        set_experts(served, "eager")
        check_pairs = make_prompts(
            tokenizer, 1, text_seed(args.seed, "check"), args.min_prompt, args.max_prompt
        )
        check_ids = [torch.tensor(tokenizer.encode(p).ids) for p, _ in check_pairs]
        widening = check_widening(model, served, check_ids)
        say(f"widening check: {widening}")
        if not widening["ok"]:
            raise SystemExit("the widened model differs from the trained one")
    served.config.output_router_logits = False
    if args.widen_intermediate:
        served.config.trained_moe_intermediate_size = args.moe_intermediate
    served.save_pretrained(str(out), safe_serialization=True)
    write_tokenizer(tokenizer, out)
    if args.widen_intermediate:
        unwiden_checkpoint(out, out / TRAINED_SUBDIR)
        say(f"saved the trained-width checkpoint in {out / TRAINED_SUBDIR}")
    checkpoint_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    say(f"saved {out} ({checkpoint_mb:.0f} MB)")

    calibration = make_prompts(
        tokenizer,
        args.calibration_prompts,
        text_seed(args.seed, "calibration"),
        args.min_prompt,
        args.max_prompt,
    )
    workload = make_prompts(
        tokenizer, args.workload_prompts, text_seed(args.seed, "workload"), args.min_prompt, args.max_prompt
    )
    write_prompts(out / "prompts-calibration.jsonl", calibration)
    write_prompts(out / "prompts-workload.jsonl", workload)

    measure = make_prompts(
        tokenizer, args.measure_prompts, text_seed(args.seed, "measure"), args.min_prompt, args.max_prompt
    )
    say(f"measuring locality on {len(measure)} held-out requests ({args.decode_tokens} decode tokens each)")
    routed: list[Routed] = []
    for i, (prompt, _) in enumerate(measure):
        routed.append(route_request(model, torch.tensor(tokenizer.encode(prompt).ids), args.decode_tokens))
        if (i + 1) % 60 == 0:
            say(f"  routed {i + 1}/{len(measure)}")
    labels = [d for _, d in measure]
    prefill = np.stack([counts(r.prefill_topk, spec.num_experts) for r in routed])
    decode = np.stack([counts(r.decode_topk, spec.num_experts) for r in routed])
    locality = locality_stats(prefill, decode, [r.decode_topk for r in routed], labels, seed=args.seed)
    continuations = [tokenizer.decode(r.generated) for r in routed]
    in_domain = [classify(c) == d for c, d in zip(continuations, labels, strict=True)]
    prompt_lengths = [len(r.prefill_topk) for r in routed]
    locality.update(
        requests=len(routed),
        per_domain=args.measure_prompts,
        decode_tokens=args.decode_tokens,
        prompt_tokens_min=min(prompt_lengths),
        prompt_tokens_max=max(prompt_lengths),
        prompt_tokens_mean=float(np.mean(prompt_lengths)),
        eos_generated=sum(eos_id in r.generated for r in routed),
        continuations_in_domain=float(np.mean(in_domain)),
        continuations_in_domain_by_domain={
            d: float(np.mean([ok for ok, lab in zip(in_domain, labels, strict=True) if lab == d]))
            for d in DOMAINS
        },
    )
    samples = []
    for d in DOMAINS:
        i = labels.index(d)
        samples.append(
            {
                "domain": d,
                "prompt_tail": measure[i][0][-80:],
                "continuation": tokenizer.decode(routed[i].generated[:24]),
            }
        )

    command = "python benchmarks/locality_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    trace_meta = {
        "source": "greedy decode of a Qwen3-MoE trained on generated domain text",
        "script": "benchmarks/locality_model.py",
        "command": command.strip(),
        "seed": args.seed,
        "commit": commit(),
        "model_dir": str(out),
        "decode_tokens": args.decode_tokens,
        "rate": args.rate,
        "routing": "transformers eager forward, top-k of router logits, generated tokens routed as fed back",
    }
    trace = build_trace(
        routed,
        labels,
        spec.num_experts,
        spec.top_k,
        rate=args.rate,
        calibration_fraction=args.calibration_fraction,
        seed=args.seed,
        meta=trace_meta,
    )
    trace_path = out / "trace.npz"
    trace.save(trace_path)
    Trace.load(trace_path)
    checks = cli_checks(trace_path) if args.cli_checks else {}
    served_params = sum(p.numel() for p in served.parameters())
    report: dict[str, Any] = {
        "commit": commit(),
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": command.strip(),
        "threads": args.threads,
        "seed": args.seed,
        "out": str(out),
        "checkpoint_mb": checkpoint_mb,
        "domains": list(DOMAINS),
        "model": {
            **{k: v for k, v in asdict(spec).items() if k != "moe_intermediate_size"},
            "vocab_size": vocab_size,
            "trained_moe_intermediate_size": spec.moe_intermediate_size,
            "served_moe_intermediate_size": int(served.config.moe_intermediate_size),
            "trained_params": trained_params,
            "served_params": served_params,
        },
        "training": {
            "steps": result.steps,
            "seconds": result.seconds,
            "tokens": result.tokens,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "warmup": args.warmup,
            "final_ce": result.final_ce,
            "final_aux": result.final_aux,
            "loss_train": loss_train,
            "loss_heldout": loss_heldout,
            "loss_curve": result.loss_curve,
        },
        "widening": widening,
        "prompts": {"calibration": len(calibration), "workload": len(workload)},
        "locality": locality,
        "samples": samples,
        "cli_checks": checks,
        "trace": {
            "path": str(trace_path),
            "requests": trace.num_requests,
            "rate": args.rate,
            "calibration": int(trace.calibration.sum()) if trace.calibration is not None else 0,
        },
    }
    report["wall_s"] = time.monotonic() - wall_start
    md_path, json_path = write_report(args.results_dir, report)
    o = locality["overall"]
    say(
        f"done: prefill vs own decode {o['prefill_vs_own_decode']:.3f}, decode vs same-domain prefill "
        f"{o['decode_vs_same_domain_prefill']:.3f}, "
        f"vs other domains {o['decode_vs_other_domain_prefill']:.3f}; "
        f"report {md_path}, {json_path}"
    )
    return report


if __name__ == "__main__":
    main()
