"""Fixtures of the bad-input suite: valid files in a temporary folder, and the refusal check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from badfiles import Refused, calibration_arrays, partition_arrays, trace_arrays, write_npz

from eldr.cli import main


@pytest.fixture(scope="session")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid calibration, partition, trace and counts files (never modified by a test)."""
    folder = tmp_path_factory.mktemp("good")
    counts = folder / "counts.npy"
    np.save(counts, calibration_arrays()["prefill_counts"][3])
    return {
        "calibration": write_npz(folder / "cal.npz", calibration_arrays()),
        "partition": write_npz(folder / "part.npz", partition_arrays()),
        "trace": write_npz(folder / "trace.npz", trace_arrays()),
        "counts": counts,
    }


@pytest.fixture
def refused(capsys: pytest.CaptureFixture[str]) -> Refused:
    """Run `eldr ARGV` in-process; assert exit 2, one stderr line, no traceback, no file left behind.

    `absent`: paths that must not exist afterwards; `folder`: a folder whose listing must not change.
    Returns the stderr line.
    """

    def check(argv: Sequence[str], *, absent: Sequence[Path] = (), folder: Path | None = None) -> str:
        before = sorted(folder.iterdir()) if folder is not None else []
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        err = captured.err
        assert code == 2, f"exit {code}: {err or captured.out}"
        assert err.endswith("\n") and err.count("\n") == 1, err
        assert "Traceback" not in err and err.startswith("eldr "), err
        for path in absent:
            assert not path.exists(), path
        if folder is not None:
            assert sorted(folder.iterdir()) == before
        return err

    return check
