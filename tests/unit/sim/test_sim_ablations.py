"""The simulator's signature ablations: eldr-raw, eldr-all-layers, eldr-plain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.cli import main
from eldr.commands.simulate import DEFAULT_POLICIES
from eldr.errors import ConfigError
from eldr.policy import ABLATION_POLICIES, POLICY_NAMES, SIM_POLICIES, LocalityBandPolicy
from eldr.sim.experiment import Experiment, check_policies, run_experiment
from eldr.sim.presets import preset
from eldr.sim.report import gain_lines, to_json
from eldr.sim.workload import (
    WorkloadConfig,
    build_policy,
    fit_for,
    split_calibration,
)
from eldr.trace.format import Trace

EXPECTED_META = {
    "eldr": ("idf", "greedy", "balanced"),
    "eldr-raw": ("raw", "greedy", "balanced"),
    "eldr-all-layers": ("idf", "all", "balanced"),
    "eldr-plain": ("idf", "greedy", "plain"),
}


def test_names_are_simulator_only() -> None:
    assert ABLATION_POLICIES == ("eldr-raw", "eldr-all-layers", "eldr-plain")
    assert not set(ABLATION_POLICIES) & set(POLICY_NAMES)  # `eldr serve` does not take them
    assert not set(ABLATION_POLICIES) & set(DEFAULT_POLICIES.split(","))
    assert (*POLICY_NAMES, "eldr-refit", *ABLATION_POLICIES) == SIM_POLICIES
    assert check_policies(["rr", "eldr-raw", " eldr-plain", "eldr-raw"]) == ("rr", "eldr-raw", "eldr-plain")
    with pytest.raises(ConfigError, match="eldr-all-layers"):
        check_policies(["eldr-idf"])
    Experiment(policies=ABLATION_POLICIES)


@pytest.mark.parametrize("name", ["eldr", *ABLATION_POLICIES])
def test_each_variant_is_fitted_as_described(small_trace: Trace, name: str) -> None:
    cal, _ = split_calibration(small_trace, None, 1000)
    policy = build_policy(name, cal, 4, tau=0.1, seed=0)
    assert isinstance(policy, LocalityBandPolicy) and policy.name == name
    part = fit_for(name, cal, 4, is_balanced=True)
    weighting, layers, kmeans = EXPECTED_META[name]
    assert (part.meta["weighting"], part.meta["layer_selection"], part.meta["kmeans"]) == (
        weighting,
        layers,
        kmeans,
    )
    assert part.meta["num_requests"] == cal.num_requests  # the same calibration set as eldr
    np.testing.assert_array_equal(policy.transform.idf, part.transform.idf)
    assert policy.transform.layers == part.transform.layers
    if weighting == "raw":
        assert (policy.transform.idf == 1.0).all()
    else:
        assert not np.allclose(policy.transform.idf, 1.0)
    if layers == "all":
        assert policy.transform.layers == tuple(range(small_trace.num_layers)) and part.meta["rho"] is None
    else:
        assert part.meta["rho"] is not None


def test_plain_ignores_is_balanced_and_ablations_ignore_a_given_partition(small_trace: Trace) -> None:
    cal, _ = split_calibration(small_trace, None, 1000)
    assert fit_for("eldr-plain", cal, 4, is_balanced=True).meta["kmeans"] == "plain"
    assert fit_for("eldr-raw", cal, 4, is_balanced=False).meta["kmeans"] == "plain"  # follows --kmeans
    given = fit_for("eldr", cal, 4, is_balanced=True)
    raw = build_policy("eldr-raw", cal, 4, tau=0.1, seed=0, partition=given)
    assert isinstance(raw, LocalityBandPolicy) and (raw.transform.idf == 1.0).all()


def test_ablations_run_and_report_against_the_best_load_balancer(small_trace: Trace) -> None:
    policies = ("rr", "jsq", "eldr", *ABLATION_POLICIES)
    experiment = Experiment(
        policies=policies, num_workers=4, workload=WorkloadConfig(rate=200.0, num_requests=150, seed=0)
    )
    outcome = run_experiment(small_trace, experiment, preset("mi300x-qwen3-30b"))
    assert list(outcome.metrics) == list(policies)
    for name in policies:
        assert outcome.runs[name].policy == name and outcome.metrics[name].policy == name
        assert outcome.metrics[name].num_requests == 150
        assert np.isfinite(outcome.runs[name].finish_s).all()
    report = to_json(outcome.metrics, {})
    for name in ("eldr", *ABLATION_POLICIES):
        assert report["gain"][name]["best_load_balancer"] in ("rr", "jsq")  # never an ablation
    lines = gain_lines(outcome.metrics)
    assert [line.split(" vs ")[0] for line in lines] == ["eldr", *ABLATION_POLICIES]


def test_simulate_cli_takes_ablations(
    small_trace: Trace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.npz"
    small_trace.save(path)
    argv = ["simulate", "--trace", str(path), "--workers", "4", "--rate", "30", "--requests", "60"]
    assert main([*argv, "--policies", "rr,eldr-raw,eldr-all-layers,eldr-plain", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["policies"]) == ["rr", *ABLATION_POLICIES]
    assert set(out["gain"]) == set(ABLATION_POLICIES)
    assert main([*argv, "--policies", "rr,eldr-idf"]) == 2
    assert "eldr-all-layers" in capsys.readouterr().err
