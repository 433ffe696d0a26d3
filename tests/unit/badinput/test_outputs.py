"""Outputs are written atomically, and a bad output path is refused before the work starts."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badfiles import Refused

from eldr.atomicfile import atomic_path, atomic_write, check_output_path
from eldr.errors import OutputFileError
from eldr.partition import Partition


def _fit(good: dict[str, Path], out: Path | str) -> list[str]:
    return ["fit", "--calibration", str(good["calibration"]), "--workers", "2", "--out", str(out)]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing/part.npz", "folder"),
        ("a-folder", "it is a folder"),
        ("a-folder/", "is not a file name"),
        ("", "is not a file name"),
        ("/dev/null", "not a regular file"),
    ],
    ids=["no-folder", "is-folder", "trailing-slash", "empty", "device"],
)
@pytest.mark.parametrize("command", ["fit", "build", "capture", "simulate-plot", "demo-plot"])
def test_bad_output_path_is_refused_before_the_work(
    refused: Refused, good: dict[str, Path], tmp_path: Path, command: str, target: str, message: str
) -> None:
    (tmp_path / "a-folder").mkdir()
    out = (
        target
        if target.startswith("/") or not target
        else str(tmp_path / target) + "/" * target.endswith("/")
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    argv = {
        "fit": _fit(good, out),
        "build": [
            "trace",
            "build",
            "olmoe",
            "--data-dir",
            "/nonexistent",
            "--num-requests",
            "5",
            "--out",
            out,
        ],
        "capture": ["capture", "--engine", "http://127.0.0.1:9", "--prompts", str(prompts), "--out", out],
        "simulate-plot": ["simulate", "--trace", str(good["trace"]), "--plot", out],
        "demo-plot": ["demo", "--plot", out],
    }[command]
    if command.endswith("plot") and target in ("missing/part.npz",):
        argv[-1] = argv[-1].replace(".npz", ".png")
    err = refused(argv, folder=tmp_path)
    assert message in err, err


def test_unknown_plot_format_is_refused_before_simulating(
    refused: Refused, good: dict[str, Path], tmp_path: Path
) -> None:
    err = refused(
        ["simulate", "--trace", str(good["trace"]), "--plot", str(tmp_path / "x.xyz")], folder=tmp_path
    )
    assert "unknown image format '.xyz'" in err


def test_a_failed_write_keeps_the_previous_partition(
    refused: Refused, good: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "part.npz"
    out.write_bytes(good["partition"].read_bytes())
    before = out.read_bytes()

    def disk_full(file: Any, **arrays: Any) -> None:
        file.write(b"PK\x03\x04 half a partition")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    err = refused(_fit(good, out), folder=tmp_path)
    assert "cannot write partition" in err and "No space left on device" in err
    assert out.read_bytes() == before


def test_a_file_size_limit_keeps_the_previous_file(good: dict[str, Path], tmp_path: Path) -> None:
    """`ulimit -f`: the real write fails part-way (EFBIG); the good partition survives, one line, exit 2."""
    out = tmp_path / "part.npz"
    out.write_bytes(good["partition"].read_bytes())
    before = out.read_bytes()
    argv = " ".join(_fit(good, out))
    result = subprocess.run(
        ["bash", "-c", f"ulimit -f 1 && exec {sys.executable} -m eldr.cli {argv}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "cannot write partition" in result.stderr, result.stderr
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["part.npz"]


def test_successful_writes_replace_the_file_and_keep_its_permissions(
    good: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "part.npz"
    out.write_bytes(b"old")
    out.chmod(0o640)
    Partition.load(good["partition"]).save(out)
    assert Partition.load(out).num_workers == 2 and (out.stat().st_mode & 0o777) == 0o640
    with atomic_path(tmp_path / "plot.png", "plot") as temp:
        assert temp.parent == tmp_path and temp.suffix == ".png"
        temp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.npz", "plot.png"]


def test_an_error_while_producing_the_data_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), atomic_write(tmp_path / "x.npz", "trace") as fh:
        fh.write(b"partial")
        _ = 1 / 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputFileError, match="folder"):
        check_output_path(tmp_path / "no" / "x", "trace")
