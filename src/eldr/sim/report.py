"""Per-policy metrics of simulated runs, ELDR's gain against the best load balancer, and the table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eldr.policy import ABLATION_POLICIES, FEWEST_NEW_EXPERTS, LOAD_BALANCERS
from eldr.policy.refit import REFIT_POLICY
from eldr.sim.engine import RunResult

# policies reported against the best load balancer (never one themselves): eldr, its ablations, the rest
GAIN_POLICIES = ("eldr", REFIT_POLICY, *ABLATION_POLICIES, "domain", "oracle", FEWEST_NEW_EXPERTS)


@dataclass(frozen=True)
class PolicyMetrics:
    policy: str
    num_requests: int
    tpot_p50_ms: float
    tpot_p99_ms: float
    ttft_p50_ms: float
    distinct_experts_per_step: float  # mean over decode steps, summed over recorded layers
    distinct_experts_per_layer: tuple[float, ...]  # [L] mean over decode steps
    mean_batch: float  # requests per decode step
    load_imbalance: float  # time-averaged max/mean in-flight
    num_steps: int
    num_fallbacks: int
    makespan_s: float


def metrics_of(run: RunResult) -> PolicyMetrics:
    out = run.output_tokens
    multi = out >= 2
    tpot = (run.finish_s[multi] - run.first_token_s[multi]) / (out[multi] - 1)
    has_first = out >= 1
    ttft = run.first_token_s[has_first] - run.arrival_s[has_first]
    steps = max(run.num_steps, 1)
    per_layer = run.distinct_sum / steps
    batches = np.arange(run.steps_by_batch.size)
    return PolicyMetrics(
        policy=run.policy,
        num_requests=int(out.size),
        tpot_p50_ms=_pct_ms(tpot, 50),
        tpot_p99_ms=_pct_ms(tpot, 99),
        ttft_p50_ms=_pct_ms(ttft, 50),
        distinct_experts_per_step=float(per_layer.sum()),
        distinct_experts_per_layer=tuple(float(x) for x in per_layer),
        mean_batch=float(batches @ run.steps_by_batch / steps),
        load_imbalance=float(run.imbalance_time_avg),
        num_steps=run.num_steps,
        num_fallbacks=run.num_fallbacks,
        makespan_s=float(np.nanmax(run.finish_s) - run.arrival_s[0]) if out.size else 0.0,
    )


def _pct_ms(values: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values.size else float("nan")


def best_load_balancer(metrics: Mapping[str, PolicyMetrics]) -> str | None:
    """The load balancer with the lowest median TPOT among those run."""
    run = [name for name in LOAD_BALANCERS if name in metrics]
    return min(run, key=lambda n: metrics[n].tpot_p50_ms) if run else None


def gains(metrics: Mapping[str, PolicyMetrics], policy: str = "eldr") -> dict[str, Any] | None:
    """`policy` relative to the best load balancer (TPOT) and to rr (experts), in percent."""
    best = best_load_balancer(metrics)
    if policy not in metrics or best is None:
        return None
    mine, base = metrics[policy], metrics[best]
    result: dict[str, Any] = {
        "best_load_balancer": best,
        "tpot_p50_pct": 100 * (mine.tpot_p50_ms / base.tpot_p50_ms - 1),
        "tpot_p99_pct": 100 * (mine.tpot_p99_ms / base.tpot_p99_ms - 1),
        "ttft_p50_pct": 100 * (mine.ttft_p50_ms / base.ttft_p50_ms - 1),
    }
    if "rr" in metrics:
        rr = metrics["rr"].distinct_experts_per_step
        result["distinct_experts_vs_rr_pct"] = 100 * (mine.distinct_experts_per_step / rr - 1)
    return result


def to_json(metrics: Mapping[str, PolicyMetrics], settings: Mapping[str, Any]) -> dict[str, Any]:
    policies = {}
    for name, m in metrics.items():
        row = asdict(m)
        row["distinct_experts_per_layer"] = list(m.distinct_experts_per_layer)
        policies[name] = row
    return {
        "settings": dict(settings),
        "policies": policies,
        "gain": {name: gains(metrics, name) for name in GAIN_POLICIES if name in metrics},
    }


def render_table(metrics: Mapping[str, PolicyMetrics], title: str) -> Any:
    """A rich table, one row per policy."""
    from rich.table import Table

    table = Table(title=title)
    for header in (
        "policy",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "TTFT p50 ms",
        "experts/step",
        "per layer",
        "batch",
        "imbalance",
    ):
        table.add_column(header, justify="left" if header == "policy" else "right")
    for name, m in metrics.items():
        table.add_row(
            name,
            f"{m.tpot_p50_ms:.2f}",
            f"{m.tpot_p99_ms:.2f}",
            f"{m.ttft_p50_ms:.1f}",
            f"{m.distinct_experts_per_step:.1f}",
            " ".join(f"{x:.1f}" for x in m.distinct_experts_per_layer),
            f"{m.mean_batch:.1f}",
            f"{m.load_imbalance:.3f}",
        )
    return table


def gain_lines(metrics: Mapping[str, PolicyMetrics], names: Sequence[str] = GAIN_POLICIES) -> list[str]:
    lines = []
    for name in names:
        g = gains(metrics, name)
        if g is None:
            continue
        line = (
            f"{name} vs best load balancer ({g['best_load_balancer']}): median TPOT "
            f"{g['tpot_p50_pct']:+.1f}%, P99 TPOT {g['tpot_p99_pct']:+.1f}%, "
            f"TTFT p50 {g['ttft_p50_pct']:+.1f}%"
        )
        if "distinct_experts_vs_rr_pct" in g:
            line += f"; distinct experts per step vs rr {g['distinct_experts_vs_rr_pct']:+.1f}%"
        lines.append(line)
    return lines
