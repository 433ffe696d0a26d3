"""Decode-routing policies behind one interface (`base.Policy`); names and construction in `registry`."""

from __future__ import annotations

from eldr.partition import Partition
from eldr.policy.base import Decision, Policy, RequestView, WorkersView
from eldr.policy.domain import DomainPolicy, OraclePolicy
from eldr.policy.expert_overlap import DEFAULT_LAM, FewestNewExpertsPolicy, check_lam
from eldr.policy.locality_band import DEFAULT_TAU, LocalityBandPolicy, check_tau
from eldr.policy.registry import (
    ABLATION_POLICIES,
    LOAD_BALANCERS,
    POLICIES,
    POLICY_NAMES,
    SERVE_POLICIES,
    SIM_POLICIES,
    PolicyInputs,
    PolicySpec,
    build,
    spec_of,
)

FEWEST_NEW_EXPERTS = FewestNewExpertsPolicy.name

__all__ = [
    "ABLATION_POLICIES",
    "DEFAULT_LAM",
    "DEFAULT_TAU",
    "FEWEST_NEW_EXPERTS",
    "LOAD_BALANCERS",
    "POLICIES",
    "POLICY_NAMES",
    "SERVE_POLICIES",
    "SIM_POLICIES",
    "Decision",
    "DomainPolicy",
    "FewestNewExpertsPolicy",
    "LocalityBandPolicy",
    "OraclePolicy",
    "Policy",
    "PolicyInputs",
    "PolicySpec",
    "RequestView",
    "WorkersView",
    "build",
    "check_lam",
    "check_tau",
    "make_policy",
    "spec_of",
]


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
    inputs = PolicyInputs(
        num_workers=num_workers, seed=seed, tau=tau, lam=lam, top_k=top_k, partition=partition
    )
    return build(name, inputs, SERVE_POLICIES)
