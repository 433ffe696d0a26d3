"""benchmarks/real_engines.py: the rig's step-cost fit from the engines' per-run step means."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest
from tests.benchmark_module import load_benchmark

PROFILE = {"base_s": 0.005, "per_request_s": 0.0007, "per_expert_s": 0.0002, "rms_rel_err": 0.05}


@pytest.fixture(scope="module")
def re_mod() -> ModuleType:
    return load_benchmark("real_engines")


def _run(mod: ModuleType, policy: str, engines: list[dict[str, float]]) -> Any:
    return mod.Run(
        policy=policy, round=0, requests=1, errors=[], tpot_p50_ms=1.0, tpot_p99_ms=1.0, ttft_p50_ms=1.0,
        throughput_tok_s=1.0, duration_s=1.0, distinct_per_layer=1.0, mean_batch=1.0, engine_itl_ms=1.0,
        decode_steps=sum(e["steps"] for e in engines), decode_tokens=1.0, skipped_steps=0.0,
        steps_per_engine=[e["steps"] for e in engines], routed=[0.0], signatures={}, engines=engines,
    )  # fmt: skip


def _true_step(alpha: float, beta: float, batch: float, experts: float) -> float:
    """Written from the model: step = beta + alpha * (per_request * batch + per_expert * experts)."""
    return beta + alpha * (PROFILE["per_request_s"] * batch + PROFILE["per_expert_s"] * experts)


def test_recovers_a_known_contention_and_offset_from_load_balancer_runs_only(re_mod: ModuleType) -> None:
    rng = np.random.default_rng(0)
    alpha, beta = 2.4, 0.011
    runs = []
    for policy in ("rr", "jsq", "p2c", "eldr"):
        for _ in range(3):
            engines = []
            for _ in range(2):
                batch = float(rng.uniform(3, 20))
                experts = float(rng.uniform(30, 110))
                engines.append(
                    {"steps": 400.0, "batch": batch, "experts": experts,
                     "step_s": _true_step(alpha, beta, batch, experts)}
                )  # fmt: skip
            runs.append(_run(re_mod, policy, engines))
    # eldr's points are off the model: the fit must not use them, and its error on them shows it
    for e in runs[-1].engines:
        e["step_s"] *= 1.5
    # a point of too few steps is left out, however wrong
    runs[0].engines.append({"steps": 10.0, "batch": 1.0, "experts": 4.0, "step_s": 9.0})
    fit = re_mod.fit_rig_cost(runs, PROFILE)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert fit["beta_s"] == pytest.approx(beta, rel=1e-6)
    assert fit["base_s"] == pytest.approx(beta, rel=1e-6)
    assert fit["per_request_s"] == pytest.approx(alpha * PROFILE["per_request_s"], rel=1e-6)
    assert fit["per_expert_s"] == pytest.approx(alpha * PROFILE["per_expert_s"], rel=1e-6)
    assert fit["fit_points"] == 18 and fit["rms_rel_err_fit"] == pytest.approx(0.0, abs=1e-9)
    assert fit["other_points"] == 6 and fit["rms_rel_err_others"] > 0.05
    # the prefill terms and the profile's own numbers pass through
    assert fit["rms_rel_err"] == PROFILE["rms_rel_err"]


def test_refuses_without_the_engines_step_seconds(re_mod: ModuleType) -> None:
    runs = [_run(re_mod, "rr", [])]
    with pytest.raises(SystemExit, match="decode_step_seconds"):
        re_mod.fit_rig_cost(runs, PROFILE)
