from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eldr.errors import InvalidInputError
from eldr.signature import (
    SignatureTransform,
    as_counts,
    check_conservation,
    counts_from_topk,
    fit_idf,
)


def test_counts_from_topk_counts_each_choice_once_per_layer() -> None:
    ids = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 1]]])  # [T=2, L=2, k=2]
    counts = counts_from_topk(ids, num_experts=4)
    assert counts.tolist() == [[2, 2, 0, 0], [0, 1, 2, 1]]
    check_conservation(counts, num_tokens=2, top_k=2)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.zeros((2, 3)), "shape"),
        (np.zeros((0, 2, 2), dtype=int), "shape"),
        (np.full((1, 2, 2), 4), "lie in"),
        (np.full((1, 2, 2), -1), "lie in"),
        (np.zeros((1, 2, 2), dtype=float), "integers"),
    ],
    ids=["2d", "empty", "too-large", "negative", "float"],
)
def test_counts_from_topk_rejects_bad_ids(ids: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        counts_from_topk(ids, num_experts=4)


def test_conservation_names_the_layer() -> None:
    counts = np.array([[2, 2], [1, 2]])
    with pytest.raises(InvalidInputError, match="layer 1 counts sum to 3, expected 2 tokens x top-2 = 4"):
        check_conservation(counts, num_tokens=2, top_k=2)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (np.zeros((0, 3)), "empty"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1, -1]]), "negative"),
        (np.array([[0.5, 1.0]]), "fractions"),
        (np.array([["a", "b"]]), "numeric"),
    ],
    ids=["empty", "nan", "negative", "fraction", "strings"],
)
def test_as_counts_rejects_bad_values(counts: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        as_counts(counts)


def test_idf_matches_the_paper_formula() -> None:
    prefill = np.array([[[1, 0, 3]], [[2, 0, 0]], [[5, 1, 0]]])  # N=3, L=1, E=3
    idf = fit_idf(prefill)
    df = np.array([3, 1, 1])
    np.testing.assert_allclose(idf[0], np.log(4.0 / (df + 1.0)), rtol=1e-6)


def _transform(
    num_layers: int = 3, num_experts: int = 4, layers: tuple[int, ...] = (2, 0)
) -> SignatureTransform:
    idf = np.linspace(0.5, 2.0, num_layers * num_experts, dtype=np.float32).reshape(num_layers, num_experts)
    return SignatureTransform(idf=idf, layers=layers)


def test_transform_weights_kept_layers_and_normalises() -> None:
    transform = _transform()
    counts = np.arange(12).reshape(3, 4)
    expected = np.concatenate([counts[0] * transform.idf[0], counts[2] * transform.idf[2]])
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(transform.apply(counts), expected, rtol=1e-6)
    assert transform.dim == 8


def test_transform_maps_zero_counts_to_zero_and_checks_shape() -> None:
    transform = _transform()
    assert not transform.apply(np.zeros((3, 4), dtype=int)).any()
    with pytest.raises(InvalidInputError, match="partition expects 3 layers x 4 experts"):
        transform.apply(np.zeros((2, 4), dtype=int))


def test_embed_and_full_weights_reproduce_apply() -> None:
    transform = _transform()
    counts = np.arange(12).reshape(3, 4)
    weighted = counts.ravel() * transform.full_weights()
    np.testing.assert_allclose(
        weighted / np.linalg.norm(weighted), transform.embed(transform.apply(counts)), rtol=1e-5
    )


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=12, max_size=12).filter(lambda c: sum(c) > 0),
    scale=st.integers(1, 1000),
)
def test_signature_is_invariant_to_scaling_counts(counts: list[int], scale: int) -> None:
    transform = _transform(layers=(0, 1, 2))
    arr = np.array(counts).reshape(3, 4)
    np.testing.assert_allclose(transform.apply(arr), transform.apply(arr * scale), rtol=1e-5, atol=1e-7)
