"""vLLM general plugin: give MoE routers their capture buffers while the model is built.

torch.compile traces the model at its first forward (on vLLM CPU: the warm-up inside
`determine_available_memory`, before any KV connector exists). The router's `if self.capture_fn is
not None:` is resolved during that trace and vLLM drops dynamo's guards, so a callback set later
is never called by the compiled graph. This plugin is loaded by vLLM in every process (entry point
`vllm.general_plugins`, name `eldr`) and registers torch's global module-registration hook: when a
built MoE layer is attached to its parent module, and the engine's KV connector is `EldrConnector` or
a subclass of it, its router gets a `router_tap.RouterTap` through the public `set_capture_fn`. The
first trace then includes the buffer copy, and the connector finds the taps when it starts.

The plugin also adds `eldr_router_capture` to the engine's `additional_config` (part of vLLM's
config hash, hence of its compile-cache key) so that a graph compiled without the capture, cached by
an earlier run of the same engine without the plugin, is never loaded for a plugin engine.

Engines without `EldrConnector` are left alone (a type check per registered submodule while their
model is built, and for each MoE layer a look at the configured connector class; nothing at run time).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("vllm.eldr")
CACHE_KEY = "eldr_router_capture"
CAPTURE_VERSION = "1"  # bump when the traced callback changes
_handle: Any = None


def register() -> None:
    """The `vllm.general_plugins` entry point (idempotent: vLLM may call it more than once)."""
    global _handle
    if _handle is None:
        _handle = torch.nn.modules.module.register_module_module_registration_hook(_on_module)


def uses_eldr_connector(vllm_config: Any) -> bool:
    """Whether the engine's KV connector is `EldrConnector` or a subclass of it (out of tree)."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    if ktc is None or not ktc.kv_connector:
        return False
    if ktc.kv_connector == "EldrConnector" or ktc.kv_connector_module_path == "eldr.vllm.connector":
        return True
    if not ktc.kv_connector_module_path:
        return False  # one of vLLM's own connectors
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from eldr.vllm.connector import EldrConnector

    return issubclass(KVConnectorFactory.get_connector_class(ktc), EldrConnector)


def _on_module(parent: torch.nn.Module, name: str, module: torch.nn.Module | None) -> None:
    if module is None or not any(cls.__name__ == "MoERunner" for cls in type(module).__mro__):
        return  # cheap filter first (no import): this runs for every submodule of every model built
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if not isinstance(module, MoERunner):
        return

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or not uses_eldr_connector(vllm_config):
        return
    from eldr.vllm.router_tap import has_capture_callback, install_tap

    router = getattr(module, "router", None)
    if router is None or not has_capture_callback(router):
        return  # the connector refuses such a model at start, with the reason
    max_num_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
    install_tap(int(module.layer_id), router, max_num_tokens)
    mark_compile_cache(vllm_config)


def mark_compile_cache(vllm_config: Any) -> None:
    """Make the compile-cache key of a plugin engine differ from the same engine's without it."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict) and extra.get(CACHE_KEY) != CAPTURE_VERSION:
        extra[CACHE_KEY] = CAPTURE_VERSION
