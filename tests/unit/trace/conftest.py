"""Fixtures for trace tests (helpers in olmoe_fake.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from olmoe_fake import FakeData, make_fake_data, tiny_trace

from eldr.trace.format import Trace


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> FakeData:
    pytest.importorskip("tokenizers", reason="the OLMoE builder needs the 'trace' extra (tokenizers)")
    return make_fake_data(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture
def make_tiny_trace() -> Callable[..., Trace]:
    return tiny_trace
