"""`eldr fit`: calibration file -> partition file."""

from __future__ import annotations

import argparse
from typing import Any

from eldr import strictjson
from eldr.atomicfile import check_output_path
from eldr.calibrate import LAYER_SELECTIONS, WEIGHTINGS, FitConfig, check_fit_size, fit_partition
from eldr.calibration_data import load_calibration
from eldr.commands.arguments import int_in, seed_value, workers_value
from eldr.limits import MAX_ITER, MAX_PAIRS, MAX_WORKERS, MIN_PAIRS, max_bytes


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "fit",
        help="fit a partition (signature transform + one centroid per decode worker)",
        description=(
            "Fit IDF weights, the greedy layer mask (when decode counts are given) and balanced "
            "spherical k-means with one centroid per decode worker, and write the partition file "
            "that `eldr route`, `eldr simulate` and `eldr serve` read. --weighting raw, --layers all and "
            "--kmeans plain switch one ingredient off each (the paper's ablations)."
        ),
    )
    p.add_argument(
        "--calibration",
        required=True,
        metavar="CAL.npz",
        help="calibration file: prefill_counts [N,L,E], optional decode_counts [N,L,E], labels [N]",
    )
    p.add_argument(
        "--workers",
        type=workers_value,
        required=True,
        metavar="K",
        help=f"number of decode workers, 1 to {MAX_WORKERS}",
    )
    p.add_argument(
        "--seed", type=seed_value, default=1, help="seed for k-means++ and pair sampling, >= 0 (default 1)"
    )
    p.add_argument(
        "--kmeans",
        choices=("balanced", "plain"),
        default="balanced",
        help="balanced (cluster size <= ceil(N/K), default) or plain spherical k-means (ablation)",
    )
    p.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default="idf",
        help="idf: counts x log((N+1)/(df+1)) (default); raw: counts without IDF, stored as IDF weights "
        "of ones, and the layer mask ranks unweighted counts (ablation)",
    )
    p.add_argument(
        "--layers",
        choices=LAYER_SELECTIONS,
        default="greedy",
        help="greedy: the layer mask by Spearman rho against decode counts, when given (default); "
        "all: keep every layer, no mask and no rho (ablation)",
    )
    p.add_argument(
        "--max-iter",
        type=int_in(1, MAX_ITER),
        default=50,
        help=f"k-means iterations at most, 1 to {MAX_ITER} (default 50)",
    )
    p.add_argument(
        "--pairs",
        type=int_in(MIN_PAIRS, MAX_PAIRS),
        default=30_000,
        help=f"request pairs sampled for the layer mask, {MIN_PAIRS} to {MAX_PAIRS} (default 30000)",
    )
    p.add_argument("--out", required=True, metavar="PART.npz", help="partition file to write")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_path(args.out, "partition")
    cal = load_calibration(args.calibration)
    check_fit_size(cal.num_requests, args.workers, max_bytes())
    config = FitConfig(
        num_workers=args.workers,
        seed=args.seed,
        is_balanced=args.kmeans == "balanced",
        max_iter=args.max_iter,
        num_pairs=args.pairs,
        weighting=args.weighting,
        layer_selection=args.layers,
    )
    part = fit_partition(cal.prefill_counts, config, decode_counts=cal.decode_counts, top_k=cal.top_k)
    part.save(args.out)
    meta = part.meta
    summary = {
        "out": str(args.out),
        "num_requests": cal.num_requests,
        "num_layers": part.num_layers,
        "num_experts": part.num_experts,
        "workers": part.num_workers,
        "kmeans": meta["kmeans"],
        "weighting": meta["weighting"],
        "layer_selection": meta["layer_selection"],
        "cluster_sizes": meta["cluster_sizes"],
        "kept_layers": list(part.transform.layers),
        "rho": meta["rho"],
        "iterations": meta["num_iterations"],
        "converged": meta["is_converged"],
        "fit_seconds": round(meta["fit_seconds"], 4),
    }
    if args.json:
        print(strictjson.dumps(summary))
        return 0
    if meta["rho"] is not None:
        rho = f"{meta['rho']:.4f}"
    elif meta["layer_selection"] == "all":
        rho = "n/a (--layers all: all layers kept)"
    else:
        rho = "n/a (no decode_counts: all layers kept)"
    print(
        f"fitted {part.num_workers} workers from {cal.num_requests} requests "
        f"({part.num_layers} layers x {part.num_experts} experts) in {meta['fit_seconds']:.2f} s"
    )
    print(
        f"  kept layers   : {len(part.transform.layers)} of {part.num_layers}: "
        f"{sorted(part.transform.layers)}"
    )
    print(f"  peak rho      : {rho}")
    print(f"  weighting     : {meta['weighting']}")
    print(f"  cluster sizes : {meta['cluster_sizes']}")
    print(
        f"  k-means       : {meta['kmeans']}, {meta['num_iterations']} iterations, "
        f"{'converged' if meta['is_converged'] else 'not converged'}"
    )
    print(f"  wrote         : {args.out}")
    return 0
