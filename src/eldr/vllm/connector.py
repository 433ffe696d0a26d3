"""`EldrConnector`: a KV-connector wrapper that returns each request's expert signature with its answer.

Loaded by stock vLLM through its supported extension point, e.g. on a GPU prefill instance

    --kv-transfer-config '{"kv_connector": "EldrConnector", "kv_connector_module_path": "eldr.vllm.connector",
      "kv_role": "kv_producer", "kv_connector_extra_config": {"eldr_wrapped": "NixlConnector"}}'

Every KV-transfer call is delegated to the wrapped connector (`eldr_wrapped`: NixlConnector in
production, ExampleConnector in the CPU tests, absent for none). On top of it:

- worker side: the MoE routers' capture callbacks record each forward's real top-k ids into fixed
  buffers (`router_tap.RouterTap`, installed while the model is built by the `eldr` general plugin,
  `plugin.py`, so compiled graphs contain the copy); `bind_connector_metadata` arms the rows of the
  step's tokens, `build_connector_worker_meta` folds them into per-KV-block rows (`router_tap.TapSet`)
  and sends them back with the step number;
- scheduler side: `build_connector_meta` numbers steps and notes which requests finish their prefill;
  `update_connector_output` folds the rows into the signature cache (`blockcache`) and fills the
  params `request_finished` returned with `kv_transfer_params["eldr"]` (`ledger` explains why the
  filling happens after `request_finished`).

Extra config keys (in `kv_connector_extra_config`, passed unchanged to the wrapped connector too):
`eldr_wrapped` (connector name), `eldr_wrapped_module_path` (for an out-of-tree connector),
`eldr_record_decode` (also return the generated tokens' counts as `kv_transfer_params["eldr_decode"]`,
the decode-recording mode `eldr capture` uses), `eldr_skip_external_loads` (never load KV from the
wrapped connector on this instance: a prefill instance whose wrapped connector would otherwise reuse
stored KV, which would leave those tokens uncounted), `eldr_decode_stats` (the decode-locality metric
on the engine's `/metrics`, `decodestats.py`).

Stats: `get_kv_connector_stats` / `build_kv_connector_stats` / `build_prom_metrics` carry the wrapped
connector's own stats and Prometheus metrics (delegated and combined, as `MultiConnector` does) and,
with `eldr_decode_stats`, the decode-locality observations (`decodestats.EldrKVConnectorStats`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.forward_context import get_forward_context, is_forward_context_available

from eldr.errors import ConfigError
from eldr.vllm.blockcache import BlockDelta
from eldr.vllm.decodestats import (
    DECODE_STATS_KEY,
    DecodeStatsRecorder,
    EldrKVConnectorStats,
    EldrPromMetrics,
    class_ref,
)
from eldr.vllm.fold import empty_delta
from eldr.vllm.ledger import SignatureLedger
from eldr.vllm.router_tap import RouterTap, TapSet, find_moe_routers, install_tap, taps_for
from eldr.vllm.version import check_vllm_version

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.eldr")  # a child of vLLM's logger: same handlers and format


@dataclass
class EldrConnectorMeta(KVConnectorMetadata):
    """Scheduler -> worker, each step: the step number and the wrapped connector's metadata."""

    step: int
    num_tokens: int
    inner: KVConnectorMetadata | None


@dataclass
class EldrWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step: the step's block rows (`None`: unusable) and the wrapped meta."""

    step: int
    delta: BlockDelta | None
    top_k: int
    inner: KVConnectorWorkerMetadata | None

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        # tensor-parallel ranks see the same router ids: keep one copy, refuse if they disagree
        assert isinstance(other, EldrWorkerMeta)
        delta = self.delta
        if delta is None or other.delta is None or delta.counts.shape != other.delta.counts.shape:
            delta = None
        inner = self.inner
        if inner is not None and other.inner is not None:
            inner = inner.aggregate(other.inner)
        return EldrWorkerMeta(self.step, delta, self.top_k, inner or other.inner)


def _wrapped_config(vllm_config: VllmConfig) -> tuple[type[KVConnectorBase_V1] | None, VllmConfig]:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    ktc = vllm_config.kv_transfer_config
    assert ktc is not None
    extra = ktc.kv_connector_extra_config
    name = extra.get("eldr_wrapped")
    if not name:
        return None, vllm_config
    inner_config = copy.copy(vllm_config)
    inner_config.kv_transfer_config = dataclasses.replace(
        ktc, kv_connector=name, kv_connector_module_path=extra.get("eldr_wrapped_module_path")
    )
    cls = KVConnectorFactory.get_connector_class(inner_config.kv_transfer_config)
    return cls, inner_config


def check_capture_mode(vllm_config: VllmConfig) -> None:
    """Refuse, at start, engine setups in which the recorded router ids could not be attributed.

    Compiled mode works (verified on vLLM CPU): the capture is an in-place copy into a fixed buffer
    that the compiled graph contains (see `capture.py`, and `plugin.py` for how it gets there before
    the first trace). CUDA graphs should repeat that copy on every replay, but were not run here: a
    warning says so. Data parallelism is refused: the routers then see other ranks' tokens too.
    Whether every router recorded every token is checked at run time, every step.
    """
    from vllm.config.compilation import CUDAGraphMode

    parallel = vllm_config.parallel_config
    if int(parallel.data_parallel_size) > 1:
        raise ConfigError(
            "eldr engine plugin does not support data parallelism (--data-parallel-size "
            f"{parallel.data_parallel_size}): the MoE routers see other ranks' tokens"
        )
    if vllm_config.compilation_config.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        logger.warning(
            "eldr engine plugin: CUDA graphs are on; the capture is designed to be replayed by them "
            "but this was not verified (steps whose ids were not recorded give no signature)"
        )


def _not_in_graph_reason(tap: RouterTap | None) -> str:
    if tap is None:
        why = (
            "its capture buffer was not installed while the model was built: the `eldr` vLLM general "
            "plugin did not run in this worker (is eldr installed in this environment, and does "
            "VLLM_PLUGINS, if set, include 'eldr'?)"
        )
    else:
        why = "another component replaced the router's capture callback after eldr installed it"
    return (
        f"eldr engine plugin: a MoE router of this compiled model would not record its expert ids: {why}; "
        "or start the engine in eager mode (--compilation-config '{\"mode\": 0}')"
    )


def _is_compiled(vllm_config: VllmConfig) -> bool:
    from vllm.config.compilation import CompilationMode

    return vllm_config.compilation_config.mode != CompilationMode.NONE


class EldrConnector(KVConnectorBase_V1):
    """Signature capture around a wrapped KV connector (see the module docstring)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        import vllm

        warning = check_vllm_version(vllm.__version__)
        if warning:
            logger.warning(warning)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_capture_mode(vllm_config)
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ConfigError(
                "eldr engine plugin supports models with one KV cache group (full attention); "
                f"this model has {len(kv_cache_config.kv_cache_groups)}"
            )
        extra = self._kv_transfer_config.kv_connector_extra_config
        inner_cls, inner_config = _wrapped_config(vllm_config)
        self._inner = inner_cls(inner_config, role, kv_cache_config) if inner_cls is not None else None
        if self._inner is not None:  # bound once here: a `__getattribute__` would tax every attribute
            for name in _DELEGATED:
                setattr(self, name, getattr(self._inner, name))
        self._block_size = int(vllm_config.cache_config.block_size)
        self._is_skipping_external = bool(extra.get("eldr_skip_external_loads", False))
        # scheduler side
        self._ledger = SignatureLedger(
            num_blocks=int(kv_cache_config.num_blocks),
            block_size=self._block_size,
            is_recording_decode=bool(extra.get("eldr_record_decode", False)),
        )
        self._requests: dict[str, Request] = {}
        self._decode_stats: DecodeStatsRecorder | None = None  # eldr_decode_stats: scheduler side only
        if bool(extra.get(DECODE_STATS_KEY, False)) and role == KVConnectorRole.SCHEDULER:
            self._decode_stats = DecodeStatsRecorder()
            if vllm_config.speculative_config is not None:
                logger.warning(
                    "eldr: %s with speculative decoding: only requests that schedule exactly one token "
                    "in a step count as decode tokens; spec decode is not modelled by this metric",
                    DECODE_STATS_KEY,
                )
        self._inner_ref = class_ref(type(self._inner)) if self._inner is not None else None
        # worker side
        self._taps: TapSet | None = None
        self._top_k = 0
        self._step_meta: EldrConnectorMeta | None = None
        self._slot_layer = kv_cache_config.kv_cache_groups[0].layer_names[0]
        self._is_warned = False

    # ------------------------------------------------------------------ worker side

    def _attach_taps(self) -> TapSet:
        """The routers' capture taps, installed while the model was built (`plugin.py`) or now."""
        if self._taps is not None:
            return self._taps
        routers = find_moe_routers(self._vllm_config.compilation_config.static_forward_context)
        if not routers:
            raise ConfigError("eldr engine plugin: the model has no MoE router with a capture callback")
        is_compiled = _is_compiled(self._vllm_config)
        max_num_tokens = int(self._vllm_config.scheduler_config.max_num_batched_tokens)
        taps: list[RouterTap] = []
        for (layer_id, router), tap in zip(routers, taps_for(routers), strict=True):
            if tap is None or not tap.is_installed:
                if is_compiled:
                    raise ConfigError(_not_in_graph_reason(tap))
                # eager mode: nothing was traced, a callback set now runs from the next forward on
                tap = install_tap(layer_id, router, max_num_tokens)
            taps.append(tap)
        self._top_k = int(routers[0][1].top_k)
        self._taps = TapSet(taps, num_experts=int(routers[0][1].global_num_experts))
        logger.info(
            "eldr: capturing %d MoE layers, %d experts, top-%d (%s mode)",
            len(taps),
            self._taps.num_experts,
            self._top_k,
            "compiled" if is_compiled else "eager",
        )
        return self._taps

    def _step_slots(self) -> torch.Tensor | None:
        if not is_forward_context_available():
            return None
        slots = get_forward_context().slot_mapping
        if not isinstance(slots, dict) or self._slot_layer not in slots:
            if not self._is_warned:
                self._is_warned = True
                keys = list(slots)[:3] if isinstance(slots, dict) else type(slots).__name__
                logger.warning(
                    "eldr: no slot mapping for %s in the forward context (%s)", self._slot_layer, keys
                )
            return None
        return slots[self._slot_layer]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._attach_taps()
        if self._inner is not None:
            self._inner.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, EldrConnectorMeta)
        self._attach_taps().arm(connector_metadata.num_tokens)
        self._step_meta = connector_metadata
        if self._inner is not None and connector_metadata.inner is not None:
            self._inner.bind_connector_metadata(connector_metadata.inner)

    def has_connector_metadata(self) -> bool:
        # vLLM calls the per-layer hooks (`wait_for_layer_load`, `save_kv_layer`) around every
        # attention layer only while this is True: with nothing wrapped they have nothing to do
        return self._inner is not None and self._inner.has_connector_metadata()

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._step_meta = None
        if self._inner is not None:
            self._inner.clear_connector_metadata()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        inner = self._inner.build_connector_worker_meta() if self._inner is not None else None
        meta = self._step_meta
        if meta is None:
            return inner
        taps = self._attach_taps()
        delta: BlockDelta | None
        if meta.num_tokens == 0:
            delta = empty_delta(len(taps.taps), taps.num_experts, self._block_size)
        else:
            slots = self._step_slots()
            delta = taps.fold(slots, self._block_size) if slots is not None else None
            if delta is None and not self._is_warned:
                self._is_warned = True
                logger.warning(
                    "eldr: step %d ran %d tokens but not every MoE router recorded every token; the "
                    "step's counts are dropped and its requests get no signature (a graph compiled "
                    "without the capture, or a MoE kernel that routes without calling the router?)",
                    meta.step,
                    meta.num_tokens,
                )
        return EldrWorkerMeta(meta.step, delta, self._top_k, inner)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        meta = kv_connector_metadata
        if self._inner is not None and isinstance(meta, EldrConnectorMeta) and meta.inner is not None:
            self._inner.handle_preemptions(meta.inner)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._inner is not None:
            self._inner.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._inner is not None:
            self._inner.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        if self._inner is not None:
            self._inner.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        if self._inner is not None:
            self._inner.wait_for_save()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ scheduler side

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        self._kv_cache_manager = kv_cache_manager
        if self._inner is not None:
            self._inner.bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        self._requests[request.request_id] = request
        self._ledger.track(request.request_id, int(request.num_prompt_tokens))
        if self._inner is None or self._is_skipping_external:
            return 0, False
        return self._inner.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens > 0 and self._kv_cache_manager is not None:
            block_ids = list(self._kv_cache_manager.get_block_ids(request.request_id)[0])
            first = int(request.num_computed_tokens) // self._block_size
            self._ledger.mark_external(request.request_id, block_ids[first:])
        if self._inner is not None:
            self._inner.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        inner = self._inner.build_connector_meta(scheduler_output) if self._inner is not None else None
        step = self._ledger.begin_step(int(scheduler_output.total_num_scheduled_tokens))
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(req_id)
            if request is None:
                continue
            before, num_prompt = int(request.num_computed_tokens), int(request.num_prompt_tokens)
            if before < num_prompt <= before + num_new and self._kv_cache_manager is not None:
                block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
                num_blocks = -(-num_prompt // self._block_size)
                self._ledger.prefill_due(step, req_id, list(block_ids[:num_blocks]))
        if self._decode_stats is not None:
            self._note_decode_blocks(step, scheduler_output)
        return EldrConnectorMeta(step, int(scheduler_output.total_num_scheduled_tokens), inner)

    def _note_decode_blocks(self, step: int, scheduler_output: SchedulerOutput) -> None:
        """The KV block of each decode token (a request scheduling one token) of the step, for its stats."""
        assert self._decode_stats is not None
        manager, requests, block_size = self._kv_cache_manager, self._requests, self._block_size
        blocks: list[int] = []
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            if num_new != 1:
                continue
            request = requests.get(req_id)
            table = manager.get_blocks(req_id).blocks[0] if manager is not None else []
            index = request.num_computed_tokens // block_size if request is not None else len(table)
            if index >= len(table):  # a decode token that cannot be placed: skip the step, never guess
                self._decode_stats.note(step, None)
                return
            blocks.append(table[index].block_id)  # the block of the step's one token's position
        if blocks:
            self._decode_stats.note(step, blocks)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, EldrWorkerMeta):
            self._ledger.apply(meta.step, meta.delta, meta.top_k)
            if self._decode_stats is not None:
                self._decode_stats.apply(meta.step, meta.delta, meta.top_k)
            connector_output.kv_connector_worker_meta = meta.inner
        if self._inner is not None:
            self._inner.update_connector_output(connector_output)
        connector_output.kv_connector_worker_meta = meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        is_delayed, params = (
            self._inner.request_finished(request, block_ids) if self._inner is not None else (False, None)
        )
        self._requests.pop(request.request_id, None)
        out = params if params is not None else {}
        is_coming = self._ledger.finish(
            request.request_id, list(block_ids), int(request.num_computed_tokens), out
        )
        return is_delayed, out if (is_coming or params is not None) else None

    # ------------------------------------------------------------------ stats (both sides)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The wrapped connector's stats and (scheduler side, `eldr_decode_stats`) the decode steps'.

        vLLM calls it on the worker after every step (`KVConnectorOutput.kv_connector_stats`) and on
        the scheduler after `update_connector_output` (scheduler.py, `update_from_output`), and combines
        the two with `aggregate`: both sides answer with `EldrKVConnectorStats`.
        """
        inner = self._inner.get_kv_connector_stats() if self._inner is not None else None
        decode = self._decode_stats.take() if self._decode_stats is not None else None
        if decode is None and inner is None:
            return None
        return EldrKVConnectorStats(data=decode or {}, inner=inner, inner_connector=self._inner_ref)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return EldrKVConnectorStats.from_dict(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        inner_cls, inner_config = _wrapped_config(vllm_config)
        inner = (
            inner_cls.build_prom_metrics(inner_config, metric_types, labelnames, per_engine_labelvalues)
            if inner_cls is not None
            else None
        )
        ktc = vllm_config.kv_transfer_config
        is_decode = ktc is not None and bool(ktc.kv_connector_extra_config.get(DECODE_STATS_KEY, False))
        if inner is None and not is_decode:
            return None
        return EldrPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues, inner=inner, is_decode=is_decode
        )

    # ------------------------------------------------------------------ plain delegation

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._inner.get_finished(finished_req_ids) if self._inner is not None else (None, None)

    @property
    def supports_divergent_local_hybrid_hits(self) -> bool:
        inner = self._inner
        return (
            inner.supports_divergent_local_hybrid_hits
            if inner
            else super().supports_divergent_local_hybrid_hits
        )

    @property
    def requires_kv_delivery(self) -> bool:
        return self._inner.requires_kv_delivery if self._inner is not None else super().requires_kv_delivery

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        inner_cls, inner_config = _wrapped_config(vllm_config)
        return inner_cls.get_required_kvcache_layout(inner_config) if inner_cls is not None else None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return False


# the wrapped connector's methods (and attribute) that EldrConnector does not define itself
_DELEGATED = frozenset(
    {
        "get_mem_pool_context",
        "set_host_xfer_buffer_ops",
        "finish_forward",
        "reset_capture_state",
        "get_transfer_results",
        "get_block_ids_with_load_errors",
        "shutdown",
        "get_kv_connector_kv_cache_events",
        "get_handshake_metadata",
        "bind_gpu_block_pool",
        "get_loaded_kv_cache_group_ids",
        "get_external_cache_hit_sources",
        "on_new_request",
        "register_finished_partial_tail",
        "take_events",
        "has_pending_block_frees",
        "has_pending_push_work",
        "get_finished_count",
        "set_xfer_handshake_metadata",
        "set_xfer_handshake_metadata_pp_aware",
        "reset_cache",
        "_cache_hit_source",
    }
)
