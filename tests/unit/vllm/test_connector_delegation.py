"""`EldrConnector` hands the KV-transfer calls it does not define itself to the wrapped connector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")


def _connector(tmp_path: Path, wrapped: str | None) -> Any:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from eldr.vllm.connector import EldrConnector

    extra: dict[str, Any] = {"shared_storage_path": str(tmp_path)}
    if wrapped is not None:
        extra["eldr_wrapped"] = wrapped
    config = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="EldrConnector",
            kv_connector_module_path="eldr.vllm.connector",
            kv_role="kv_producer",
            kv_connector_extra_config=extra,
        )
    )
    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)
    groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)]
    return EldrConnector(config, KVConnectorRole.SCHEDULER, KVCacheConfig(8, [], groups))


def test_the_wrapped_connectors_own_methods_are_called(tmp_path: Path) -> None:
    connector = _connector(tmp_path, "ExampleConnector")
    inner = connector._inner
    assert type(inner).__name__ == "ExampleConnector"
    for name in ("get_block_ids_with_load_errors", "shutdown", "take_events"):
        assert getattr(connector, name).__self__ is inner, name
    # stats are combined, not delegated (the wrapped connector's own stats travel inside eldr's)
    assert connector.get_kv_connector_stats.__self__ is connector
    assert connector.get_kv_connector_stats() is None  # ExampleConnector has none, decode stats off
    assert connector.requires_kv_delivery == inner.requires_kv_delivery
    assert connector._cache_hit_source == inner._cache_hit_source


def test_with_nothing_wrapped_the_base_defaults_answer_and_no_per_layer_hooks_run(tmp_path: Path) -> None:
    connector = _connector(tmp_path, None)
    assert connector._inner is None
    assert connector.get_block_ids_with_load_errors.__self__ is connector
    assert connector.get_block_ids_with_load_errors() == set()
    assert connector.requires_kv_delivery  # the base's default for a producer
    assert not connector.has_connector_metadata()  # vLLM then skips wait_for_layer_load / save_kv_layer
