from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_rig import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()
