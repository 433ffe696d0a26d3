from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from eldr.layermask import rank_rows, sample_pairs, select_layers, standardize_rows
from eldr.signature import fit_idf
from eldr.synthetic import planted_clusters


def test_binned_rank_correlation_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((3, 30_000)).astype(np.float32)
    x[1, :500] = 0.25  # a block of exact ties
    y = x[0] + x[1] + rng.random(30_000)
    ours = standardize_rows(rank_rows(x)) @ standardize_rows(rank_rows(y[None]))[0]
    exact = [spearmanr(row, y).statistic for row in x]
    np.testing.assert_allclose(ours, exact, atol=1e-4)


def test_pairs_are_distinct_and_seeded() -> None:
    pairs = sample_pairs(50, 1000, seed=1)
    assert pairs.shape == (1000, 2)
    assert np.all(pairs[:, 0] != pairs[:, 1]) and pairs.max() < 50
    np.testing.assert_array_equal(pairs, sample_pairs(50, 1000, seed=1))


def test_greedy_mask_keeps_the_informative_layers() -> None:
    informative = (1, 4, 6)
    data = planted_clusters(
        600, num_clusters=6, num_layers=8, num_experts=32, informative_layers=informative, seed=2
    )
    weighted = data.prefill_counts.astype(np.float32) * fit_idf(data.prefill_counts)[None]
    mask = select_layers(weighted, data.decode_counts, num_pairs=20_000, seed=1)
    assert set(mask.greedy_order[:3]) == set(informative)
    assert set(informative) <= set(mask.layers)
    assert sorted(mask.greedy_order) == list(range(8))
    assert len(mask.rho_curve) == 8
    assert mask.rho_curve[len(mask.layers) - 1] == max(mask.rho_curve)
