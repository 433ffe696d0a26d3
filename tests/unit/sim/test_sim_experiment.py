from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.cli import main
from eldr.errors import ConfigError
from eldr.policy import POLICY_NAMES
from eldr.sim.experiment import Experiment, run_experiment
from eldr.sim.presets import preset
from eldr.sim.workload import WorkloadConfig
from eldr.trace.format import Trace


def experiment(seed: int = 0, policies: tuple[str, ...] = POLICY_NAMES, rate: float = 30.0) -> Experiment:
    return Experiment(policies=policies, num_workers=4, workload=WorkloadConfig(rate=rate, seed=seed))


def test_every_request_finishes_exactly_once(small_trace: Trace) -> None:
    outcome = run_experiment(small_trace, experiment(), preset("mi300x-qwen3-30b"))
    assert outcome.num_calibration == 1000 and set(outcome.metrics) == set(POLICY_NAMES)
    for name, run in outcome.runs.items():
        assert run.policy == name
        assert np.isfinite(run.finish_s).all() and (run.worker >= 0).all(), name
        assert (run.first_token_s >= run.ready_s).all() and (run.finish_s >= run.first_token_s).all()
        assert run.final_in_flight.tolist() == [0, 0, 0, 0]
        # every generated token was in exactly one step: sum over steps of the batch size
        tokens_stepped = int(np.arange(run.steps_by_batch.size) @ run.steps_by_batch)
        assert tokens_stepped == int(run.output_tokens.sum()) == 300 * 32
        assert outcome.metrics[name].num_requests == 300 and outcome.metrics[name].load_imbalance >= 1.0


def test_locality_policies_touch_fewer_experts_on_planted_clusters(small_trace: Trace) -> None:
    # 200 req/s: batches of ~8 requests per worker, where 4 planted clusters make a difference
    m = run_experiment(small_trace, experiment(rate=200.0), preset("mi300x-qwen3-30b")).metrics
    rr = m["rr"].distinct_experts_per_step
    for name in ("eldr", "domain", "oracle"):
        assert m[name].distinct_experts_per_step < 0.9 * rr, name


def test_deterministic_per_seed(small_trace: Trace) -> None:
    policies = ("p2c", "eldr")
    a = run_experiment(small_trace, experiment(1, policies), preset("mi300x-qwen3-30b")).metrics
    b = run_experiment(small_trace, experiment(1, policies), preset("mi300x-qwen3-30b")).metrics
    c = run_experiment(small_trace, experiment(2, policies), preset("mi300x-qwen3-30b")).metrics
    assert a == b and a != c


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown policies"):
        Experiment(policies=("rr", "nope"))


def test_simulate_cli_json(small_trace: Trace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.npz"
    small_trace.save(path)
    argv = ["simulate", "--trace", str(path), "--workers", "4", "--rate", "30", "--policies", "rr,eldr"]
    assert main([*argv, "--json", "--requests", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["policies"]) == ["rr", "eldr"]
    for row in out["policies"].values():
        for key in (
            "tpot_p50_ms",
            "tpot_p99_ms",
            "ttft_p50_ms",
            "distinct_experts_per_step",
            "load_imbalance",
        ):
            assert row[key] > 0
    assert out["gain"]["eldr"]["best_load_balancer"] == "rr"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace", "/nonexistent.npz"], "cannot read trace"),
        (["--policies", "rr,bogus"], "unknown policies"),
        (["--decode", "replay"], "decode_topk"),
    ],
    ids=["missing-file", "bad-policy", "replay-without-data"],
)
def test_simulate_cli_bad_input(
    small_trace: Trace, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    path = tmp_path / "t.npz"
    small_trace.save(path)
    assert main(["simulate", "--trace", str(path), "--workers", "4", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
