"""The plugin refuses, at engine start, a compiled engine whose routers would not record their ids.

In compiled mode the capture buffers must be installed while the model is built, by the `eldr` vLLM
general plugin; an engine that excludes it (`VLLM_PLUGINS`) would trace its MoE layers without the
callback. Runs before the other e2e modules (file order) so that it starts its engine alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eldr.errors import EldrError
from eldr.testing.engines import EngineSpec, kv_config, start_engine

pytestmark = pytest.mark.e2e


def test_plugin_refuses_a_compiled_engine_without_its_general_plugin(
    tiny_moe_model: Path, tmp_path: Path
) -> None:
    spec = EngineSpec(
        "compiled-no-general-plugin",
        tiny_moe_model,
        kv_config(is_plugin=True, wrapped=None),
        env={"VLLM_PLUGINS": "lora_filesystem_resolver"},  # every general plugin but eldr's
    )
    engine = start_engine(spec, tmp_path)
    try:
        with pytest.raises(EldrError, match="failed to start"):
            engine.wait_healthy(timeout_s=400)
    finally:
        engine.stop()
    log = engine.log_path.read_text(errors="replace")
    assert "would not record its expert ids" in log and "VLLM_PLUGINS" in log
