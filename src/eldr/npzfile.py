"""Reading eldr's `.npz` files (calibration, partition, trace): no pickle, one clear error."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.errors import InputFileError


def read_npz(path: str | Path, what: str) -> dict[str, npt.NDArray[Any]]:
    """All arrays of `path`, loaded without pickle; `InputFileError` naming `what` if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc}") from exc


def read_meta(arrays: dict[str, npt.NDArray[Any]], path: str | Path) -> dict[str, Any]:
    """The 0-d JSON string array `meta` as a dict (empty when absent)."""
    if "meta" not in arrays:
        return {}
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: meta is not a JSON string: {exc}") from exc
    if not isinstance(meta, dict):
        raise InputFileError(f"{path}: meta must be a JSON object")
    return meta
