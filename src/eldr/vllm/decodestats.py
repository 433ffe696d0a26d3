"""Opt-in engine metric of decode locality: distinct experts per MoE layer per decode step, batch size.

Enabled by `"eldr_decode_stats": true` in `kv_connector_extra_config` (off by default: then nothing of
this module runs). For every engine step that has decode tokens it records

- the step's decode batch size: the number of requests that schedule exactly one token in the step
  (a decode token; with speculative decoding a request schedules 1 + its draft tokens, which this
  metric does not model: spec decode is out of scope);
- per MoE layer, how many distinct experts the step's decode tokens activated together;
- the step's seconds: from the scheduler's handing it out (`build_connector_meta`) to its output's
  arrival (`update_connector_output`), i.e. the model's forward, sampling and the return trip. With
  async scheduling a step is scheduled while the previous one runs, so this includes that wait.

How (scheduler side, nothing extra on the worker): the worker already folds every step's router ids
into per-KV-block rows (`fold.py`, `EldrWorkerMeta.delta`). A decode token is the only token its
request writes in the step, and a KV block being written belongs to one request (blocks shared through
the prefix cache are full and never written), so the row of a decode token's KV block in that step's
delta *is* that token's choices. `build_connector_meta` notes each decode token's KV block (the
request's block at position `num_computed_tokens`); `update_connector_output` takes the union of those
rows per layer (`active_experts`). A row that does not hold exactly one token's choices, or a step the
fold refused (a router row still -1: `delta is None`), is counted as skipped, never guessed.

Export: vLLM's KV-connector stats path. `EldrKVConnectorStats` carries the per-step values losslessly
(a list of batch sizes, a list of per-layer distinct counts per step, a skipped count) together with the
wrapped connector's own stats object; `EldrPromMetrics` turns them into `eldr:` histograms and counters
on the API server's `/metrics`, next to the wrapped connector's own metrics (delegated, as
`MultiConnector` does).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from eldr.vllm.blockcache import BlockDelta

if TYPE_CHECKING:
    from vllm.config import VllmConfig

DECODE_STATS_KEY = "eldr_decode_stats"  # kv_connector_extra_config key
DECODE_DATA_KEY = "eldr_decode"  # in the stats dict vLLM ships to the frontend
INNER_DATA_KEY = "inner"  # the wrapped connector's stats dict, with its class

ACTIVE_EXPERTS_METRIC = "eldr:decode_step_active_experts"
BATCH_SIZE_METRIC = "eldr:decode_step_batch_size"
STEP_SECONDS_METRIC = "eldr:decode_step_seconds"
STEPS_METRIC = "eldr:decode_steps"  # exposed as eldr:decode_steps_total
SKIPPED_METRIC = "eldr:decode_steps_skipped"  # exposed as eldr:decode_steps_skipped_total


# ---------------------------------------------------------------------------------------- the numbers


def decode_rows(
    block_ids: npt.NDArray[np.int64], decode_blocks: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64] | None:
    """The rows of `block_ids` (a step's delta) that hold `decode_blocks`, in their order.

    `None` when a decode block is not in the delta (the step cannot be attributed).
    """
    num_rows = int(block_ids.size)
    if num_rows == 0:
        return None
    order = np.argsort(block_ids)
    pos = np.searchsorted(block_ids, decode_blocks, sorter=order)
    if int(pos.max()) >= num_rows:
        return None
    rows = order[pos]
    return rows if np.array_equal(block_ids[rows], decode_blocks) else None


def active_experts(
    counts: npt.NDArray[np.integer], rows: npt.NDArray[np.int64] | None, top_k: int
) -> npt.NDArray[np.int64] | None:
    """Distinct experts per layer `[L]` over `counts[rows]` (`[n, L, E]`; all rows when `rows` is None).

    Each of those rows must hold exactly one token's choices, else `None` (they are not decode tokens
    alone). Checked on layer 0: every token adds `top_k` to every layer of its block's row and every
    row of a delta holds at least one token, so layer 0 totals `rows x top_k` iff each holds one.
    """
    picked = counts if rows is None else counts[rows]
    num_rows = int(picked.shape[0])
    if num_rows == 0 or int(picked[:, 0].sum(dtype=np.int64)) != num_rows * top_k:
        return None
    return np.count_nonzero(picked.max(axis=0), axis=1).astype(np.int64, copy=False)


class DecodeStatsRecorder:
    """Scheduler side: decode blocks noted per step, applied when the step's delta arrives."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # step -> (its decode tokens' blocks, when it was handed out)
        self._due: dict[int, tuple[npt.NDArray[np.int64] | None, float]] = {}
        self.batch_sizes: list[int] = []
        self.active: list[list[int]] = []  # per recorded step: [L] distinct experts
        self.seconds: list[float] = []  # per recorded step: scheduled -> output arrived
        self.skipped = 0

    def note(self, step: int, decode_blocks: Sequence[int] | None) -> None:
        """The step's decode tokens' KV blocks (`None`: the step has decode tokens it cannot place)."""
        blocks = None if decode_blocks is None else np.asarray(decode_blocks, dtype=np.int64)
        self._due[step] = (blocks, self._clock())

    def apply(self, step: int, delta: BlockDelta | None, top_k: int) -> None:
        """The step's delta (`None`: the fold refused the step) arrived from the worker."""
        if not self._due:
            return
        if next(iter(self._due)) < step:  # steps whose worker data never came (in step order)
            for old in [s for s in self._due if s < step]:
                del self._due[old]
                self.skipped += 1
        if step not in self._due:
            return
        blocks, started = self._due.pop(step)
        found = None
        if blocks is not None and delta is not None:
            rows = decode_rows(delta.block_ids, blocks)
            if rows is not None:  # a decode-only step takes every row: no gather
                is_all = rows.size == delta.block_ids.size
                found = active_experts(delta.counts, None if is_all else rows, top_k)
        if found is None or blocks is None:
            self.skipped += 1
            return
        self.batch_sizes.append(int(blocks.size))
        self.active.append(found.tolist())
        self.seconds.append(max(self._clock() - started, 0.0))

    def take(self) -> dict[str, Any] | None:
        """The steps recorded since the last call, as the stats payload (`None`: nothing)."""
        if not self.batch_sizes and not self.skipped:
            return None
        data = {
            "batch_sizes": self.batch_sizes,
            "active_experts": self.active,
            "step_seconds": self.seconds,
            "skipped": self.skipped,
        }
        self.batch_sizes, self.active, self.seconds, self.skipped = [], [], [], 0
        return data


# ---------------------------------------------------------------------------------------- stats object


def class_ref(cls: type) -> str:
    """`module:Class`, what `load_class` imports again in another process."""
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class EldrKVConnectorStats(KVConnectorStats):
    """The decode-locality observations (`data`, empty when off) and the wrapped connector's stats.

    `data`: `{"batch_sizes": [b per step], "active_experts": [[distinct per layer] per step],
    "step_seconds": [s per step], "skipped": n}`. `to_dict()` ships `{"eldr_decode": data, "inner":
    {"connector": "module:Class", "data": inner.to_dict()}}` (keys only when present); `from_dict`
    rebuilds it in the frontend, the wrapped connector's part through that connector's own
    `build_kv_connector_stats` (as `MultiConnector` does).
    """

    inner: KVConnectorStats | None = field(default=None)
    inner_connector: str | None = field(default=None)  # `class_ref` of the wrapped connector

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.data:
            out[DECODE_DATA_KEY] = self.data
        if self.inner is not None and self.inner_connector is not None:
            out[INNER_DATA_KEY] = {"connector": self.inner_connector, "data": self.inner.to_dict()}
        return out

    @classmethod
    def from_dict(cls, payload: dict[str, Any] | None) -> EldrKVConnectorStats:
        if not payload:
            return cls()
        decode = payload.get(DECODE_DATA_KEY)
        data: dict[str, Any] = {}
        if decode:
            data = {
                "batch_sizes": list(decode["batch_sizes"]),
                "active_experts": [list(step) for step in decode["active_experts"]],
                "step_seconds": [float(x) for x in decode.get("step_seconds", ())],
                "skipped": int(decode["skipped"]),
            }
        inner: KVConnectorStats | None = None
        ref: str | None = None
        inner_payload = payload.get(INNER_DATA_KEY)
        if inner_payload:
            ref, value = inner_payload["connector"], inner_payload["data"]
            if isinstance(value, KVConnectorStats):  # same process, not serialised
                inner = value
            else:
                inner = load_class(ref).build_kv_connector_stats(data=value)
        return cls(data=data, inner=inner, inner_connector=ref if inner is not None else None)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not isinstance(other, EldrKVConnectorStats):
            raise TypeError(f"cannot aggregate EldrKVConnectorStats with {type(other).__name__}")
        data = self.data
        if other.data:
            data = (
                {
                    "batch_sizes": self.data["batch_sizes"] + other.data["batch_sizes"],
                    "active_experts": self.data["active_experts"] + other.data["active_experts"],
                    "step_seconds": self.data.get("step_seconds", []) + other.data.get("step_seconds", []),
                    "skipped": self.data["skipped"] + other.data["skipped"],
                }
                if self.data
                else other.data
            )
        inner = self.inner
        if inner is None:
            inner = other.inner
        elif other.inner is not None:
            inner = inner.aggregate(other.inner)
        return EldrKVConnectorStats(
            data=data, inner=inner, inner_connector=self.inner_connector or other.inner_connector
        )

    def reset(self) -> None:
        self.data = {}
        if self.inner is not None:
            self.inner.reset()  # type: ignore[no-untyped-call]

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.inner.reduce()) if self.inner is not None else {}
        if self.data:
            sizes, active = self.data["batch_sizes"], self.data["active_experts"]
            num_layer_steps = sum(len(step) for step in active)
            out["eldr_decode_steps"] = len(sizes)
            out["eldr_decode_steps_skipped"] = int(self.data["skipped"])
            out["eldr_mean_decode_batch_size"] = round(sum(sizes) / len(sizes), 3) if sizes else 0.0
            out["eldr_mean_active_experts"] = (
                round(sum(sum(step) for step in active) / num_layer_steps, 3) if num_layer_steps else 0.0
            )
            seconds = self.data.get("step_seconds", [])
            out["eldr_mean_decode_step_ms"] = round(1e3 * sum(seconds) / len(seconds), 3) if seconds else 0.0
        return out

    def is_empty(self) -> bool:
        has_decode = bool(self.data) and bool(self.data["batch_sizes"] or self.data["skipped"])
        return not has_decode and (self.inner is None or self.inner.is_empty())


# ---------------------------------------------------------------------------------------- Prometheus


def expert_buckets(num_experts: int) -> list[float]:
    """Histogram bounds over 1..E: 1, 2, 4, 8 and sixteen even steps up to E (every integer when E <= 16)."""
    if num_experts <= 0:
        return [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    if num_experts <= 16:
        return [float(b) for b in range(1, num_experts + 1)]
    steps = {round(num_experts * i / 16) for i in range(1, 17)}
    return [float(b) for b in sorted({1, 2, 4, 8} | steps) if 1 <= b <= num_experts]


def batch_buckets(max_batch: int) -> list[float]:
    """Histogram bounds over 1..max_num_seqs: 1, 2, 3, 4, 6, 8, 12, 16, ... (x1.5 / x1.33 steps)."""
    bounds: list[float] = []
    power = 1
    while power <= max(max_batch, 1):
        bounds.append(float(power))
        if power >= 2 and power * 3 // 2 <= max_batch:
            bounds.append(float(power * 3 // 2))
        power *= 2
    if max_batch > 0 and bounds[-1] < max_batch:
        bounds.append(float(max_batch))
    return sorted(set(bounds))


# decode step seconds: 1 ms .. 5 s, about x1.5-2 apart
STEP_SECONDS_BUCKETS = [
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
]

_REGISTERED: dict[str, Any] = {}  # metric name -> the collector this process created last


def _fresh(metric_cls: Any, name: str, **kwargs: Any) -> Any:
    """`metric_cls(name, ...)`, after unregistering a previous one of that name from the default registry.

    vLLM unregisters its own `vllm:` collectors when a second `PrometheusStatLogger` is built in one
    process (tests, an engine restarted in process); `eldr:` names would otherwise be duplicates.
    """
    previous = _REGISTERED.pop(name, None)
    if previous is not None:
        from prometheus_client import REGISTRY

        with contextlib.suppress(KeyError):  # registered elsewhere (a test's registry, Ray)
            REGISTRY.unregister(previous)
    metric = metric_cls(name=name, **kwargs)
    _REGISTERED[name] = metric
    return metric


class EldrPromMetrics(KVConnectorPromMetrics):
    """The wrapped connector's Prometheus metrics (delegated) and, when enabled, the decode metrics."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
        inner: KVConnectorPromMetrics | None,
        is_decode: bool,
    ) -> None:
        from vllm.v1.metrics.utils import create_metric_per_engine

        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._inner = inner
        self._decode: tuple[dict[int, Any], ...] | None = None
        if not is_decode:
            return
        num_experts, max_batch = _model_sizes(vllm_config)
        per_engine = self.per_engine_labelvalues
        active = _fresh(
            self._histogram_cls,
            ACTIVE_EXPERTS_METRIC,
            documentation="Distinct experts activated per MoE layer by a decode step's decode tokens "
            "(one observation per decode step and MoE layer; eldr plugin).",
            buckets=expert_buckets(num_experts),
            labelnames=labelnames,
        )
        batch = _fresh(
            self._histogram_cls,
            BATCH_SIZE_METRIC,
            documentation="Decode tokens (requests scheduling exactly one token) per decode step "
            "(one observation per decode step; eldr plugin).",
            buckets=batch_buckets(max_batch),
            labelnames=labelnames,
        )
        seconds = _fresh(
            self._histogram_cls,
            STEP_SECONDS_METRIC,
            documentation="Seconds from a decode step's scheduling to its output's arrival at the "
            "scheduler (one observation per decode step; eldr plugin).",
            buckets=STEP_SECONDS_BUCKETS,
            labelnames=labelnames,
        )
        steps = _fresh(
            self._counter_cls,
            STEPS_METRIC,
            documentation="Decode steps recorded by the eldr decode-locality metric.",
            labelnames=labelnames,
        )
        skipped = _fresh(
            self._counter_cls,
            SKIPPED_METRIC,
            documentation="Decode steps the eldr decode-locality metric skipped: router rows missing "
            "(the step's expert ids were not all recorded) or not attributable.",
            labelnames=labelnames,
        )
        self._decode = (
            create_metric_per_engine(active, per_engine),
            create_metric_per_engine(batch, per_engine),
            create_metric_per_engine(seconds, per_engine),
            create_metric_per_engine(steps, per_engine),
            create_metric_per_engine(skipped, per_engine),
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        inner = transfer_stats_data.get(INNER_DATA_KEY)
        if inner and self._inner is not None:
            self._inner.observe(inner["data"], engine_idx)
        decode = transfer_stats_data.get(DECODE_DATA_KEY)
        if not decode or self._decode is None:
            return
        active, batch, seconds, steps, skipped = (metric[engine_idx] for metric in self._decode)
        for size, per_layer in zip(decode["batch_sizes"], decode["active_experts"], strict=True):
            batch.observe(size)
            for value in per_layer:
                active.observe(value)
        for value in decode.get("step_seconds", ()):
            seconds.observe(value)
        if decode["batch_sizes"]:
            steps.inc(len(decode["batch_sizes"]))
        if decode["skipped"]:
            skipped.inc(decode["skipped"])


def _model_sizes(vllm_config: VllmConfig) -> tuple[int, int]:
    """(experts per MoE layer or 0 when unknown, max_num_seqs) for the histogram bounds."""
    num_experts = 0
    try:
        num_experts = int(vllm_config.model_config.get_num_experts())
    except Exception:  # a model config without MoE fields: generic bounds
        num_experts = 0
    return num_experts, int(vllm_config.scheduler_config.max_num_seqs)
