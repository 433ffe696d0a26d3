"""`eldr route`: one routing decision for one request's counts, from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from eldr.commands.arguments import tau_value
from eldr.errors import InputFileError, InvalidInputError
from eldr.partition import Partition
from eldr.policy import DEFAULT_TAU, LocalityBandPolicy, RequestView, WorkersView
from eldr.signature import as_counts, counts_from_topk


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "route",
        help="route one request with the eldr locality-band policy",
        description=(
            "Compute the request's signature, its cosine similarity to every worker's centroid, the "
            "locality band {k : s_k >= max(s) - tau}, and the least-loaded worker in the band."
        ),
    )
    p.add_argument("--partition", required=True, metavar="PART.npz", help="partition from `eldr fit`")
    p.add_argument(
        "--counts",
        required=True,
        metavar="COUNTS.npy",
        help="the request's prefill expert counts [L,E], or per-token top-k ids [T,L,k]",
    )
    p.add_argument(
        "--loads",
        required=True,
        metavar="N,N,...",
        help="in-flight decode requests per worker, comma-separated, one per partition worker",
    )
    p.add_argument(
        "--tau",
        type=tau_value,
        default=DEFAULT_TAU,
        help=f"band width (default {DEFAULT_TAU}; 0 = pure locality, 1 = JSQ)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def parse_loads(text: str) -> list[int]:
    try:
        loads = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"--loads must be comma-separated integers, got {text!r}") from exc
    if not loads or min(loads) < 0:
        raise InvalidInputError(f"--loads must be non-negative integers, got {text!r}")
    return loads


def run(args: argparse.Namespace) -> int:
    part = Partition.load(args.partition)
    try:
        raw = np.load(args.counts, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputFileError(f"cannot read counts {args.counts}: {exc}") from exc
    counts = counts_from_topk(raw, part.num_experts) if raw.ndim == 3 else as_counts(raw, ndim=2)
    part.transform.check_shape(counts)
    loads = parse_loads(args.loads)
    part.check_fits(num_workers=len(loads))
    policy = LocalityBandPolicy(part, tau=args.tau)
    decision = policy.choose(RequestView(counts=counts), WorkersView.of(loads))
    sims = [] if decision.similarities is None else [round(float(s), 6) for s in decision.similarities]
    out = {
        "worker": decision.worker,
        "similarities": sims,
        "band": list(decision.band),
        "is_fallback": decision.is_fallback,
    }
    if args.json:
        print(json.dumps(out))
    elif decision.is_fallback:
        print(f"worker {decision.worker} (no usable signature: all-zero counts, routed by JSQ)")
    else:
        print(
            f"worker {decision.worker}  band {list(decision.band)}  "
            f"similarity {sims[decision.worker]:.4f} (best {max(sims):.4f})"
        )
    return 0
