"""benchmarks/plugin_timing.py: the worker's clocks reach the scheduler and the answers' params."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from tests.benchmark_module import load_benchmark  # noqa: E402

from eldr.vllm.blockcache import BlockDelta  # noqa: E402

BLOCK = 4


@pytest.fixture(scope="module")
def timing() -> ModuleType:
    return load_benchmark("plugin_timing")  # as on an engine's PYTHONPATH: its metadata pickles by name


def _scheduler(timing: ModuleType) -> Any:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    ktc = KVTransferConfig(
        kv_connector="TimedEldrConnector", kv_connector_module_path="plugin_timing", kv_role="kv_both"
    )
    config = VllmConfig(kv_transfer_config=ktc)
    config.cache_config.block_size = BLOCK
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)]
    return timing.TimedEldrConnector(config, KVConnectorRole.SCHEDULER, KVCacheConfig(64, [], groups))


def test_an_answer_carries_the_worker_and_scheduler_totals(timing: ModuleType) -> None:
    from vllm.v1.outputs import KVConnectorOutput

    connector = _scheduler(timing)
    connector.bind_kv_cache_manager(SimpleNamespace(get_block_ids=lambda req_id: ([7],)))
    request = SimpleNamespace(request_id="r", num_prompt_tokens=BLOCK, num_computed_tokens=0)
    connector.get_num_new_matched_tokens(request, 0)
    meta = connector.build_connector_meta(
        SimpleNamespace(num_scheduled_tokens={"r": BLOCK}, total_num_scheduled_tokens=BLOCK)
    )
    request.num_computed_tokens = BLOCK
    _, params = connector.request_finished(request, [7])
    assert params is not None and "eldr_timing" not in params  # filled with the step's worker data
    counts = np.array([[[3, 1]]], dtype=np.uint8)  # [1 block, 1 layer, 2 experts]: 4 tokens, top-1
    delta = BlockDelta(np.array([7]), np.array([True]), counts)
    worker = timing.TimedWorkerMeta(meta.step, delta, 1, None, (5_000, 700, 3_000))
    connector.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker))
    totals = params["eldr_timing"]
    assert "eldr" in params
    assert {k: totals[k] for k in ("worker_ns", "callback_ns", "worker_cpu_ns", "steps")} == {
        "worker_ns": 5_000,
        "callback_ns": 700,
        "worker_cpu_ns": 3_000,
        "steps": 1,
    }
    assert totals["scheduler_ns"] > 0 and totals["scheduler_cpu_ns"] >= 0
    calls = {name: hook[0] for name, hook in connector.clock.by_hook.items()}
    assert calls == {
        "get_num_new_matched_tokens": 1,
        "build_connector_meta": 1,
        "request_finished": 1,
        "update_connector_output": 1,
    }


def test_tensor_parallel_ranks_times_add_up(timing: ModuleType) -> None:
    one = timing.TimedWorkerMeta(3, None, 2, None, (1, 2, 3))
    merged = one.aggregate(timing.TimedWorkerMeta(3, None, 2, None, (10, 20, 30)))
    assert isinstance(merged, timing.TimedWorkerMeta)
    assert (merged.step, merged.top_k, merged.timing_ns) == (3, 2, (11, 22, 33))


def test_a_timed_callback_still_records_and_adds_its_time(timing: ModuleType) -> None:
    clock = timing.Clock()
    seen: list[int] = []
    callback = clock.timed_callback(lambda ids: seen.append(int(ids.shape[0])))
    callback(torch.zeros((3, 2), dtype=torch.int32))
    assert seen == [3] and clock.callbacks_ns > 0
    assert clock.take()[1] > 0 and clock.callbacks_ns == 0
