"""Benchmark: `eldr fit` (IDF + greedy layer mask + balanced k-means) at Qwen3-30B-A3B's shape.

Issue 2's goal: at most 2 s for N = 1,000, L = 48, E = 128, K = 16, mask selection included (the paper
reports < 10 s on CPU), and how the time grows with N. Data: synthetic planted clusters
(`eldr.synthetic`, 16 clusters, every 4th layer informative), fixed seeds. Writes
benchmarks/results/fit_speed.md.

    python benchmarks/fit_speed.py [--sizes 1000,5000,20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from eldr.calibrate import fit_transform
from eldr.kmeans import spherical_kmeans
from eldr.synthetic import planted_clusters
from provenance import commit, machine

NUM_LAYERS, NUM_EXPERTS, TOP_K, NUM_WORKERS = 48, 128, 8, 16


def fit_once(n: int, seed: int) -> dict[str, float]:
    data = planted_clusters(
        n,
        num_clusters=NUM_WORKERS,
        num_layers=NUM_LAYERS,
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        informative_layers=tuple(range(0, NUM_LAYERS, 4)),
        prompt_tokens=(16, 256),
        concentration=0.3,
        seed=seed,
    )
    start = time.perf_counter()
    transform, _ = fit_transform(data.prefill_counts, data.decode_counts, seed=1)
    signatures = transform.apply(data.prefill_counts)
    mask_done = time.perf_counter()
    result = spherical_kmeans(signatures, NUM_WORKERS, seed=1)
    end = time.perf_counter()
    return {
        "total_s": end - start,
        "transform_s": mask_done - start,
        "kmeans_s": end - mask_done,
        "iterations": result.num_iterations,
        "kept_layers": len(transform.layers),
        "max_cluster": max(result.cluster_sizes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (seeds 0..R-1); medians")
    parser.add_argument("--out", default="benchmarks/results/fit_speed.md")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        runs = [fit_once(n, seed) for seed in range(args.repeats if n <= 5000 else 1)]
        med = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        rows.append((n, len(runs), med))
        print(f"N={n}: {med}", flush=True)
    header = (
        f"# `eldr fit` time (L={NUM_LAYERS}, E={NUM_EXPERTS}, K={NUM_WORKERS}, 30,000 pairs, "
        "mask included)\n\n"
        f"machine: {machine()}, numpy {np.__version__}; commit {commit()}; command: "
        f"`python benchmarks/fit_speed.py --sizes {args.sizes} --repeats {args.repeats}`\n\n"
        "| N | runs | total s (median) | IDF + layer mask s | balanced k-means s | iterations | "
        "max cluster (cap ceil(N/K)) |\n|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    table = "".join(
        f"| {n} | {runs} | {m['total_s']:.2f} | {m['transform_s']:.2f} | {m['kmeans_s']:.2f} | "
        f"{m['iterations']:.0f} | {m['max_cluster']:.0f} ({-(-n // NUM_WORKERS)}) |\n"
        for n, runs, m in rows
    )
    print(header + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + table)


if __name__ == "__main__":
    main()
