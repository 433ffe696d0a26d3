from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import InvalidInputError
from eldr.trace.sampling import systematic_topk, topk_from_counts


def test_zero_one_rows_are_drawn_exactly() -> None:
    pi = np.zeros((3, 10))
    pi[0, [1, 4, 9]] = 1
    pi[1, [0, 1, 2]] = 1
    pi[2, [5, 6, 7]] = 1
    out = systematic_topk(pi, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(out, [[1, 4, 9], [0, 1, 2], [5, 6, 7]])


def test_inclusion_frequencies_match_the_probabilities() -> None:
    pi = np.array([1.0, 0.75, 0.5, 0.25, 0.25, 0.25, 0.0, 0.0])  # sums to 3
    rows = 40_000
    out = systematic_topk(np.tile(pi, (rows, 1)), 3, np.random.default_rng(1))
    freq = np.bincount(out.ravel(), minlength=8) / rows
    # binomial standard error <= 0.0025: 4 sigma
    np.testing.assert_allclose(freq, pi, atol=0.01)


def test_joint_draws_vary_between_rows() -> None:
    pi = np.full((2000, 6), 0.5)  # any 3 of 6
    out = systematic_topk(pi, 3, np.random.default_rng(2))
    assert len({tuple(row) for row in out.tolist()}) == 20  # all C(6, 3) subsets occur


@settings(max_examples=50, deadline=None)
@given(
    num_experts=st.integers(2, 20),
    top_k=st.integers(1, 6),
    occurrences=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_draws_are_k_distinct_experts_from_the_support(
    num_experts: int, top_k: int, occurrences: int, seed: int
) -> None:
    top_k = min(top_k, num_experts)
    rng = np.random.default_rng(seed)
    # a token id seen `occurrences` times, each time routed to top_k distinct experts
    counts = np.zeros(num_experts)
    for _ in range(occurrences):
        counts[rng.choice(num_experts, size=top_k, replace=False)] += 1
    pi = counts / occurrences
    out = systematic_topk(np.tile(pi, (64, 1)), top_k, rng)
    assert out.shape == (64, top_k)
    assert np.all(np.diff(out, axis=1) > 0)  # sorted and distinct
    assert np.all(counts[out] > 0)  # never an expert the token was not routed to
    assert np.all(np.isin(np.flatnonzero(pi == 1.0), out))  # experts chosen every time are always drawn


@pytest.mark.parametrize(
    ("pi", "k", "message"),
    [
        (np.array([0.5, 0.5]), 1, r"\[rows, experts\]"),
        (np.array([[1.5, 0.5]]), 2, r"in \[0, 1\]"),
        (np.array([[0.5, 0.25]]), 1, "sum to top_k"),
        (np.array([[0.5, 0.5]]), 3, "top_k must lie"),
    ],
    ids=["1d", "above-one", "bad-sum", "k-too-big"],
)
def test_invalid_probabilities_are_rejected(pi: np.ndarray, k: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        systematic_topk(pi, k, np.random.default_rng(0))


def test_topk_from_counts_follows_the_decode_counts() -> None:
    # request 0: 4 tokens, layer 0 always {0, 1}; layer 1 experts 2 and 3 each in half the tokens
    counts = np.array([[[4, 4, 0, 0], [4, 0, 2, 2]], [[0, 1, 1, 0], [1, 0, 0, 1]]])
    out = topk_from_counts(counts, np.array([4, 1]), 2, np.random.default_rng(0))
    assert out.shape == (2, 2, 2)
    np.testing.assert_array_equal(out[0, 0], [0, 1])
    assert out[0, 1, 0] == 0 and out[0, 1, 1] in (2, 3)
    np.testing.assert_array_equal(out[1], [[1, 2], [0, 3]])  # one token: exact
    with pytest.raises(InvalidInputError, match="at least one token"):
        topk_from_counts(counts, np.array([4, 0]), 2, np.random.default_rng(0))
