"""The engine plugin's per-step work outside the engine: fold, scheduler side, worker -> scheduler pickle.

Question: what does one engine step cost the plugin, at the tiny test model's scale and at the paper's
(Qwen3-30B-A3B: L = 48 MoE layers, E = 128 experts, top-8, KV blocks of 16 tokens)? Per scale, one
step of T tokens of one request from position 0, in KV blocks scattered over the pool as vLLM hands
them out:

- `arm` and `fold`: `TapSet.arm` and `TapSet.fold` on CPU capture buffers, as the engine worker runs
  them (numpy); `fold, device path`: `fold.fold_on_device` on the same CPU tensors (the code an
  accelerator runs; on a GPU the ids never leave the device, so CPU time here is not GPU time);
- `scheduler`: `SignatureLedger.apply` of the step's rows, with the request's prompt counts summed,
  checked and encoded (the work of `update_connector_output`);
- `pickle`: the step's `EldrWorkerMeta` through pickle and back (vLLM's worker -> scheduler queue).

Each is timed hot (repeated back to back, median) and cold (a 32 MiB memory sweep and unrelated Python
and numpy work before each call, median), because inside an engine every hook runs right after a
forward pass has evicted the caches: the hot numbers understate what the engine sees.

    .venv/bin/python benchmarks/fold_speed.py [--repeats 200] [--out benchmarks/results/fold_speed.md]
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eldr.vllm.connector import EldrWorkerMeta
from eldr.vllm.fold import fold_on_device
from eldr.vllm.ledger import SignatureLedger
from eldr.vllm.router_tap import RouterTap, TapSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine


@dataclass(frozen=True)
class Scale:
    name: str
    num_tokens: int
    num_layers: int
    num_experts: int
    top_k: int
    block_size: int
    max_tokens: int  # capture buffer rows (max_num_batched_tokens)


SCALES = (
    Scale("tiny model, 1 token", 1, 4, 32, 4, 128, 2048),
    Scale("tiny model, 256 tokens", 256, 4, 32, 4, 128, 2048),
    Scale("tiny model, 1,024 tokens", 1024, 4, 32, 4, 128, 2048),
    Scale("paper scale, 1,024 tokens", 1024, 48, 128, 8, 16, 8192),
    Scale("paper scale, 8,192 tokens", 8192, 48, 128, 8, 16, 8192),
)
NUM_KV_BLOCKS = 20_000


class Evictor:
    """What an engine does between two hooks, roughly: touch much memory and much other code."""

    def __init__(self) -> None:
        self.memory = np.ones(32 << 17)  # 32 MiB of float64
        self.blob = {"a": [list(range(40)) for _ in range(100)], "b": "x" * 4000}

    def __call__(self) -> None:
        self.memory += 1.0
        json.loads(json.dumps(self.blob))
        re.findall(r"\d+", "a1b22c333" * 100)
        np.sort(np.arange(4000) % 97)
        torch.randn(128, 128) @ torch.randn(128, 128)


def _time_us(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None) -> float:
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


def _step(scale: Scale, rng: np.random.Generator) -> tuple[TapSet, torch.Tensor, list[int]]:
    """Capture buffers holding one forward's ids, and its slot mapping (one request, from position 0)."""
    buffers = [
        torch.from_numpy(rng.integers(0, scale.num_experts, (scale.max_tokens, scale.top_k)).astype(np.int32))
        for _ in range(scale.num_layers)
    ]
    taps = TapSet([RouterTap(i, None, b, lambda ids: None) for i, b in enumerate(buffers)], scale.num_experts)
    num_blocks = -(-scale.num_tokens // scale.block_size)
    blocks = rng.permutation(NUM_KV_BLOCKS)[:num_blocks].tolist()
    positions = np.arange(scale.num_tokens)
    table = np.asarray(blocks)[positions // scale.block_size]
    slots = torch.from_numpy(table * scale.block_size + positions % scale.block_size)
    return taps, slots, blocks


def _row(scale: Scale, repeats: int, evict: Evictor) -> dict[str, float]:
    rng = np.random.default_rng(scale.num_tokens * scale.num_layers)
    taps, slots, blocks = _step(scale, rng)
    taps.num_armed = scale.num_tokens  # as after `arm` and a forward that wrote every row

    def fold() -> object:
        delta = taps.fold(slots, scale.block_size)
        assert delta is not None  # `None`: refused (an unwritten row), which would time nothing
        return delta

    def fold_device() -> object:
        buffers = [tap.buffer for tap in taps.taps]
        delta = fold_on_device(buffers, slots.numpy(), scale.block_size, scale.num_experts)
        assert delta is not None
        return delta

    delta = taps.fold(slots, scale.block_size)
    ledger = SignatureLedger(NUM_KV_BLOCKS, scale.block_size)
    counter = iter(range(10**9))

    def scheduler() -> object:
        req_id = str(next(counter))
        ledger.track(req_id, scale.num_tokens)
        step = ledger.begin_step(scale.num_tokens)
        ledger.prefill_due(step, req_id, blocks)
        params: dict[str, object] = {}
        ledger.finish(req_id, blocks, scale.num_tokens, params)
        ledger.apply(step, delta, scale.top_k)
        assert "eldr" in params
        return params

    meta = EldrWorkerMeta(1, delta, scale.top_k, None)
    hot, cold = (lambda fn: _time_us(fn, repeats, None)), (lambda fn: _time_us(fn, repeats, evict))
    row = {
        "fold": hot(fold),
        "fold, cold": cold(fold),
        "fold, device path": hot(fold_device),
        "scheduler": hot(scheduler),
        "scheduler, cold": cold(scheduler),
        "pickle": hot(lambda: pickle.loads(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))),
    }
    return {"arm": hot(lambda: taps.arm(scale.num_tokens)), **row}  # last: arming unwrites the rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per cell (default 200)")
    parser.add_argument("--out", default="benchmarks/results/fold_speed.md", help="results file (markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the engine worker here (one core bound)
    at_start, evict = machine(), Evictor()
    rows = {scale.name: _row(scale, args.repeats, evict) for scale in SCALES}
    columns = list(next(iter(rows.values())))
    lines = [
        "# The plugin's per-step work outside the engine",
        "",
        f"Commit {commit()}; machine at the start: {at_start}; at the end: {machine()}; one thread; "
        f"command: `.venv/bin/python benchmarks/fold_speed.py --repeats {args.repeats}`. "
        "µs per engine step, median of the repeats; `cold`: caches evicted before each call.",
        "",
        "| step | T, L, E, k, block | " + " | ".join(columns) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for scale in SCALES:
        shape = (
            f"{scale.num_tokens}, {scale.num_layers}, {scale.num_experts}, {scale.top_k}, {scale.block_size}"
        )
        cells = " | ".join(f"{rows[scale.name][c]:.0f}" for c in columns)
        lines.append(f"| {scale.name} | {shape} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
