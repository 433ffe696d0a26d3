"""Offline calibration: calibration counts -> `Partition` (paper §4.2-4.3.1).

1. IDF weights from the calibration requests' prefill counts.
2. The greedy layer mask (`layermask.py`) when decode-time counts are given, else all layers.
3. Balanced spherical k-means (`kmeans.py`) on the transformed signatures, K = number of workers.

Each ingredient can be switched off to measure what it contributes (`FitConfig`, `eldr fit` flags):
`weighting="raw"` stores IDF weights of ones (plain counts; the layer mask then ranks unweighted
counts too), `layer_selection="all"` keeps every layer (no greedy mask, no rho curve) and
`is_balanced=False` runs plain spherical k-means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from eldr import __version__
from eldr.calibration_data import check_calibration
from eldr.errors import InvalidInputError
from eldr.kmeans import spherical_kmeans
from eldr.layermask import select_layers
from eldr.limits import FIT_BYTES_PER_ASSIGNMENT
from eldr.partition import Partition
from eldr.signature import FloatArray, SignatureTransform, fit_idf

Weighting = Literal["idf", "raw"]
LayerSelection = Literal["greedy", "all"]
WEIGHTINGS: tuple[Weighting, ...] = ("idf", "raw")  # raw: counts without IDF (ablation)
LAYER_SELECTIONS: tuple[LayerSelection, ...] = ("greedy", "all")  # all: no layer mask (ablation)


@dataclass(frozen=True)
class FitConfig:
    num_workers: int
    seed: int = 1
    is_balanced: bool = True
    max_iter: int = 50
    num_pairs: int = 30_000
    weighting: Weighting = "idf"
    layer_selection: LayerSelection = "greedy"

    def __post_init__(self) -> None:
        check_ablation(self.weighting, self.layer_selection)
        if self.num_workers < 1:
            raise InvalidInputError(f"number of workers must be >= 1, got {self.num_workers}")
        if self.max_iter < 1:
            raise InvalidInputError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.num_pairs < 10:
            raise InvalidInputError(f"num_pairs must be >= 10, got {self.num_pairs}")


def check_ablation(weighting: str, layer_selection: str) -> None:
    """Raise `InvalidInputError` naming the choices for an unknown weighting or layer selection."""
    if weighting not in WEIGHTINGS:
        raise InvalidInputError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if layer_selection not in LAYER_SELECTIONS:
        raise InvalidInputError(
            f"layer selection must be one of {', '.join(LAYER_SELECTIONS)}, got {layer_selection!r}"
        )


def fit_weights(prefill_counts: npt.NDArray[np.integer], weighting: str = "idf") -> FloatArray:
    """Per-(layer, expert) weights `[L, E]`: IDF, or ones for raw counts."""
    check_ablation(weighting, "greedy")
    if weighting == "raw":
        return np.ones(prefill_counts.shape[1:], dtype=np.float32)
    return fit_idf(prefill_counts)


def fit_transform(
    prefill_counts: npt.NDArray[np.integer],
    decode_counts: npt.NDArray[np.integer] | None,
    *,
    seed: int = 1,
    num_pairs: int = 30_000,
    weighting: str = "idf",
    layer_selection: str = "greedy",
) -> tuple[SignatureTransform, tuple[float, ...]]:
    """Fit the weights and the layer mask; returns the transform and the greedy rho curve (empty if none).

    `weighting="raw"` gives weights of ones (the mask then ranks unweighted counts);
    `layer_selection="all"` keeps every layer without computing rho.
    """
    check_ablation(weighting, layer_selection)
    idf = fit_weights(prefill_counts, weighting)
    num_layers = prefill_counts.shape[1]
    if layer_selection == "all" or decode_counts is None or prefill_counts.shape[0] < 3:
        return SignatureTransform(idf=idf, layers=tuple(range(num_layers))), ()
    weighted = prefill_counts.astype(np.float32) * idf[None]
    mask = select_layers(weighted, decode_counts, num_pairs=num_pairs, seed=seed)
    return SignatureTransform(idf=idf, layers=mask.layers), mask.rho_curve


def check_fit_size(num_requests: int, num_workers: int, budget_bytes: int) -> None:
    """Refuse a fit whose balanced assignment (N x K pairs) would take more than the budget."""
    need = num_requests * num_workers * FIT_BYTES_PER_ASSIGNMENT
    if need > budget_bytes:
        raise InvalidInputError(
            f"fitting K={num_workers} workers on N={num_requests} calibration requests needs about "
            f"{need / 2**30:.3g} GiB for the balanced assignment, above the limit of "
            f"{budget_bytes / 2**30:.3g} GiB (ELDR_MAX_BYTES): use fewer calibration requests"
        )


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
    transform, rho_curve = fit_transform(
        prefill,
        decode,
        seed=config.seed,
        num_pairs=config.num_pairs,
        weighting=config.weighting,
        layer_selection=config.layer_selection,
    )
    if not transform.full_weights().any():
        raise InvalidInputError(
            "every kept (layer, expert) has weight zero: each expert used was used by every calibration "
            "request (IDF 0), so no request has a usable signature"
        )
    signatures = transform.apply(prefill)
    num_usable = int(np.count_nonzero(signatures.any(axis=1)))
    if num_usable < config.num_workers:
        raise InvalidInputError(
            f"only {num_usable} of {num_requests} calibration requests have a usable signature (counts "
            f"that weigh to non-zero; all-zero counts, or experts every request uses, weigh zero): "
            f"cannot fit K={config.num_workers} centroids"
        )
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
        "weighting": config.weighting,
        "layer_selection": config.layer_selection,
        "rho_curve": list(rho_curve),
        "rho": max(rho_curve) if rho_curve else None,
        "cluster_sizes": result.cluster_sizes,
        "num_iterations": result.num_iterations,
        "is_converged": result.is_converged,
        "fit_seconds": time.perf_counter() - started,
        "eldr_version": __version__,
    }
    dead = np.flatnonzero(np.linalg.norm(result.centroids, axis=1) == 0)
    if dead.size:
        raise InvalidInputError(
            f"centroid {int(dead[0])} came out zero: its cluster holds only requests whose counts weigh "
            "to zero; drop all-zero requests from the calibration file"
        )
    return Partition(
        transform=transform,
        centroids=result.centroids,
        top_k=top_k,
        worker_of=tuple(range(config.num_workers)),
        meta=meta,
    )
