"""Paper-reproduction sweeps on the decode-pool simulator, and the mi300x preset's calibration.

    python benchmarks/sweeps.py calibrate                    # solve the preset's bandwidth (RR only)
    python benchmarks/sweeps.py run --trace T.npz            # every sweep below, ~15 min here
    python benchmarks/sweeps.py run --trace T.npz --only ablation   # some sections only (see --only)
    python benchmarks/sweeps.py plot                         # redraw the plots from sweeps.json

`run` writes benchmarks/results/sweeps.json, benchmarks/results/sweeps.md (the tables that
docs/results.md quotes) and docs/img/sweep_*.png. Sweeps (mi300x-qwen3-30b, tau 0.1, balanced
k-means unless varied; medians over --seeds):

- headline: 16 workers, 60 req/s, all seven policies, trace lengths (exact decode replay when the
  trace has it) and the paper's fixed 512-token outputs (sampled from decode counts);
- rate: 20..100 req/s; tau: 0, 0.1, 0.2, 0.3; k-means: balanced vs plain; decoders: 8/16/24 — all with
  the paper's 512-token outputs;
- ablation: the signature ablations eldr-raw (no IDF), eldr-all-layers (no layer mask) and eldr-plain
  (plain k-means) beside eldr and the best load balancer, 16 workers, 40/60/80 req/s, 512-token outputs.

`run --only SECTION[,SECTION]` runs those sections alone and writes sweeps_<sections>.{json,md} instead
of sweeps.{json,md} (never overwriting the full results); `--out DIR` writes elsewhere than
benchmarks/results (plots then go to DIR too, not docs/img).

Every run of a seed decodes the same tokens under every policy (common random numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from eldr import data
from eldr.calibration_data import CalibrationData
from eldr.partition import Partition
from eldr.policy import ABLATION_POLICIES, LOAD_BALANCERS, PolicyInputs, build
from eldr.sim.costmodel import CostModel, bind
from eldr.sim.engine import PoolConfig, Requests, simulate
from eldr.sim.presets import mi300x_qwen3_30b
from eldr.sim.report import PolicyMetrics, metrics_of
from eldr.sim.workload import (
    WorkloadConfig,
    build_policy,
    fit_for,
    measured_requests,
    poisson_arrivals,
    split_calibration,
)
from eldr.trace.format import Trace
from provenance import commit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ANCHOR_TPOT_MS = 27.0
SECTIONS = ("headline", "rate", "tau", "kmeans", "decoders", "ablation")
ABLATION_RATES = (40.0, 60.0, 80.0)
LOCALITY = ("eldr", "oracle", *ABLATION_POLICIES)  # policies routed by a fitted partition and tau


class Bench:
    """A trace's calibration set and measured requests, with fitted partitions cached."""

    def __init__(self, trace: Trace, num_requests: int | None = None) -> None:
        self.trace = trace
        self.cal, self.index = split_calibration(trace, None, 1000)
        self.index = self.index[:num_requests]  # None: every measured request
        self._requests: dict[tuple[int | None, int], Requests] = {}
        self._parts: dict[tuple[str, int, bool], Partition] = {}
        self._runs: dict[tuple[Any, ...], PolicyMetrics] = {}

    def requests(self, output_tokens: int | None, seed: int, rate: float | None) -> Requests:
        key = (output_tokens, seed)
        if key not in self._requests:
            config = WorkloadConfig(output_tokens=output_tokens, seed=seed)
            self._requests[key] = measured_requests(self.trace, self.index, config, with_decode_counts=True)
        base = self._requests[key]
        if rate is None:
            return base
        return replace(base, arrival_s=poisson_arrivals(base.num_requests, rate, seed))

    @staticmethod
    def canonical(policy: str, balanced: bool) -> tuple[str, bool]:
        """eldr-plain is eldr with plain k-means (the k-means sweep's): one cache entry for both."""
        return ("eldr", False) if policy == "eldr-plain" else (policy, balanced)

    def partition(self, name: str, workers: int, balanced: bool) -> Partition:
        name, balanced = self.canonical(name, balanced)
        key = (name, workers, balanced)
        if key not in self._parts:
            self._parts[key] = fit_for(name, self.cal, workers, is_balanced=balanced)
        return self._parts[key]

    def run(
        self,
        policy: str,
        cost: CostModel,
        *,
        workers: int = 16,
        rate: float = 60.0,
        output_tokens: int | None = 512,
        tau: float = 0.1,
        balanced: bool = True,
        seed: int = 0,
    ) -> PolicyMetrics:
        policy, balanced = self.canonical(policy, balanced)
        locality = policy in LOCALITY
        key = (
            policy,
            cost,
            workers,
            rate,
            output_tokens,
            tau if locality else None,
            balanced or not locality,
            seed,
        )
        if key not in self._runs:
            self._runs[key] = self._run(policy, cost, workers, rate, output_tokens, tau, balanced, seed)
        return self._runs[key]

    def _run(
        self,
        policy: str,
        cost: CostModel,
        workers: int,
        rate: float,
        output_tokens: int | None,
        tau: float,
        balanced: bool,
        seed: int,
    ) -> PolicyMetrics:
        cal: CalibrationData = self.cal
        part = self.partition(policy, workers, balanced) if policy in LOCALITY else None
        if part is not None:  # fitted once per setting (cached), built by the registry
            built = build(policy, PolicyInputs(num_workers=workers, seed=seed, tau=tau, partition=part))
        else:
            built = build_policy(policy, cal, workers, tau=tau, seed=seed, is_balanced=balanced)
        step_cost = bind(cost, self.trace.layers, self.trace.num_model_layers, self.trace.num_experts)
        pool = PoolConfig(workers, cost.max_batch, cost.kv_capacity_tokens)
        return metrics_of(simulate(self.requests(output_tokens, seed, rate), built, step_cost, pool))


def calibrate(args: argparse.Namespace) -> int:
    """Effective bandwidth such that RR's median TPOT is 27 ms at 60 req/s, 16 workers, 512 tokens."""
    trace_path = args.trace or data.demo_trace_path()
    bench = Bench(Trace.load(trace_path))
    lo, hi = 0.5e12, 6e12  # bytes/s; TPOT falls as bandwidth grows
    history = []
    for _ in range(args.iterations):
        mid = (lo * hi) ** 0.5
        tpot = bench.run("rr", mi300x_qwen3_30b(mid), seed=0).tpot_p50_ms
        history.append((mid, tpot))
        print(f"  {mid / 1e12:.4f} TB/s -> RR median TPOT {tpot:.3f} ms", flush=True)
        if tpot > ANCHOR_TPOT_MS:
            lo = mid
        else:
            hi = mid
    best = min(history, key=lambda h: abs(h[1] - ANCHOR_TPOT_MS))
    lines = [
        "# mi300x-qwen3-30b: solving the effective bandwidth from the RR anchor",
        "",
        f"machine: {platform.node()} (2-core shared VM); commit {commit()}; "
        f"command: `python benchmarks/sweeps.py {' '.join(sys.argv[1:])}`",
        f"trace: {Path(trace_path).name}, {bench.index.size} measured requests, policy rr only, 16 workers, "
        "60 req/s Poisson (seed 0), 512-token outputs",
        "",
        "| effective TB/s | RR median TPOT ms |",
        "|---|---|",
        *(f"| {bw / 1e12:.4f} | {tpot:.3f} |" for bw, tpot in history),
        "",
        f"result: {best[0] / 1e12:.3f} TB/s gives RR median TPOT {best[1]:.2f} ms "
        f"(anchor {ANCHOR_TPOT_MS} ms)",
        "",
    ]
    (ROOT / "benchmarks" / "results" / "mi300x_calibration.md").write_text("\n".join(lines))
    print(lines[-2])
    return 0


def median_over_seeds(
    bench: Bench, policies: Sequence[str], cost: CostModel, seeds: Sequence[int], **kw: Any
) -> dict[str, dict[str, float]]:
    rows: dict[str, list[PolicyMetrics]] = {p: [] for p in policies}
    for seed in seeds:
        for p in policies:
            rows[p].append(bench.run(p, cost, seed=seed, **kw))
    out: dict[str, dict[str, float]] = {}
    for p, ms in rows.items():
        out[p] = {
            key: float(np.median([getattr(m, key) for m in ms]))
            for key in (
                "tpot_p50_ms",
                "tpot_p99_ms",
                "ttft_p50_ms",
                "distinct_experts_per_step",
                "load_imbalance",
            )
        }
        out[p]["mean_batch"] = float(np.median([m.mean_batch for m in ms]))
    return out


def gain_row(cell: dict[str, dict[str, float]], policy: str = "eldr") -> dict[str, Any]:
    lbs = [n for n in LOAD_BALANCERS if n in cell]
    best = min(lbs, key=lambda n: cell[n]["tpot_p50_ms"])
    mine = cell[policy]
    row = {
        "best_lb": best,
        "p50_pct": 100 * (mine["tpot_p50_ms"] / cell[best]["tpot_p50_ms"] - 1),
        "p99_pct": 100 * (mine["tpot_p99_ms"] / cell[best]["tpot_p99_ms"] - 1),
    }
    if "rr" in cell:
        row["experts_vs_rr_pct"] = 100 * (
            mine["distinct_experts_per_step"] / cell["rr"]["distinct_experts_per_step"] - 1
        )
        row["p50_vs_rr_pct"] = 100 * (mine["tpot_p50_ms"] / cell["rr"]["tpot_p50_ms"] - 1)
    return row


def policy_table(cell: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| policy | TPOT p50 ms | TPOT p99 ms | TTFT p50 ms | experts/step | batch | imbalance |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in cell.items():
        lines.append(
            f"| {name} | {m['tpot_p50_ms']:.2f} | {m['tpot_p99_ms']:.2f} | {m['ttft_p50_ms']:.1f} | "
            f"{m['distinct_experts_per_step']:.1f} | {m['mean_batch']:.1f} | {m['load_imbalance']:.3f} |"
        )
    return lines


def parse_sections(text: str | None) -> tuple[str, ...]:
    """`--only a,b`: the sections to run, in SECTIONS order; every section when not given."""
    if text is None:
        return SECTIONS
    asked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in asked if t not in SECTIONS]
    if unknown or not asked:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in asked)


def kept_layers(bench: Bench, policy: str, workers: int = 16) -> dict[str, Any]:
    """The kept layers of a policy's partition: column indices, the model's layer ids and rho."""
    part = bench.partition(policy, workers, True)
    kept = sorted(part.transform.layers)
    return {
        "layers": kept,
        "model_layers": [int(bench.trace.layers[i]) for i in kept],
        "num_layers": part.num_layers,
        "rho": part.meta.get("rho"),
        "weighting": part.meta.get("weighting"),
        "kmeans": part.meta.get("kmeans"),
    }


def run_sweeps(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    sections = parse_sections(args.only)
    trace = Trace.load(args.trace)
    bench = Bench(trace, args.requests)
    cost = mi300x_qwen3_30b()
    seeds = list(range(args.seeds))
    sweep_seeds = list(range(args.sweep_seeds))
    lbs = list(LOAD_BALANCERS)
    command = "python benchmarks/sweeps.py " + " ".join(sys.argv[1:])
    header = (
        f"machine: {platform.node()} ({platform.machine()}, 2-core shared VM, no GPU); commit {commit()}; "
        f"command: `{command}`; trace: {args.trace} ({trace.num_requests} requests, "
        f"{bench.index.size} measured); cost model {cost.name}; medians over seeds {seeds} (headline) "
        f"and {sweep_seeds} (sweeps)"
    )
    if sections != SECTIONS:
        header += f"; sections: {', '.join(sections)}"
    results: dict[str, Any] = {"header": header}
    md = ["# Sweep results", "", header, ""]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    all_policies = [*lbs, "domain", "eldr", "oracle"]
    for label, out in (("trace lengths", None), ("512-token outputs", 512)):
        if "headline" not in sections:
            break
        cell = median_over_seeds(bench, all_policies, cost, seeds, output_tokens=out)
        results[f"headline {label}"] = {
            "policies": cell,
            "eldr": gain_row(cell),
            "domain": gain_row(cell, "domain"),
        }
        g = gain_row(cell)
        md += [f"## Headline, {label}: 16 workers, 60 req/s, tau 0.1", "", *policy_table(cell), ""]
        md += [
            f"eldr vs best load balancer ({g['best_lb']}): median TPOT {g['p50_pct']:+.1f}%, "
            f"P99 {g['p99_pct']:+.1f}%; distinct experts per step vs rr {g['experts_vs_rr_pct']:+.1f}%",
            "",
        ]
        log(f"headline {label}: {g}")

    rates = [20.0, 40.0, 60.0, 80.0, 100.0]
    rate_cells: dict[float, dict[str, dict[str, float]]] = {}

    def lb_cell(r: float) -> dict[str, dict[str, float]]:
        """The load balancers at rate r (the rate sweep's, or run now; Bench caches every run)."""
        base = rate_cells[r] if r in rate_cells else median_over_seeds(bench, lbs, cost, sweep_seeds, rate=r)
        return {n: base[n] for n in lbs}

    if "rate" in sections:
        rate_cells = {r: median_over_seeds(bench, [*lbs, "eldr"], cost, sweep_seeds, rate=r) for r in rates}
        results["rate"] = {str(r): {"policies": c, "eldr": gain_row(c)} for r, c in rate_cells.items()}
        md += ["## Request rate (16 workers, 512-token outputs)", ""]
        md += [
            "| req/s | best LB | LB TPOT p50 ms | eldr TPOT p50 ms | p50 | p99 | experts vs rr |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, c in rate_cells.items():
            g = gain_row(c)
            md.append(
                f"| {r:g} | {g['best_lb']} | {c[g['best_lb']]['tpot_p50_ms']:.2f} | "
                f"{c['eldr']['tpot_p50_ms']:.2f} | "
                f"{g['p50_pct']:+.1f}% | {g['p99_pct']:+.1f}% | {g['experts_vs_rr_pct']:+.1f}% |"
            )
        md.append("")
        log("rate sweep done")
    taus = [0.0, 0.1, 0.2, 0.3]
    tau_rates = [40.0, 60.0, 80.0]
    if "tau" in sections:
        md += ["## tau (16 workers, 512-token outputs; vs best load balancer of the same rate)", ""]
        md += ["| req/s | tau | eldr TPOT p50 ms | p50 | p99 | imbalance |", "|---|---|---|---|---|---|"]
        results["tau"] = {}
        for r in tau_rates:
            base = lb_cell(r)
            for tau in taus:
                cell = dict(base)
                cell.update(median_over_seeds(bench, ["eldr"], cost, sweep_seeds, rate=r, tau=tau))
                g = gain_row(cell)
                results["tau"][f"{r:g}/{tau:g}"] = {"eldr": cell["eldr"], "gain": g}
                md.append(
                    f"| {r:g} | {tau:g} | {cell['eldr']['tpot_p50_ms']:.2f} | {g['p50_pct']:+.1f}% | "
                    f"{g['p99_pct']:+.1f}% | {cell['eldr']['load_imbalance']:.3f} |"
                )
        md.append("")
        log("tau sweep done")

    if "kmeans" in sections:
        md += ["## Balanced vs plain k-means (16 workers, 512-token outputs)", ""]
        md += [
            "| req/s | k-means | eldr TPOT p50 ms | p99 ms | p50 vs best LB | p99 vs best LB |",
            "|---|---|---|---|---|---|",
        ]
        results["kmeans"] = {}
        for r in tau_rates:
            base = lb_cell(r)
            for balanced in (True, False):
                cell = dict(base)
                cell.update(median_over_seeds(bench, ["eldr"], cost, sweep_seeds, rate=r, balanced=balanced))
                g = gain_row(cell)
                kind = "balanced" if balanced else "plain"
                results["kmeans"][f"{r:g}/{kind}"] = {"eldr": cell["eldr"], "gain": g}
                md.append(
                    f"| {r:g} | {kind} | {cell['eldr']['tpot_p50_ms']:.2f} | "
                    f"{cell['eldr']['tpot_p99_ms']:.2f} | {g['p50_pct']:+.1f}% | {g['p99_pct']:+.1f}% |"
                )
        md.append("")
        log("k-means sweep done")

    if "decoders" in sections:
        md += ["## Decoders (60 req/s scaled by decoders/16, 512-token outputs; paper: vs RR)", ""]
        md += [
            "| decoders | req/s | rr TPOT p50 ms | eldr TPOT p50 ms | eldr vs rr | eldr vs best LB "
            "| experts vs rr |"
        ]
        md += ["|---|---|---|---|---|---|---|"]
        results["decoders"] = {}
        for d in (8, 16, 24):
            r = 60.0 * d / 16
            cell = median_over_seeds(bench, [*lbs, "eldr"], cost, sweep_seeds, rate=r, workers=d)
            g = gain_row(cell)
            results["decoders"][str(d)] = {"policies": cell, "eldr": g}
            md.append(
                f"| {d} | {r:g} | {cell['rr']['tpot_p50_ms']:.2f} | {cell['eldr']['tpot_p50_ms']:.2f} | "
                f"{g['p50_vs_rr_pct']:+.1f}% | {g['p50_pct']:+.1f}% | {g['experts_vs_rr_pct']:+.1f}% |"
            )
        md.append("")
        log("decoder sweep done")

    if "ablation" in sections:
        variants = ["eldr", *ABLATION_POLICIES]
        md += [
            "## Signature ablations (16 workers, 512-token outputs, tau 0.1; vs best load balancer of the "
            "same rate)",
            "",
            "eldr-raw: counts without IDF; eldr-all-layers: every layer, no greedy mask; eldr-plain: plain "
            "spherical k-means. Each is fitted on the same calibration requests, everything else as eldr. "
            "Kept layers: the trace's model layer ids (kept of recorded).",
            "",
            "| req/s | variant | TPOT p50 ms | p99 ms | median vs best LB | P99 vs best LB | "
            "experts/step vs rr | kept layers |",
            "|---|---|---|---|---|---|---|---|",
        ]
        layers = {v: kept_layers(bench, v) for v in variants}
        results["ablation"] = {}
        for r in ABLATION_RATES:
            cell = lb_cell(r)
            cell.update(median_over_seeds(bench, variants, cost, sweep_seeds, rate=r))
            best = gain_row(cell)["best_lb"]
            entry: dict[str, Any] = {
                "best_lb": best,
                "policies": {n: cell[n] for n in [best, *variants]},
                "gain": {v: gain_row(cell, v) for v in variants},
                "kept_layers": layers,
            }
            results["ablation"][f"{r:g}"] = entry
            rr_experts = cell["rr"]["distinct_experts_per_step"]
            best_experts = 100 * (cell[best]["distinct_experts_per_step"] / rr_experts - 1)
            md.append(
                f"| {r:g} | {best} (best LB) | {cell[best]['tpot_p50_ms']:.2f} | "
                f"{cell[best]['tpot_p99_ms']:.2f} | — | — | {best_experts:+.1f}% | all |"
            )
            for v in variants:
                g, kept = entry["gain"][v], layers[v]
                md.append(
                    f"| {r:g} | {v} | {cell[v]['tpot_p50_ms']:.2f} | {cell[v]['tpot_p99_ms']:.2f} | "
                    f"{g['p50_pct']:+.1f}% | {g['p99_pct']:+.1f}% | {g['experts_vs_rr_pct']:+.1f}% | "
                    f"{len(kept['layers'])}/{kept['num_layers']}: "
                    f"{' '.join(str(x) for x in kept['model_layers'])} |"
                )
        md.append("")
        rhos = [f"{v} {layers[v]['rho']:.3f}" for v in ("eldr", "eldr-raw") if layers[v]["rho"] is not None]
        if rhos:
            md += [f"greedy layer mask, peak Spearman rho: {', '.join(rhos)}", ""]
        if layers["eldr"]["layers"] == layers["eldr-all-layers"]["layers"]:
            md += [
                "eldr's greedy mask kept every recorded layer here, so eldr-all-layers routes with the same "
                "partition as eldr.",
                "",
            ]
        log("ablation sweep done")

    md += [f"total sweep time {time.perf_counter() - started:.0f} s", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sweeps" if sections == SECTIONS else "sweeps_" + "_".join(sections)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    img = ROOT / "docs" / "img" if out.resolve() == RESULTS.resolve() else out
    return plot_sweeps(argparse.Namespace(results=str(out / f"{stem}.json"), img=str(img)))


def plot_sweeps(args: argparse.Namespace) -> int:
    """docs/img/sweep_{rate,tau,kmeans,decoders}.png from a sweeps.json (or sweeps_<sections>.json).

    Sections absent from the results are skipped; the ablation section has no plot.
    """
    from eldr.sim.plot import pyplot

    res = json.loads(Path(args.results).read_text())
    if not any(name in res for name in ("rate", "tau", "kmeans", "decoders")):
        print("no plots for these sections")
        return 0
    plt = pyplot()
    img = Path(getattr(args, "img", None) or ROOT / "docs" / "img")
    img.mkdir(parents=True, exist_ok=True)
    lbs = list(LOAD_BALANCERS)
    written: list[str] = []

    if "rate" in res:
        rates = sorted(float(r) for r in res["rate"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for name in [*lbs, "eldr"]:
            cells = [res["rate"][str(r)]["policies"][name] for r in rates]
            axes[0].plot(rates, [c["tpot_p50_ms"] for c in cells], marker="o", label=name)
            axes[1].plot(rates, [c["tpot_p99_ms"] for c in cells], marker="o", label=name)
            axes[2].plot(rates, [c["distinct_experts_per_step"] for c in cells], marker="o", label=name)
        for ax, label in zip(
            axes, ("median TPOT (ms)", "P99 TPOT (ms)", "distinct experts per step"), strict=True
        ):
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        fig.suptitle("rate sweep: 16 decoders, 512-token outputs, mi300x-qwen3-30b, OLMoE Task-like trace")
        fig.tight_layout()
        fig.savefig(img / "sweep_rate.png", dpi=110)
        plt.close(fig)
        written.append("rate")

    if "tau" in res:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        tau_keys = [k.split("/") for k in res["tau"]]
        for rate in sorted({float(r) for r, _ in tau_keys}):
            taus = sorted(float(t) for r, t in tau_keys if float(r) == rate)
            gains = [res["tau"][f"{rate:g}/{t:g}"]["gain"] for t in taus]
            axes[0].plot(taus, [g["p50_pct"] for g in gains], marker="o", label=f"{rate:g} req/s")
            axes[1].plot(taus, [g["p99_pct"] for g in gains], marker="o", label=f"{rate:g} req/s")
        for ax, label in zip(axes, ("median TPOT vs best LB (%)", "P99 TPOT vs best LB (%)"), strict=True):
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("tau")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        fig.suptitle("eldr band width tau (16 decoders, 512-token outputs)")
        fig.tight_layout()
        fig.savefig(img / "sweep_tau.png", dpi=110)
        plt.close(fig)
        written.append("tau")

    if "kmeans" in res:
        fig, ax = plt.subplots(figsize=(7, 4))
        km_rates = sorted({float(k.split("/")[0]) for k in res["kmeans"]})
        x = np.arange(len(km_rates))
        for i, kind in enumerate(("balanced", "plain")):
            for j, (metric, hatch) in enumerate((("p50_pct", ""), ("p99_pct", "//"))):
                vals = [res["kmeans"][f"{r:g}/{kind}"]["gain"][metric] for r in km_rates]
                ax.bar(
                    x + (2 * i + j - 1.5) * 0.2,
                    vals,
                    0.2,
                    hatch=hatch,
                    color=f"C{i}",
                    label=f"{kind} {metric[:3]}",
                )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, [f"{r:g} req/s" for r in km_rates])
        ax.set_ylabel("eldr TPOT vs best load balancer (%)")
        ax.legend(fontsize=8)
        ax.set_title("balanced vs plain k-means (paper: plain worsens P99 by up to 17.4%)")
        fig.tight_layout()
        fig.savefig(img / "sweep_kmeans.png", dpi=110)
        plt.close(fig)
        written.append("kmeans")

    if "decoders" in res:
        fig, ax = plt.subplots(figsize=(6, 4))
        decoders = sorted(int(d) for d in res["decoders"])
        ours = [res["decoders"][str(d)]["eldr"]["p50_vs_rr_pct"] for d in decoders]
        ax.plot(decoders, ours, marker="o", label="simulated (OLMoE Task-like trace)")
        ax.plot([8, 16, 24], [-8.0, -9.8, -10.2], marker="s", ls="--", label="paper (Qwen3, Language)")
        ax.set_xlabel("decode workers")
        ax.set_ylabel("eldr median TPOT vs rr (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "sweep_decoders.png", dpi=110)
        plt.close(fig)
        written.append("decoders")
    print(f"wrote {img}/sweep_{{{','.join(written)}}}.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    cal = sub.add_parser("calibrate", help="solve the mi300x preset's effective bandwidth from RR's 27 ms")
    cal.add_argument("--trace", help="trace (default: the shipped demo trace)")
    cal.add_argument("--iterations", type=int, default=12, help="bisection steps (default 12)")
    cal.set_defaults(func=calibrate)
    run = sub.add_parser("run", help="run every sweep (or --only some) and write the results")
    run.add_argument("--trace", required=True, help="the OLMoE Task-like trace (eldr trace build olmoe)")
    run.add_argument(
        "--seeds", type=int, default=3, help="seeds per headline cell; medians quoted (default 3)"
    )
    run.add_argument("--sweep-seeds", type=int, default=1, help="seeds per sweep cell (default 1)")
    run.add_argument(
        "--requests", type=int, metavar="N", help="measure only the first N requests (a quick check)"
    )
    run.add_argument(
        "--only",
        type=lambda text: ",".join(parse_sections(text)),
        metavar="SECTION[,SECTION]",
        help=f"run only these sections, from {','.join(SECTIONS)}, and write sweeps_<sections>.json/.md "
        "(default: every section, sweeps.json/.md)",
    )
    run.add_argument(
        "--out",
        default=str(RESULTS),
        metavar="DIR",
        help="results folder (default benchmarks/results; elsewhere, the plots go there too)",
    )
    run.set_defaults(func=run_sweeps)
    plot = sub.add_parser("plot", help="redraw docs/img/sweep_*.png from a results file")
    plot.add_argument("--results", default=str(RESULTS / "sweeps.json"))
    plot.add_argument(
        "--img", default=str(ROOT / "docs" / "img"), help="where the plots go (default docs/img)"
    )
    plot.set_defaults(func=plot_sweeps)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
