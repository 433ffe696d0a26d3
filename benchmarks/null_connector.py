"""A KV connector that does nothing: what vLLM's connector machinery costs with no connector work at all.

`benchmarks/plugin_overhead.py` runs one engine with it (`--kv-transfer-config '{"kv_connector":
"NullConnector", "kv_connector_module_path": "null_connector", ...}'`, this folder on PYTHONPATH), so
that `plugin / null` is the plugin's own cost and `null / stock` the cost of having a KV connector
configured at all (the scheduler and model runner take their connector paths every step). Like
`EldrConnector` with nothing wrapped, it binds no metadata for the per-layer hooks, so vLLM skips them.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata


class NullConnector(KVConnectorBase_V1):
    """Every hook returns at once; nothing is ever loaded or saved."""

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def has_connector_metadata(self) -> bool:
        return False

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KVConnectorMetadata()
