from __future__ import annotations

import numpy as np
import pytest

from eldr.calibrate import FitConfig, fit_partition
from eldr.partition import Partition
from eldr.synthetic import SyntheticCounts, planted_clusters


@pytest.fixture(scope="session")
def synthetic() -> SyntheticCounts:
    return planted_clusters(240, num_clusters=4, num_layers=6, num_experts=16, top_k=2, seed=5)


@pytest.fixture(scope="session")
def partition(synthetic: SyntheticCounts) -> Partition:
    return fit_partition(
        synthetic.prefill_counts, FitConfig(num_workers=4), decode_counts=synthetic.decode_counts, top_k=2
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
