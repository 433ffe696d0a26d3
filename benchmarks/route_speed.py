"""Benchmark: one routing decision, eldr (signature transform + similarities + band + choice) and
fewest-new-experts (activation + one matvec over the workers' live batches + score + recording the
dispatch).

Issue 2's goal: median <= 30 µs for K = 16 at L = 48, E = 128 (Qwen3-30B-A3B's shape; the paper's proxy
spends 0.15 ms); issue 16's: <= 50 µs for fewest-new-experts at K = 16. Reports p50/p99 for K = 16, 64,
256 (fewest-new-experts with 32 requests in flight per worker, each decision released after it is
timed, and the release's own time) and writes benchmarks/results/route_speed.md.

    python benchmarks/route_speed.py [--decisions 20000] [--out benchmarks/results/route_speed.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from eldr.calibrate import FitConfig, fit_partition
from eldr.policy import FewestNewExpertsPolicy, LocalityBandPolicy, RequestView, WorkersView
from eldr.synthetic import SyntheticCounts, planted_clusters
from provenance import commit, machine

NUM_LAYERS, NUM_EXPERTS, TOP_K = 48, 128, 8


def workload(num_workers: int, seed: int) -> SyntheticCounts:
    """Requests with planted clusters at Qwen3-30B-A3B's shape (at least 600, 2 per worker)."""
    return planted_clusters(
        max(2 * num_workers, 600),
        num_clusters=min(num_workers, 32),
        num_layers=NUM_LAYERS,
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        informative_layers=tuple(range(0, NUM_LAYERS, 4)),
        seed=seed,
    )


def time_decisions(num_workers: int, num_decisions: int, seed: int = 0) -> np.ndarray:
    data = workload(num_workers, seed)
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


def time_overlap(num_workers: int, num_decisions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fewest-new-experts: (choose µs, release µs) with 32 requests in flight on every worker."""
    data = workload(num_workers, seed)
    num_requests = len(data.prefill_counts)
    policy = FewestNewExpertsPolicy(num_workers, TOP_K, shape=(NUM_LAYERS, NUM_EXPERTS))
    rng = np.random.default_rng(seed)
    for j in range(32 * num_workers):
        policy.dispatch(RequestView(f"running-{j}", data.prefill_counts[j % num_requests]), j % num_workers)
    loads = [WorkersView.of(32 + rng.integers(0, 8, size=num_workers)) for _ in range(64)]
    clock = time.perf_counter_ns
    chose, released = np.empty(num_decisions), np.empty(num_decisions)
    for i in range(-500, num_decisions):  # the first 500: warm-up
        req = RequestView(str(i), data.prefill_counts[i % num_requests])
        start = clock()
        policy.choose(req, loads[i % len(loads)])
        middle = clock()
        policy.release(req.request_id)
        end = clock()
        if i >= 0:
            chose[i], released[i] = middle - start, end - middle
    return chose / 1000.0, released / 1000.0  # µs


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
    overlap_rows = []
    for k in (16, 64, 256):
        chose, released = time_overlap(k, args.decisions)
        overlap_rows.append(
            (
                k,
                *(
                    float(f(x))
                    for x in (chose, released)
                    for f in (np.median, lambda a: np.percentile(a, 99))
                ),
            )
        )
    header = (
        f"# Routing decision latency (L={NUM_LAYERS}, E={NUM_EXPERTS}, tau=0.1)\n\n"
        f"machine: {machine()}, numpy {np.__version__}; commit {commit()}; "
        f"command: `python benchmarks/route_speed.py --decisions {args.decisions}`\n\n"
        "## eldr (locality band)\n\n"
        "| K (workers) | p50 µs | p99 µs |\n|---:|---:|---:|\n"
    )
    table = "".join(f"| {k} | {p50:.1f} | {p99:.1f} |\n" for k, p50, p99 in rows)
    overlap = (
        "\n## fewest-new-experts (32 requests in flight per worker; goal: decision p50 <= 50 µs at K = 16)"
        "\n\n"
        "| K (workers) | decision p50 µs | decision p99 µs | release p50 µs | release p99 µs |\n"
        "|---:|---:|---:|---:|---:|\n"
        + "".join(f"| {k} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |\n" for k, a, b, c, d in overlap_rows)
    )
    print(header + table + overlap)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + table + overlap)


if __name__ == "__main__":
    main()
