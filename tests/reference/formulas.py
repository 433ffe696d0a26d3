"""An independent reference for ELDR's signature and routing, written straight from the formulas.

Slow and obvious on purpose: plain numpy in float64 and Python loops, and nothing imported from
`eldr`, so a bug in the package cannot hide in a shared helper. The formulas (PAPER.md "The
signature", "Online: locality-band routing"; docs/partition-format.md):

    idf[l, e]  = log((N + 1) / (df[l, e] + 1)),   df = requests whose prefill count at (l, e) is > 0
    x          = concat(counts[l] * idf[l] for l in sorted(layers));  signature = x / ||x||
    s_k        = centroid_k . signature            (centroids are unit rows, in worker order)
    band       = {k healthy : s_k >= max(s over healthy) - tau}
                 if tau > 0 and the band has one member, the most similar other healthy worker joins
                 (ties in similarity: the lowest index)
    pick       = the band member with the fewest in-flight requests; ties: higher s, then lower index
    similarities within TIE = 1e-6 of each other count as equal (float32 rounding of identical rows)

A partition file row k serves worker `worker_of[k]`; `worker_order` applies that mapping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
TIE = 1e-6


def idf(prefill_counts: npt.ArrayLike) -> Array:
    """`[L, E]` IDF weights of calibration counts `[N, L, E]`."""
    counts = np.asarray(prefill_counts)
    n, num_layers, num_experts = counts.shape
    out = np.zeros((num_layers, num_experts), dtype=np.float64)
    for layer in range(num_layers):
        for expert in range(num_experts):
            df = sum(1 for i in range(n) if counts[i, layer, expert] > 0)
            out[layer, expert] = math.log((n + 1) / (df + 1))
    return out


def weighted_vector(counts: npt.ArrayLike, idf_weights: npt.ArrayLike, layers: Any) -> Array:
    """`x = concat(counts[l] * idf[l] for l in sorted(layers))`, unnormalised, `[D]` float64."""
    c = np.asarray(counts, dtype=np.float64)
    w = np.asarray(idf_weights, dtype=np.float64)
    parts = [c[layer] * w[layer] for layer in sorted(int(x) for x in layers)]
    return np.concatenate(parts)


def signature(counts: npt.ArrayLike, idf_weights: npt.ArrayLike, layers: Any) -> Array | None:
    """The unit signature `[D]`, or None when the weighted vector is all zero."""
    x = weighted_vector(counts, idf_weights, layers)
    norm = math.sqrt(sum(float(v) * float(v) for v in x))
    if norm == 0.0:
        return None
    return x / norm


def similarities(centroids: npt.ArrayLike, sig: npt.ArrayLike) -> Array:
    """`[K]` = centroids @ sig (unit centroids, so these are cosine similarities)."""
    rows = np.asarray(centroids, dtype=np.float64)
    vec = np.asarray(sig, dtype=np.float64)
    return np.array([sum(float(a) * float(b) for a, b in zip(row, vec, strict=True)) for row in rows])


def band(sims: npt.ArrayLike, healthy: npt.ArrayLike, tau: float) -> list[int]:
    """Sorted worker indices of the locality band (at least one healthy worker is required)."""
    s = [float(v) for v in np.asarray(sims)]
    ok = [bool(v) for v in np.asarray(healthy)]
    candidates = [k for k in range(len(s)) if ok[k]]
    if not candidates:
        raise ValueError("no healthy worker")
    best = max(s[k] for k in candidates)
    members = [k for k in candidates if s[k] >= best - tau - TIE]
    if tau > 0 and len(members) == 1:
        others = [k for k in candidates if k != members[0]]
        if others:
            second_best = max(s[k] for k in others)
            members.append(min(k for k in others if s[k] >= second_best - TIE))  # ties: the lowest index
    return sorted(members)


def pick(members: list[int], sims: npt.ArrayLike, loads: npt.ArrayLike) -> int:
    """Fewest in-flight in the band; ties go to the higher similarity, then the lower index."""
    s = [float(v) for v in np.asarray(sims)]
    q = [int(v) for v in np.asarray(loads)]
    lightest = [k for k in members if q[k] == min(q[m] for m in members)]
    most_similar = max(s[k] for k in lightest)
    return min(k for k in lightest if s[k] >= most_similar - TIE)


def least_loaded_healthy(loads: npt.ArrayLike, healthy: npt.ArrayLike) -> list[int]:
    """The healthy workers with the fewest in-flight requests (where a fallback may go)."""
    q = [int(v) for v in np.asarray(loads)]
    ok = [bool(v) for v in np.asarray(healthy)]
    lowest = min(q[k] for k in range(len(q)) if ok[k])
    return [k for k in range(len(q)) if ok[k] and q[k] == lowest]


def usable_counts(counts: Any, num_layers: int, num_experts: int) -> Array | None:
    """The counts as float64 when they can make a signature: right shape, numeric, finite, >= 0."""
    if counts is None:
        return None
    arr = np.asarray(counts)
    if arr.shape != (num_layers, num_experts) or arr.dtype.kind not in "biuf":
        return None
    values = arr.astype(np.float64)
    for v in values.ravel():
        if not math.isfinite(float(v)) or float(v) < 0:
            return None
    return values


def route(
    counts: Any,
    idf_weights: npt.ArrayLike,
    layers: Any,
    centroids: npt.ArrayLike,
    loads: npt.ArrayLike,
    healthy: npt.ArrayLike,
    tau: float,
) -> tuple[int, Array, list[int]] | None:
    """`(worker, similarities, band)`, or None when the request has no usable signature.

    `centroids` are in worker order: row w belongs to worker w.
    """
    w = np.asarray(idf_weights)
    values = usable_counts(counts, w.shape[0], w.shape[1])
    if values is None:
        return None
    sig = signature(values, w, layers)
    if sig is None:
        return None
    sims = similarities(centroids, sig)
    members = band(sims, healthy, tau)
    return pick(members, sims, loads), sims, members


def worker_order(centroids: npt.ArrayLike, worker_of: Any) -> Array:
    """Partition rows reordered so that row w belongs to worker w (row k serves worker_of[k])."""
    rows = np.asarray(centroids, dtype=np.float64)
    out = np.full(rows.shape, np.nan)
    for k, worker in enumerate(worker_of):
        out[int(worker)] = rows[k]
    if np.isnan(out).any():
        raise ValueError(f"worker_of {list(worker_of)} is not a permutation")
    return out


def load_partition(path: str | Path) -> dict[str, Any]:
    """A partition file's arrays (`idf`, `layers`, `worker_of`, raw `centroids`, `meta`), read with numpy."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return {
        "idf": arrays["idf"].astype(np.float64),
        "layers": [int(x) for x in arrays["layers"]],
        "worker_of": [int(x) for x in arrays["worker_of"]],
        "centroids": arrays["centroids"].astype(np.float64),
        "meta": json.loads(str(arrays["meta"])),
    }


def route_partition_file(
    path: str | Path, counts: Any, loads: npt.ArrayLike, healthy: npt.ArrayLike, tau: float
) -> tuple[int, Array, list[int]] | None:
    """`route` with the transform and centroids of a partition file (worker order applied here)."""
    part = load_partition(path)
    centroids = worker_order(part["centroids"], part["worker_of"])
    return route(counts, part["idf"], part["layers"], centroids, loads, healthy, tau)


def unit_mean(rows: npt.ArrayLike) -> Array | None:
    """The normalised mean of signature rows `[M, D]`; None when it is zero (or there are no rows)."""
    arr = np.asarray(rows, dtype=np.float64)
    if arr.shape[0] == 0:
        return None
    total = arr.sum(axis=0)
    norm = math.sqrt(float(total @ total))
    return None if norm == 0.0 else total / norm
