"""The one policy registry: every name builds, and every place that lists or builds policies uses it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from eldr.errors import ConfigError
from eldr.partition import Partition
from eldr.policy import (
    ABLATION_POLICIES,
    LOAD_BALANCERS,
    POLICIES,
    POLICY_NAMES,
    SERVE_POLICIES,
    SIM_POLICIES,
    PolicyInputs,
    RequestView,
    WorkersView,
    build,
    make_policy,
    spec_of,
)

SRC = Path(__file__).resolve().parents[2] / "src" / "eldr"


def _inputs(name: str, partition: Partition) -> PolicyInputs:
    spec = POLICIES[name]
    return PolicyInputs(
        num_workers=partition.num_workers,
        top_k=2,
        partition=partition if spec.partition or name == "fewest-new-experts" else None,
        label_counts={"a": 60, "b": 60} if name == "domain" else None,
        refit_window=8,
    )


@pytest.mark.parametrize("name", SIM_POLICIES)
def test_every_registered_policy_builds_and_routes(name: str, partition: Partition) -> None:
    policy = build(name, _inputs(name, partition))
    assert policy.name == name  # runs and metrics carry the registered name
    counts = np.ones((partition.num_layers, partition.num_experts), dtype=np.int64)
    view = WorkersView.of([0] * partition.num_workers)
    decision = policy.choose(RequestView("r0", counts, label="a"), view)
    assert 0 <= decision.worker < partition.num_workers
    policy.release("r0")


def test_the_lists_are_views_of_the_registry() -> None:
    assert LOAD_BALANCERS == ("random", "rr", "jsq", "p2c")
    assert (*LOAD_BALANCERS, "eldr", "fewest-new-experts") == SERVE_POLICIES
    assert (*LOAD_BALANCERS, "eldr", "domain", "oracle", "fewest-new-experts") == POLICY_NAMES
    assert ABLATION_POLICIES == ("eldr-raw", "eldr-all-layers", "eldr-plain")
    assert set(SIM_POLICIES) == {*POLICY_NAMES, "eldr-refit", *ABLATION_POLICIES}
    for name in SERVE_POLICIES:  # a router knows neither labels nor a request's future decode experts
        assert POLICIES[name].partition != "decode" and name != "domain"


def test_names_outside_a_list_are_refused_with_the_choices(partition: Partition) -> None:
    with pytest.raises(ConfigError, match="unknown policy 'oracle'; choose one of random, rr"):
        make_policy("oracle", partition=partition)
    with pytest.raises(ConfigError, match="unknown policy 'bogus'"):
        spec_of("bogus")
    with pytest.raises(ConfigError, match="needs a partition"):
        build("eldr", PolicyInputs())
    with pytest.raises(ConfigError, match="number of decode workers and top_k"):
        build("fewest-new-experts", PolicyInputs(num_workers=4))


def test_serve_config_and_cli_take_their_names_from_the_registry() -> None:
    from eldr.proxy.config import ServeConfig

    with pytest.raises(ConfigError, match="domain"):
        ServeConfig(prefill=("http://127.0.0.1:1",), decode=("http://127.0.0.1:2",), policy="domain")
    for name in SERVE_POLICIES:
        ServeConfig(
            prefill=("http://127.0.0.1:1",),
            decode=("http://127.0.0.1:2",),
            policy=name,
            partition="p.npz",
            top_k=2,
        )


def test_no_module_builds_policies_outside_the_registry() -> None:
    """Policy classes are constructed in the registry only (this test failed on commands/route.py)."""
    names = (
        "RandomPolicy|RoundRobinPolicy|JsqPolicy|PowerOfTwoPolicy|LocalityBandPolicy|OraclePolicy|"
        "DomainPolicy|FewestNewExpertsPolicy|RefittingPolicy"
    )
    classes = rf"\b({names})\("
    allowed = {"policy/registry.py"}
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            is_code = not line.lstrip().startswith(("class ", "#"))
            if re.search(classes, line) and is_code and rel not in allowed:
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []
