"""The one registry of decode-routing policies: name -> what it is built from, where it runs, its options.

Every place that names or builds a policy goes through `POLICIES`: `eldr serve --policy` and the
config file (`SERVE_POLICIES`), `eldr simulate --policies` (`SIM_POLICIES`), the proxy's router and
the simulator (`build`). A spec says

- `options`: the `PolicyInputs` fields the policy reads (what `--help` and the docs list for it);
- `partition`: what its partition is fitted on, `"prefill"` counts (eldr and its variants) or
  `"decode"` counts (oracle), with `fit_overrides` for the `FitConfig` settings a variant changes;
  `None`: it routes without one;
- `is_servable`: a router can run it (it needs neither labels nor a request's future decode experts);
- `is_load_balancer`: one of the paper's four load balancers (the baselines gains are measured
  against).

Building is plain: the caller fits what the spec asks for (the simulator fits partitions on its
calibration requests, the proxy loads `eldr fit`'s file) and passes it in `PolicyInputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy.typing as npt

from eldr.errors import ConfigError
from eldr.partition import Partition
from eldr.policy.base import Policy
from eldr.policy.baselines import JsqPolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy
from eldr.policy.domain import DomainPolicy, OraclePolicy
from eldr.policy.expert_overlap import DEFAULT_LAM, FewestNewExpertsPolicy
from eldr.policy.locality_band import DEFAULT_TAU, LocalityBandPolicy
from eldr.policy.refit import DEFAULT_REFIT_WINDOW, REFIT_POLICY, RefittingPolicy


@dataclass(frozen=True)
class PolicyInputs:
    """Everything a policy may be built from; each one reads the fields its spec names."""

    num_workers: int | None = None
    seed: int = 0
    tau: float = DEFAULT_TAU
    lam: float = DEFAULT_LAM
    top_k: int | None = None  # fewest-new-experts: experts per token (else the partition's)
    partition: Partition | None = None
    label_counts: Mapping[str, int] | None = None  # domain: calibration requests per label
    layer_weights: npt.ArrayLike | None = None  # fewest-new-experts: weight of each recorded layer
    shape: tuple[int, int] | None = None  # fewest-new-experts: (L, E), else the partition's
    refit_every: int = 500
    refit_window: int = DEFAULT_REFIT_WINDOW


@dataclass(frozen=True)
class PolicySpec:
    name: str
    summary: str
    build: Callable[[PolicyInputs], Policy] = field(repr=False)
    options: tuple[str, ...] = ("seed",)
    partition: str | None = None  # "prefill" | "decode": what its partition is fitted on
    fit_overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    is_servable: bool = False
    is_load_balancer: bool = False
    is_variant: bool = False  # a variant of eldr (refit, ablations): simulator only, never by default


def _partition_of(name: str, inputs: PolicyInputs) -> Partition:
    if inputs.partition is None:
        raise ConfigError(f"the {name} policy needs a partition (fit one with `eldr fit`)")
    return inputs.partition


def _band(name: str) -> Callable[[PolicyInputs], Policy]:
    def build(inputs: PolicyInputs) -> Policy:
        policy = LocalityBandPolicy(_partition_of(name, inputs), tau=inputs.tau, seed=inputs.seed)
        policy.name = name  # runs and metrics carry the variant's name
        return policy

    return build


def _refitting(inputs: PolicyInputs) -> Policy:
    band = LocalityBandPolicy(_partition_of(REFIT_POLICY, inputs), tau=inputs.tau, seed=inputs.seed)
    return RefittingPolicy(band, window=inputs.refit_window, refit_every=inputs.refit_every, seed=inputs.seed)


def _oracle(inputs: PolicyInputs) -> Policy:
    return OraclePolicy(_partition_of("oracle", inputs), tau=inputs.tau, seed=inputs.seed)


def _domain(inputs: PolicyInputs) -> Policy:
    if inputs.label_counts is None or inputs.num_workers is None:
        raise ConfigError("the domain policy needs labelled calibration requests and the number of workers")
    return DomainPolicy(inputs.label_counts, inputs.num_workers, seed=inputs.seed)


def _fewest_new_experts(inputs: PolicyInputs) -> Policy:
    name = FewestNewExpertsPolicy.name
    partition = inputs.partition
    top_k = inputs.top_k or (partition.top_k if partition is not None else None)
    if inputs.num_workers is None or not top_k:
        raise ConfigError(f"the {name} policy needs the number of decode workers and top_k")
    # a partition fixes L x E up front (what turns vLLM's own expert ids into counts); without one
    # the first usable signature does
    shape = inputs.shape
    if shape is None and partition is not None:
        shape = (partition.num_layers, partition.num_experts)
    return FewestNewExpertsPolicy(
        inputs.num_workers,
        top_k,
        lam=inputs.lam,
        layer_weights=inputs.layer_weights,
        shape=shape,
        seed=inputs.seed,
    )


_BAND_OPTIONS = ("tau", "seed")
_SPECS = (
    PolicySpec(
        "random",
        "a uniformly random healthy worker",
        lambda i: RandomPolicy(i.seed),
        is_servable=True,
        is_load_balancer=True,
    ),
    PolicySpec(
        "rr",
        "round robin over the healthy workers",
        lambda i: RoundRobinPolicy(i.seed),
        is_servable=True,
        is_load_balancer=True,
    ),
    PolicySpec(
        "jsq",
        "join the shortest queue: fewest in-flight requests",
        lambda i: JsqPolicy(i.seed),
        is_servable=True,
        is_load_balancer=True,
    ),
    PolicySpec(
        "p2c",
        "power of two choices: the less loaded of two random workers",
        lambda i: PowerOfTwoPolicy(i.seed),
        is_servable=True,
        is_load_balancer=True,
    ),
    PolicySpec(
        "eldr",
        "locality band over the partition's centroids, least loaded inside it (the paper)",
        _band("eldr"),
        is_servable=True,
        options=_BAND_OPTIONS,
        partition="prefill",
    ),
    PolicySpec("domain", "simulation: each workload label owns a pool of workers (needs labels)", _domain),
    PolicySpec(
        "oracle",
        "simulation: eldr on a partition of the requests' true decode experts",
        _oracle,
        options=_BAND_OPTIONS,
        partition="decode",
    ),
    PolicySpec(
        FewestNewExpertsPolicy.name,
        "the worker whose running batch the request adds the fewest new experts to, plus lam x load",
        _fewest_new_experts,
        options=("lam", "top_k", "seed"),
        is_servable=True,
    ),
    PolicySpec(
        REFIT_POLICY,
        "simulation: eldr with online refit (what eldr serve --refit-every does)",
        _refitting,
        options=("tau", "seed", "refit_every", "refit_window"),
        partition="prefill",
        is_variant=True,
    ),
    PolicySpec(
        "eldr-raw",
        "ablation: eldr fitted on counts without IDF weights",
        _band("eldr-raw"),
        fit_overrides=MappingProxyType({"weighting": "raw"}),
        is_variant=True,
        options=_BAND_OPTIONS,
        partition="prefill",
    ),
    PolicySpec(
        "eldr-all-layers",
        "ablation: eldr on every recorded layer, no greedy layer mask",
        _band("eldr-all-layers"),
        fit_overrides=MappingProxyType({"layer_selection": "all"}),
        is_variant=True,
        options=_BAND_OPTIONS,
        partition="prefill",
    ),
    PolicySpec(
        "eldr-plain",
        "ablation: eldr fitted by plain instead of balanced k-means",
        _band("eldr-plain"),
        fit_overrides=MappingProxyType({"is_balanced": False}),
        is_variant=True,
        options=_BAND_OPTIONS,
        partition="prefill",
    ),
)

POLICIES: Mapping[str, PolicySpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
LOAD_BALANCERS = tuple(name for name, spec in POLICIES.items() if spec.is_load_balancer)
SERVE_POLICIES = tuple(name for name, spec in POLICIES.items() if spec.is_servable)
SIM_POLICIES = tuple(POLICIES)  # the simulator runs every one
POLICY_NAMES = tuple(name for name, spec in POLICIES.items() if not spec.is_variant)
ABLATION_POLICIES = tuple(name for name, spec in POLICIES.items() if spec.fit_overrides)


def spec_of(name: str, allowed: tuple[str, ...] = SIM_POLICIES) -> PolicySpec:
    """The spec of policy `name`, a `ConfigError` naming the choices unless it is one of `allowed`."""
    if name not in allowed:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(allowed)}")
    return POLICIES[name]


def build(name: str, inputs: PolicyInputs, allowed: tuple[str, ...] = SIM_POLICIES) -> Policy:
    """Policy `name` from `inputs` (a `ConfigError` when it is not `allowed` or lacks an input)."""
    return spec_of(name, allowed).build(inputs)
