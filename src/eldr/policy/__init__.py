"""Decode-routing policies behind one interface (`base.Policy`), and a factory by name."""

from __future__ import annotations

from eldr.errors import ConfigError
from eldr.partition import Partition
from eldr.policy.base import Decision, Policy, RequestView, WorkersView
from eldr.policy.baselines import JsqPolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy
from eldr.policy.domain import DomainPolicy, OraclePolicy
from eldr.policy.locality_band import DEFAULT_TAU, LocalityBandPolicy, check_tau

LOAD_BALANCERS = ("random", "rr", "jsq", "p2c")
POLICY_NAMES = (*LOAD_BALANCERS, "eldr", "domain", "oracle")

__all__ = [
    "DEFAULT_TAU",
    "LOAD_BALANCERS",
    "POLICY_NAMES",
    "Decision",
    "DomainPolicy",
    "LocalityBandPolicy",
    "OraclePolicy",
    "Policy",
    "RequestView",
    "WorkersView",
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
    name: str, *, partition: Partition | None = None, tau: float = DEFAULT_TAU, seed: int = 0
) -> Policy:
    """A policy that needs at most a partition: a load balancer or `eldr`."""
    if name in LOAD_BALANCERS:
        return make_load_balancer(name, seed)
    if name == "eldr":
        if partition is None:
            raise ConfigError("the eldr policy needs a partition (fit one with `eldr fit`)")
        return LocalityBandPolicy(partition, tau=tau, seed=seed)
    raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join((*LOAD_BALANCERS, 'eldr'))}")
