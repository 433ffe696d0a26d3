"""`eldr trace`: build traces from real MoE routing (`build olmoe`) and inspect them (`info`)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from eldr import strictjson
from eldr.atomicfile import check_output_path
from eldr.commands.arguments import float_in, int_in, int_list, nonempty_text, seed_value
from eldr.errors import InvalidInputError
from eldr.limits import (
    MAX_BATCH,
    MAX_BATCH_SIZES,
    MAX_BYTES_ENV,
    MAX_DOMAINS,
    MAX_RATE,
    MAX_REQUESTS,
    MAX_STEPS,
    MAX_TOKENS,
    max_bytes,
    size_text,
)
from eldr.trace.format import Trace

DEFAULT_DATA_DIR = "../shared/data"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "trace",
        help="build request traces from real MoE routing, or validate and summarise one",
        description="Build request traces from real expert routing (`build`) or inspect a trace (`info`).",
    )
    actions = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    _register_build(actions)
    _register_info(actions)


def _register_build(actions: Any) -> None:
    build: argparse.ArgumentParser = actions.add_parser(
        "build",
        help="build a trace from real routing data",
        description="Build a trace from real routing data.",
    )
    sources = build.add_subparsers(dest="source", required=True, metavar="SOURCE")
    p: argparse.ArgumentParser = sources.add_parser(
        "olmoe",
        help="a 4-domain Task-like trace from OLMoE-1B-7B's real routing (arXiv, books, GitHub, Wikipedia)",
        description=(
            "Build a trace whose requests are windows of four real domain texts (a prompt window and the "
            "continuation standing for the generated tokens), each token routed from OLMoE-1B-7B's real "
            "top-8 routing at layers 0, 7, 15; lengths from the Azure 2023 trace; Poisson or replayed "
            "arrivals. The first --calibration arrivals are flagged `calibration` and come from a text "
            "region disjoint from the others'. See docs/trace-format.md."
        ),
    )
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"the shared data folder with olmoe/ and workloads/ (default {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--num-requests",
        type=int_in(1, MAX_REQUESTS),
        required=True,
        metavar="N",
        help=f"requests in the trace, 1 to {MAX_REQUESTS}",
    )
    arrivals = p.add_mutually_exclusive_group()
    arrivals.add_argument(
        "--rate",
        type=float_in(0.0, MAX_RATE, is_low_open=True),
        default=60.0,
        metavar="R",
        help=f"Poisson arrivals at R requests/s, (0, {MAX_RATE:g}] (default 60)",
    )
    arrivals.add_argument(
        "--replay-azure",
        action="store_true",
        help="replay the Azure trace's own timestamps (consecutive rows from its start) instead of Poisson",
    )
    p.add_argument(
        "--azure",
        choices=("conv", "code"),
        default="conv",
        help="which Azure 2023 trace gives lengths (and replayed arrivals): conv (default) or code",
    )
    p.add_argument(
        "--max-prompt",
        type=int_in(1, MAX_TOKENS),
        default=1024,
        help=f"clip prompt lengths to this many tokens, 1 to {MAX_TOKENS} (default 1024)",
    )
    p.add_argument(
        "--max-output",
        type=int_in(1, MAX_TOKENS),
        default=512,
        help=f"clip output lengths to this many tokens, 1 to {MAX_TOKENS} (default 512)",
    )
    p.add_argument(
        "--calibration",
        type=int_in(0, MAX_REQUESTS),
        default=1000,
        metavar="M",
        help="the first M arrivals are calibration requests from a disjoint text region (default 1000)",
    )
    p.add_argument(
        "--calibration-fraction",
        type=float_in(0.0, 0.99, is_low_open=True),
        default=0.2,
        metavar="F",
        help="share of each domain's routed tokens reserved for calibration requests, (0, 0.99] "
        "(default 0.2)",
    )
    p.add_argument(
        "--mix",
        type=nonempty_text,
        default=None,
        metavar="D=W,...",
        help=(
            "domain weights, e.g. book=1,github=1 (default: the paper's Task sizes "
            "book=3600,github=2779,arxiv=2744,wikipedia=2545)"
        ),
    )
    p.add_argument("--seed", type=seed_value, default=0, help="seed for every random draw, >= 0 (default 0)")
    p.add_argument(
        "--exact-decode",
        action="store_true",
        help="also store every decode token's top-k (decode_topk uint8 + decode_offsets): larger file",
    )
    p.add_argument("--out", required=True, metavar="T.npz", help="trace file to write")
    p.set_defaults(func=run_build)


def _register_info(actions: Any) -> None:
    p: argparse.ArgumentParser = actions.add_parser(
        "info",
        help="validate a trace and print its size, domains, lengths and locality statistics",
        description=(
            "Validate a trace file and print N, L, E, k, domains, prompt/output length statistics, the "
            "prefill-decode correlations and distinct experts per step in same-domain versus mixed "
            "batches (definitions in docs/trace-format.md). A malformed file is one line and exit 2."
        ),
    )
    p.add_argument("trace", metavar="T.npz", help="trace file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--batch-sizes",
        type=int_list(1, MAX_BATCH, max_items=MAX_BATCH_SIZES),
        default=[16, 64],
        metavar="B,...",
        help=f"batch sizes for the distinct-experts comparison, up to {MAX_BATCH_SIZES} values in "
        f"[1, {MAX_BATCH}] (default 16,64)",
    )
    p.add_argument(
        "--steps",
        type=int_in(1, MAX_STEPS),
        default=200,
        help=f"sampled decode steps per batch comparison, 1 to {MAX_STEPS} (default 200)",
    )
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the sampled batches, >= 0 (default 0)")
    p.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from eldr.trace.olmoe import PAPER_MIX, OlmoeConfig, build_olmoe_trace, parse_mix

    check_output_path(args.out, "trace")
    mix = PAPER_MIX if args.mix is None else parse_mix(args.mix)
    config = OlmoeConfig(
        num_requests=args.num_requests,
        num_calibration=args.calibration,
        rate=args.rate,
        is_replay=args.replay_azure,
        azure=args.azure,
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        calibration_fraction=args.calibration_fraction,
        mix=mix,
        seed=args.seed,
        is_exact_decode=args.exact_decode,
    )
    started = time.perf_counter()
    num_domains = sum(1 for _, weight in mix if weight > 0)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task("routing texts", total=num_domains)

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)

        trace = build_olmoe_trace(Path(args.data_dir), config, on_step=advance)
    trace.save(args.out)
    elapsed = time.perf_counter() - started
    clip = trace.meta["clipping"]
    num_calibration = int(trace.calibration.sum()) if trace.calibration is not None else 0
    print(
        f"wrote {args.out}: {trace.num_requests} requests ({num_calibration} "
        f"calibration), L={trace.num_layers} E={trace.num_experts} k={trace.top_k} in {elapsed:.1f} s"
    )
    print(
        f"  clipped: {clip['prompt_clipped']} prompts > {args.max_prompt}, "
        f"{clip['output_clipped']} outputs > {args.max_output}, "
        f"{clip['cut_to_fit_region']} cut to fit their text region"
    )
    return 0


def _describe(values: np.ndarray[Any, Any]) -> dict[str, float]:
    return {
        "min": float(values.min()),
        "p50": float(np.median(values)),
        "mean": float(values.mean()),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }


def summarise(trace: Trace, batch_sizes: list[int], num_steps: int, seed: int) -> dict[str, Any]:
    """Everything `trace info` prints, as one JSON-ready dict."""
    from eldr.trace.stats import batch_locality, conservation_violations, correlations

    domains: dict[str, int] = {}
    if trace.domain is not None:
        names, counts = np.unique(trace.domain, return_counts=True)
        domains = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
    corr = correlations(trace)
    locality: dict[str, Any] = {}
    if trace.domain is not None:
        for size in batch_sizes:
            result = batch_locality(trace, size, num_steps=num_steps, seed=seed)
            locality[str(size)] = {
                "mixed": result.mixed,
                "same": {**result.same, "all": result.same_overall},
                "reduction": {**{d: result.reduction(d) for d in result.same}, "all": result.reduction()},
            }
    duration = float(trace.arrival_s[-1] - trace.arrival_s[0])
    return {
        "num_requests": trace.num_requests,
        "num_calibration": int(trace.calibration.sum()) if trace.calibration is not None else 0,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "layers": trace.layers.tolist(),
        "num_model_layers": trace.num_model_layers,
        "has_exact_decode": trace.decode_topk is not None,
        "conservation_violations": conservation_violations(trace),
        "domains": domains,
        "prompt_tokens": _describe(trace.prompt_tokens),
        "output_tokens": _describe(trace.output_tokens),
        "duration_s": duration,
        "mean_rate": (trace.num_requests - 1) / duration if duration > 0 else None,
        "request_correlation": corr.request,
        "expert_correlation": corr.expert,
        "distinct_experts": locality,
        "distinct_experts_steps": num_steps,
        "seed": seed,
        "source": trace.meta.get("source"),
        "attribution": trace.meta.get("attribution"),
        "clipping": trace.meta.get("clipping"),
    }


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def run_info(args: argparse.Namespace) -> int:
    trace = Trace.load(args.trace)
    _check_sample_size(trace, args.batch_sizes, args.steps)
    info = summarise(trace, args.batch_sizes, args.steps, args.seed)
    if args.json:
        print(strictjson.dumps(info))
        return 0
    _print_info(args.trace, info)
    return 0


def _check_sample_size(trace: Trace, batch_sizes: list[int], num_steps: int) -> None:
    """Refuse --steps x --batch-sizes whose sampled tokens would exceed the memory budget."""
    if trace.domain is not None and (num_domains := np.unique(trace.domain).size) > MAX_DOMAINS:
        raise InvalidInputError(
            f"the trace has {num_domains} distinct domain labels; statistics are computed for at most "
            f"{MAX_DOMAINS}"
        )
    rows = num_steps * max(batch_sizes)
    sample_bytes = rows * trace.num_layers * (trace.num_experts + 8 * trace.top_k)
    budget = max_bytes()
    if trace.domain is not None and sample_bytes > budget:
        raise InvalidInputError(
            f"--steps {num_steps} x batch size {max(batch_sizes)} would sample {size_text(sample_bytes)} "
            f"of expert choices, above the limit of {size_text(budget)} (or raise {MAX_BYTES_ENV})"
        )


def _print_info(path: str, info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"{escape(path)}: N={info['num_requests']} ({info['num_calibration']} calibration)")
    console.print(
        f"L={info['num_layers']} (layers {info['layers']} of {info['num_model_layers']})  "
        f"E={info['num_experts']}  k={info['top_k']}  "
        f"exact decode: {'yes' if info['has_exact_decode'] else 'no'}"
    )
    if info["source"] is not None:
        attribution = info["attribution"] or "no attribution recorded"
        console.print(escape(f"source: {info['source']}  ({attribution})"))
    clip = info["clipping"]
    if isinstance(clip, dict) and {"prompt_clipped", "output_clipped", "cut_to_fit_region"} <= clip.keys():
        console.print(
            escape(
                f"clipped when built: {clip['prompt_clipped']} prompts, {clip['output_clipped']} outputs, "
                f"{clip['cut_to_fit_region']} cut to fit their text region"
            )
        )
    bad = info["conservation_violations"]
    console.print(
        "conservation (counts = tokens x k in every layer): "
        + ("holds for every request" if bad == 0 else f"violated by {bad} requests")
    )
    rate = info["mean_rate"]
    console.print(f"arrivals over {info['duration_s']:.1f} s" + (f" (mean {rate:.1f} req/s)" if rate else ""))
    lengths = Table(title="lengths (tokens)")
    for col in ("", "min", "p50", "mean", "p99", "max"):
        lengths.add_column(col, justify="right")
    for name in ("prompt_tokens", "output_tokens"):
        row = info[name]
        lengths.add_row(name, *(f"{row[key]:.0f}" if key != "mean" else f"{row[key]:.1f}" for key in row))
    console.print(lengths)

    names = ["all", *info["domains"]]
    corr = Table(title="prefill-decode correlation (docs/trace-format.md)")
    for col in ("domain", "requests", "per request (over experts)", "per expert (over requests)"):
        corr.add_column(col, justify="right")
    for name in names:
        count = info["num_requests"] if name == "all" else info["domains"][name]
        corr.add_row(
            escape(name),
            str(count),
            _fmt(info["request_correlation"][name]),
            _fmt(info["expert_correlation"][name]),
        )
    console.print(corr)

    if not info["distinct_experts"]:
        console.print("distinct experts per step: n/a (the trace has no domain labels)")
        return
    table = Table(
        title=f"distinct experts per layer per decode step ({info['distinct_experts_steps']} sampled steps)"
    )
    for col in ("batch", "domain", "same-domain", "mixed", "reduction"):
        table.add_column(col, justify="right")
    for size, result in info["distinct_experts"].items():
        for name in names:
            table.add_row(
                size,
                escape(name),
                f"{result['same'][name]:.2f}",
                f"{result['mixed']:.2f}",
                f"{100 * result['reduction'][name]:.1f}%",
            )
    console.print(table)
