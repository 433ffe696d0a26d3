"""benchmarks/locality_model.py on a tiny config: training, widening, prompts, trace, report; and the text."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.benchmark_module import load_benchmark  # noqa: E402

from eldr.testing.domain_text import DOMAINS, classify, document, documents  # noqa: E402
from eldr.trace.format import Trace  # noqa: E402

TINY = [
    "--layers", "2", "--experts", "8", "--top-k", "2", "--hidden", "32", "--moe-intermediate", "16",
    "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--vocab-size", "400",
    "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--train-tokens", "2000",
]  # fmt: skip


@pytest.fixture(scope="module")
def lm() -> ModuleType:
    return load_benchmark("locality_model")


@pytest.fixture(scope="module")
def tiny_run(lm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    out = tmp_path_factory.mktemp("model")
    results = tmp_path_factory.mktemp("results")
    argv = [
        *TINY,
        "--steps", "3", "--widen-intermediate", "48", "--threads", "1",
        "--calibration-prompts", "2", "--workload-prompts", "3", "--measure-prompts", "3",
        "--min-prompt", "16", "--max-prompt", "48", "--decode-tokens", "5", "--rate", "2",
        "--no-cli-checks", "--out", str(out), "--results-dir", str(results),
    ]  # fmt: skip
    report = lm.main(argv)
    return report, out, results


def test_tiny_run_writes_a_servable_checkpoint(tiny_run: tuple[dict[str, Any], Path, Path]) -> None:
    report, out, _ = tiny_run
    assert report["training"]["steps"] == 3
    assert report["widening"]["ok"] and report["widening"]["routing_identical"]
    assert report["widening"]["padding_nonzeros"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 48 and config["num_experts_per_tok"] == 2
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    # vLLM's qwen3_moe loader reads one gate/up/down projection per expert
    assert shapes["model.layers.1.mlp.experts.7.gate_proj.weight"] == (48, 32)
    assert shapes["model.layers.1.mlp.experts.7.up_proj.weight"] == (48, 32)
    assert shapes["model.layers.1.mlp.experts.7.down_proj.weight"] == (32, 48)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config and tok_config["eos_token"] == "<|endoftext|>"


def test_tiny_run_prompts_are_valid(tiny_run: tuple[dict[str, Any], Path, Path]) -> None:
    _, out, _ = tiny_run
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    for name, per_domain in (("prompts-calibration.jsonl", 2), ("prompts-workload.jsonl", 3)):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert len(rows) == per_domain * len(DOMAINS)
        assert sorted({r["label"] for r in rows}) == sorted(DOMAINS)
        for row in rows:
            assert set(row) == {"prompt", "label"}
            assert 16 <= len(tokenizer.encode(row["prompt"]).ids) <= 48
    calibration = (out / "prompts-calibration.jsonl").read_text()
    assert calibration not in (out / "prompts-workload.jsonl").read_text()


def test_tiny_run_trace_and_report(tiny_run: tuple[dict[str, Any], Path, Path]) -> None:
    report, out, results = tiny_run
    trace = Trace.load(out / "trace.npz")
    assert trace.num_requests == 3 * len(DOMAINS)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (2, 8, 2)
    assert trace.domain is not None and sorted(set(trace.domain.tolist())) == sorted(DOMAINS)
    assert np.all(trace.output_tokens == 5) and trace.decode_topk is not None
    assert np.all(trace.prefill_counts.sum(axis=-1) == trace.prompt_tokens[:, None] * 2)  # conservation
    assert trace.calibration is not None and int(trace.calibration.sum()) == round(0.25 * trace.num_requests)
    assert trace.meta["script"] == "benchmarks/locality_model.py" and trace.meta["seed"] == 0
    loc = report["locality"]["overall"]
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in loc.values())
    saved = json.loads((results / "locality_model.json").read_text())
    assert saved["locality"]["overall"] == pytest.approx(loc)
    assert "## Locality" in (results / "locality_model.md").read_text()


def test_widening_check_catches_nonzero_padding(lm: ModuleType) -> None:
    transformers = pytest.importorskip("transformers")
    spec = lm.ModelSpec(
        num_layers=2, num_experts=8, top_k=2, hidden_size=32, moe_intermediate_size=16, num_heads=2,
        num_kv_heads=1, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(lm.make_config(spec, 64, 1)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)  # well separated router logits
    lm.set_experts(model, "eager")
    prompts = [torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    wide = lm.widen(model, 40)
    lm.set_experts(wide, "eager")
    check = lm.check_widening(model, wide, prompts)
    assert check["ok"] and check["max_abs_logit_diff"] < 1e-5
    experts = wide.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[3, 40 + 20] = 0.1  # one up row of the padding: no effect alone ...
    check = lm.check_widening(model, wide, prompts)
    assert check["padding_nonzeros"] == 32 and not check["ok"]
    with torch.no_grad():  # ... but with its gate row and down column every expert 3 token changes
        experts.gate_up_proj[3, 20] = 0.1
        experts.down_proj[3, :, 20] = 1.0
    check = lm.check_widening(model, wide, prompts)
    assert not check["logits_allclose"] and not check["ok"]


def test_domain_text_is_deterministic() -> None:
    for domain in DOMAINS:
        assert documents(domain, 3, seed=5) == documents(domain, 3, seed=5)
        assert documents(domain, 3, seed=5) != documents(domain, 3, seed=6)
    assert document("code", random.Random(1)) == document("code", random.Random(1))
    with pytest.raises(ValueError, match="unknown domain"):
        document("poetry", random.Random(0))


def test_domain_text_domains_are_distinct() -> None:
    rng = random.Random(0)
    assert len(DOMAINS) >= 5
    assert all(classify(document(d, rng)) == d for d in DOMAINS for _ in range(20))
    assert classify("") == ""


def test_counts_and_lr(lm: ModuleType) -> None:
    topk = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]])  # [T=2, L=2, k=2]
    assert lm.counts(topk, 4).tolist() == [[1, 2, 1, 0], [1, 0, 1, 2]]
    assert lm.lr_at(0.0, 0, 1.0, 10) == pytest.approx(0.1)
    assert lm.lr_at(1.0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lm.lr_at(0.0, 10, 1.0, 10) == pytest.approx(1.0)


def test_the_trained_width_checkpoint_is_the_same_function(
    lm: ModuleType, tiny_run: tuple[dict[str, Any], Path, Path], tmp_path: Path
) -> None:
    """OUT/trained (what a prefill engine may serve) gives the widened checkpoint's logits and routing."""
    from safetensors.torch import load_file, save_file

    transformers = pytest.importorskip("transformers")
    _, out, _ = tiny_run
    narrow_dir = out / lm.TRAINED_SUBDIR
    narrow_config = json.loads((narrow_dir / "config.json").read_text())
    assert narrow_config["moe_intermediate_size"] == 16  # the tiny run's trained width
    wide = transformers.Qwen3MoeForCausalLM.from_pretrained(str(out)).eval()
    narrow = transformers.Qwen3MoeForCausalLM.from_pretrained(str(narrow_dir)).eval()
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 12]])
    with torch.no_grad():
        a = wide(ids, output_router_logits=True)
        b = narrow(ids, output_router_logits=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    for ra, rb in zip(a.router_logits, b.router_logits, strict=True):
        assert torch.equal(ra.topk(2).indices, rb.topk(2).indices)
    # a checkpoint whose padding is not zero is refused
    tensors = load_file(str(out / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("experts.0.down_proj.weight"))
    tensors[name][:, -1] = 1.0
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(SystemExit, match="non-zero weights"):
        lm.unwiden_checkpoint(bad, tmp_path / "bad-narrow")
