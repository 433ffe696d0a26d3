"""A trace -> calibration set + measured requests + the policies to compare.

Calibration requests (what `eldr` and `domain` are fitted on) come from, in order of preference:
`--calibration FILE` (a trace or a CAL.npz), the trace's boolean `calibration` flags, or its first
`num_calibration` requests. Requests used for calibration are never measured.

Every policy of the registry (`eldr.policy.registry`) runs here: besides `POLICY_NAMES`, the paper's
signature ablations (`ABLATION_POLICIES`: `eldr` fitted on the same calibration set with one
ingredient off) and `eldr-refit` (eldr with online refit). A spec's `partition` says what its
partition is fitted on here (`fit_for`).
`fewest-new-experts` needs no fitting: it weighs the trace's recorded layers by the model layers each
stands for (the cost model's layer map) and, unless `lam` is given, takes the load weight the cost
model implies for the calibration set's mean context (`overlap_lam`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.calibrate import FitConfig, fit_partition
from eldr.calibration_data import CalibrationData
from eldr.errors import ConfigError, InvalidInputError
from eldr.partition import Partition
from eldr.policy import FEWEST_NEW_EXPERTS, SIM_POLICIES, Policy, PolicyInputs, RequestView, spec_of
from eldr.policy.domain import label_counts_of
from eldr.policy.expert_overlap import lam_of
from eldr.policy.refit import DEFAULT_REFIT_WINDOW
from eldr.sim.costmodel import StepCost
from eldr.sim.engine import Requests
from eldr.sim.tokens import SAMPLERS, TokenPlan, replay_plan, sample_plan, subset_plan
from eldr.trace.format import Trace

DECODE_MODES = ("auto", "sample", "replay")


@dataclass(frozen=True)
class WorkloadConfig:
    rate: float | None = None  # Poisson arrivals at this rate (req/s); None: the trace's arrival_s
    num_requests: int | None = None  # measure at most this many requests (in trace order)
    output_tokens: int | None = None  # every request generates exactly this many tokens
    num_calibration: int = 1000  # first requests used for calibration when nothing else says
    decode: str = "auto"  # replay the trace's decode_topk when present (auto), or sample
    sampler: str = "gumbel"  # how sampled tokens draw their top-k (tokens.SAMPLERS)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ConfigError(f"rate must be > 0 req/s, got {self.rate}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"number of requests must be >= 1, got {self.num_requests}")
        if self.output_tokens is not None and self.output_tokens < 0:
            raise ConfigError(f"output tokens must be >= 0, got {self.output_tokens}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")


def split_calibration(
    trace: Trace, calibration: CalibrationData | None, num_calibration: int
) -> tuple[CalibrationData, npt.NDArray[np.int64]]:
    """(calibration data, indices of the trace's measured requests)."""
    everything = np.arange(trace.num_requests, dtype=np.int64)
    if calibration is not None:
        if calibration.prefill_counts.shape[1:] != trace.prefill_counts.shape[1:]:
            raise InvalidInputError(
                f"calibration counts are {calibration.prefill_counts.shape[1:]} per request, the trace's "
                f"are {trace.prefill_counts.shape[1:]}"
            )
        return calibration, everything
    if trace.calibration is not None and trace.calibration.any():
        cal_index = np.flatnonzero(trace.calibration)
        measured = np.flatnonzero(~trace.calibration)
    else:
        if trace.num_requests <= num_calibration:
            raise InvalidInputError(
                f"the trace has {trace.num_requests} requests and no calibration flags: need more than "
                f"{num_calibration} to keep the first {num_calibration} for calibration, or --calibration"
            )
        cal_index, measured = everything[:num_calibration], everything[num_calibration:]
    labels = None if trace.domain is None else trace.domain[cal_index].astype(str)
    cal = CalibrationData(
        trace.prefill_counts[cal_index].astype(np.int64),
        trace.decode_counts[cal_index].astype(np.int64),
        labels,
        trace.top_k,
    )
    return cal, measured.astype(np.int64)


def measured_requests(
    trace: Trace, index: npt.NDArray[np.int64], config: WorkloadConfig, *, with_decode_counts: bool
) -> Requests:
    """The trace's requests `index` (capped, re-timed, plan built) as simulator input."""
    if config.num_requests is not None:
        index = index[: config.num_requests]
    if index.size == 0:
        raise InvalidInputError("no requests left to simulate after the calibration split")
    if config.output_tokens is None:
        out = trace.output_tokens[index].astype(np.int64)
    else:
        out = np.full(index.size, config.output_tokens, dtype=np.int64)
    if config.rate is None:
        arrival = trace.arrival_s[index] - trace.arrival_s[index[0]]
    else:
        arrival = poisson_arrivals(index.size, config.rate, config.seed)
    plan = token_plan(trace, index, out, config)
    labels = None if trace.domain is None else trace.domain[index].astype(str)
    views = [
        RequestView(
            request_id=str(int(i)),
            counts=trace.prefill_counts[i],
            label=None if labels is None else str(labels[j]),
            decode_counts=trace.decode_counts[i] if with_decode_counts else None,
        )
        for j, i in enumerate(index.tolist())
    ]
    return Requests(
        np.asarray(arrival, dtype=np.float64),
        trace.prompt_tokens[index].astype(np.int64),
        out,
        views,
        plan,
    )


def poisson_arrivals(num_requests: int, rate: float, seed: int) -> npt.NDArray[np.float64]:
    """Poisson arrival times `[N]` at `rate` req/s, the first at 0."""
    arrival = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests))
    return arrival - arrival[0]


def token_plan(
    trace: Trace, index: npt.NDArray[np.int64], out: npt.NDArray[np.int64], config: WorkloadConfig
) -> TokenPlan:
    has_exact = trace.decode_topk is not None and trace.decode_offsets is not None
    if config.decode == "replay" and not has_exact:
        raise InvalidInputError("--decode replay needs a trace with decode_topk and decode_offsets")
    if config.decode == "replay" and config.output_tokens is not None:
        raise InvalidInputError("--decode replay cannot change output lengths (drop --output-tokens)")
    if has_exact and config.decode != "sample" and config.output_tokens is None:
        assert trace.decode_topk is not None and trace.decode_offsets is not None
        full = replay_plan(trace.decode_topk, trace.decode_offsets, trace.output_tokens, trace.num_experts)
        return subset_plan(full, index)
    # seed offset: the plan's randomness is independent of the arrival process
    return sample_plan(
        trace.decode_counts[index], out, trace.top_k, seed=config.seed + 7919, sampler=config.sampler
    )


def fit_for(
    name: str, cal: CalibrationData, num_workers: int, *, is_balanced: bool, fit_seed: int = 1
) -> Partition:
    """The partition a policy routes with, fitted on what its spec says: prefill counts (`eldr` and its
    variants) or decode counts (`oracle`). An ablation overrides one `FitConfig` setting (its spec's
    `fit_overrides`); `eldr-plain` is plain k-means whatever `is_balanced` says."""
    spec = spec_of(name, SIM_POLICIES)
    if spec.partition == "decode":
        if cal.decode_counts is None:
            raise InvalidInputError(f"the {name} policy needs calibration decode_counts")
        counts = cal.decode_counts
    else:
        counts = cal.prefill_counts
    settings: dict[str, Any] = {"is_balanced": is_balanced, **spec.fit_overrides}
    config = FitConfig(num_workers=num_workers, seed=fit_seed, **settings)
    return fit_partition(counts, config, decode_counts=cal.decode_counts, top_k=cal.top_k)


def mean_context_tokens(cal: CalibrationData, output_tokens: int | None) -> float:
    """Mean context of a decoding request: calibration prompt tokens + half the output tokens
    (`output_tokens`, else the calibration requests' mean decode tokens)."""
    if cal.top_k is None:
        raise InvalidInputError(f"the {FEWEST_NEW_EXPERTS} policy needs top_k (the trace's or CAL.npz's)")
    prompt = float(cal.prefill_counts[:, 0].sum(axis=-1).mean()) / cal.top_k  # each layer sums to T k
    if output_tokens is not None:
        out = float(output_tokens)
    elif cal.decode_counts is not None:
        out = float(cal.decode_counts[:, 0].sum(axis=-1).mean()) / cal.top_k
    else:
        out = 0.0
    return prompt + out / 2


def overlap_lam(step_cost: StepCost, context_tokens: float) -> float:
    """`fewest-new-experts`' load weight implied by a bound cost model (`expert_overlap` docstring)."""
    m = step_cost.model
    return lam_of(
        per_request_s=m.per_request_s,
        attn_per_token_s=m.attn_per_token_s,
        per_expert_s=m.per_expert_s,
        expert_scale=step_cost.expert_scale,
        context=context_tokens,
    )


def overlap_inputs(
    cal: CalibrationData, step_cost: StepCost, *, lam: float | None = None, output_tokens: int | None = None
) -> dict[str, Any]:
    """`fewest-new-experts` in a simulated pool: layers weighed by the layer map, lam derived from the
    cost model unless given, L x E and top_k from the calibration requests."""
    if lam is None:
        lam = overlap_lam(step_cost, mean_context_tokens(cal, output_tokens))
    if cal.top_k is None:
        raise InvalidInputError(f"the {FEWEST_NEW_EXPERTS} policy needs top_k (the trace's or CAL.npz's)")
    num_layers, num_experts = cal.prefill_counts.shape[1:]
    return {
        "lam": lam,
        "top_k": cal.top_k,
        "layer_weights": step_cost.layer_weights,
        "shape": (int(num_layers), int(num_experts)),
    }


def build_policy(
    name: str,
    cal: CalibrationData,
    num_workers: int,
    *,
    tau: float,
    seed: int,
    is_balanced: bool = True,
    partition: Partition | None = None,
    step_cost: StepCost | None = None,
    lam: float | None = None,
    output_tokens: int | None = None,
    refit_every: int = 500,
    refit_window: int = DEFAULT_REFIT_WINDOW,
) -> Policy:
    """The policy `name` of the registry, with what its spec needs derived from the calibration set.

    A policy with a partition gets one fitted here (`fit_for`); `partition` replaces it for `eldr` and
    `eldr-refit` only (the ablations and `oracle` are always fitted here). `domain` takes the
    calibration labels; `fewest-new-experts` needs `step_cost` (and takes `lam`, `output_tokens`:
    `overlap_inputs`); `eldr-refit` refits every `refit_every` signatures over the last `refit_window`.
    """
    spec = spec_of(name, SIM_POLICIES)
    extra: dict[str, Any] = {}
    if spec.partition is not None:
        is_given = partition is not None and spec.partition == "prefill" and not spec.fit_overrides
        extra["partition"] = (
            partition if is_given else fit_for(name, cal, num_workers, is_balanced=is_balanced)
        )
    if name == "domain":
        if cal.labels is None:
            raise InvalidInputError("the domain policy needs labelled calibration requests (trace `domain`)")
        extra["label_counts"] = label_counts_of(cal.labels)
    if name == FEWEST_NEW_EXPERTS:
        if step_cost is None:
            raise ConfigError(f"the {name} policy needs the bound cost model (step_cost)")
        extra.update(overlap_inputs(cal, step_cost, lam=lam, output_tokens=output_tokens))
    inputs = PolicyInputs(
        num_workers=num_workers,
        seed=seed,
        tau=tau,
        refit_every=refit_every,
        refit_window=refit_window,
        **extra,
    )
    return spec.build(inputs)
