"""Data shipped with eldr: a small OLMoE-derived trace and its partition (see NOTICE).

Regenerate both with `scripts/build-demo-data` (needs ../shared/data); docs/trace-format.md says how.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

from eldr.errors import InputFileError

DEMO_TRACE = "demo_trace.npz"
DEMO_PARTITION = "demo_partition.npz"


def _path(name: str) -> Path:
    resource = files("eldr.data").joinpath(name)
    with as_file(resource) as path:  # a real file for an installed (unzipped) package
        if not Path(path).is_file():
            raise InputFileError(f"shipped data file {name} is missing from this eldr install")
        return Path(path)


def demo_trace_path() -> Path:
    """The shipped demo trace: 4,000 OLMoE-derived requests, the first 1,000 flagged for calibration."""
    return _path(DEMO_TRACE)


def demo_partition_path() -> Path:
    """The partition (16 workers) fitted on the demo trace's calibration requests."""
    return _path(DEMO_PARTITION)
