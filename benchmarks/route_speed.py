"""Benchmark: one eldr routing decision (signature transform + similarities + band + choice).

Issue 2's goal: median <= 30 µs for K = 16 at L = 48, E = 128 (Qwen3-30B-A3B's shape; the paper's proxy
spends 0.15 ms). Reports p50/p99 for K = 16, 64, 256 and writes benchmarks/results/route_speed.md.

    python benchmarks/route_speed.py [--decisions 20000] [--out benchmarks/results/route_speed.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from eldr.calibrate import FitConfig, fit_partition
from eldr.policy import LocalityBandPolicy, RequestView, WorkersView
from eldr.synthetic import planted_clusters
from provenance import commit, machine

NUM_LAYERS, NUM_EXPERTS, TOP_K = 48, 128, 8


def time_decisions(num_workers: int, num_decisions: int, seed: int = 0) -> np.ndarray:
    data = planted_clusters(
        max(2 * num_workers, 600),
        num_clusters=min(num_workers, 32),
        num_layers=NUM_LAYERS,
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        informative_layers=tuple(range(0, NUM_LAYERS, 4)),
        seed=seed,
    )
    part = fit_partition(data.prefill_counts, FitConfig(num_workers, max_iter=10))
    policy = LocalityBandPolicy(part, tau=0.1)
    rng = np.random.default_rng(seed)
    requests = [RequestView(counts=c) for c in data.prefill_counts]
    loads = [WorkersView.of(rng.integers(0, 8, size=num_workers)) for _ in range(64)]
    for i in range(500):  # warm-up
        policy.choose(requests[i % len(requests)], loads[i % len(loads)])
    out = np.empty(num_decisions)
    clock = time.perf_counter_ns
    for i in range(num_decisions):
        req, view = requests[i % len(requests)], loads[i % len(loads)]
        start = clock()
        policy.choose(req, view)
        out[i] = clock() - start
    return out / 1000.0  # µs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--out", default="benchmarks/results/route_speed.md")
    args = parser.parse_args()
    rows = []
    for k in (16, 64, 256):
        us = time_decisions(k, args.decisions)
        rows.append((k, float(np.median(us)), float(np.percentile(us, 99))))
    header = (
        f"# Routing decision latency (L={NUM_LAYERS}, E={NUM_EXPERTS}, tau=0.1)\n\n"
        f"machine: {machine()}, numpy {np.__version__}; commit {commit()}; "
        f"command: `python benchmarks/route_speed.py --decisions {args.decisions}`\n\n"
        "| K (workers) | p50 µs | p99 µs |\n|---:|---:|---:|\n"
    )
    table = "".join(f"| {k} | {p50:.1f} | {p99:.1f} |\n" for k, p50, p99 in rows)
    print(header + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + table)


if __name__ == "__main__":
    main()
