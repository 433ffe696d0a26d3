"""The vLLM general plugin: which engines it acts in, and the compile-cache key it changes."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

from eldr.vllm.connector import EldrConnector
from eldr.vllm.plugin import CACHE_KEY, mark_compile_cache, uses_eldr_connector


class SubclassedEldrConnector(EldrConnector):
    """An out-of-tree connector built on EldrConnector (as benchmarks/plugin_timing.py's)."""


class OtherConnector(KVConnectorBase_V1):
    """An out-of-tree connector of its own."""


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


def test_an_out_of_tree_subclass_of_the_connector_is_recognised() -> None:
    from vllm.config import KVTransferConfig, VllmConfig

    def config(name: str) -> VllmConfig:
        ktc = KVTransferConfig(kv_connector=name, kv_connector_module_path=__name__, kv_role="kv_both")
        return VllmConfig(kv_transfer_config=ktc)

    assert uses_eldr_connector(config("SubclassedEldrConnector"))
    assert not uses_eldr_connector(config("OtherConnector"))
