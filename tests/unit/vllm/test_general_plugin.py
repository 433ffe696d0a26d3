"""The vLLM general plugin: which engines it acts in, and the compile-cache key it changes."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from eldr.vllm.plugin import CACHE_KEY, mark_compile_cache, uses_eldr_connector


def test_only_engines_with_the_eldr_connector_are_touched() -> None:
    from vllm.config import KVTransferConfig, VllmConfig

    assert not uses_eldr_connector(VllmConfig())
    plain = VllmConfig(
        kv_transfer_config=KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    )
    assert not uses_eldr_connector(plain)
    eldr = KVTransferConfig(
        kv_connector="EldrConnector", kv_connector_module_path="eldr.vllm.connector", kv_role="kv_both"
    )
    assert uses_eldr_connector(VllmConfig(kv_transfer_config=eldr))


def test_a_plugin_engine_gets_its_own_compile_cache_key() -> None:
    from vllm.config import VllmConfig

    config = VllmConfig()
    without = config.compute_hash()  # what an engine without the plugin would be cached under
    mark_compile_cache(config)
    assert CACHE_KEY in config.additional_config
    assert config.compute_hash() != without
    marked = config.compute_hash()
    mark_compile_cache(config)  # once per MoE layer: idempotent
    assert config.compute_hash() == marked
