from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eldr.cli import main
from eldr.synthetic import SyntheticCounts


@pytest.fixture
def cal_file(tmp_path: Path, synthetic: SyntheticCounts) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(
        path,
        prefill_counts=synthetic.prefill_counts,
        decode_counts=synthetic.decode_counts,
        labels=np.array([f"d{x}" for x in synthetic.labels]),
        top_k=2,
    )
    return path


def test_fit_then_route(
    cal_file: Path, tmp_path: Path, synthetic: SyntheticCounts, capsys: pytest.CaptureFixture[str]
) -> None:
    part = tmp_path / "part.npz"
    assert main(["fit", "--calibration", str(cal_file), "--workers", "4", "--out", str(part), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["workers"] == 4 and sum(summary["cluster_sizes"]) == 240
    assert max(summary["cluster_sizes"]) <= 60 and summary["rho"] is not None

    counts = tmp_path / "counts.npy"
    np.save(counts, synthetic.prefill_counts[7])
    argv = ["route", "--partition", str(part), "--counts", str(counts), "--loads", "0,0,0,0", "--tau", "0"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["worker"] == int(np.argmax(out["similarities"])) and out["band"] == [out["worker"]]
    assert main(argv) == 0
    assert f"worker {out['worker']}" in capsys.readouterr().out


def test_route_accepts_per_token_topk_ids(
    cal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    part = tmp_path / "part.npz"
    main(["fit", "--calibration", str(cal_file), "--workers", "4", "--out", str(part)])
    assert "fitted 4 workers from 240 requests" in capsys.readouterr().out
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 16, size=(5, 6, 2)))
    assert (
        main(["route", "--partition", str(part), "--counts", str(ids), "--loads", "1,2,3,4", "--json"]) == 0
    )
    assert 0 <= json.loads(capsys.readouterr().out)["worker"] < 4


def _write(tmp_path: Path, name: str, **arrays: np.ndarray) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


@pytest.mark.parametrize(
    ("arrays", "workers", "message"),
    [
        ({"prefill_counts": np.ones((4, 3))}, "2", "must have 3 dimensions"),
        ({"prefill_counts": -np.ones((4, 2, 3))}, "2", "negative"),
        ({"prefill_counts": np.full((4, 2, 3), np.nan)}, "2", "NaN"),
        ({"prefill_counts": np.ones((4, 2, 3))}, "9", "K=9 workers from N=4"),
        ({"prefill_counts": np.ones((0, 2, 3))}, "2", "empty"),
        ({"decode_counts": np.ones((4, 2, 3))}, "2", "no 'prefill_counts'"),
        (
            {"prefill_counts": np.ones((4, 2, 3)), "decode_counts": np.ones((3, 2, 3))},
            "2",
            "decode_counts has shape",
        ),
    ],
    ids=["2d", "negative", "nan", "k>n", "empty", "no-prefill", "decode-shape"],
)
def test_fit_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arrays: dict[str, np.ndarray],
    workers: str,
    message: str,
) -> None:
    cal = _write(tmp_path, "cal.npz", **arrays)
    assert main(["fit", "--calibration", cal, "--workers", workers, "--out", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("eldr fit: error:")


def test_unreadable_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--calibration", str(tmp_path / "nope.npz"), "--workers", "2", "--out", "x"]) == 2
    assert "cannot read calibration file" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    bad.write_text("hello")
    assert main(["route", "--partition", str(bad), "--counts", str(bad), "--loads", "1"]) == 2
    assert "cannot read partition" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("counts", "loads", "message"),
    [
        (np.ones((6, 16)), "1,2,3", "fitted for 4 decode workers, this setup has 3"),
        (np.ones((5, 16)), "1,2,3,4", "the partition expects 6 layers x 16 experts"),
        (-np.ones((6, 16)), "1,2,3,4", "negative"),
    ],
    ids=["loads-vs-k", "shape", "negative"],
)
def test_route_bad_input_is_one_line_and_exit_2(
    cal_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    counts: np.ndarray,
    loads: str,
    message: str,
) -> None:
    part = tmp_path / "part.npz"
    main(["fit", "--calibration", str(cal_file), "--workers", "4", "--out", str(part)])
    capsys.readouterr()
    path = tmp_path / "c.npy"
    np.save(path, counts)
    assert main(["route", "--partition", str(part), "--counts", str(path), "--loads", loads]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "route" in out


def test_fit_uses_only_flagged_calibration_requests_of_a_trace(
    tmp_path: Path, synthetic: SyntheticCounts, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = np.zeros(240, dtype=bool)
    flags[:100] = True
    cal = _write(
        tmp_path,
        "trace.npz",
        prefill_counts=synthetic.prefill_counts,
        decode_counts=synthetic.decode_counts,
        domain=np.array([f"d{x}" for x in synthetic.labels]),
        calibration=flags,
    )
    assert (
        main(["fit", "--calibration", cal, "--workers", "4", "--out", str(tmp_path / "p.npz"), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["num_requests"] == 100
    none = _write(
        tmp_path, "none.npz", prefill_counts=synthetic.prefill_counts, calibration=~np.ones(240, bool)
    )
    assert main(["fit", "--calibration", none, "--workers", "4", "--out", str(tmp_path / "q.npz")]) == 2
    assert "no request is flagged" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["trace", "info", "--json"], ["trace", "info"]])
def test_a_closed_stdout_pipe_ends_quietly(args: list[str]) -> None:
    """`eldr ... | head -1`: the reader is gone before the command writes; no traceback, a non-zero exit."""
    import subprocess
    import sys

    from eldr.data import demo_trace_path

    command = [sys.executable, "-m", "eldr.cli", *args, str(demo_trace_path())]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command has written anything
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert code in (1, 141)  # rich's console exits 1 on a broken pipe; plain output exits 141
