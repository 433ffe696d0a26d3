"""The counts file `eldr route --counts` reads: one `.npy`, one request's expert choices.

Either counts `[L, E]` (finite, whole, non-negative) or the per-token top-k expert ids `[T, L, k]`
that vLLM reports (integers in [0, E)), which are turned into counts. The header is checked (rank,
dtype, memory budget) before the data is read (`eldr.npzfile.read_npy`).
"""

from __future__ import annotations

from pathlib import Path

from eldr.errors import InvalidInputError
from eldr.npzfile import ArraySpec, read_npy
from eldr.signature import CountArray, as_counts, counts_from_topk

SPEC = ArraySpec("counts", None, "biuf")


def load_counts(path: str | Path, *, num_experts: int) -> CountArray:
    """One request's counts `[L, E]` from a counts or top-k ids file; one error naming file and rule."""
    raw = read_npy(path, "counts", SPEC)
    try:
        if raw.ndim == 3:
            return counts_from_topk(raw, num_experts)
        if raw.ndim == 2:
            return as_counts(raw, name="counts", ndim=2)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from exc
    raise InvalidInputError(
        f"{path}: counts must be [layers, experts] counts or [tokens, layers, k] top-k ids, "
        f"got shape {raw.shape}"
    )
