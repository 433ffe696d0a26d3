"""The calibration file `eldr fit` reads: one `.npz`, numpy alone, no pickle.

| array            | shape     | required | meaning                                             |
|------------------|-----------|----------|-----------------------------------------------------|
| `prefill_counts` | [N, L, E] | yes      | per-request prefill expert counts                   |
| `decode_counts`  | [N, L, E] | no       | per-request decode-time counts (for the layer mask) |
| `labels`         | [N] str   | no       | workload labels (for the `domain` baseline)         |
| `top_k`          | scalar    | no       | experts per token                                   |

A trace file (docs/trace-format.md) holds the same arrays (labels as `domain`) and is accepted too;
when it flags calibration requests (boolean `calibration` [N]) only those are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.errors import InputFileError, InvalidInputError
from eldr.limits import MAX_REQUESTS
from eldr.npzfile import ArraySpec, read_npz, scalar_int
from eldr.signature import as_counts

# what `load_calibration` reads (a trace's other arrays are never decompressed)
ARRAYS = (
    ArraySpec("prefill_counts", 3, "biuf", is_required=False),  # required: a clearer message below
    ArraySpec("decode_counts", 3, "biuf", is_required=False),
    ArraySpec("labels", 1, "US", is_required=False),
    ArraySpec("domain", 1, "US", is_required=False),
    ArraySpec("top_k", 0, "iuf", is_required=False),
    ArraySpec("calibration", 1, "b", is_required=False),
)


def check_calibration(
    prefill_counts: npt.ArrayLike, decode_counts: npt.ArrayLike | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64] | None]:
    """Calibration counts as int64 `[N, L, E]` (decode counts, when given, of the same shape)."""
    prefill = as_counts(prefill_counts, name="prefill_counts", ndim=3)
    if decode_counts is None:
        return prefill, None
    decode = as_counts(decode_counts, name="decode_counts", ndim=3)
    if decode.shape != prefill.shape:
        raise InvalidInputError(f"decode_counts has shape {decode.shape}, prefill_counts has {prefill.shape}")
    return prefill, decode


@dataclass(frozen=True)
class CalibrationData:
    prefill_counts: npt.NDArray[np.int64]  # [N, L, E]
    decode_counts: npt.NDArray[np.int64] | None  # [N, L, E]
    labels: npt.NDArray[np.str_] | None  # [N]
    top_k: int | None

    @property
    def num_requests(self) -> int:
        return int(self.prefill_counts.shape[0])


def load_calibration(path: str | Path) -> CalibrationData:
    """Read and check a calibration file (or a trace); one error naming the file, array and rule."""
    arrays = read_npz(path, "calibration file", ARRAYS)
    if "prefill_counts" not in arrays:
        raise InputFileError(f"{path} has no 'prefill_counts' array (found: {sorted(arrays)})")
    where = f"{path}: "
    flags = arrays.get("calibration")
    if flags is not None:
        if flags.shape != arrays["prefill_counts"].shape[:1]:
            raise InvalidInputError(f"{where}'calibration' must be a boolean array with one flag per request")
        if not flags.any():
            raise InvalidInputError(f"{where}no request is flagged for calibration")
        for name in ("prefill_counts", "decode_counts", "labels", "domain"):
            if name in arrays and arrays[name].shape[:1] == flags.shape:
                arrays[name] = arrays[name][flags]
    try:
        prefill, decode = check_calibration(arrays["prefill_counts"], arrays.get("decode_counts"))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}{exc}") from exc
    if prefill.shape[0] > MAX_REQUESTS:
        raise InvalidInputError(f"{where}at most {MAX_REQUESTS} calibration requests, got {prefill.shape[0]}")
    if not prefill.any():
        raise InvalidInputError(f"{where}prefill_counts are all zero: no request has an expert signature")
    raw_labels = arrays.get("labels", arrays.get("domain"))
    labels = None if raw_labels is None else _text(raw_labels, where)
    if labels is not None and labels.shape != (prefill.shape[0],):
        raise InvalidInputError(f"{where}labels has shape {labels.shape}, expected ({prefill.shape[0]},)")
    num_experts = int(prefill.shape[2])
    top_k = None
    if "top_k" in arrays:
        top_k = scalar_int(arrays["top_k"], "top_k", where, low=1, high=num_experts)
    return CalibrationData(prefill, decode, labels, top_k)


def _text(labels: npt.NDArray[Any], where: str) -> npt.NDArray[np.str_]:
    if labels.dtype.kind == "U":
        return labels.astype(str)
    try:
        return np.char.decode(labels, "utf-8").astype(str)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{where}labels are not UTF-8 text: {exc.reason}") from exc
