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


def test_simulate_cli_replays_online_refit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.sim.conftest import synthetic_trace

    path = tmp_path / "drift.npz"
    _drifted(synthetic_trace(1300, output_tokens=32)).save(path)
    argv = ["simulate", "--trace", str(path), "--workers", "4", "--rate", "200", "--json"]
    assert main([*argv, "--policies", "eldr,eldr-refit", "--refit-every", "50", "--refit-window", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["refit_every"] == 50 and out["settings"]["refit_window"] == 200
    rows = out["policies"]
    assert rows["eldr-refit"]["distinct_experts_per_step"] < rows["eldr"]["distinct_experts_per_step"]
    assert main([*argv, "--policies", "eldr-refit", "--refit-window", "3"]) == 2
    assert "refit window 3" in capsys.readouterr().err


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


def _drifted(trace: Trace) -> Trace:
    """Calibration requests from clusters d0, d1 only; measured requests from d2, d3: the mix drifted."""
    assert trace.domain is not None
    old = np.flatnonzero(np.isin(trace.domain, ["d0", "d1"]))
    new = np.flatnonzero(np.isin(trace.domain, ["d2", "d3"]))
    order = np.concatenate([old, new])
    return Trace(
        prefill_counts=trace.prefill_counts[order],
        decode_counts=trace.decode_counts[order],
        prompt_tokens=trace.prompt_tokens[order],
        output_tokens=trace.output_tokens[order],
        arrival_s=np.sort(trace.arrival_s),
        top_k=trace.top_k,
        layers=trace.layers,
        num_model_layers=trace.num_model_layers,
        domain=trace.domain[order],
        calibration=np.arange(order.size) < old.size,
    )


def test_online_refit_follows_a_drifted_mix(small_trace: Trace) -> None:
    """Centroids fitted on two clusters, traffic from two others: refitting on the recent signatures
    splits the new clusters over the workers; the stale partition cannot."""
    trace = _drifted(small_trace)
    base = {"num_workers": 4, "workload": WorkloadConfig(rate=200.0, seed=0)}
    cost = preset("mi300x-qwen3-30b")
    m = run_experiment(
        trace, Experiment(policies=("eldr", "eldr-refit"), refit_every=50, refit_window=200, **base), cost
    )
    refit = m.runs["eldr-refit"]
    assert refit.policy == "eldr-refit"
    stale = m.metrics["eldr"].distinct_experts_per_step
    assert m.metrics["eldr-refit"].distinct_experts_per_step < 0.95 * stale
    # after the first refits every worker serves one of the new clusters only
    assert trace.calibration is not None and trace.domain is not None
    labels = trace.domain[~trace.calibration][refit.worker.size // 2 :]
    workers = refit.worker[refit.worker.size // 2 :]
    for w in range(4):
        mine = labels[workers == w]
        assert mine.size and max(np.mean(mine == "d2"), np.mean(mine == "d3")) == 1.0, w
    # never due within the run: eldr-refit routes exactly as eldr
    never = run_experiment(
        trace, Experiment(policies=("eldr", "eldr-refit"), refit_every=10**6, **base), cost
    )
    np.testing.assert_array_equal(never.runs["eldr"].worker, never.runs["eldr-refit"].worker)


def test_refit_settings_of_an_experiment_are_checked() -> None:
    with pytest.raises(ConfigError, match="refit_every"):
        Experiment(policies=("eldr-refit",), refit_every=0)
    with pytest.raises(ConfigError, match="refit window 3"):
        Experiment(policies=("eldr-refit",), num_workers=4, refit_window=3)
    Experiment(policies=("eldr",), num_workers=4, refit_window=3)  # not running eldr-refit: unused
