"""Benchmark-only clocks around the plugin's own code (`ELDR_PLUGIN_TIMING=1`; nothing when unset).

With the variable set when the engine starts, `instrument` wraps the connector's hooks in
`time.perf_counter_ns` accumulators (the worker-side hooks in the worker process, the scheduler-side
ones in the engine core), the eager-mode router callback is timed too, and every answer's
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
consecutive answers' totals. Without the variable nothing is wrapped: zero cost.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

ENV = "ELDR_PLUGIN_TIMING"
TIMING_KEY = "eldr_timing"
IS_ENABLED = os.environ.get(ENV) == "1"


class Clock:
    """Per-process accumulators (a worker's pending time is shipped with each step's metadata)."""

    def __init__(self) -> None:
        self.worker_pending_ns = 0
        self.worker_pending_cpu_ns = 0
        self.callback_pending_ns = 0
        self.by_hook: dict[str, list[int]] = {}  # name -> [calls, wall ns, CPU ns], logged by the worker
        self.totals = {
            "worker_ns": 0,
            "callback_ns": 0,
            "scheduler_ns": 0,
            "worker_cpu_ns": 0,
            "scheduler_cpu_ns": 0,
            "steps": 0,
        }

    def take_worker(self) -> tuple[int, int, int]:
        taken = self.worker_pending_ns, self.callback_pending_ns, self.worker_pending_cpu_ns
        self.worker_pending_ns = self.callback_pending_ns = self.worker_pending_cpu_ns = 0
        return taken

    def receive(self, worker_ns: int, callback_ns: int, worker_cpu_ns: int) -> None:
        self.totals["worker_ns"] += worker_ns
        self.totals["callback_ns"] += callback_ns
        self.totals["worker_cpu_ns"] += worker_cpu_ns
        self.totals["steps"] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.totals)


CLOCK = Clock()


def _timed_worker(fn: Callable[..., Any]) -> Callable[..., Any]:
    hook = CLOCK.by_hook.setdefault(fn.__name__, [0, 0, 0])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu_ns = time.thread_time_ns() - start_cpu
            wall_ns = time.perf_counter_ns() - start
            CLOCK.worker_pending_cpu_ns += cpu_ns
            CLOCK.worker_pending_ns += wall_ns
            hook[0] += 1
            hook[1] += wall_ns
            hook[2] += cpu_ns

    return wrapper


def _timed_scheduler(fn: Callable[..., Any]) -> Callable[..., Any]:
    hook = CLOCK.by_hook.setdefault(fn.__name__, [0, 0, 0])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu_ns = time.thread_time_ns() - start_cpu
            wall_ns = time.perf_counter_ns() - start
            CLOCK.totals["scheduler_cpu_ns"] += cpu_ns
            CLOCK.totals["scheduler_ns"] += wall_ns
            hook[0] += 1
            hook[1] += wall_ns
            hook[2] += cpu_ns

    return wrapper


def hook_report() -> str:
    """One line: per hook, calls and mean wall / CPU µs per call (this process's hooks)."""
    parts = [
        f"{name} {calls}x {wall / calls / 1000:.0f}/{cpu / calls / 1000:.0f}"
        for name, (calls, wall, cpu) in sorted(CLOCK.by_hook.items())
        if calls
    ]
    return "eldr timing (calls, mean wall/CPU µs): " + ", ".join(parts)


def instrument(cls: type, worker_hooks: tuple[str, ...], scheduler_hooks: tuple[str, ...]) -> None:
    """Wrap the named methods of `cls` in the worker / scheduler accumulators."""
    for name in worker_hooks:
        setattr(cls, name, _timed_worker(cls.__dict__[name]))
    for name in scheduler_hooks:
        setattr(cls, name, _timed_scheduler(cls.__dict__[name]))


def timed_callback(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """An eager-mode router callback that adds its own time to the worker's clock."""

    def callback(topk_ids: Any) -> None:
        start = time.perf_counter_ns()
        fn(topk_ids)
        CLOCK.callback_pending_ns += time.perf_counter_ns() - start

    return callback
