"""Offline calibration: calibration counts -> `Partition` (paper §4.2-4.3.1).

1. IDF weights from the calibration requests' prefill counts.
2. The greedy layer mask (`layermask.py`) when decode-time counts are given, else all layers.
3. Balanced spherical k-means (`kmeans.py`) on the transformed signatures, K = number of workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eldr import __version__
from eldr.errors import InvalidInputError
from eldr.kmeans import spherical_kmeans
from eldr.layermask import select_layers
from eldr.partition import Partition
from eldr.signature import SignatureTransform, as_counts, fit_idf


@dataclass(frozen=True)
class FitConfig:
    num_workers: int
    seed: int = 1
    is_balanced: bool = True
    max_iter: int = 50
    num_pairs: int = 30_000

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise InvalidInputError(f"number of workers must be >= 1, got {self.num_workers}")
        if self.max_iter < 1:
            raise InvalidInputError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.num_pairs < 10:
            raise InvalidInputError(f"num_pairs must be >= 10, got {self.num_pairs}")


def fit_transform(
    prefill_counts: npt.NDArray[np.integer],
    decode_counts: npt.NDArray[np.integer] | None,
    *,
    seed: int = 1,
    num_pairs: int = 30_000,
) -> tuple[SignatureTransform, tuple[float, ...]]:
    """Fit IDF and the layer mask; returns the transform and the greedy rho curve (empty if none)."""
    idf = fit_idf(prefill_counts)
    num_layers = prefill_counts.shape[1]
    if decode_counts is None or prefill_counts.shape[0] < 3:
        return SignatureTransform(idf=idf, layers=tuple(range(num_layers))), ()
    weighted = prefill_counts.astype(np.float32) * idf[None]
    mask = select_layers(weighted, decode_counts, num_pairs=num_pairs, seed=seed)
    return SignatureTransform(idf=idf, layers=mask.layers), mask.rho_curve


def check_calibration(
    prefill_counts: npt.ArrayLike, decode_counts: npt.ArrayLike | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64] | None]:
    prefill = as_counts(prefill_counts, name="prefill_counts", ndim=3)
    if decode_counts is None:
        return prefill, None
    decode = as_counts(decode_counts, name="decode_counts", ndim=3)
    if decode.shape != prefill.shape:
        raise InvalidInputError(f"decode_counts has shape {decode.shape}, prefill_counts has {prefill.shape}")
    return prefill, decode


def fit_partition(
    prefill_counts: npt.ArrayLike,
    config: FitConfig,
    *,
    decode_counts: npt.ArrayLike | None = None,
    top_k: int | None = None,
) -> Partition:
    """Fit a partition with one centroid per decode worker from `[N, L, E]` calibration counts."""
    started = time.perf_counter()
    prefill, decode = check_calibration(prefill_counts, decode_counts)
    num_requests = prefill.shape[0]
    if config.num_workers > num_requests:
        raise InvalidInputError(
            f"cannot fit K={config.num_workers} workers from N={num_requests} calibration requests"
        )
    transform, rho_curve = fit_transform(prefill, decode, seed=config.seed, num_pairs=config.num_pairs)
    signatures = transform.apply(prefill)
    result = spherical_kmeans(
        signatures,
        config.num_workers,
        seed=config.seed,
        balanced=config.is_balanced,
        max_iter=config.max_iter,
    )
    meta = {
        "num_requests": num_requests,
        "seed": config.seed,
        "kmeans": "balanced" if config.is_balanced else "plain",
        "rho_curve": list(rho_curve),
        "rho": max(rho_curve) if rho_curve else None,
        "cluster_sizes": result.cluster_sizes,
        "num_iterations": result.num_iterations,
        "is_converged": result.is_converged,
        "fit_seconds": time.perf_counter() - started,
        "eldr_version": __version__,
    }
    return Partition(
        transform=transform,
        centroids=result.centroids,
        top_k=top_k,
        worker_of=tuple(range(config.num_workers)),
        meta=meta,
    )
