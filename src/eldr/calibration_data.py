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

import numpy as np
import numpy.typing as npt

from eldr.calibrate import check_calibration
from eldr.errors import InputFileError, InvalidInputError
from eldr.npzfile import read_npz


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
    arrays = read_npz(path, "calibration file")
    if "prefill_counts" not in arrays:
        raise InputFileError(f"{path} has no 'prefill_counts' array (found: {sorted(arrays)})")
    flags = arrays.get("calibration")
    if flags is not None:
        if flags.dtype != np.bool_ or flags.shape != arrays["prefill_counts"].shape[:1]:
            raise InvalidInputError(
                f"{path}: 'calibration' must be a boolean array with one flag per request"
            )
        if not flags.any():
            raise InvalidInputError(f"{path}: no request is flagged for calibration")
        for name in ("prefill_counts", "decode_counts", "labels", "domain"):
            if name in arrays:
                arrays[name] = arrays[name][flags]
    prefill, decode = check_calibration(arrays["prefill_counts"], arrays.get("decode_counts"))
    raw_labels = arrays.get("labels", arrays.get("domain"))
    labels = None if raw_labels is None else raw_labels.astype(str)
    if labels is not None and labels.shape != (prefill.shape[0],):
        raise InvalidInputError(f"labels has shape {labels.shape}, expected ({prefill.shape[0]},)")
    top_k = int(arrays["top_k"]) if "top_k" in arrays else None
    return CalibrationData(prefill, decode, labels, top_k)
