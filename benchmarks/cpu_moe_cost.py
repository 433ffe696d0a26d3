"""Benchmark: one MoE layer forward on this CPU against the number of distinct active experts.

The `this-cpu` cost preset comes from here. A numpy fp32 MoE layer with 64 SwiGLU experts of
hidden 1024 x intermediate 512 (6.3 MB each, 403 MB in all: far beyond any cache) runs a batch of
B tokens (B = 16, 64), each routed to 8 of the n active experts so that the batch touches exactly n
distinct experts; a fresh random set of active experts every repeat so weights come from DRAM; repeats run in
rounds over the grid in random order so the shared machine's noise spreads over all points.
Fit: t = c0 + c1 * n + c2 * B (non-negative least squares), published with the points.

    python benchmarks/cpu_moe_cost.py [--repeats 15] [--out benchmarks/results/cpu_moe_cost.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: the machine is shared and noisy
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from provenance import commit

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 1024, 512, 64, 8
ACTIVE = (8, 16, 24, 32, 40, 48, 56, 64)
BATCHES = (16, 64)


def moe_forward(
    x: np.ndarray, experts: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray
) -> np.ndarray:
    """x [B, H]; experts [B, k] expert ids; returns [B, H] (gates uniform 1/k)."""
    out = np.zeros_like(x)
    for e in np.unique(experts):
        rows = np.flatnonzero((experts == e).any(axis=1))
        xe = x[rows]
        a = xe @ w1[e]
        h = a / (1.0 + np.exp(-a)) * (xe @ w3[e])  # SwiGLU
        out[rows] += (h @ w2[e]) / TOP_K
    return out


def routing(batch: int, active: np.ndarray) -> np.ndarray:
    """[B, k]: token t takes active[(t*k + j) % n], j < k — k distinct, all n covered when B*k >= n."""
    n = active.size
    slots = (np.arange(batch)[:, None] * TOP_K + np.arange(TOP_K)[None, :]) % n
    return active[slots]


def measure(repeats: int, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    scale = np.float32(0.02)
    w1 = rng.standard_normal((NUM_EXPERTS, HIDDEN, INTER), dtype=np.float32) * scale
    w3 = rng.standard_normal((NUM_EXPERTS, HIDDEN, INTER), dtype=np.float32) * scale
    w2 = rng.standard_normal((NUM_EXPERTS, INTER, HIDDEN), dtype=np.float32) * scale
    xs = {batch: rng.standard_normal((batch, HIDDEN), dtype=np.float32) for batch in BATCHES}
    grid = [(batch, n) for batch in BATCHES for n in ACTIVE]
    times: dict[tuple[int, int], list[float]] = {key: [] for key in grid}
    for _ in range(repeats):  # rounds over the whole grid in random order: noise spreads evenly
        for k in rng.permutation(len(grid)):
            batch, n = grid[k]
            experts = routing(batch, rng.choice(NUM_EXPERTS, size=n, replace=False))
            assert np.unique(experts).size == n
            start = time.perf_counter()
            moe_forward(xs[batch], experts, w1, w3, w2)
            times[(batch, n)].append(time.perf_counter() - start)
    points = []
    for batch, n in grid:
        points.append({"batch": batch, "active": n, "median_ms": 1e3 * float(np.median(times[(batch, n)]))})
        print(f"  batch {batch:3d}  active {n:3d}  {points[-1]['median_ms']:8.2f} ms", flush=True)
    return points


def fit(points: list[dict[str, float]]) -> tuple[float, float, float]:
    a = np.array([[1.0, p["active"], p["batch"]] for p in points])
    t = np.array([p["median_ms"] for p in points]) / 1e3
    coef, _ = nnls(a, t)  # non-negative least squares: a cost term cannot be negative
    return float(coef[0]), float(coef[1]), float(coef[2])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed forwards per point; median (default 15)"
    )
    parser.add_argument("--out", default="benchmarks/results/cpu_moe_cost.md", help="results file")
    args = parser.parse_args()
    points = measure(args.repeats)
    c0, c1, c2 = fit(points)
    lines = [
        "# One MoE layer on this CPU vs distinct active experts",
        "",
        f"machine: {platform.node()} ({platform.machine()}, 2-core shared VM, 1 BLAS thread); "
        f"commit {commit()}; command: `python benchmarks/cpu_moe_cost.py {' '.join(sys.argv[1:])}`",
        f"layer: {NUM_EXPERTS} SwiGLU experts {HIDDEN}x{INTER} fp32 "
        f"({3 * HIDDEN * INTER * 4 / 1e6:.1f} MB each), "
        f"top-{TOP_K}; median of {args.repeats} forwards",
        "",
        f"fit: t = {c0 * 1e3:.3f} ms + {c1 * 1e3:.4f} ms x active + {c2 * 1e3:.4f} ms x batch",
        "",
        "| batch | active experts | measured ms | fit ms |",
        "|---|---|---|---|",
    ]
    for p in points:
        model = 1e3 * (c0 + c1 * p["active"] + c2 * p["batch"])
        lines.append(f"| {p['batch']:.0f} | {p['active']:.0f} | {p['median_ms']:.2f} | {model:.2f} |")
    by = {(p["batch"], p["active"]): p["median_ms"] for p in points}
    lines += [
        "",
        f"ratio 64 vs 8 active experts at batch 64: {by[(64, 64)] / by[(64, 8)]:.2f}x "
        f"(paper, MI300X, 128 vs 16 of 128: 4.7x)",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"points": points, "c0_s": c0, "per_expert_s": c1, "per_request_s": c2}, indent=1) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
