"""`eldr route`: one routing decision for one request's counts, from the command line.

`--policy eldr` (default) routes by the partition's locality band; `--policy fewest-new-experts`
routes by the experts the workers' running requests (`--in-flight FILE.npz`, `eldr.inflight`) are
expected to use, plus a load term (`eldr.policy.expert_overlap`).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from eldr import strictjson
from eldr.commands.arguments import float_in, int_in, loads_value, tau_value
from eldr.countsfile import load_counts
from eldr.errors import ConfigError, InvalidInputError
from eldr.inflight import load_in_flight
from eldr.limits import MAX_LOAD, MAX_WORKERS
from eldr.partition import Partition
from eldr.policy import (
    DEFAULT_LAM,
    DEFAULT_TAU,
    FEWEST_NEW_EXPERTS,
    FewestNewExpertsPolicy,
    PolicyInputs,
    RequestView,
    WorkersView,
    build,
)

ROUTE_POLICIES = ("eldr", FEWEST_NEW_EXPERTS)
MAX_LAM = 1e6


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "route",
        help="route one request with the eldr locality-band policy (or fewest-new-experts)",
        description=(
            "eldr: compute the request's signature, its cosine similarity to every worker's centroid, the "
            "locality band {k : s_k >= max(s) - tau}, and the least-loaded worker in the band. "
            "fewest-new-experts: score every worker by the experts the request is expected to add to its "
            "running batch (--in-flight) plus a load term, and take the lowest (docs/simulator.md)."
        ),
    )
    p.add_argument(
        "--policy",
        choices=ROUTE_POLICIES,
        default="eldr",
        help="eldr (default; needs --partition) or fewest-new-experts (needs --in-flight)",
    )
    p.add_argument(
        "--partition",
        metavar="PART.npz",
        help="partition from `eldr fit` (eldr; for fewest-new-experts it only supplies top_k)",
    )
    p.add_argument(
        "--counts",
        required=True,
        metavar="COUNTS.npy",
        help="the request's prefill expert counts [L,E], or per-token top-k ids [T,L,k]",
    )
    p.add_argument(
        "--loads",
        type=loads_value,
        required=True,
        metavar="N,N,...",
        help="in-flight decode requests per worker, comma-separated, one per partition worker "
        f"(each 0 to {MAX_LOAD}, at most {MAX_WORKERS} workers)",
    )
    p.add_argument(
        "--tau",
        type=tau_value,
        default=DEFAULT_TAU,
        help=f"band width (default {DEFAULT_TAU}; 0 = pure locality, 1 = JSQ)",
    )
    p.add_argument(
        "--in-flight",
        metavar="FILE.npz",
        help="fewest-new-experts: the running requests, counts [M,L,E] (prefill expert counts) and "
        "worker [M] (their decode worker, 0-based); M may be 0",
    )
    p.add_argument(
        "--top-k",
        type=int_in(1, 4096),
        help="fewest-new-experts: experts per token (default: the --partition's top_k)",
    )
    p.add_argument(
        "--lam",
        type=float_in(0.0, MAX_LAM),
        default=DEFAULT_LAM,
        help=f"fewest-new-experts: load weight in expert reads per in-flight request (default "
        f"{DEFAULT_LAM:.1f}: Qwen3-30B-A3B on MI300X)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.policy == FEWEST_NEW_EXPERTS:
        return run_overlap(args)
    if args.partition is None:
        raise ConfigError("--policy eldr needs --partition (fit one with `eldr fit`)")
    part = Partition.load(args.partition)
    part.check_fits(num_workers=len(args.loads))
    counts = load_counts(args.counts, num_experts=part.num_experts)
    try:
        part.transform.check_shape(counts)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{args.counts}: {exc}") from exc
    loads: list[int] = args.loads
    policy = build("eldr", PolicyInputs(num_workers=len(loads), tau=args.tau, partition=part))
    decision = policy.choose(RequestView(counts=counts), WorkersView.of(loads))
    sims = [] if decision.similarities is None else [round(float(s), 6) for s in decision.similarities]
    out = {
        "worker": decision.worker,
        "similarities": sims,
        "band": list(decision.band),
        "is_fallback": decision.is_fallback,
    }
    if args.json:
        print(strictjson.dumps(out))
    elif decision.is_fallback:
        print(f"worker {decision.worker} (no usable signature: all-zero counts, routed by JSQ)")
    else:
        print(
            f"worker {decision.worker}  band {list(decision.band)}  "
            f"similarity {sims[decision.worker]:.4f} (best {max(sims):.4f})"
        )
    return 0


def run_overlap(args: argparse.Namespace) -> int:
    """`--policy fewest-new-experts`: seed the policy with the running requests, then route one."""
    if args.in_flight is None:
        raise ConfigError(f"--policy {FEWEST_NEW_EXPERTS} needs --in-flight (M = 0 for an idle pool)")
    loads: list[int] = args.loads
    part = Partition.load(args.partition) if args.partition else None
    top_k = args.top_k or (part.top_k if part is not None else None)
    if top_k is None:
        raise ConfigError(f"--policy {FEWEST_NEW_EXPERTS} needs --top-k (or a --partition that records it)")
    running = load_in_flight(args.in_flight, num_workers=len(loads))
    shape = (int(running.counts.shape[1]), int(running.counts.shape[2]))
    if part is not None and (part.num_layers, part.num_experts) != shape:
        raise InvalidInputError(
            f"{args.in_flight}: counts are L x E = {shape[0]} x {shape[1]}, the partition's "
            f"{part.num_layers} x {part.num_experts}"
        )
    per_worker = np.bincount(running.worker, minlength=len(loads))
    short = [w for w in range(len(loads)) if loads[w] < per_worker[w]]
    if short:
        raise InvalidInputError(
            f"--loads gives worker {short[0]} {loads[short[0]]} in-flight requests, --in-flight lists "
            f"{int(per_worker[short[0]])}"
        )
    counts = load_counts(args.counts, num_experts=shape[1])
    if counts.shape != shape:
        raise InvalidInputError(f"{args.counts}: counts are {counts.shape}, the in-flight requests' {shape}")
    policy = build(
        FEWEST_NEW_EXPERTS, PolicyInputs(num_workers=len(loads), top_k=top_k, lam=args.lam, shape=shape)
    )
    assert isinstance(policy, FewestNewExpertsPolicy)
    for j in range(running.num_requests):
        policy.dispatch(RequestView(f"in-flight-{j}", running.counts[j]), int(running.worker[j]))
    view = WorkersView.of(loads)
    scores = policy.scores(RequestView("request", counts), view)
    decision = policy.choose(RequestView("request", counts), view)
    out = {
        "worker": decision.worker,
        "policy": FEWEST_NEW_EXPERTS,
        "scores": [] if scores is None else [None if np.isinf(x) else round(float(x), 4) for x in scores],
        "lam": args.lam,
        "is_fallback": decision.is_fallback,
    }
    if args.json:
        print(strictjson.dumps(out))
    elif decision.is_fallback:
        print(f"worker {decision.worker} (no usable counts: all zero, routed by JSQ)")
    else:
        assert scores is not None
        rest = np.delete(scores, decision.worker)
        runner_up = f" (next best {float(rest.min()):.2f})" if rest.size else ""
        print(f"worker {decision.worker}  score {float(scores[decision.worker]):.2f}{runner_up}")
    return 0
