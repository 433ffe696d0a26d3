"""The in-flight file `eldr route --in-flight` reads: the decode workers' running requests.

One `.npz` with `counts [M, L, E]` (each running request's prefill expert counts: finite, whole,
non-negative) and `worker [M]` (the decode worker each runs on, 0-based). M may be 0 (an idle pool).
Headers are checked (rank, dtype, memory budget) before any data is read (`eldr.npzfile.read_npz`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError
from eldr.npzfile import ArraySpec, read_npz
from eldr.signature import CountArray, as_counts

SPECS = (ArraySpec("counts", 3, "biuf"), ArraySpec("worker", 1, "iu"))


@dataclass(frozen=True)
class InFlight:
    counts: CountArray  # [M, L, E]
    worker: npt.NDArray[np.int64]  # [M]

    @property
    def num_requests(self) -> int:
        return int(self.worker.shape[0])


def load_in_flight(path: str | Path, *, num_workers: int) -> InFlight:
    """The running requests of a pool of `num_workers`; one error naming the file and the rule."""
    arrays = read_npz(path, "in-flight file", SPECS)
    counts, worker = arrays["counts"], arrays["worker"]
    if counts.shape[0] != worker.shape[0]:
        raise InvalidInputError(
            f"{path}: counts has {counts.shape[0]} requests but worker has {worker.shape[0]}"
        )
    if counts.shape[1] == 0 or counts.shape[2] == 0:
        raise InvalidInputError(f"{path}: counts must be [requests, layers, experts], got {counts.shape}")
    try:
        checked = as_counts(counts, name="counts", ndim=3) if counts.size else counts.astype(np.int64)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from exc
    if worker.size and (int(worker.min()) < 0 or int(worker.max()) >= num_workers):
        raise InvalidInputError(
            f"{path}: every worker must be in [0, {num_workers}), got {worker.min()}..{worker.max()}"
        )
    return InFlight(checked, worker.astype(np.int64))
