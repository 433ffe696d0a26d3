"""The partition file: everything online routing needs, frozen and versioned.

A partition is one `.npz` written with numpy alone and read with `allow_pickle=False`:

| array        | shape / type     | meaning                                                    |
|--------------|------------------|------------------------------------------------------------|
| `centroids`  | [K, D] float32   | unit centroids in signature space, one per decode worker   |
| `idf`        | [L, E] float32   | IDF weights of the signature transform                     |
| `layers`     | [num_kept] int64 | kept layers, in greedy order                               |
| `worker_of`  | [K] int64        | centroid k serves decode worker `worker_of[k]`             |
| `meta`       | 0-d str (JSON)   | format, version, top_k, fit metadata                       |

`docs/partition-format.md` documents the same table for other producers. `Partition.load` checks the
file before trusting it (docs/limits.md): ranks and dtypes from the `.npy` headers, then finite unit
centroids, finite IDF weights >= 0, distinct layers in range, `worker_of` a permutation and
`top_k` a positive integer, so a poisoned file is refused at load and never reaches routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.atomicfile import atomic_write
from eldr.errors import InputFileError, InvalidInputError, PartitionMismatchError
from eldr.limits import MAX_IDF, MAX_WORKERS, UNIT_NORM_TOLERANCE
from eldr.npzfile import ArraySpec, read_meta, read_npz, whole_numbers
from eldr.signature import FloatArray, SignatureTransform

FORMAT_NAME = "eldr-partition"
FORMAT_VERSION = 1
ARRAYS = (
    ArraySpec("centroids", 2, "f"),
    ArraySpec("idf", 2, "iuf"),
    ArraySpec("layers", 1, "iu"),
    ArraySpec("worker_of", 1, "iu"),
    ArraySpec("meta", 0, "U"),
)


@dataclass(frozen=True)
class Partition:
    """Signature transform + one unit centroid per decode worker."""

    transform: SignatureTransform
    centroids: FloatArray  # [K, D]
    top_k: int | None  # experts per token, when the calibration data said
    worker_of: tuple[int, ...]  # [K]: centroid k -> worker index
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_centroids(self.centroids)
        k, dim = self.centroids.shape
        if dim != self.transform.dim:
            raise PartitionMismatchError(
                f"centroids have dimension {dim}, the signature transform gives {self.transform.dim}"
            )
        if sorted(self.worker_of) != list(range(k)):
            raise PartitionMismatchError(
                f"worker_of must be a permutation of 0..{k - 1}, got {list(self.worker_of)}"
            )

    @property
    def num_workers(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_layers(self) -> int:
        return self.transform.num_layers

    @property
    def num_experts(self) -> int:
        return self.transform.num_experts

    def worker_centroids(self) -> FloatArray:
        """Centroids reordered so that row w belongs to worker w."""
        out = np.empty_like(self.centroids)
        out[np.asarray(self.worker_of)] = self.centroids
        return out

    def check_fits(
        self,
        *,
        num_workers: int | None = None,
        num_layers: int | None = None,
        num_experts: int | None = None,
    ) -> None:
        """Raise `PartitionMismatchError` naming both values when the setup differs."""
        for what, mine, theirs in (
            ("decode workers", self.num_workers, num_workers),
            ("MoE layers (L)", self.num_layers, num_layers),
            ("experts per layer (E)", self.num_experts, num_experts),
        ):
            if theirs is not None and theirs != mine:
                raise PartitionMismatchError(
                    f"partition was fitted for {mine} {what}, this setup has {theirs}"
                )

    def save(self, path: str | Path) -> None:
        meta = {**self.meta, "format": FORMAT_NAME, "version": FORMAT_VERSION, "top_k": self.top_k}
        with atomic_write(path, "partition") as fh:
            np.savez_compressed(
                fh,
                centroids=self.centroids.astype(np.float32),
                idf=self.transform.idf.astype(np.float32),
                layers=np.asarray(self.transform.layers, dtype=np.int64),
                worker_of=np.asarray(self.worker_of, dtype=np.int64),
                meta=np.asarray(json.dumps(meta, sort_keys=True)),
            )

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read and check a partition file; `InputFileError`/`InvalidInputError` naming file and array."""
        arrays = read_npz(path, "partition", ARRAYS)
        meta = read_meta(arrays, path)
        if meta.get("format") != FORMAT_NAME:
            raise InputFileError(f"{path} is not an eldr partition (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise InputFileError(
                f"{path} has partition format version {meta.get('version')}, "
                f"this eldr reads version {FORMAT_VERSION}"
            )
        where = f"{path}: "
        centroids, idf = arrays["centroids"], arrays["idf"]
        check_centroids(centroids, where)  # negative entries are allowed: s_k is a cosine in [-1, 1]
        if idf.size == 0 or not np.isfinite(idf).all() or idf.min() < 0 or idf.max() > MAX_IDF:
            raise InvalidInputError(f"{where}idf must be non-empty, finite and in [0, {MAX_IDF:g}]")
        num_layers = int(idf.shape[0])
        layers = whole_numbers(arrays["layers"], "layers", where, low=0, high=num_layers - 1)
        if layers.size == 0 or np.unique(layers).size != layers.size:
            raise InvalidInputError(f"{where}layers must be distinct layer ids, got {layers.tolist()[:20]}")
        worker_of = arrays["worker_of"]
        if worker_of.shape != centroids.shape[:1] or not np.array_equal(
            np.sort(worker_of), np.arange(centroids.shape[0])
        ):
            raise InvalidInputError(
                f"{where}worker_of must be a permutation of 0..{centroids.shape[0] - 1}, one per centroid"
            )
        top_k = meta.get("top_k")
        if type(top_k) is float and top_k.is_integer():  # other producers may write 8.0
            top_k = int(top_k)
        if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= idf.shape[1]):
            raise InvalidInputError(f"{where}meta top_k must be null or an integer in [1, E], got {top_k!r}")
        try:
            transform = SignatureTransform(idf=idf.astype(np.float32), layers=tuple(layers.tolist()))
            return cls(
                transform=transform,
                centroids=centroids.astype(np.float32),
                top_k=top_k,
                worker_of=tuple(worker_of.tolist()),
                meta=meta,
            )
        except (InvalidInputError, PartitionMismatchError) as exc:
            raise InvalidInputError(f"{where}{exc}") from exc


def check_centroids(centroids: npt.NDArray[Any], where: str = "") -> None:
    """Centroids `[K, D]`: 1 <= K <= MAX_WORKERS, floats, finite, every row of unit norm."""
    if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] < 1:
        raise InvalidInputError(f"{where}centroids must have shape [workers, dim], got {centroids.shape}")
    if centroids.shape[0] > MAX_WORKERS:
        raise InvalidInputError(f"{where}centroids has {centroids.shape[0]} rows, at most {MAX_WORKERS}")
    if centroids.dtype.kind != "f" or not np.isfinite(centroids).all():
        raise InvalidInputError(f"{where}centroids must be finite floats, found NaN or infinite values")
    norms = np.linalg.norm(centroids.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise InvalidInputError(
            f"{where}centroids must be unit vectors: row {row} has norm {norms[row]:.6g} "
            f"(tolerance {UNIT_NORM_TOLERANCE})"
        )
