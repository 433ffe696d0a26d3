"""The decode-locality metric (`eldr_decode_stats`) against a per-token reference, and its vLLM stats path.

A simulated step: requests with their own KV block tables, some decoding (one token), some in a
prefill chunk, laid out in the worker's token order (not the scheduler's); random router choices per
token and layer. The real fold (`fold.fold_ids`, `fold.fold_on_device`) makes the step's block rows,
the scheduler side (`DecodeStatsRecorder`, and through `EldrConnector`) picks the decode tokens' rows;
the reference loops over the decode tokens one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from eldr.vllm.blockcache import BlockDelta  # noqa: E402
from eldr.vllm.decodestats import (  # noqa: E402
    ACTIVE_EXPERTS_METRIC,
    BATCH_SIZE_METRIC,
    DECODE_DATA_KEY,
    STEP_SECONDS_METRIC,
    DecodeStatsRecorder,
    EldrKVConnectorStats,
    EldrPromMetrics,
    batch_buckets,
    expert_buckets,
)
from eldr.vllm.fold import fold_ids, fold_on_device  # noqa: E402

BLOCK = 16


@dataclass
class Req:
    req_id: str
    table: list[int]  # KV block ids by position // BLOCK
    start: int  # num_computed_tokens before the step
    num_new: int  # tokens scheduled this step

    @property
    def is_decode(self) -> bool:
        return self.num_new == 1


@dataclass
class Step:
    requests: list[Req]  # scheduler order
    worker_order: list[Req]
    slots: np.ndarray  # [T] in worker order
    ids: np.ndarray  # [L, T, k]
    token_req: list[Req]  # [T] which request each token row belongs to


def _make_step(
    rng: np.random.Generator, num_decode: int, num_prefill: int, layers: int, experts: int, k: int
) -> Step:
    free = list(rng.permutation(4096))
    requests: list[Req] = []
    for i in range(num_decode + num_prefill):
        if i < num_decode:
            start, num_new = int(rng.integers(1, 6 * BLOCK)), 1
        else:
            start, num_new = int(rng.integers(0, 3 * BLOCK)), int(rng.integers(2, 3 * BLOCK))
        table = [int(free.pop()) for _ in range((start + num_new - 1) // BLOCK + 1)]
        requests.append(Req(f"r{i}", table, start, num_new))
    order = [requests[i] for i in rng.permutation(len(requests))]
    slots: list[int] = []
    token_req: list[Req] = []
    for req in order:
        for pos in range(req.start, req.start + req.num_new):
            slots.append(req.table[pos // BLOCK] * BLOCK + pos % BLOCK)
            token_req.append(req)
    num_tokens = len(slots)
    ids = np.argsort(rng.random((layers, num_tokens, experts)), axis=-1)[..., :k].astype(np.int32)
    return Step(requests, order, np.array(slots, dtype=np.int64), ids, token_req)


def _decode_blocks(step: Step) -> list[int]:
    """What the scheduler notes: each decode request's block at its position, in scheduler order."""
    return [req.table[req.start // BLOCK] for req in step.requests if req.is_decode]


def _reference(step: Step) -> tuple[int, list[int]]:
    """(decode tokens, distinct experts per layer over them), one token at a time."""
    layers = step.ids.shape[0]
    seen: list[set[int]] = [set() for _ in range(layers)]
    num_decode = 0
    for t, req in enumerate(step.token_req):
        if not req.is_decode:
            continue
        num_decode += 1
        for layer in range(layers):
            seen[layer].update(int(e) for e in step.ids[layer, t])
    return num_decode, [len(s) for s in seen]


def _fold(step: Step, experts: int, *, on_device: bool = False) -> BlockDelta | None:
    if on_device:
        buffers = [torch.from_numpy(step.ids[layer].copy()) for layer in range(step.ids.shape[0])]
        return fold_on_device(buffers, step.slots, BLOCK, experts)
    return fold_ids(list(step.ids), step.slots, BLOCK, experts)


def _record(steps: list[Step], experts: int, top_k: int, *, on_device: bool = False) -> dict[str, Any] | None:
    recorder = DecodeStatsRecorder()
    for number, step in enumerate(steps):
        blocks = _decode_blocks(step)
        if blocks:
            recorder.note(number, blocks)
        recorder.apply(number, _fold(step, experts, on_device=on_device), top_k)
    return recorder.take()


@pytest.mark.parametrize(("layers", "experts", "top_k"), [(1, 8, 2), (4, 32, 4), (12, 64, 6), (48, 128, 8)])
@pytest.mark.parametrize("on_device", [False, True])
def test_matches_a_per_token_reference_on_mixed_steps(
    layers: int, experts: int, top_k: int, on_device: bool
) -> None:
    rng = np.random.default_rng(layers * 1000 + experts + top_k)
    shapes = [(1, 0), (1, 3), (8, 0), (8, 2), (32, 1), (128, 0), (3, 5), (0, 4), (60, 2)]
    steps = [_make_step(rng, d, p, layers, experts, top_k) for d, p in shapes]
    data = _record(steps, experts, top_k, on_device=on_device)
    expected = [_reference(step) for step in steps if any(r.is_decode for r in step.requests)]
    assert data is not None
    assert data["skipped"] == 0
    assert data["batch_sizes"] == [size for size, _ in expected]
    assert data["active_experts"] == [active for _, active in expected]
    for active in data["active_experts"]:
        assert all(top_k <= a <= experts for a in active)


def test_prefill_tokens_do_not_count_towards_active_experts() -> None:
    """Decode tokens choose experts 0..k-1, prefill tokens k..2k-1: an all-token count would say 2k."""
    rng = np.random.default_rng(7)
    layers, experts, top_k = 3, 16, 4
    step = _make_step(rng, 4, 2, layers, experts, top_k)
    for t, req in enumerate(step.token_req):
        step.ids[:, t] = np.arange(top_k) if req.is_decode else np.arange(top_k, 2 * top_k)
    data = _record([step], experts, top_k)
    assert data is not None
    assert data["batch_sizes"] == [4]
    assert data["active_experts"] == [[top_k] * layers]
    all_tokens = [len(np.unique(step.ids[layer])) for layer in range(layers)]
    assert all_tokens == [2 * top_k] * layers  # what counting every token of the step would give


def test_steps_without_decode_tokens_record_nothing() -> None:
    rng = np.random.default_rng(3)
    steps = [_make_step(rng, 0, 3, 2, 8, 2), _make_step(rng, 0, 1, 2, 8, 2)]
    assert _record(steps, 8, 2) is None


def test_a_step_with_missing_router_rows_is_skipped_and_counted() -> None:
    rng = np.random.default_rng(11)
    layers, experts, top_k = 4, 32, 4
    steps = [_make_step(rng, 6, 1, layers, experts, top_k) for _ in range(3)]
    steps[1].ids[2, 0] = -1  # one router did not record one token (any token: the fold refuses the step)
    data = _record(steps, experts, top_k)
    assert data is not None
    assert data["skipped"] == 1
    assert data["batch_sizes"] == [_reference(steps[0])[0], _reference(steps[2])[0]]
    assert data["active_experts"] == [_reference(steps[0])[1], _reference(steps[2])[1]]


def test_rows_that_are_not_one_token_each_are_skipped_not_guessed() -> None:
    rng = np.random.default_rng(5)
    step = _make_step(rng, 2, 1, 2, 8, 2)
    prefill = next(r for r in step.requests if not r.is_decode)
    recorder = DecodeStatsRecorder()
    # the scheduler (wrongly) names a prefill block as a decode token's: its row holds several tokens
    recorder.note(0, [*_decode_blocks(step), prefill.table[prefill.start // BLOCK]])
    recorder.apply(0, _fold(step, 8), 2)
    # a block the step did not write at all
    recorder.note(1, [10_000])
    recorder.apply(1, _fold(step, 8), 2)
    # worker data that never came for step 2: counted when step 3's arrives
    recorder.note(2, _decode_blocks(step))
    recorder.note(3, _decode_blocks(step))
    recorder.apply(3, _fold(step, 8), 2)
    data = recorder.take()
    assert data is not None and len(data.pop("step_seconds")) == 1
    assert data == {"batch_sizes": [2], "active_experts": [_reference(step)[1]], "skipped": 3}
    assert recorder.take() is None  # taken: the next call starts empty


def test_step_seconds_run_from_a_steps_scheduling_to_its_output() -> None:
    """Seconds per recorded step from the recorder's clock: note -> apply, skipped steps leave none."""
    rng = np.random.default_rng(9)
    step = _make_step(rng, 3, 0, 2, 8, 2)
    now = [100.0]
    recorder = DecodeStatsRecorder(clock=lambda: now[0])
    recorder.note(0, _decode_blocks(step))
    recorder.note(1, [10_000])  # cannot be attributed: skipped, no seconds
    now[0] = 100.25
    recorder.apply(0, _fold(step, 8), 2)
    now[0] = 100.5
    recorder.apply(1, _fold(step, 8), 2)
    recorder.note(2, _decode_blocks(step))
    now[0] = 101.0
    recorder.apply(2, _fold(step, 8), 2)
    data = recorder.take()
    assert data is not None
    assert data["step_seconds"] == [0.25, 0.5] and data["skipped"] == 1
    assert len(data["batch_sizes"]) == len(data["step_seconds"])


# ------------------------------------------------------------------------------ the stats object


def _stats(
    batch: list[int], active: list[list[int]], skipped: int = 0, seconds: list[float] | None = None
) -> EldrKVConnectorStats:
    data = {"batch_sizes": batch, "active_experts": active, "skipped": skipped}
    data["step_seconds"] = seconds if seconds is not None else [0.01 * (i + 1) for i in range(len(batch))]
    return EldrKVConnectorStats(data=data)


def _through_msgpack(payload: dict[str, Any]) -> dict[str, Any]:
    """What the frontend receives: vLLM's own engine-core -> frontend serialisation of SchedulerStats."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    outputs = EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=payload))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(outputs))
    result: dict[str, Any] = decoded.scheduler_stats.kv_connector_stats
    return result


def _nixl() -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

    return NixlConnector


def test_stats_round_trip_aggregate_reduce_and_emptiness() -> None:
    from eldr.vllm.connector import EldrConnector
    from eldr.vllm.decodestats import class_ref

    nixl = _nixl()
    inner = nixl.build_kv_connector_stats()
    inner.data["transfer_duration"].append(0.5)
    inner.data["post_duration"].append(0.1)
    inner.data["bytes_transferred"].append(2**20)
    inner.data["num_descriptors"].append(3)
    first = _stats([2, 3], [[4, 5], [6, 7]])
    first.inner, first.inner_connector = inner, class_ref(nixl)
    second = _stats([1], [[2, 2]], skipped=1)

    rebuilt = EldrConnector.build_kv_connector_stats(_through_msgpack(first.to_dict()))
    assert isinstance(rebuilt, EldrKVConnectorStats)
    assert rebuilt.data == first.data
    assert type(rebuilt.inner) is type(inner) and rebuilt.inner.data == inner.data

    total = rebuilt.aggregate(EldrConnector.build_kv_connector_stats(_through_msgpack(second.to_dict())))
    assert isinstance(total, EldrKVConnectorStats)
    assert total.data == {
        "batch_sizes": [2, 3, 1],
        "active_experts": [[4, 5], [6, 7], [2, 2]],
        "step_seconds": [0.01, 0.02, 0.01],
        "skipped": 1,
    }
    reduced = total.reduce()
    assert reduced["eldr_decode_steps"] == 3
    assert reduced["eldr_decode_steps_skipped"] == 1
    assert reduced["eldr_mean_decode_batch_size"] == 2.0
    assert reduced["eldr_mean_active_experts"] == round((4 + 5 + 6 + 7 + 2 + 2) / 6, 3)
    assert reduced["eldr_mean_decode_step_ms"] == round(1e3 * 0.04 / 3, 3)
    assert reduced["Num successful transfers"] == 1  # the wrapped connector's own summary, kept

    assert not total.is_empty()
    assert EldrKVConnectorStats().is_empty()
    assert EldrConnector.build_kv_connector_stats(None).is_empty()
    assert EldrKVConnectorStats(inner=nixl.build_kv_connector_stats()).is_empty()
    assert not _stats([], [], skipped=1).is_empty()  # skipped steps are news too
    total.reset()
    assert total.is_empty() and DECODE_DATA_KEY not in total.to_dict()
    assert total.to_dict()["inner"]["connector"] == class_ref(nixl)


# ------------------------------------------------------------------------------ Prometheus


def _metric_types(registry: Any) -> dict[type, type]:
    from prometheus_client import Counter, Gauge, Histogram

    def bound(base: type) -> type:
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, *args, registry=registry, **kwargs)  # type: ignore[misc]

        return type(f"Test{base.__name__}", (base,), {"__init__": init})

    return {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}


def _vllm_config(tmp_path: Path, wrapped: str | None, *, decode_stats: bool) -> Any:
    from vllm.config import KVTransferConfig, VllmConfig

    extra: dict[str, Any] = {"shared_storage_path": str(tmp_path)}
    if wrapped is not None:
        extra["eldr_wrapped"] = wrapped
    if decode_stats:
        extra["eldr_decode_stats"] = True
    return VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="EldrConnector",
            kv_connector_module_path="eldr.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    )


def test_prom_metrics_observe_exact_sums_counts_and_the_wrapped_connectors_metrics(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from eldr.vllm.connector import EldrConnector
    from eldr.vllm.decodestats import class_ref

    registry = CollectorRegistry()
    labels = {"model_name": "tiny", "engine": "0"}
    prom = EldrConnector.build_prom_metrics(
        _vllm_config(tmp_path, "NixlConnector", decode_stats=True),
        _metric_types(registry),
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    assert isinstance(prom, EldrPromMetrics)
    inner = _nixl().build_kv_connector_stats()
    inner.data["transfer_duration"].append(0.02)
    inner.data["post_duration"].append(0.001)
    inner.data["bytes_transferred"].append(4096)
    inner.data["num_descriptors"].append(2)
    stats = _stats([1, 8, 3], [[4, 4], [20, 17], [9, 12]], skipped=2, seconds=[0.004, 0.05, 0.012])
    stats.inner, stats.inner_connector = inner, class_ref(_nixl())
    prom.observe(_through_msgpack(stats.to_dict()), 0)
    prom.observe(_stats([2], [[7, 8]], seconds=[0.3]).to_dict(), 0)

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value(f"{BATCH_SIZE_METRIC}_count") == 4
    assert value(f"{BATCH_SIZE_METRIC}_sum") == 1 + 8 + 3 + 2
    assert value(f"{ACTIVE_EXPERTS_METRIC}_count") == 8  # one per (step, layer)
    assert value(f"{ACTIVE_EXPERTS_METRIC}_sum") == 4 + 4 + 20 + 17 + 9 + 12 + 7 + 8
    assert (
        registry.get_sample_value(f"{ACTIVE_EXPERTS_METRIC}_bucket", {**labels, "le": "8.0"}) == 4
    )  # 4, 4, 7, 8
    assert value(f"{STEP_SECONDS_METRIC}_count") == 4
    assert value(f"{STEP_SECONDS_METRIC}_sum") == pytest.approx(0.004 + 0.05 + 0.012 + 0.3)
    assert registry.get_sample_value(f"{STEP_SECONDS_METRIC}_bucket", {**labels, "le": "0.015"}) == 2
    assert value("eldr:decode_steps_total") == 4
    assert value("eldr:decode_steps_skipped_total") == 2
    assert value("vllm:nixl_xfer_time_seconds_count") == 1  # the wrapped connector's own metric


def test_without_the_key_no_eldr_metric_exists(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from eldr.vllm.connector import EldrConnector

    args = (["model_name", "engine"], {0: ["tiny", "0"]})
    config = _vllm_config(tmp_path, "ExampleConnector", decode_stats=False)
    assert EldrConnector.build_prom_metrics(config, _metric_types(CollectorRegistry()), *args) is None
    registry = CollectorRegistry()
    prom = EldrConnector.build_prom_metrics(
        _vllm_config(tmp_path, "NixlConnector", decode_stats=False), _metric_types(registry), *args
    )
    assert prom is not None  # the wrapped connector's metrics only
    names = {metric.name for metric in registry.collect()}
    assert names and not any(name.startswith("eldr:") for name in names)


def test_buckets_fit_the_model() -> None:
    assert expert_buckets(128)[:5] == [1, 2, 4, 8, 16] and expert_buckets(128)[-1] == 128
    assert expert_buckets(32) == [1, 2, 4, *range(6, 33, 2)]
    assert expert_buckets(8) == list(range(1, 9))
    assert batch_buckets(256) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert batch_buckets(100)[-1] == 100


# ------------------------------------------------------------------------------ through the connector


class _Manager:
    """The two KV cache manager calls the connector makes, over fixed block tables."""

    def __init__(self, tables: dict[str, list[int]]) -> None:
        self.tables = tables

    def get_blocks(self, req_id: str) -> Any:
        return SimpleNamespace(blocks=([SimpleNamespace(block_id=b) for b in self.tables[req_id]],))

    def get_block_ids(self, req_id: str) -> tuple[list[int], ...]:
        return (list(self.tables[req_id]),)


def _scheduler_connector(tmp_path: Path, *, decode_stats: bool, role: str = "SCHEDULER") -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from eldr.vllm.connector import EldrConnector

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)]
    config = _vllm_config(tmp_path, None, decode_stats=decode_stats)
    config.cache_config.block_size = BLOCK
    return EldrConnector(config, KVConnectorRole[role], KVCacheConfig(4096, [], groups))


def _run_steps(connector: Any, steps: list[Step], experts: int, top_k: int) -> list[Any]:
    """Drive the scheduler side as vLLM does; the stats `get_kv_connector_stats` gave after each step."""
    from vllm.v1.outputs import KVConnectorOutput

    from eldr.vllm.connector import EldrWorkerMeta

    answers = []
    for number, step in enumerate(steps):
        # fresh request ids per step: a block table is one step's only
        tables = {f"{number}-{r.req_id}": r.table for r in step.requests}
        connector.bind_kv_cache_manager(_Manager(tables))
        for req in step.requests:
            request = SimpleNamespace(
                request_id=f"{number}-{req.req_id}", num_prompt_tokens=10**6, num_computed_tokens=req.start
            )
            connector.get_num_new_matched_tokens(request, req.start)
        scheduled = {f"{number}-{r.req_id}": r.num_new for r in step.requests}
        output = SimpleNamespace(
            num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values())
        )
        meta = connector.build_connector_meta(output)
        delta = _fold(step, experts)
        worker = EldrWorkerMeta(meta.step, delta, top_k, None)
        connector.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker))
        answers.append(connector.get_kv_connector_stats())
    return answers


def test_through_the_connector_each_step_is_reported_after_its_update(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    layers, experts, top_k = 4, 32, 4
    steps = [_make_step(rng, d, p, layers, experts, top_k) for d, p in [(3, 1), (0, 2), (5, 0)]]
    connector = _scheduler_connector(tmp_path, decode_stats=True)
    answers = _run_steps(connector, steps, experts, top_k)
    assert answers[1] is None  # no decode tokens, nothing wrapped: nothing to report
    for answer, step in ((answers[0], steps[0]), (answers[2], steps[2])):
        assert isinstance(answer, EldrKVConnectorStats)
        size, active = _reference(step)
        assert len(answer.data.pop("step_seconds")) == 1
        assert answer.data == {"batch_sizes": [size], "active_experts": [active], "skipped": 0}
        assert answer.to_dict() == {DECODE_DATA_KEY: answer.data}


def test_with_the_key_off_nothing_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decode stats ran with the key off")

    for name in ("note", "apply", "take"):
        monkeypatch.setattr(DecodeStatsRecorder, name, refuse)
    rng = np.random.default_rng(2)
    steps = [_make_step(rng, 4, 1, 2, 8, 2) for _ in range(2)]
    connector = _scheduler_connector(tmp_path, decode_stats=False)
    assert connector._decode_stats is None
    assert _run_steps(connector, steps, 8, 2) == [None, None]


def test_the_worker_side_records_nothing_itself(tmp_path: Path) -> None:
    connector = _scheduler_connector(tmp_path, decode_stats=True, role="WORKER")
    assert connector._decode_stats is None
    assert connector.get_kv_connector_stats() is None  # nothing wrapped: as before


def test_a_decode_token_the_scheduler_cannot_place_skips_its_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    step = _make_step(rng, 3, 0, 2, 8, 2)
    step.requests[0].table = []  # the manager knows no block at its position
    connector = _scheduler_connector(tmp_path, decode_stats=True)
    (answer,) = _run_steps(connector, [step], 8, 2)
    assert answer.data == {"batch_sizes": [], "active_experts": [], "step_seconds": [], "skipped": 1}
