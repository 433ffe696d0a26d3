"""Every `--json` output is strict JSON: an undefined metric is null, never a bare NaN or Infinity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badfiles import trace_arrays, write_npz

from eldr.cli import main
from eldr.strictjson import dumps, finite_or_none


def strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON output"))


def test_non_finite_values_become_null() -> None:
    value = {"a": float("nan"), "b": [np.float32("inf"), np.float64(1.5)], 3: np.array([1.0, -np.inf])}
    assert strict_loads(dumps(value)) == {"a": None, "b": [None, 1.5], "3": [1.0, None]}
    assert finite_or_none((np.int64(2), "x", None, True)) == [2, "x", None, True]


def test_simulate_json_with_undefined_tpot_is_strict(
    good: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """One output token per request: no TPOT at all, so its percentiles are undefined (null)."""
    argv = ["simulate", "--trace", str(good["trace"]), "--workers", "2", "--policies", "rr,eldr"]
    assert main([*argv, "--output-tokens", "1", "--json"]) == 0
    out = strict_loads(capsys.readouterr().out)
    assert out["policies"]["rr"]["tpot_p50_ms"] is None and out["policies"]["rr"]["ttft_p50_ms"] > 0
    assert out["gain"]["eldr"]["tpot_p50_pct"] is None


def test_trace_info_json_with_undefined_correlations_is_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = trace_arrays()
    arrays["decode_counts"] = np.zeros_like(arrays["decode_counts"])  # constant: no correlation
    arrays["output_tokens"] = np.zeros_like(arrays["output_tokens"])
    arrays["arrival_s"] = np.zeros_like(arrays["arrival_s"])  # zero duration: no mean rate
    del arrays["domain"]  # no batch-locality statistics (they need domains and output tokens)
    path = write_npz(tmp_path / "flat.npz", arrays)
    assert main(["trace", "info", str(path), "--json"]) == 0
    out = strict_loads(capsys.readouterr().out)
    assert out["request_correlation"]["all"] is None and out["mean_rate"] is None


def test_fit_and_route_json_are_strict(
    good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.npz"
    assert (
        main(
            ["fit", "--calibration", str(good["calibration"]), "--workers", "2", "--out", str(out), "--json"]
        )
        == 0
    )
    assert strict_loads(capsys.readouterr().out)["workers"] == 2
    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((2, 8), dtype=np.int64))
    assert main(["route", "--partition", str(out), "--counts", str(zeros), "--loads", "3,1", "--json"]) == 0
    decision = strict_loads(capsys.readouterr().out)
    assert decision["is_fallback"] and decision["worker"] == 1
