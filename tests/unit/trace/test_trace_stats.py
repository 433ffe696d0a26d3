from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from eldr.errors import InvalidInputError
from eldr.trace.format import Trace
from eldr.trace.stats import (
    batch_locality,
    conservation_violations,
    correlations,
    distinct_experts,
    expert_correlation,
    request_correlation,
)


def test_request_correlation_by_hand() -> None:
    prefill = np.array([[[1, 2, 3, 0], [4, 0, 0, 0]], [[1, 1, 1, 1], [2, 0, 2, 0]]])
    decode = np.array([[[2, 4, 6, 0], [0, 4, 0, 0]], [[1, 2, 3, 4], [0, 2, 0, 2]]])
    # request 0: layer 0 proportional (r = 1); layer 1: x = (4,0,0,0), y = (0,4,0,0): r = -1/3
    # request 1: layer 0 constant prefill (undefined); layer 1 opposite (r = -1)
    np.testing.assert_allclose(request_correlation(prefill, decode), [(1 - 1 / 3) / 2, -1.0])
    assert np.isnan(request_correlation(np.ones((1, 1, 3)), np.ones((1, 1, 3))))[0]


def test_expert_correlation_uses_frequencies_per_token() -> None:
    # expert 0's frequency: prefill 0.5, 0.25, 1.0; decode 1.0, 0.5, 2.0 per token -> r = 1
    # expert 1: prefill 0.5, 0.75, 0; decode 0, 0.5, 0 -> r = 2 / sqrt(7) (by hand)
    prefill = np.array([[[2, 2]], [[1, 3]], [[4, 0]]])
    prompt = np.array([4, 4, 4])
    decode = np.array([[[2, 0]], [[1, 1]], [[4, 0]]])
    output = np.array([2, 2, 2])
    corr = expert_correlation(prefill, decode, prompt, output)
    assert corr.shape == (1, 2)
    np.testing.assert_allclose(corr, [[1.0, 2 / np.sqrt(7)]])
    # doubling one request's prompt (and its counts) changes no frequency, so no correlation
    prefill2, prompt2 = prefill.copy(), prompt.copy()
    prefill2[1] *= 2
    prompt2[1] *= 2
    np.testing.assert_allclose(expert_correlation(prefill2, decode, prompt2, output), corr)


def test_distinct_experts_are_the_union_per_layer() -> None:
    topk = np.array(
        [
            [[[0, 1], [5, 6]], [[1, 2], [5, 6]]],  # step 0: layer 0 {0,1,2}, layer 1 {5,6}
            [[[3, 4], [0, 7]], [[5, 6], [1, 7]]],  # step 1: layer 0 {3,4,5,6}, layer 1 {0,1,7}
        ]
    )
    np.testing.assert_array_equal(distinct_experts(topk, 8), [[3, 2], [4, 3]])


def _two_domain_trace(num_per_domain: int) -> Trace:
    # domain a always uses experts {0, 1}, domain b {2, 3}: one layer, top-2, 3 output tokens each
    n = 2 * num_per_domain
    is_a = np.arange(n) < num_per_domain
    row = np.where(is_a[:, None], [0, 1], [2, 3])
    decode_topk = np.repeat(row[:, None, :], 3, axis=0)  # [3n, 1, 2]
    counts = np.zeros((n, 1, 6), dtype=np.int64)
    counts[is_a, 0, :2] = 3
    counts[~is_a, 0, 2:4] = 3
    return Trace(
        prefill_counts=counts,
        decode_counts=counts,
        prompt_tokens=np.full(n, 3),
        output_tokens=np.full(n, 3),
        arrival_s=np.arange(n, dtype=float),
        top_k=2,
        layers=np.array([0]),
        num_model_layers=1,
        domain=np.where(is_a, "a", "b"),
        decode_topk=decode_topk,
        decode_offsets=np.arange(n + 1) * 3,
    )


@pytest.mark.parametrize("exact", [True, False], ids=["exact-decode", "sampled-from-counts"])
def test_batch_locality_on_disjoint_domains(exact: bool) -> None:
    trace = _two_domain_trace(50)
    if not exact:
        trace = Trace(**{**trace.__dict__, "decode_topk": None, "decode_offsets": None})
    one = batch_locality(trace, 1, num_steps=50)
    assert one.same == {"a": 2.0, "b": 2.0} and one.mixed == 2.0 and one.reduction() == 0.0
    two = batch_locality(trace, 2, num_steps=400, seed=1)
    assert two.same == {"a": 2.0, "b": 2.0} and two.same_overall == 2.0
    # a mixed pair spans both domains with probability 1/2 (4 experts), else 2: mean 3
    assert 2.8 < two.mixed < 3.2
    assert two.reduction("a") == pytest.approx(1 - 2.0 / two.mixed)
    big = batch_locality(trace, 64, num_steps=20)
    assert big.mixed == 4.0 and big.reduction() == 0.5


def test_correlations_and_conservation_on_a_tiny_trace(make_tiny_trace: Callable[..., Trace]) -> None:
    trace = make_tiny_trace()
    corr = correlations(trace)
    assert set(corr.request) == {"all", "a", "b"}
    assert corr.request["a"] == pytest.approx(1.0) and corr.request["all"] == pytest.approx(1.0)
    assert np.isnan(corr.expert["a"])  # one request: no correlation over requests
    assert conservation_violations(trace) == 0
    broken = make_tiny_trace(prompt_tokens=np.array([3, 1]))
    assert conservation_violations(broken) == 1


def test_batch_locality_needs_domains(make_tiny_trace: Callable[..., Trace]) -> None:
    with pytest.raises(InvalidInputError, match="domain"):
        batch_locality(make_tiny_trace(domain=None), 2)
