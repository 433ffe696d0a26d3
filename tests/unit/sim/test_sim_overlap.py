"""`fewest-new-experts` in the simulator: every request released, layer weights and lam from the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.cli import main
from eldr.policy import FewestNewExpertsPolicy, WorkersView
from eldr.sim.costmodel import bind
from eldr.sim.engine import PoolConfig, simulate
from eldr.sim.experiment import Experiment, run_experiment
from eldr.sim.presets import preset
from eldr.sim.workload import (
    WorkloadConfig,
    build_policy,
    mean_context_tokens,
    measured_requests,
    overlap_lam,
    split_calibration,
)
from eldr.trace.format import Trace

NAME = "fewest-new-experts"


def test_every_dispatch_is_released_by_the_end_of_a_run(small_trace: Trace) -> None:
    cost = preset("mi300x-qwen3-30b")
    cal, index = split_calibration(small_trace, None, 1000)
    requests = measured_requests(small_trace, index, WorkloadConfig(rate=200.0), with_decode_counts=False)
    step_cost = bind(cost, small_trace.layers, small_trace.num_model_layers, small_trace.num_experts)
    policy = build_policy(NAME, cal, 4, tau=0.1, seed=0, step_cost=step_cost)
    assert isinstance(policy, FewestNewExpertsPolicy)
    seen: list[int] = []
    run = simulate(requests, policy, step_cost, PoolConfig(4, 64, 10**6), lambda n: seen.append(n))
    assert policy.live_ids == frozenset() and sum(seen) == requests.num_requests
    assert run.final_in_flight.tolist() == [0, 0, 0, 0] and np.isfinite(run.finish_s).all()
    probe = policy.scores(requests.views[0], WorkersView.of([0, 0, 0, 0]))
    assert probe is not None  # every worker's row is empty again
    np.testing.assert_allclose(probe, probe[0], rtol=1e-6)


def test_lam_comes_from_the_cost_model_and_the_mean_context(small_trace: Trace) -> None:
    cost = preset("mi300x-qwen3-30b")
    cal, _ = split_calibration(small_trace, None, 1000)
    step_cost = bind(cost, small_trace.layers, small_trace.num_model_layers, small_trace.num_experts)
    context = mean_context_tokens(cal, 512)
    prompts = small_trace.prompt_tokens[:1000].mean()
    assert context == pytest.approx(prompts + 256)
    expected = 2 * cost.attn_per_token_s * context / (cost.per_expert_s * cost.num_experts / 64)
    assert overlap_lam(step_cost, context) == pytest.approx(expected)
    policy = build_policy(NAME, cal, 4, tau=0.1, seed=0, step_cost=step_cost, output_tokens=512)
    assert isinstance(policy, FewestNewExpertsPolicy) and policy.lam == pytest.approx(expected)


def test_it_touches_fewer_experts_than_round_robin_on_planted_clusters(small_trace: Trace) -> None:
    experiment = Experiment(policies=("rr", NAME), num_workers=4, workload=WorkloadConfig(rate=200.0))
    outcome = run_experiment(small_trace, experiment, preset("mi300x-qwen3-30b"))
    m = outcome.metrics
    assert m[NAME].distinct_experts_per_step < 0.9 * m["rr"].distinct_experts_per_step
    assert outcome.lam is not None and outcome.lam > 0


def test_simulate_cli_takes_lam(
    small_trace: Trace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.npz"
    small_trace.save(path)
    argv = ["simulate", "--trace", str(path), "--workers", "4", "--rate", "30", "--requests", "100"]
    assert main([*argv, "--policies", f"rr,{NAME}", "--lam", "7.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["lam"] == 7.5 and list(out["policies"]) == ["rr", NAME]
    assert out["gain"][NAME]["best_load_balancer"] == "rr"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--lam", "-1"])
    assert exc.value.code == 2 and "--lam" in capsys.readouterr().err
