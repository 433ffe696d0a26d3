"""Does routing by the live batch beat routing by a static partition? `fewest-new-experts` vs eldr.

    python benchmarks/batch_policy.py --trace task.npz [--single-domain-trace book.npz] [--out DIR]

Issue 16. Same setting and seeds as docs/results.md's headline (mi300x-qwen3-30b, 16 decoders,
60 req/s Poisson, 512-token outputs, tau 0.1, balanced k-means, seeds 0, 1, 2), every policy on the
same requests and decoded tokens per seed:

- headline (medians over seeds 0-2): the four load balancers, eldr, oracle, fewest-new-experts at
  its derived lam and at 0.5x / 2x lam; and the trace's own output lengths (exact decode replay);
- rate sweep 20/40/60/80/100 req/s and decoders 8/16/24 (rate 60 x D/16), seed 0;
- no domain structure: the Task trace's requests with their real prompt lengths, but every request's
  expert counts drawn from one distribution (the trace's mean expert use per layer), so nothing but
  sampling noise tells requests apart; optionally a real single-domain OLMoE trace
  (`eldr trace build olmoe --mix book=1`). There the policy must do no harm: within 2% of the best
  load balancer at median and P99.

Prints the tables and writes benchmarks/results/batch_policy.{md,json} (or DIR).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from eldr.policy import FEWEST_NEW_EXPERTS, LOAD_BALANCERS, Policy, PolicyInputs, build
from eldr.sim.costmodel import CostModel, bind
from eldr.sim.engine import PoolConfig, simulate
from eldr.sim.presets import mi300x_qwen3_30b
from eldr.sim.report import PolicyMetrics, metrics_of
from eldr.sim.workload import mean_context_tokens, overlap_inputs, overlap_lam
from eldr.trace.format import Trace
from provenance import commit, machine
from sweeps import Bench, policy_table

ROOT = Path(__file__).resolve().parent.parent
FNE = FEWEST_NEW_EXPERTS
POLICIES = (*LOAD_BALANCERS, "eldr", "oracle", FNE)
LAM_SCALES = (0.5, 1.0, 2.0)
KEYS = (
    "tpot_p50_ms",
    "tpot_p99_ms",
    "ttft_p50_ms",
    "distinct_experts_per_step",
    "mean_batch",
    "load_imbalance",
)
NO_HARM_PCT = 2.0


class Runner:
    """Runs (policy, setting) cells on one trace, each once (Bench caches requests and partitions)."""

    def __init__(self, trace: Trace, cost: CostModel) -> None:
        self.bench = Bench(trace)
        self.cost = cost
        self.step_cost = bind(cost, trace.layers, trace.num_model_layers, trace.num_experts)
        self._runs: dict[tuple[Any, ...], PolicyMetrics] = {}
        self.lams: dict[tuple[int | None, float], float] = {}

    def lam(self, output_tokens: int | None, scale: float = 1.0) -> float:
        key = (output_tokens, scale)
        if key not in self.lams:
            context = mean_context_tokens(self.bench.cal, output_tokens)
            self.lams[key] = scale * overlap_lam(self.step_cost, context)
        return self.lams[key]

    def run(
        self,
        policy: str,
        *,
        seed: int = 0,
        workers: int = 16,
        rate: float = 60.0,
        output_tokens: int | None = 512,
        lam_scale: float = 1.0,
    ) -> PolicyMetrics:
        key = (policy, seed, workers, rate, output_tokens, lam_scale if policy == FNE else 1.0)
        if key not in self._runs:
            built = self.build(policy, seed, workers, output_tokens, lam_scale)
            requests = self.bench.requests(output_tokens, seed, rate)
            pool = PoolConfig(workers, self.cost.max_batch, self.cost.kv_capacity_tokens)
            self._runs[key] = metrics_of(simulate(requests, built, self.step_cost, pool))
            if policy == FNE:
                assert not built.live_ids, "every dispatched request must be released"  # type: ignore[attr-defined]
        return self._runs[key]

    def build(
        self, policy: str, seed: int, workers: int, output_tokens: int | None, lam_scale: float
    ) -> Policy:
        inputs = PolicyInputs(num_workers=workers, seed=seed, tau=0.1)
        if policy in ("eldr", "oracle"):
            inputs = replace(inputs, partition=self.bench.partition(policy, workers, True))
        elif policy == FNE:
            lam = self.lam(output_tokens, lam_scale)
            extra = overlap_inputs(self.bench.cal, self.step_cost, lam=lam, output_tokens=output_tokens)
            inputs = replace(inputs, **extra)
        return build(policy, inputs)

    def cell(self, seeds: tuple[int, ...], policies: tuple[str, ...] = POLICIES, **kw: Any) -> dict[str, Any]:
        """Per policy, the median over seeds of each metric."""
        out: dict[str, Any] = {}
        for name in policies:
            runs = [self.run(name, seed=s, **kw) for s in seeds]
            out[name] = {k: float(np.median([getattr(m, k) for m in runs])) for k in KEYS}
        return out


def gain(cell: dict[str, Any], name: str, base: str | None = None) -> dict[str, float | str]:
    """`name` against `base` (default: the load balancer with the lowest median TPOT), in percent."""
    best = base or min((n for n in LOAD_BALANCERS if n in cell), key=lambda n: cell[n]["tpot_p50_ms"])
    mine, ref = cell[name], cell[best]
    out: dict[str, float | str] = {
        "vs": best,
        "p50_pct": 100 * (mine["tpot_p50_ms"] / ref["tpot_p50_ms"] - 1),
        "p99_pct": 100 * (mine["tpot_p99_ms"] / ref["tpot_p99_ms"] - 1),
        "experts_pct": 100 * (mine["distinct_experts_per_step"] / ref["distinct_experts_per_step"] - 1),
    }
    if "rr" in cell:
        rr = cell["rr"]["distinct_experts_per_step"]
        out["experts_vs_rr_pct"] = 100 * (mine["distinct_experts_per_step"] / rr - 1)
    return out


def no_harm(cell: dict[str, Any], name: str) -> dict[str, float]:
    """`name` against the best load balancer of each metric separately (median, P99), in percent."""
    lbs = [n for n in LOAD_BALANCERS if n in cell]
    return {
        key: 100 * (cell[name][metric] / min(cell[n][metric] for n in lbs) - 1)
        for key, metric in (("p50_pct", "tpot_p50_ms"), ("p99_pct", "tpot_p99_ms"))
    }


def gain_rows(cell: dict[str, Any], names: tuple[str, ...] = ("eldr", "oracle", FNE)) -> list[str]:
    lines = [
        "| policy | vs | median TPOT | P99 TPOT | experts/step | experts/step vs rr |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        for base in (None, "eldr") if name == FNE else (None,):
            g = gain(cell, name, base)
            lines.append(
                f"| {name} | {g['vs']} | {g['p50_pct']:+.1f}% | {g['p99_pct']:+.1f}% | "
                f"{g['experts_pct']:+.1f}% | {g.get('experts_vs_rr_pct', float('nan')):+.1f}% |"
            )
    return lines


def flat_trace(trace: Trace, seed: int = 0) -> Trace:
    """The trace's requests (prompt lengths, calibration flags) with structureless expert counts: each
    request's counts are drawn from the trace's mean expert use per layer, decode counts alike."""
    rng = np.random.default_rng(seed)
    usage = trace.prefill_counts.sum(axis=0).astype(np.float64)  # [L, E]
    probs = usage / usage.sum(axis=1, keepdims=True)
    k = trace.top_k
    prefill = rng.multinomial((trace.prompt_tokens * k)[:, None], probs)  # [N, L, E]
    decode = rng.multinomial((np.maximum(trace.output_tokens, 1) * k)[:, None], probs)
    return Trace(
        prefill_counts=prefill.astype(np.int64),
        decode_counts=decode.astype(np.int64),
        prompt_tokens=trace.prompt_tokens,
        output_tokens=trace.output_tokens,
        arrival_s=trace.arrival_s,
        top_k=k,
        layers=trace.layers,
        num_model_layers=trace.num_model_layers,
        calibration=trace.calibration,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", required=True, help="the headline Task-like trace (docs/results.md)")
    parser.add_argument("--single-domain-trace", help="optional: an OLMoE trace of one domain (--mix book=1)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    started = time.perf_counter()
    cost = mi300x_qwen3_30b()
    trace = Trace.load(args.trace, with_exact_decode=True)
    runner = Runner(trace, cost)
    command = "python benchmarks/batch_policy.py " + " ".join(sys.argv[1:])
    header = (
        f"machine: {machine()}; commit {commit()}; command: `{command}`; trace {args.trace} "
        f"({trace.num_requests} requests, {runner.bench.index.size} measured); cost model {cost.name}; "
        "tau 0.1, balanced k-means"
    )
    results: dict[str, Any] = {"header": header}
    md = ["# fewest-new-experts against the load balancers, eldr and the oracle", "", header, ""]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {msg}", flush=True)

    seeds = (0, 1, 2)
    for label, out in (("512-token outputs", 512), ("trace output lengths, exact decode replay", None)):
        cell = runner.cell(seeds, output_tokens=out)
        for scale in LAM_SCALES:
            if scale != 1.0:
                runs = [runner.run(FNE, seed=s, output_tokens=out, lam_scale=scale) for s in seeds]
                cell[f"{FNE} x{scale:g} lam"] = {
                    k: float(np.median([getattr(m, k) for m in runs])) for k in KEYS
                }
        lam = runner.lam(out)
        results[f"headline {label}"] = {"lam": lam, "policies": cell}
        md += [f"## Headline, {label}: 16 decoders, 60 req/s, medians over seeds 0-2", ""]
        md += [f"lam (derived) = {lam:.2f} expert-layer reads per in-flight request", ""]
        md += [*policy_table(cell), "", *gain_rows(cell), ""]
        md += [
            "lam sensitivity (same seeds):",
            "",
            "| lam | value | median vs best LB | P99 vs best LB | "
            "median vs eldr | P99 vs eldr | experts/step |",
            "|---|---|---|---|---|---|---|",
        ]
        for scale in LAM_SCALES:
            name = FNE if scale == 1.0 else f"{FNE} x{scale:g} lam"
            g, e = gain(cell, name), gain(cell, name, "eldr")
            experts = cell[name]["distinct_experts_per_step"]
            md.append(
                f"| x{scale:g} | {lam * scale:.2f} | {g['p50_pct']:+.1f}% | {g['p99_pct']:+.1f}% | "
                f"{e['p50_pct']:+.1f}% | {e['p99_pct']:+.1f}% | {experts:.1f} |"
            )
        md.append("")
        log(f"headline {label}: {gain(cell, FNE)} / vs eldr {gain(cell, FNE, 'eldr')}")

    sweep_header = (
        "| {x} | best LB | LB p50 / p99 ms | eldr p50 / p99 | oracle p50 / p99 | fne p50 / p99 | "
        "fne vs LB p50 / p99 | fne vs eldr p50 / p99 | experts/step LB / eldr / oracle / fne |"
    )

    def sweep_row(x: str, cell: dict[str, Any]) -> str:
        g, e = gain(cell, FNE), gain(cell, FNE, "eldr")
        best = str(g["vs"])
        pair = lambda n: f"{cell[n]['tpot_p50_ms']:.2f} / {cell[n]['tpot_p99_ms']:.2f}"  # noqa: E731
        experts = " / ".join(
            f"{cell[n]['distinct_experts_per_step']:.1f}" for n in (best, "eldr", "oracle", FNE)
        )
        return (
            f"| {x} | {best} | {pair(best)} | {pair('eldr')} | {pair('oracle')} | {pair(FNE)} | "
            f"{g['p50_pct']:+.1f}% / {g['p99_pct']:+.1f}% | {e['p50_pct']:+.1f}% / {e['p99_pct']:+.1f}% | "
            f"{experts} |"
        )

    md += ["## Request rate (16 decoders, 512-token outputs, seed 0)", ""]
    md += [sweep_header.format(x="req/s"), "|---|---|---|---|---|---|---|---|---|"]
    results["rate"] = {}
    for rate in (20.0, 40.0, 60.0, 80.0, 100.0):
        cell = runner.cell((0,), rate=rate)
        results["rate"][f"{rate:g}"] = cell
        md.append(sweep_row(f"{rate:g}", cell))
        log(f"rate {rate:g}: {gain(cell, FNE)}")
    md.append("")

    md += ["## Decoders (60 req/s x decoders/16, 512-token outputs, seed 0)", ""]
    md += [sweep_header.format(x="decoders"), "|---|---|---|---|---|---|---|---|---|"]
    results["decoders"] = {}
    for workers in (8, 16, 24):
        cell = runner.cell((0,), workers=workers, rate=60.0 * workers / 16)
        results["decoders"][str(workers)] = cell
        md.append(sweep_row(str(workers), cell))
        log(f"decoders {workers}: {gain(cell, FNE)}")
    md.append("")

    flats: list[tuple[str, Trace]] = [
        ("structureless counts (the Task trace's requests, counts from one distribution)", flat_trace(trace))
    ]
    if args.single_domain_trace:
        flats.append(
            (f"single domain OLMoE trace ({args.single_domain_trace})", Trace.load(args.single_domain_trace))
        )
    results["no domain structure"] = {}
    for label, flat in flats:
        flat_runner = Runner(flat, cost)
        cell = flat_runner.cell((0,), (*LOAD_BALANCERS, "eldr", FNE))
        g, strict = gain(cell, FNE), no_harm(cell, FNE)
        is_ok = strict["p50_pct"] <= NO_HARM_PCT and strict["p99_pct"] <= NO_HARM_PCT
        results["no domain structure"][label] = {
            "policies": cell,
            "gain": g,
            "vs_best_lb_per_metric": strict,
            "within_2pct": is_ok,
        }
        md += [f"## No domain structure: {label}; 16 decoders, 60 req/s, 512-token outputs, seed 0", ""]
        md += [*policy_table(cell), "", *gain_rows(cell, ("eldr", FNE)), ""]
        md += [
            f"fewest-new-experts within {NO_HARM_PCT:g}% of the best load balancer at median and at P99 "
            f"(each against the load balancer best at that metric): **{'yes' if is_ok else 'no'}** "
            f"({strict['p50_pct']:+.2f}% / {strict['p99_pct']:+.2f}%)",
            "",
        ]
        log(f"no domain structure, {label}: {strict}")

    md.append(f"total {time.perf_counter() - started:.0f} s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "batch_policy.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "batch_policy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
