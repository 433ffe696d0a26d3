"""Expert signatures: prefill expert counts -> unit-norm vectors (paper §4.2).

A request's raw signature is `counts[l, e]`: for every prompt token and MoE layer, +1 for each of the
token's top-k experts (discrete choices, never gate probabilities). The frozen transform fitted on a
calibration set turns counts into the vector that routing compares with centroids:

    x[l, e] = counts[l, e] * idf[l, e]           idf = log((N + 1) / (df + 1))
    v = concat(x[l] for l in kept layers)         the greedy layer mask of `calibrate.py`
    signature = v / ||v||                         one L2 norm over the whole vector

`counts_from_topk` accepts vLLM's per-token routed-experts layout `[T, L, k]` and converts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError
from eldr.limits import MAX_COUNT, MAX_IDF

FloatArray = npt.NDArray[np.float32]
CountArray = npt.NDArray[np.int64]


def as_counts(counts: npt.ArrayLike, *, name: str = "counts", ndim: int | None = None) -> CountArray:
    """Validate expert counts (finite, non-negative, integral, non-empty) and return them as int64."""
    arr = np.asarray(counts)
    if arr.size == 0:
        raise InvalidInputError(f"{name} is empty (shape {arr.shape})")
    if ndim is not None and arr.ndim != ndim:
        raise InvalidInputError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InvalidInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError(f"{name} contains NaN or infinite values")
        if np.any(arr != np.round(arr)):
            raise InvalidInputError(f"{name} must hold whole expert counts, found fractions")
    if np.any(arr < 0):
        raise InvalidInputError(f"{name} contains negative counts")
    if int(arr.max()) > MAX_COUNT:
        raise InvalidInputError(f"{name} holds a count above {MAX_COUNT} (docs/limits.md)")
    return arr.astype(np.int64, copy=False)


def counts_from_topk(topk_ids: npt.ArrayLike, num_experts: int) -> CountArray:
    """Convert per-token top-k expert ids `[T, L, k]` into counts `[L, E]`."""
    ids = np.asarray(topk_ids)
    if ids.ndim != 3 or ids.size == 0:
        raise InvalidInputError(f"top-k ids must have shape [tokens, layers, k], got {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise InvalidInputError(f"top-k ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= num_experts:
        raise InvalidInputError(f"top-k ids must lie in [0, {num_experts}), found [{ids.min()}, {ids.max()}]")
    _, num_layers, _ = ids.shape
    flat = (np.arange(num_layers, dtype=np.int64)[None, :, None] * num_experts + ids).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def conserved(
    counts: npt.NDArray[np.integer], num_tokens: npt.ArrayLike, top_k: int
) -> npt.NDArray[np.bool_]:
    """Per request `[N]` of `counts [N, L, E]`: does every layer sum to `num_tokens[n] * top_k`?"""
    sums = counts.sum(axis=2, dtype=np.int64)
    return np.all(sums == np.asarray(num_tokens, dtype=np.int64)[:, None] * top_k, axis=1)


def check_conservation(counts: CountArray, num_tokens: int, top_k: int) -> None:
    """Each layer of a request's counts `[L, E]` must sum to `num_tokens * top_k`."""
    if counts.ndim != 2:
        raise InvalidInputError(f"counts must have shape [layers, experts], got {counts.shape}")
    if conserved(counts[None], [num_tokens], top_k)[0]:
        return
    sums = counts.sum(axis=1, dtype=np.int64)
    layer = int(np.flatnonzero(sums != num_tokens * top_k)[0])
    raise InvalidInputError(
        f"layer {layer} counts sum to {int(sums[layer])}, expected "
        f"{num_tokens} tokens x top-{top_k} = {num_tokens * top_k}"
    )


def fit_idf(prefill_counts: npt.NDArray[np.integer]) -> FloatArray:
    """IDF weights `[L, E]` = log((N + 1) / (df + 1)), df = requests whose prefill used (l, e)."""
    num_requests = prefill_counts.shape[0]
    df = (prefill_counts > 0).sum(axis=0)
    return np.log((num_requests + 1.0) / (df + 1.0)).astype(np.float32)


@dataclass(frozen=True)
class SignatureTransform:
    """Frozen counts -> signature transform: IDF weights and the kept layers."""

    idf: FloatArray  # [L, E]
    layers: tuple[int, ...]  # kept layer indices, in the greedy order they were chosen
    _weights: FloatArray = field(init=False, repr=False, compare=False)  # [len(layers) * E]
    _order: npt.NDArray[np.int64] = field(init=False, repr=False, compare=False)  # sorted layers

    def __post_init__(self) -> None:
        if self.idf.ndim != 2 or self.idf.size == 0:
            raise InvalidInputError(f"idf must have shape [layers, experts], got {self.idf.shape}")
        if self.idf.dtype.kind not in "iuf" or not np.isfinite(self.idf).all():
            raise InvalidInputError(f"idf weights must be finite numbers in [0, {MAX_IDF:g}]")
        if self.idf.min() < 0 or self.idf.max() > MAX_IDF:
            raise InvalidInputError(f"idf weights must be finite numbers in [0, {MAX_IDF:g}]")
        if not self.layers:
            raise InvalidInputError("a signature transform needs at least one layer")
        if min(self.layers) < 0 or max(self.layers) >= self.idf.shape[0]:
            raise InvalidInputError(f"layer ids {self.layers} out of range [0, {self.idf.shape[0]})")
        if len(set(self.layers)) != len(self.layers):
            raise InvalidInputError(f"layer ids must be distinct, got {self.layers}")
        order = np.asarray(sorted(self.layers), dtype=np.int64)
        weights = np.ascontiguousarray(self.idf[order].ravel(), dtype=np.float32)
        object.__setattr__(self, "_weights", weights)
        object.__setattr__(self, "_order", order)

    @property
    def num_layers(self) -> int:
        return int(self.idf.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.idf.shape[1])

    @property
    def dim(self) -> int:
        return int(self._weights.shape[0])

    def full_weights(self) -> FloatArray:
        """IDF weights over all `L * E` count positions, zero on dropped layers."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.float32)
        out[self._order] = self.idf[self._order]
        return out.ravel()

    def embed(self, vectors: FloatArray) -> FloatArray:
        """Map signature-space vectors `[..., D]` onto the full `[..., L * E]` count layout."""
        out = np.zeros((*vectors.shape[:-1], self.num_layers, self.num_experts), dtype=np.float32)
        out[..., self._order, :] = vectors.reshape(*vectors.shape[:-1], len(self._order), self.num_experts)
        return out.reshape(*vectors.shape[:-1], -1)

    def check_shape(self, counts: npt.NDArray[np.generic]) -> None:
        expected = (self.num_layers, self.num_experts)
        if tuple(counts.shape[-2:]) != expected:
            raise InvalidInputError(
                f"counts have {counts.shape[-2]} layers x {counts.shape[-1]} experts, "
                f"the partition expects {expected[0]} layers x {expected[1]} experts"
            )

    def apply(self, counts: npt.NDArray[np.generic]) -> FloatArray:
        """Counts `[L, E]` -> unit signature `[D]`; `[N, L, E]` -> `[N, D]`. Zero counts map to 0."""
        self.check_shape(counts)
        kept = counts[..., self._order, :]
        flat = kept.reshape(*kept.shape[:-2], -1).astype(np.float32) * self._weights
        norms = np.linalg.norm(flat, axis=-1, keepdims=True)
        return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)
