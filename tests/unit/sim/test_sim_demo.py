from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from eldr.cli import main


def test_demo_writes_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    plot = tmp_path / "demo.png"
    argv = ["demo", "--requests", "150", "--policies", "rr,jsq,eldr,domain", "--plot", str(plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "eldr vs best load balancer" in out and "domain" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_json_uses_the_shipped_partition(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "100", "--policies", "rr,eldr", "--no-plot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["num_calibration"] == 1000 and out["settings"]["num_measured"] == 100
    assert out["policies"]["eldr"]["num_fallbacks"] == 0
    assert out["policies"]["eldr"]["distinct_experts_per_step"] > 0


@pytest.mark.slow
def test_full_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    assert main(["demo", "--plot", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    for name in ("rr", "random", "jsq", "p2c", "domain", "eldr", "oracle"):
        assert f"│ {name}" in out


def test_demo_without_matplotlib_prints_the_table_and_how_to_get_the_plot(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--requests", "50", "--policies", "rr,eldr"]) == 0
    captured = capsys.readouterr()
    assert "│ eldr" in captured.out and captured.err == ""
    last = captured.out.strip().splitlines()[-1]
    assert "pip install 'eldr[plot]'" in last and "no plot written" in last
    assert not (tmp_path / "eldr-demo.png").exists()


def test_demo_asked_for_a_plot_without_matplotlib_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["demo", "--requests", "50", "--policies", "rr", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'eldr[plot]'" in err and len(err.splitlines()) == 1
