"""`eldr simulate`: run the routing policies through the decode-pool simulator on a trace."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import Any

from eldr import strictjson
from eldr.atomicfile import atomic_path, check_output_path
from eldr.commands.arguments import float_in, int_in, seed_value, tau_value, workers_value
from eldr.errors import InvalidInputError
from eldr.limits import (
    MAX_BATCH,
    MAX_BYTES_ENV,
    MAX_KV_TOKENS,
    MAX_RATE,
    MAX_REFIT_WINDOW,
    MAX_REQUESTS,
    MAX_TOKENS,
    MAX_WORKERS,
    max_bytes,
    size_text,
)
from eldr.policy import DEFAULT_TAU, FEWEST_NEW_EXPERTS, POLICY_NAMES, SERVE_POLICIES
from eldr.policy.refit import DEFAULT_REFIT_WINDOW, REFIT_POLICY

DEFAULT_POLICIES = "rr,random,jsq,p2c,domain,eldr,oracle"
MAX_LAM = 1e6
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="simulate a decode pool under each routing policy on a trace",
        description=(
            "Discrete-event simulation of D decode workers with continuous batching. Every decode step "
            "costs base + per-request + per-distinct-expert per MoE layer + attention on context "
            "(a cost-model preset). The eldr and domain policies are fitted on calibration requests. "
            "Prints TPOT p50/p99, TTFT p50, distinct experts per step and load imbalance per policy."
        ),
    )
    add_sim_arguments(p)
    p.add_argument("--trace", required=True, metavar="TRACE.npz", help="trace file (docs/trace-format.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="also write a plot of the results (needs eldr[plot])")
    p.set_defaults(func=run)


def cost_model_name(value: str) -> str:
    """argparse type of --cost-model: a preset's name or a path ending in .json (read at run time)."""
    from eldr.sim.presets import PRESETS

    if value in PRESETS or value.endswith(".json"):
        return value
    raise argparse.ArgumentTypeError(
        f"unknown cost model {value!r}; choose one of {', '.join(sorted(PRESETS))} or give a FILE.json"
    )


def add_sim_arguments(p: argparse.ArgumentParser, *, default_rate: float | None = None) -> None:
    """Flags shared by `eldr simulate` and `eldr demo`."""
    from eldr.policy import ABLATION_POLICIES
    from eldr.policy.refit import REFIT_POLICY
    from eldr.sim.costmodel import LAYER_MAPS
    from eldr.sim.presets import PRESETS
    from eldr.sim.tokens import SAMPLERS
    from eldr.sim.workload import DECODE_MODES

    p.add_argument(
        "--workers", type=workers_value, default=16, help=f"decode workers, 1 to {MAX_WORKERS} (default 16)"
    )
    p.add_argument(
        "--rate",
        type=float_in(0.0, MAX_RATE, is_low_open=True),
        default=default_rate,
        help=f"re-time arrivals as Poisson at this many req/s, (0, {MAX_RATE:g}] (default: the trace's "
        "arrival_s)"
        if default_rate is None
        else f"Poisson arrival rate in req/s, (0, {MAX_RATE:g}] (default {default_rate:g})",
    )
    p.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma-separated policies to compare, from {','.join(POLICY_NAMES)} (`eldr serve` runs "
        f"{','.join(SERVE_POLICIES)}; domain and oracle are simulation-only) (default: "
        f"{DEFAULT_POLICIES}), "
        f"or {REFIT_POLICY} (eldr with online refit: --refit-every, --refit-window), or the signature "
        f"ablations {','.join(ABLATION_POLICIES)} (eldr without IDF / layer mask / "
        "balanced k-means, fitted like eldr; never --partition)",
    )
    p.add_argument(
        "--tau",
        type=tau_value,
        default=DEFAULT_TAU,
        help=f"eldr band width, finite and >= 0 (default {DEFAULT_TAU}; 0 = pure locality, 1 = JSQ)",
    )
    p.add_argument(
        "--refit-every",
        type=int_in(1, MAX_REQUESTS),
        default=500,
        help="eldr-refit: refit the centroids after this many routed signatures, as `eldr serve "
        "--refit-every` does (default 500)",
    )
    p.add_argument(
        "--refit-window",
        type=int_in(1, MAX_REFIT_WINDOW),
        default=DEFAULT_REFIT_WINDOW,
        help=f"eldr-refit: recent signatures a refit clusters, >= --workers (default {DEFAULT_REFIT_WINDOW})",
    )
    p.add_argument(
        "--lam",
        type=float_in(0.0, MAX_LAM),
        help=f"{FEWEST_NEW_EXPERTS}: load weight in expert reads per in-flight request, [0, {MAX_LAM:g}] "
        "(default: derived from the cost model and the mean context; docs/simulator.md)",
    )
    p.add_argument(
        "--cost-model",
        type=cost_model_name,
        default="mi300x-qwen3-30b",
        metavar="{" + ",".join(sorted(PRESETS)) + "} or FILE.json",
        help="step-cost preset (default mi300x-qwen3-30b), or a cost model fitted elsewhere as JSON, "
        "e.g. by benchmarks/real_engines.py (docs/simulator.md)",
    )
    p.add_argument(
        "--seed", type=seed_value, default=0, help="seed for arrivals, token sampling and policies, >= 0"
    )
    p.add_argument(
        "--calibration",
        metavar="FILE.npz",
        help="fit eldr/domain/oracle on this trace or CAL.npz (default: the trace's `calibration` "
        "requests, else its first --num-calibration requests, which are then not measured)",
    )
    p.add_argument(
        "--num-calibration",
        type=int_in(1, MAX_REQUESTS),
        default=1000,
        help=f"requests held out for calibration when the trace flags none, 1 to {MAX_REQUESTS} "
        "(default 1000)",
    )
    p.add_argument(
        "--kmeans",
        choices=("balanced", "plain"),
        default="balanced",
        help="k-means for the eldr/oracle partitions: balanced (paper, default) or plain (ablation)",
    )
    p.add_argument(
        "--partition", metavar="PART.npz", help="route eldr with this partition instead of fitting one"
    )
    p.add_argument(
        "--max-batch",
        type=int_in(1, MAX_BATCH),
        help=f"decode batch limit per worker, 1 to {MAX_BATCH} (default: the preset's)",
    )
    p.add_argument(
        "--kv-capacity",
        type=int_in(1, MAX_KV_TOKENS),
        help="KV-cache tokens per worker, >= 1 (default: the preset's)",
    )
    p.add_argument(
        "--requests",
        type=int_in(1, MAX_REQUESTS),
        help=f"simulate at most this many measured requests, 1 to {MAX_REQUESTS}",
    )
    p.add_argument(
        "--output-tokens",
        type=int_in(1, MAX_TOKENS),
        help=f"every request generates exactly this many tokens, 1 to {MAX_TOKENS} (paper: 512)",
    )
    p.add_argument(
        "--layer-map",
        choices=LAYER_MAPS,
        default="nearest",
        help="how recorded layers drive the model's layers: nearest relative depth (default) or uniform",
    )
    p.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default="auto",
        help="per-token experts: replay decode_topk when the trace has it (auto, default), or sample",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="gumbel",
        help="how sampled tokens draw k experts from decode counts: gumbel (successive, default) or "
        "systematic (keeps each expert's per-token frequency exactly)",
    )


def experiment_of(args: argparse.Namespace) -> Any:
    from eldr.sim.experiment import Experiment, check_policies
    from eldr.sim.workload import WorkloadConfig

    return Experiment(
        policies=check_policies(args.policies.split(",")),
        num_workers=args.workers,
        tau=args.tau,
        lam=args.lam,
        refit_every=args.refit_every,
        refit_window=args.refit_window,
        is_balanced=args.kmeans == "balanced",
        max_batch=args.max_batch,
        kv_capacity_tokens=args.kv_capacity,
        layer_map=args.layer_map,
        workload=WorkloadConfig(
            rate=args.rate,
            num_requests=args.requests,
            output_tokens=args.output_tokens,
            num_calibration=args.num_calibration,
            decode=args.decode,
            sampler=args.sampler,
            seed=args.seed,
        ),
    )


def run(args: argparse.Namespace) -> int:
    from eldr.trace.format import Trace

    if args.plot is not None:
        from eldr.sim.plot import pyplot

        check_plot_path(args.plot)
        pyplot()  # fail fast, before simulating, when matplotlib is missing
    experiment_of(args)  # settings checked before the trace is read
    needs_exact = args.decode == "replay" or (args.decode == "auto" and args.output_tokens is None)
    trace = Trace.load(args.trace, with_exact_decode=needs_exact)
    return simulate_and_report(args, trace, str(args.trace))


def check_plot_path(path: str) -> None:
    """Refuse, before simulating, a plot path that cannot be written or a format matplotlib lacks."""
    target = check_output_path(path, "plot")
    if target.suffix and target.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise InvalidInputError(
            f"plot {path}: unknown image format {target.suffix!r}; use one of .{', .'.join(PLOT_FORMATS)}"
        )


def check_plan_size(args: argparse.Namespace, trace: Any) -> None:
    """Refuse a run whose per-token expert plan would exceed the memory budget (`ELDR_MAX_BYTES`)."""
    words = -(-int(trace.num_experts) // 64)
    num_requests = min(args.requests or trace.num_requests, trace.num_requests)
    if args.output_tokens is not None:
        num_tokens = num_requests * args.output_tokens
    else:
        num_tokens = int(trace.output_tokens.sum())
    plan_bytes = num_tokens * int(trace.num_layers) * words * 8
    budget = max_bytes()
    if plan_bytes > budget:
        raise InvalidInputError(
            f"{num_requests} requests x their output tokens ({num_tokens} decode tokens) would need a "
            f"{size_text(plan_bytes)} token plan, above the limit of {size_text(budget)}: lower "
            f"--requests or --output-tokens (or raise {MAX_BYTES_ENV})"
        )


def simulate_and_report(args: argparse.Namespace, trace: Any, trace_name: str) -> int:
    from rich.console import Console
    from rich.markup import escape

    from eldr.calibrate import check_fit_size
    from eldr.calibration_data import load_calibration
    from eldr.partition import Partition
    from eldr.sim.experiment import run_experiment
    from eldr.sim.presets import preset
    from eldr.sim.report import gain_lines, render_table, to_json

    experiment = experiment_of(args)
    cost = preset(args.cost_model)
    check_plan_size(args, trace)
    calibration = load_calibration(args.calibration) if args.calibration else None
    if calibration is not None:
        num_calibration = calibration.num_requests
    elif trace.calibration is not None and trace.calibration.any():
        num_calibration = int(trace.calibration.sum())
    else:
        num_calibration = min(args.num_calibration, trace.num_requests)
    fitted = {"oracle", "eldr-raw", "eldr-all-layers"} | (
        {"eldr", REFIT_POLICY} if args.partition is None else set()
    )
    if experiment.is_balanced and fitted & set(experiment.policies):  # only what is fitted, balanced
        check_fit_size(num_calibration, experiment.num_workers, max_bytes())
    partition = Partition.load(args.partition) if args.partition else None
    if partition is not None:
        partition.check_fits(
            num_workers=experiment.num_workers, num_layers=trace.num_layers, num_experts=trace.num_experts
        )
    show_progress = not args.json and sys.stderr.isatty()
    with ExitStack() as stack:
        on_policy = None
        if show_progress:
            from rich.progress import Progress

            bar = stack.enter_context(Progress(console=Console(stderr=True), transient=True))

            def on_policy(name: str, total: int) -> Any:
                task = bar.add_task(f"simulating {name}", total=total)
                return lambda done: bar.advance(task, done)

        outcome = run_experiment(
            trace, experiment, cost, calibration=calibration, partition=partition, on_policy=on_policy
        )
    settings = {
        "trace": trace_name,
        "workers": experiment.num_workers,
        "rate": args.rate,
        "tau": experiment.tau,
        "lam": outcome.lam,
        "cost_model": cost.name,
        "seed": args.seed,
        "kmeans": args.kmeans,
        "num_calibration": outcome.num_calibration,
        "num_measured": next(iter(outcome.metrics.values())).num_requests,
        "output_tokens": args.output_tokens,
        "layer_map": experiment.layer_map,
        "sampler": args.sampler,
        **(
            {"refit_every": experiment.refit_every, "refit_window": experiment.refit_window}
            if REFIT_POLICY in experiment.policies
            else {}
        ),
    }
    if args.plot:
        from eldr.sim.plot import plot_policies

        title = f"{trace_name}: {experiment.num_workers} workers, {args.rate or 'trace'} req/s, {cost.name}"
        with atomic_path(args.plot, "plot") as temp:
            plot_policies(outcome.metrics, outcome.runs, str(temp), title)
    if args.json:
        print(strictjson.dumps(to_json(outcome.metrics, settings)))
        return 0
    console = Console(width=max(Console().width, 120))
    rate = f"{args.rate:g} req/s Poisson" if args.rate else "trace arrivals"
    console.print(
        render_table(
            outcome.metrics,
            f"{escape(trace_name)}: {settings['num_measured']} requests, "
            f"{experiment.num_workers} decode workers, {rate}, {cost.name}, tau {experiment.tau:g}, "
            f"seed {args.seed}",
        )
    )
    for line in gain_lines(outcome.metrics):
        console.print(line)
    console.print(
        "experts/step: distinct experts per decode step summed over the trace's recorded layers; "
        "imbalance: time-averaged max/mean in-flight"
    )
    if args.plot:
        console.print(f"wrote {args.plot}")
    return 0
