"""One experiment: a trace, a pool and a cost model, every policy run on the same requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eldr.calibration_data import CalibrationData
from eldr.errors import ConfigError
from eldr.partition import Partition
from eldr.policy import DEFAULT_TAU, SIM_POLICIES, FewestNewExpertsPolicy, check_lam, check_tau
from eldr.policy.refit import DEFAULT_REFIT_WINDOW, REFIT_POLICY
from eldr.sim.costmodel import CostModel, bind
from eldr.sim.engine import PoolConfig, RunResult, simulate
from eldr.sim.report import PolicyMetrics, metrics_of
from eldr.sim.workload import (
    WorkloadConfig,
    build_policy,
    measured_requests,
    split_calibration,
)
from eldr.trace.format import Trace


@dataclass(frozen=True)
class Experiment:
    policies: tuple[str, ...]
    num_workers: int = 16
    tau: float = DEFAULT_TAU
    is_balanced: bool = True
    max_batch: int | None = None  # None: the cost model's
    kv_capacity_tokens: int | None = None  # None: the cost model's
    layer_map: str = "nearest"
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    lam: float | None = None  # fewest-new-experts' load weight; None: derived from the cost model
    refit_every: int = 500  # eldr-refit: refit after this many routed signatures
    refit_window: int = DEFAULT_REFIT_WINDOW  # eldr-refit: recent signatures a refit clusters

    def __post_init__(self) -> None:
        unknown = [name for name in self.policies if name not in SIM_POLICIES]
        if unknown or not self.policies:
            raise ConfigError(f"unknown policies {unknown}; choose from {', '.join(SIM_POLICIES)}")
        check_tau(self.tau)
        if self.lam is not None:
            check_lam(self.lam)
        if self.refit_every < 1:
            raise ConfigError(f"refit_every must be >= 1, got {self.refit_every}")
        if REFIT_POLICY in self.policies and self.refit_window < self.num_workers:
            raise ConfigError(
                f"refit window {self.refit_window} must hold at least one request per worker "
                f"({self.num_workers})"
            )


@dataclass(frozen=True)
class Outcome:
    metrics: dict[str, PolicyMetrics]
    runs: dict[str, RunResult]
    num_calibration: int
    lam: float | None = None  # the load weight fewest-new-experts ran with, when it ran


def run_experiment(
    trace: Trace,
    experiment: Experiment,
    cost: CostModel,
    *,
    calibration: CalibrationData | None = None,
    partition: Partition | None = None,
    on_policy: Callable[[str, int], Callable[[int], None] | None] | None = None,
) -> Outcome:
    """Simulate every policy of `experiment` on the trace's measured requests.

    `on_policy(name, num_requests)` may return a progress callback for that policy's run.
    """
    cal, measured = split_calibration(trace, calibration, experiment.workload.num_calibration)
    requests = measured_requests(
        trace, measured, experiment.workload, with_decode_counts="oracle" in experiment.policies
    )
    step_cost = bind(cost, trace.layers, trace.num_model_layers, trace.num_experts, how=experiment.layer_map)
    pool = PoolConfig(
        experiment.num_workers,
        experiment.max_batch or cost.max_batch,
        experiment.kv_capacity_tokens or cost.kv_capacity_tokens,
    )
    metrics: dict[str, PolicyMetrics] = {}
    runs: dict[str, RunResult] = {}
    lam: float | None = None
    for name in experiment.policies:
        policy = build_policy(
            name,
            cal,
            experiment.num_workers,
            tau=experiment.tau,
            seed=experiment.workload.seed,
            is_balanced=experiment.is_balanced,
            partition=partition,
            step_cost=step_cost,
            lam=experiment.lam,
            output_tokens=experiment.workload.output_tokens,
            refit_every=experiment.refit_every,
            refit_window=experiment.refit_window,
        )
        if isinstance(policy, FewestNewExpertsPolicy):
            lam = policy.lam
        progress = on_policy(name, requests.num_requests) if on_policy is not None else None
        runs[name] = simulate(requests, policy, step_cost, pool, progress)
        metrics[name] = metrics_of(runs[name])
    return Outcome(metrics, runs, cal.num_requests, lam)


def check_policies(names: Sequence[str]) -> tuple[str, ...]:
    """Parse a policy list (`SIM_POLICIES`: the whole registry), keeping order, dropping repeats."""
    unique = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in unique if n not in SIM_POLICIES]
    if unknown or not unique:
        raise ConfigError(f"unknown policies {unknown}; choose from {', '.join(SIM_POLICIES)}")
    return unique
