"""Benchmark: simulator wall time and peak memory for 10,000 and 50,000 requests on 16 workers.

Issue 3's goal: 10,000 requests with up to 512 output tokens on 16 workers in at most 60 s here.
Each size runs in its own process (so its peak RSS is its own): a synthetic trace with 4 planted
clusters, 3 layers x 64 experts, top-8 (OLMoE's shape), prompts 16..128, outputs uniform in 1..512,
1,000 calibration requests + N measured at 60 req/s, mi300x-qwen3-30b. Reported: token-plan sampling
time, each policy's simulation time (eldr includes fitting its partition), total, peak RSS.

    python benchmarks/sim_speed.py [--sizes 10000,50000] [--out benchmarks/results/sim_speed.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from provenance import commit

POLICIES = {10_000: "rr,random,jsq,p2c,domain,eldr,oracle", 50_000: "rr,jsq,eldr"}


def one_size(num_requests: int, policies: str) -> dict[str, object]:
    from eldr.sim.experiment import Experiment, run_experiment
    from eldr.sim.presets import preset
    from eldr.sim.workload import WorkloadConfig
    from eldr.synthetic import planted_clusters
    from eldr.trace.format import Trace

    total = num_requests + 1000
    rng = np.random.default_rng(0)
    out = rng.integers(1, 513, size=total)
    syn = planted_clusters(total, num_layers=3, num_experts=64, top_k=8, informative_layers=(0, 1, 2), seed=0)
    decode = syn.decode_counts  # 64 tokens' worth: sampling uses its distribution, lengths come from `out`
    trace = Trace(
        prefill_counts=syn.prefill_counts,
        decode_counts=decode,
        prompt_tokens=syn.prompt_tokens,
        output_tokens=out.astype(np.int64),
        arrival_s=np.arange(total) / 60.0,
        top_k=8,
        layers=np.array([0, 7, 15]),
        num_model_layers=16,
        domain=np.array([f"d{x}" for x in syn.labels]),
    )
    marks: list[tuple[str, float]] = []
    started = time.perf_counter()
    cpu_started = time.process_time()

    def on_policy(name: str, n: int) -> None:
        marks.append((name, time.perf_counter()))
        return None

    names = tuple(policies.split(","))
    outcome = run_experiment(
        trace,
        Experiment(policies=names, workload=WorkloadConfig(rate=60.0, seed=0)),
        preset("mi300x-qwen3-30b"),
        on_policy=on_policy,  # type: ignore[arg-type]
    )
    ended = time.perf_counter()
    stamps = [t for _, t in marks] + [ended]
    per_policy = {name: stamps[i + 1] - stamps[i] for i, (name, _) in enumerate(marks)}
    # the first mark comes after the calibration split and the token plan
    return {
        "num_requests": num_requests,
        "output_tokens": int(out[1000:].sum()),
        "plan_and_setup_s": marks[0][1] - started,
        "per_policy_s": per_policy,
        "total_s": ended - started,
        "total_cpu_s": time.process_time() - cpu_started,
        "load_average_1min": os.getloadavg()[0],
        "steps": {n: m.num_steps for n, m in outcome.metrics.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="10000,50000", help="measured requests per run (default 10000,50000)"
    )
    parser.add_argument("--out", default="benchmarks/results/sim_speed.md", help="results file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policies", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_size(args.child, args.policies)))
        return 0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        policies = POLICIES.get(size, "rr,eldr")
        cmd = [sys.executable, __file__, "--child", str(size), "--policies", policies]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Simulator speed",
        "",
        f"machine: {platform.node()} ({platform.machine()}, 2-core shared VM, no GPU); commit {commit()}; "
        f"command: `python benchmarks/sim_speed.py {' '.join(sys.argv[1:])}`",
        "synthetic OLMoE-shaped trace (3 layers x 64 experts, top-8), outputs uniform 1..512, 60 req/s, "
        "16 workers, mi300x-qwen3-30b; each size in its own process",
        "",
        "Wall times depend on what else runs on the shared 2-core VM (load average in the last column); "
        "CPU seconds of the process are the steadier number.",
        "",
        "| requests | output tokens | plan + setup s | per policy s (wall) | total wall s | total CPU s "
        "| peak RSS MB | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{k} {v:.1f}" for k, v in r["per_policy_s"].items())
        lines.append(
            f"| {r['num_requests']:,} | {r['output_tokens']:,} | {r['plan_and_setup_s']:.1f} | {per} | "
            f"{r['total_s']:.1f} | {r['total_cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['load_average_1min']:.1f} |"
        )
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
