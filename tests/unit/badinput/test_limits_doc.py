"""docs/limits.md lists every limit of `eldr.limits` and every ranged `eldr serve` setting."""

from __future__ import annotations

from pathlib import Path

import pytest

import eldr.limits as limits
from eldr.proxy.config import RANGES

DOC = Path(__file__).resolve().parents[3] / "docs" / "limits.md"


def test_every_limit_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    names = [
        name
        for name, value in vars(limits).items()
        if name.isupper() and isinstance(value, int | float) and name not in ("GIB", "MIB")
    ]
    assert len(names) > 20
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/limits.md does not list {missing}"
    assert not [key for key in RANGES if f"`{key}`" not in text]
    assert limits.MAX_BYTES_ENV in text and "2 GiB" in text


def test_the_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(limits.MAX_BYTES_ENV, raising=False)
    assert limits.max_bytes() == limits.DEFAULT_MAX_BYTES == 2 * 2**30
    monkeypatch.setenv(limits.MAX_BYTES_ENV, "1048576")
    assert limits.max_bytes() == 2**20
    for bad in ("0", "-5", "1.5", "lots"):
        monkeypatch.setenv(limits.MAX_BYTES_ENV, bad)
        with pytest.raises(limits.ConfigError, match="ELDR_MAX_BYTES"):
            limits.max_bytes()
