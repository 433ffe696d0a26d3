"""`eldr simulate --cost-model FILE.json`: a cost model fitted elsewhere (e.g. on real engines)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from eldr.cli import main
from eldr.data import demo_trace_path
from eldr.errors import InvalidInputError
from eldr.sim.presets import load_cost_model, preset


def _fields(**change: Any) -> dict[str, Any]:
    values = dataclasses.asdict(preset("this-cpu"))
    del values["name"], values["source"]
    values.update(change)
    return values


def test_a_file_holds_the_same_model_as_the_preset(tmp_path: Path) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(_fields()))
    loaded = load_cost_model(path)
    assert dataclasses.replace(loaded, name="this-cpu", source="") == dataclasses.replace(
        preset("this-cpu"), source=""
    )
    assert loaded.name == "cpu.json" and preset(str(path)) == loaded


def test_simulate_runs_with_a_file_and_the_step_cost_changes_the_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = {}
    for scale in (1.0, 2.0):
        path = tmp_path / f"x{scale}.json"
        base = _fields()
        path.write_text(json.dumps({**base, "per_expert_s": base["per_expert_s"] * scale}))
        argv = ["simulate", "--trace", str(demo_trace_path()), "--workers", "4", "--rate", "0.5"]
        argv += ["--requests", "40", "--policies", "rr", "--cost-model", str(path), "--json"]
        assert main(argv) == 0
        answers[scale] = json.loads(capsys.readouterr().out)
    tpot = {s: a["policies"]["rr"]["tpot_p50_ms"] for s, a in answers.items()}
    assert tpot[2.0] > 1.5 * tpot[1.0] > 0  # the per-expert term dominates this preset's step
    assert answers[1.0]["settings"]["cost_model"] == "x1.0.json"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps(_fields(per_expert_s=-1.0)), ">= 0"),
        (json.dumps(_fields(base_s="fast")), "finite number"),
        (json.dumps(_fields(base_s=True)), "finite number"),
        (json.dumps(_fields()).replace('"base_s": 0.0', '"base_s": NaN'), "not a number"),
        (json.dumps(_fields(max_batch=0)), "whole number"),
        (json.dumps(_fields(num_layers=2.5)), "whole number"),
        (json.dumps(_fields(colour="blue")), "unknown keys \\['colour'\\]"),
        (json.dumps({k: v for k, v in _fields().items() if k != "base_s"}), "missing keys \\['base_s'\\]"),
        (json.dumps({**_fields(), "name": 3}), "name must be a string"),
    ],
)
def test_a_bad_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        load_cost_model(path)


def test_bad_cost_models_on_the_command_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "big.json").write_text(" " * (64 * 1024 + 1))
    (tmp_path / "dir.json").mkdir()
    for value, message in (
        ("a100", "unknown cost model"),
        (str(tmp_path / "missing.json"), "cannot read cost model"),
        (str(tmp_path / "dir.json"), "folder"),
        (str(tmp_path / "big.json"), "above the limit"),
    ):
        argv = ["simulate", "--trace", str(demo_trace_path()), "--cost-model", value]
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (value, err)
