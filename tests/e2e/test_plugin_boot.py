"""The plugin refuses, at engine start, a mode in which its counts would be wrong.

Runs before the other e2e modules (file order) so that it starts its engine alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eldr.errors import EldrError
from eldr.testing.engines import EngineSpec, kv_config, start_engine

pytestmark = pytest.mark.e2e


def test_plugin_refuses_compiled_mode_on_cpu(tiny_moe_model: Path, tmp_path: Path) -> None:
    spec = EngineSpec("compiled-plugin", tiny_moe_model, kv_config(is_plugin=True, wrapped=None))
    engine = start_engine(spec, tmp_path)
    try:
        with pytest.raises(EldrError, match="failed to start"):
            engine.wait_healthy(timeout_s=400)
    finally:
        engine.stop()
    assert "needs eager mode" in engine.log_path.read_text(errors="replace")
