"""Hostile inputs under a real memory cap (`ulimit -v`, 1 GiB of address space): refused before they
can allocate, one line, exit 2. A representative subset, each in its own process."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from badfiles import calibration_arrays, npy_bytes, npy_header_bytes, trace_arrays, write_lying_npz, write_zip

CAP_KIB = 1024 * 1024  # below the default 2 GiB budget: only refusing before allocating can pass

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ulimit -v needs Linux")


def run_capped(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    command = f"ulimit -v {CAP_KIB} && exec {shlex.quote(sys.executable)} -m eldr.cli {shlex.join(argv)}"
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **env},
    )


def assert_refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_a_member_claiming_3_gib_is_refused_unread(tmp_path: Path) -> None:
    data = npy_header_bytes((3 * 2**25, 2, 2)) + bytes(64)  # int64: 3 GiB declared
    path = write_lying_npz(
        tmp_path / "cal.npz", calibration_arrays(), "prefill_counts", data, 3 * 2**30 + 128
    )
    assert path.stat().st_size < 100_000
    out = tmp_path / "part.npz"
    argv = ["fit", "--calibration", str(path), "--workers", "2", "--out", str(out)]
    assert_refused(run_capped(argv), "above the limit")
    assert not out.exists()


def test_a_real_deflate_bomb_is_refused_under_a_lowered_budget(tmp_path: Path) -> None:
    arrays = trace_arrays()
    members = {f"{k}.npy": npy_bytes(np.asarray(v)) for k, v in arrays.items() if k != "decode_counts"}
    members["decode_counts.npy"] = npy_bytes(np.zeros((2**22, 2, 8), dtype=np.int64))  # 512 MiB of zeros
    path = write_zip(tmp_path / "bomb.npz", members, compress=True)
    assert path.stat().st_size < 2_000_000
    result = run_capped(["trace", "info", str(path)], ELDR_MAX_BYTES=str(256 * 2**20))
    assert_refused(result, "512 MiB in memory")


def test_a_counts_header_declaring_an_exabyte(tmp_path: Path, good: dict[str, Path]) -> None:
    counts = tmp_path / "counts.npy"
    counts.write_bytes(npy_header_bytes((10**9, 10**9)))
    argv = ["route", "--partition", str(good["partition"]), "--counts", str(counts), "--loads", "0,0"]
    assert_refused(run_capped(argv), "declares shape")


def test_endless_text_inputs_are_refused_at_once(tmp_path: Path) -> None:
    assert_refused(run_capped(["serve", "--config", "/dev/urandom"]), "a character device")
    out = str(tmp_path / "c.npz")
    argv = ["capture", "--engine", "http://127.0.0.1:9", "--prompts", "/dev/zero", "--out", out]
    assert_refused(run_capped(argv), "a character device")


def test_a_flag_that_would_allocate_without_bound(tmp_path: Path) -> None:
    assert_refused(run_capped(["demo", "--no-plot", "--output-tokens", "1048576"]), "token plan")
    assert_refused(run_capped(["demo", "--no-plot", "--workers", "100000000"]), "--workers")


def test_running_out_of_memory_within_a_raised_budget_is_one_line(tmp_path: Path) -> None:
    """ELDR_MAX_BYTES raised to 8 GiB lets a 3 GiB array through the checks; the 1 GiB cap does not."""
    data = npy_header_bytes((3 * 2**25, 2, 2)) + bytes(64)
    path = write_lying_npz(
        tmp_path / "cal.npz", calibration_arrays(), "prefill_counts", data, 3 * 2**30 + 128
    )
    argv = ["fit", "--calibration", str(path), "--workers", "2", "--out", str(tmp_path / "p.npz")]
    assert_refused(run_capped(argv, ELDR_MAX_BYTES=str(8 * 2**30)), "out of memory")
