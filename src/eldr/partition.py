"""The partition file: everything online routing needs, frozen and versioned.

A partition is one `.npz` written with numpy alone and read with `allow_pickle=False`:

| array        | shape / type     | meaning                                                    |
|--------------|------------------|------------------------------------------------------------|
| `centroids`  | [K, D] float32   | unit centroids in signature space, one per decode worker   |
| `idf`        | [L, E] float32   | IDF weights of the signature transform                     |
| `layers`     | [num_kept] int64 | kept layers, in greedy order                               |
| `worker_of`  | [K] int64        | centroid k serves decode worker `worker_of[k]`             |
| `meta`       | 0-d str (JSON)   | format, version, top_k, fit metadata                       |

`docs/partition-format.md` documents the same table for other producers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eldr.errors import InputFileError, PartitionMismatchError
from eldr.npzfile import read_meta, read_npz
from eldr.signature import FloatArray, SignatureTransform

FORMAT_NAME = "eldr-partition"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Partition:
    """Signature transform + one unit centroid per decode worker."""

    transform: SignatureTransform
    centroids: FloatArray  # [K, D]
    top_k: int | None  # experts per token, when the calibration data said
    worker_of: tuple[int, ...]  # [K]: centroid k -> worker index
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
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
        with open(path, "wb") as fh:
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
        arrays = read_npz(path, "partition")
        missing = {"centroids", "idf", "layers", "worker_of", "meta"} - arrays.keys()
        if missing:
            raise InputFileError(f"{path} is not an eldr partition: missing {sorted(missing)}")
        meta = read_meta(arrays, path)
        if meta.get("format") != FORMAT_NAME:
            raise InputFileError(f"{path} is not an eldr partition (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise InputFileError(
                f"{path} has partition format version {meta.get('version')}, "
                f"this eldr reads version {FORMAT_VERSION}"
            )
        transform = SignatureTransform(
            idf=arrays["idf"].astype(np.float32),
            layers=tuple(int(x) for x in arrays["layers"]),
        )
        return cls(
            transform=transform,
            centroids=arrays["centroids"].astype(np.float32),
            top_k=None if meta.get("top_k") is None else int(meta["top_k"]),
            worker_of=tuple(int(x) for x in arrays["worker_of"]),
            meta=meta,
        )
