"""`TimedEldrConnector`: the eldr connector with clocks around its own code (benchmarks/plugin_overhead.py).

An engine started with this folder on its PYTHONPATH and

    --kv-transfer-config '{"kv_connector": "TimedEldrConnector", "kv_connector_module_path": "plugin_timing",
      "kv_role": "kv_both"}'

runs `EldrConnector` with each hook inside `time.perf_counter_ns` / `time.thread_time_ns` accumulators
(the worker-side hooks in the worker's connector, the scheduler-side ones in the scheduler's; the `eldr`
general plugin recognises the subclass and installs the router taps as usual). In eager mode the router
callbacks are timed too (`RouterTap.wrap`, once the connector has found the taps). The worker's time since
its last step rides to the scheduler on `TimedWorkerMeta`, and every answer's
`kv_transfer_params["eldr_timing"]` carries the engine's cumulative totals:

- `worker_ns`: worker-side hooks (arming the capture buffers, folding them per KV block, building
  the step's worker metadata, delegation);
- `callback_ns`: the router callbacks (eager mode only: in compiled mode the copy is inside the
  compiled graph and is not separable by a host clock);
- `scheduler_ns`: scheduler-side hooks (step bookkeeping, signature cache, ledger, payload encoding);
- `worker_cpu_ns`, `scheduler_cpu_ns`: the same hooks' thread CPU time (`time.thread_time_ns`):
  wall time minus the time the thread was descheduled, which on a loaded 2-core machine can be
  most of the wall time of a short hook;
- `steps`: engine steps that carried worker data.

A client sending one request at a time gets its request's plugin time as the difference between two
consecutive answers' totals. Every 50 steps each side logs its hooks' calls and mean wall / CPU µs
(`eldr timing, worker ...` and `eldr timing, scheduler ...`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, KVConnectorWorkerMetadata

from eldr.payload import PAYLOAD_KEY
from eldr.vllm.connector import EldrConnector, EldrWorkerMeta
from eldr.vllm.router_tap import Callback, find_moe_routers, taps_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

TIMING_KEY = "eldr_timing"
REPORT_EVERY_STEPS = 50
WORKER_HOOKS = (
    "register_kv_caches",
    "bind_connector_metadata",
    "clear_connector_metadata",
    "build_connector_worker_meta",
    "start_load_kv",
    "wait_for_layer_load",
    "save_kv_layer",
    "wait_for_save",
)
SCHEDULER_HOOKS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
)
logger = logging.getLogger("vllm.eldr")


@dataclass
class TimedWorkerMeta(EldrWorkerMeta):
    """`EldrWorkerMeta` plus the worker's (hooks wall, callbacks wall, hooks CPU) ns since its last step."""

    timing_ns: tuple[int, int, int] = (0, 0, 0)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        merged = super().aggregate(other)  # tensor-parallel ranks: their times add up
        assert isinstance(merged, EldrWorkerMeta) and isinstance(other, TimedWorkerMeta)
        (a, b, c), (x, y, z) = self.timing_ns, other.timing_ns
        return TimedWorkerMeta(merged.step, merged.delta, merged.top_k, merged.inner, (a + x, b + y, c + z))


class Clock:
    """One connector's accumulators: its own hooks' time, its router callbacks', what its workers sent."""

    def __init__(self) -> None:
        self.hooks_ns = 0  # worker: since the last step's metadata; scheduler: cumulative
        self.hooks_cpu_ns = 0
        self.callbacks_ns = 0  # worker, eager mode: since the last step's metadata
        self.by_hook: dict[str, list[int]] = {}  # name -> [calls, wall ns, CPU ns], cumulative
        self.received = {"worker_ns": 0, "callback_ns": 0, "worker_cpu_ns": 0, "steps": 0}

    def add(self, name: str, wall_ns: int, cpu_ns: int) -> None:
        self.hooks_ns += wall_ns
        self.hooks_cpu_ns += cpu_ns
        hook = self.by_hook.setdefault(name, [0, 0, 0])
        hook[0] += 1
        hook[1] += wall_ns
        hook[2] += cpu_ns

    def take(self) -> tuple[int, int, int]:
        """Worker: (hooks wall, callbacks wall, hooks CPU) ns since the last take."""
        taken = self.hooks_ns, self.callbacks_ns, self.hooks_cpu_ns
        self.hooks_ns = self.callbacks_ns = self.hooks_cpu_ns = 0
        return taken

    def receive(self, timing_ns: tuple[int, int, int]) -> None:
        """Scheduler: one step's worker times."""
        for key, value in zip(("worker_ns", "callback_ns", "worker_cpu_ns"), timing_ns, strict=True):
            self.received[key] += value
        self.received["steps"] += 1

    def totals(self) -> dict[str, int]:
        """Scheduler: the engine's cumulative totals (the `eldr_timing` of an answer)."""
        return self.received | {"scheduler_ns": self.hooks_ns, "scheduler_cpu_ns": self.hooks_cpu_ns}

    def report(self, side: str) -> str:
        """One line: per hook, calls and mean wall / CPU µs per call."""
        parts = [
            f"{name} {calls}x {wall / calls / 1000:.0f}/{cpu / calls / 1000:.0f}"
            for name, (calls, wall, cpu) in sorted(self.by_hook.items())
            if calls
        ]
        return f"eldr timing, {side} (calls, mean wall/CPU µs): " + ", ".join(parts)

    def timed_callback(self, fn: Callback) -> Callback:
        """A router callback that adds its own wall time to `callbacks_ns`."""

        def callback(topk_ids: torch.Tensor) -> None:
            start = time.perf_counter_ns()
            fn(topk_ids)
            self.callbacks_ns += time.perf_counter_ns() - start

        return callback


def _clocked(name: str) -> Callable[..., Any]:
    """`EldrConnector.<name>`, its wall and thread CPU time added to the connector's clock."""
    hook = getattr(EldrConnector, name)

    @functools.wraps(hook)
    def method(self: _ClockedEldrConnector, *args: Any, **kwargs: Any) -> Any:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return hook(self, *args, **kwargs)
        finally:
            cpu_ns = time.thread_time_ns() - start_cpu
            self.clock.add(name, time.perf_counter_ns() - start, cpu_ns)

    return method


class _ClockedEldrConnector(EldrConnector):
    """`EldrConnector` with every hook of `WORKER_HOOKS` and `SCHEDULER_HOOKS` timed into `clock`."""

    clock: Clock


for _name in WORKER_HOOKS + SCHEDULER_HOOKS:
    setattr(_ClockedEldrConnector, _name, _clocked(_name))


class TimedEldrConnector(_ClockedEldrConnector):
    """The timed hooks plus the transport of their totals: worker -> scheduler -> answers."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        from vllm.config.compilation import CompilationMode

        self.clock = Clock()
        super().__init__(vllm_config, role, kv_cache_config)
        self._side = "worker" if role == KVConnectorRole.WORKER else "scheduler"
        self._is_eager = vllm_config.compilation_config.mode == CompilationMode.NONE
        self._finished: list[dict[str, Any]] = []  # params handed out since the last step's data

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)  # finds the routers' taps
        if self._is_eager:
            routers = find_moe_routers(self._vllm_config.compilation_config.static_forward_context)
            for tap in taps_for(routers):
                if tap is not None:
                    tap.wrap(self.clock.timed_callback)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        meta = super().build_connector_worker_meta()  # its own time is already in the clock
        if not isinstance(meta, EldrWorkerMeta):
            return meta
        if meta.step % REPORT_EVERY_STEPS == 0:
            logger.info("%s", self.clock.report(self._side))
        return TimedWorkerMeta(meta.step, meta.delta, meta.top_k, meta.inner, self.clock.take())

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        super().update_connector_output(connector_output)  # fills the payloads of `_finished`
        if not isinstance(meta, EldrWorkerMeta):
            return
        if isinstance(meta, TimedWorkerMeta):
            self.clock.receive(meta.timing_ns)
        if meta.step % REPORT_EVERY_STEPS == 0:
            logger.info("%s", self.clock.report(self._side))
        totals = self.clock.totals()
        for params in self._finished:  # as the ledger does: filled at the next step's data or never
            if PAYLOAD_KEY in params:
                params[TIMING_KEY] = dict(totals)
        self._finished.clear()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        is_delayed, params = super().request_finished(request, block_ids)
        if params is not None:
            self._finished.append(params)
        return is_delayed, params
