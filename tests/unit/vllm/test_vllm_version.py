from __future__ import annotations

import pytest

from eldr.errors import ConfigError
from eldr.vllm.version import OVERRIDE_ENV, check_vllm_version, release_of


@pytest.mark.parametrize(
    ("version", "release"), [("0.32.0", "0.32"), ("0.32.0+cpu", "0.32"), ("0.33.1rc1", "0.33")], ids=str
)
def test_release_of(version: str, release: str) -> None:
    assert release_of(version) == release


def test_verified_version_passes_silently() -> None:
    assert check_vllm_version("0.32.0+cpu", env={}) is None


def test_expected_version_warns() -> None:
    warning = check_vllm_version("0.33.0", env={})
    assert warning is not None and "only verified on 0.32" in warning


def test_other_versions_are_refused_unless_overridden() -> None:
    with pytest.raises(ConfigError, match=r"supports vLLM 0\.32, 0\.33, found 0\.21\.0"):
        check_vllm_version("0.21.0", env={})
    warning = check_vllm_version("0.21.0", env={OVERRIDE_ENV: "1"})
    assert warning is not None and "unsupported" in warning
