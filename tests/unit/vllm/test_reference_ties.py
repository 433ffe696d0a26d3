from __future__ import annotations

import numpy as np

from eldr.testing.reference import explained_by_ties


def test_identical_counts_need_no_tie() -> None:
    counts = np.array([[2, 1, 0]])
    assert explained_by_ties(counts, counts.copy(), []) == 0


def test_a_difference_needs_a_matching_near_tie() -> None:
    reference = np.array([[2, 1, 0], [1, 1, 1]])
    actual = np.array([[2, 0, 1], [1, 1, 1]])  # layer 0: one count moved from expert 1 to expert 2
    assert explained_by_ties(actual, reference, [(0, 1, 2)]) == 1
    assert explained_by_ties(actual, reference, []) is None
    assert explained_by_ties(actual, reference, [(1, 1, 2)]) is None  # a tie in another layer
    assert explained_by_ties(actual, reference, [(0, 2, 1)]) is None  # the opposite direction


def test_each_tie_explains_one_count_only() -> None:
    reference = np.array([[3, 0]])
    actual = np.array([[1, 2]])
    assert explained_by_ties(actual, reference, [(0, 0, 1)]) is None
    assert explained_by_ties(actual, reference, [(0, 0, 1), (0, 0, 1)]) == 2
