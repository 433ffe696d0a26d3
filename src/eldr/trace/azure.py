"""Request lengths and arrivals from the Azure LLM inference trace 2023 (CC-BY-4.0).

`azure2023_{conv,code}.csv` holds `TIMESTAMP,ContextTokens,GeneratedTokens` for about an hour of a
production service. Lengths are taken from its rows; arrivals are Poisson at a chosen rate (rows drawn
at random) or the rows' own timestamps replayed in order (consecutive rows, tiled past the hour).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from eldr.errors import InputFileError, InvalidInputError
from eldr.inputfile import read_text
from eldr.limits import MAX_BYTES_ENV, max_bytes

AZURE_KINDS = ("conv", "code")


@dataclass(frozen=True)
class AzureTrace:
    arrival_s: npt.NDArray[np.float64]  # [R] seconds since the first row, sorted
    prompt_tokens: npt.NDArray[np.int64]  # [R] ContextTokens
    output_tokens: npt.NDArray[np.int64]  # [R] GeneratedTokens

    @property
    def num_rows(self) -> int:
        return int(self.arrival_s.shape[0])


def load_azure(path: str | Path) -> AzureTrace:
    """Read one Azure 2023 CSV; a missing or malformed file raises `InputFileError`."""
    text = read_text(path, "Azure trace", max_bytes=max_bytes(), limit_name=MAX_BYTES_ENV)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputFileError(f"cannot read Azure trace {path}: {exc}") from exc
    if not rows or rows[0][:3] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
        raise InputFileError(f"{path} is not an Azure 2023 trace (header TIMESTAMP,ContextTokens,...)")
    body = [row for row in rows[1:] if row]
    try:
        stamps = np.array([row[0].replace(" ", "T") for row in body], dtype="datetime64[ns]")
        prompt = np.array([int(row[1]) for row in body], dtype=np.int64)
        output = np.array([int(row[2]) for row in body], dtype=np.int64)
    except (ValueError, IndexError) as exc:
        raise InputFileError(f"{path}: malformed row: {exc}") from exc
    if stamps.size == 0:
        raise InputFileError(f"{path} has no rows")
    arrival = (stamps - stamps[0]).astype(np.int64).astype(np.float64) / 1e9
    order = np.argsort(arrival, kind="stable")
    return AzureTrace(arrival_s=arrival[order], prompt_tokens=prompt[order], output_tokens=output[order])


def poisson_arrivals(num_requests: int, rate: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Arrival times [N] of a Poisson process at `rate` requests per second, starting at 0."""
    if rate <= 0 or not np.isfinite(rate):
        raise InvalidInputError(f"request rate must be a positive number, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def replay_rows(
    azure: AzureTrace, num_requests: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Row indices and arrival times [N] replaying the trace from its start, tiled past its end."""
    rows = np.arange(num_requests, dtype=np.int64) % azure.num_rows
    period = (
        float(azure.arrival_s[-1]) + float(np.median(np.diff(azure.arrival_s))) if azure.num_rows > 1 else 1.0
    )
    arrival = azure.arrival_s[rows] + (np.arange(num_requests) // azure.num_rows) * period
    return rows, arrival


def allocate(weights: dict[str, float], total: int) -> dict[str, int]:
    """Split `total` in proportion to `weights` (largest remainder; deterministic)."""
    names = list(weights)
    w = np.array([weights[name] for name in names], dtype=np.float64)
    if w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise InvalidInputError(f"domain weights must be non-negative with a positive sum, got {weights}")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    for idx in np.argsort(-(exact - counts), kind="stable")[:remainder]:
        counts[idx] += 1
    return {name: int(c) for name, c in zip(names, counts, strict=True)}
