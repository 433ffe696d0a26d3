"""Locality statistics of a trace: the two measurements ELDR is motivated by (paper §3).

1. Prefill-decode correlation. `request_correlation`: per request and layer, the Pearson correlation
   over the E experts between the request's prefill counts and its decode counts, averaged over the
   layers where both are defined. `expert_correlation`: per layer and expert, the Pearson correlation
   over requests between the expert's prefill frequency (count / prompt tokens) and its decode frequency
   (count / output tokens); one value per (layer, expert).
2. Distinct experts per decode step. A batch of B requests takes one decode token from each (a random
   token of the exact `decode_topk` when the trace has it, else a top-k drawn from the request's decode
   counts with `sampling.topk_from_counts`); per layer, the union of their top-k is that step's distinct
   experts. Same-domain batches draw their B requests from one domain, mixed batches from the whole
   trace (what a load balancer blind to content produces); the reduction is 1 - same / mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError
from eldr.signature import conserved
from eldr.trace.format import Trace
from eldr.trace.sampling import topk_from_counts

FloatArray = npt.NDArray[np.float64]


def conservation_violations(trace: Trace) -> int:
    """Requests whose counts do not sum to tokens x top_k in every layer (prefill or decode)."""
    prefill_ok = conserved(trace.prefill_counts, trace.prompt_tokens, trace.top_k)
    decode_ok = conserved(trace.decode_counts, trace.output_tokens, trace.top_k)
    return int(np.sum(~(prefill_ok & decode_ok)))


def _pearson(x: FloatArray, y: FloatArray, axis: int) -> FloatArray:
    """Pearson correlation along `axis`; NaN where either side is constant."""
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    num = (xc * yc).sum(axis=axis)
    den = np.sqrt((xc * xc).sum(axis=axis) * (yc * yc).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def request_correlation(prefill: npt.ArrayLike, decode: npt.ArrayLike) -> FloatArray:
    """[N] mean over layers of Pearson(prefill[n, l, :], decode[n, l, :]); NaN if no layer is defined."""
    p = np.asarray(prefill, dtype=np.float64)
    d = np.asarray(decode, dtype=np.float64)
    if p.ndim != 3 or p.shape != d.shape:
        raise InvalidInputError(f"prefill {p.shape} and decode {d.shape} counts must be equal [N, L, E]")
    per_layer = _pearson(p, d, axis=2)  # [N, L]
    defined = ~np.isnan(per_layer)
    total = np.where(defined, per_layer, 0.0).sum(axis=1)
    num_defined = defined.sum(axis=1)
    return np.where(num_defined > 0, total / np.maximum(num_defined, 1), np.nan)


def expert_correlation(
    prefill: npt.ArrayLike, decode: npt.ArrayLike, prompt_tokens: npt.ArrayLike, output_tokens: npt.ArrayLike
) -> FloatArray:
    """[L, E] Pearson over requests of prefill vs decode frequency of each expert (NaN if constant)."""
    p = np.asarray(prefill, dtype=np.float64)
    d = np.asarray(decode, dtype=np.float64)
    prompt = np.asarray(prompt_tokens, dtype=np.float64)
    output = np.asarray(output_tokens, dtype=np.float64)
    if p.ndim != 3 or p.shape != d.shape or prompt.shape != p.shape[:1] or output.shape != p.shape[:1]:
        raise InvalidInputError("prefill/decode [N, L, E] and prompt/output tokens [N] must agree")
    keep = (prompt > 0) & (output > 0)
    if keep.sum() < 2:
        raise InvalidInputError("expert correlation needs at least 2 requests with prompt and output tokens")
    p_freq = p[keep] / prompt[keep, None, None]
    d_freq = d[keep] / output[keep, None, None]
    return _pearson(p_freq, d_freq, axis=0)


def distinct_experts(topk: npt.NDArray[np.integer], num_experts: int) -> npt.NDArray[np.int64]:
    """Distinct experts per layer of batches: topk [S, B, L, k] -> [S, L] sizes of the unions over B."""
    ids = np.asarray(topk)
    if ids.ndim != 4:
        raise InvalidInputError(f"batch top-k must be [steps, batch, layers, k], got {ids.shape}")
    steps, _, layers, _ = ids.shape
    hit = np.zeros((steps, layers, num_experts), dtype=bool)
    s = np.arange(steps)[:, None, None, None]
    lay = np.arange(layers)[None, None, :, None]
    hit[np.broadcast_to(s, ids.shape), np.broadcast_to(lay, ids.shape), ids] = True
    return hit.sum(axis=2)


def step_topk(
    trace: Trace, requests: npt.NDArray[np.int64], rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """One decode token's top-k per layer for each given request: [M, L, k]."""
    if trace.decode_topk is not None and trace.decode_offsets is not None:
        lo = trace.decode_offsets[requests]
        width = trace.decode_offsets[requests + 1] - lo
        token = lo + (rng.random(requests.size) * width).astype(np.int64)
        return np.asarray(trace.decode_topk[token], dtype=np.int64)
    return topk_from_counts(trace.decode_counts[requests], trace.output_tokens[requests], trace.top_k, rng)


@dataclass(frozen=True)
class BatchLocality:
    batch_size: int
    same: dict[str, float]  # domain -> mean distinct experts per layer per step, same-domain batches
    mixed: float  # the same for batches drawn from the whole trace
    same_overall: float  # same-domain mean, domains weighted by their share of requests

    def reduction(self, domain: str | None = None) -> float:
        """Relative reduction 1 - same / mixed (for one domain, or overall)."""
        same = self.same_overall if domain is None else self.same[domain]
        return 1.0 - same / self.mixed


def batch_locality(trace: Trace, batch_size: int, num_steps: int = 200, seed: int = 0) -> BatchLocality:
    """Distinct experts per step, same-domain versus mixed batches of `batch_size` (see module doc)."""
    if trace.domain is None:
        raise InvalidInputError("batch locality needs the trace's domain labels")
    if batch_size < 1 or num_steps < 1:
        raise InvalidInputError("batch size and number of steps must be >= 1")
    rng = np.random.default_rng(seed)
    eligible = trace.output_tokens > 0
    pool = np.flatnonzero(eligible)
    if pool.size == 0:
        raise InvalidInputError("no request has output tokens")

    def mean_distinct(candidates: npt.NDArray[np.int64]) -> float:
        replace = candidates.size < batch_size
        picks = np.stack([rng.choice(candidates, size=batch_size, replace=replace) for _ in range(num_steps)])
        topk = step_topk(trace, picks.ravel(), rng).reshape(
            num_steps, batch_size, trace.num_layers, trace.top_k
        )
        return float(distinct_experts(topk, trace.num_experts).mean())

    mixed = mean_distinct(pool)
    domains, sizes = np.unique(trace.domain[eligible], return_counts=True)
    same = {str(d): mean_distinct(np.flatnonzero(eligible & (trace.domain == d))) for d in domains}
    weights = sizes / sizes.sum()
    same_overall = float(sum(w * same[str(d)] for d, w in zip(domains, weights, strict=True)))
    return BatchLocality(batch_size=batch_size, same=same, mixed=mixed, same_overall=same_overall)


@dataclass(frozen=True)
class Correlations:
    request: dict[str, float]  # domain or "all" -> mean request correlation
    expert: dict[str, float]  # domain or "all" -> mean expert correlation over (layer, expert)


def correlations(trace: Trace) -> Correlations:
    """Both prefill-decode correlations, per domain and overall ("all")."""
    groups: dict[str, npt.NDArray[np.bool_]] = {"all": np.ones(trace.num_requests, dtype=bool)}
    if trace.domain is not None:
        groups.update({str(d): trace.domain == d for d in np.unique(trace.domain)})
    request: dict[str, float] = {}
    expert: dict[str, float] = {}
    per_request = request_correlation(trace.prefill_counts, trace.decode_counts)
    for name, mask in groups.items():
        values = per_request[mask]
        request[name] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
        usable = mask & (trace.output_tokens > 0)
        if usable.sum() >= 2:
            per_expert = expert_correlation(
                trace.prefill_counts[usable],
                trace.decode_counts[usable],
                trace.prompt_tokens[usable],
                trace.output_tokens[usable],
            )
            expert[name] = float(np.nanmean(per_expert)) if np.any(~np.isnan(per_expert)) else float("nan")
        else:
            expert[name] = float("nan")
    return Correlations(request=request, expert=expert)
