"""Decode-routing policies behind one interface (`base.Policy`), and a factory by name."""

from __future__ import annotations

from eldr.errors import ConfigError
from eldr.partition import Partition
from eldr.policy.base import Decision, Policy, RequestView, WorkersView
from eldr.policy.baselines import JsqPolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy
from eldr.policy.domain import DomainPolicy, OraclePolicy
from eldr.policy.expert_overlap import DEFAULT_LAM, FewestNewExpertsPolicy, check_lam
from eldr.policy.locality_band import DEFAULT_TAU, LocalityBandPolicy, check_tau

LOAD_BALANCERS = ("random", "rr", "jsq", "p2c")
FEWEST_NEW_EXPERTS = FewestNewExpertsPolicy.name
POLICY_NAMES = (*LOAD_BALANCERS, "eldr", "domain", "oracle", FEWEST_NEW_EXPERTS)
SERVE_POLICIES = (*LOAD_BALANCERS, "eldr", FEWEST_NEW_EXPERTS)  # what `make_policy` builds

__all__ = [
    "DEFAULT_LAM",
    "DEFAULT_TAU",
    "FEWEST_NEW_EXPERTS",
    "LOAD_BALANCERS",
    "POLICY_NAMES",
    "SERVE_POLICIES",
    "Decision",
    "DomainPolicy",
    "FewestNewExpertsPolicy",
    "LocalityBandPolicy",
    "OraclePolicy",
    "Policy",
    "RequestView",
    "WorkersView",
    "check_lam",
    "check_tau",
    "make_load_balancer",
    "make_policy",
]


def make_load_balancer(name: str, seed: int = 0) -> Policy:
    """One of the paper's four load balancers by name."""
    classes: dict[str, type[Policy]] = {
        "random": RandomPolicy,
        "rr": RoundRobinPolicy,
        "jsq": JsqPolicy,
        "p2c": PowerOfTwoPolicy,
    }
    if name not in classes:
        raise ConfigError(f"unknown load balancer {name!r}; choose one of {', '.join(classes)}")
    return classes[name](seed)  # type: ignore[call-arg]


def make_policy(
    name: str,
    *,
    partition: Partition | None = None,
    tau: float = DEFAULT_TAU,
    seed: int = 0,
    num_workers: int | None = None,
    top_k: int | None = None,
    lam: float = DEFAULT_LAM,
) -> Policy:
    """A policy a router can run (`SERVE_POLICIES`): a load balancer, `eldr` (needs a partition) or
    `fewest-new-experts` (needs the number of decode workers and top_k, else the partition's top_k)."""
    if name in LOAD_BALANCERS:
        return make_load_balancer(name, seed)
    if name == "eldr":
        if partition is None:
            raise ConfigError("the eldr policy needs a partition (fit one with `eldr fit`)")
        return LocalityBandPolicy(partition, tau=tau, seed=seed)
    if name == FEWEST_NEW_EXPERTS:
        k = top_k or (partition.top_k if partition is not None else None)
        if num_workers is None or not k:
            raise ConfigError(f"the {name} policy needs the number of decode workers and top_k")
        # a partition fixes L x E up front (what turns vLLM's own expert ids into counts); without one
        # the first usable signature does
        shape = None if partition is None else (partition.num_layers, partition.num_experts)
        return FewestNewExpertsPolicy(num_workers, k, lam=lam, seed=seed, shape=shape)
    raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(SERVE_POLICIES)}")
