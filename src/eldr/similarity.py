"""The one similarity routing uses: s_k = centroid_k . signature (paper §4.3.2).

Centroids are unit vectors in signature space `[K, D]` and a signature is `x / ||x||` with
`x = concat(counts[l] * idf[l] for the kept layers, ascending)` (`signature.py`), so s_k is the cosine
similarity of the two. Every path computes it through `cosine_to_rows`:

- from a signature `[D]`:   s = cosine_to_rows(centroids, signature)
- from raw counts `[L, E]`: s = cosine_to_rows(embed(centroids), counts * w), where `embed` puts the
  centroids on the full `[L * E]` count layout (zeros on dropped layers) and `w` is the IDF weight of
  every count position (zero on dropped layers). This is the same number, x / ||x|| dotted with the
  centroids, without building the signature first. IDF enters once, through `w`: the embedded
  centroids already live in weighted space and carry no weights of their own.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError, PartitionMismatchError
from eldr.signature import FloatArray, SignatureTransform


def cosine_to_rows(rows: FloatArray, vector: FloatArray) -> FloatArray | None:
    """`rows @ vector / ||vector||` `[K]`, for unit rows `[K, n]`; None when the vector is zero."""
    norm = float(np.sqrt(vector @ vector))
    if norm == 0.0 or not math.isfinite(norm):
        return None
    sims: FloatArray = rows @ vector
    sims /= norm
    return sims


class CentroidSimilarity:
    """Similarities of a request to every centroid, from its counts or from its signature."""

    def __init__(self, transform: SignatureTransform, centroids: FloatArray) -> None:
        if centroids.ndim != 2 or centroids.shape[1] != transform.dim:
            raise PartitionMismatchError(
                f"centroids {centroids.shape} do not match signature dimension {transform.dim}"
            )
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # [K, D]
        self._embedded = np.ascontiguousarray(transform.embed(self.centroids))  # [K, L * E], no weights
        self._weights = transform.full_weights()  # [L * E], zero on dropped layers
        self._shape = (transform.num_layers, transform.num_experts)

    @property
    def num_centroids(self) -> int:
        return int(self.centroids.shape[0])

    def of_counts(self, counts: npt.NDArray[np.generic]) -> FloatArray | None:
        """Similarities `[K]` of raw counts `[L, E]`; None when they weigh to zero."""
        if counts.shape != self._shape:
            raise InvalidInputError(f"counts have shape {counts.shape}, expected {self._shape}")
        weighted = np.multiply(counts.reshape(-1), self._weights, dtype=np.float32)  # [L * E]
        return cosine_to_rows(self._embedded, weighted)

    def of_signature(self, signature: FloatArray) -> FloatArray | None:
        """Similarities `[K]` of a signature `[D]` (normalised again, so any scale gives the same)."""
        return cosine_to_rows(self.centroids, np.asarray(signature, dtype=np.float32))
