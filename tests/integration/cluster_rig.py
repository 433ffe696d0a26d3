"""Shared rig for the proxy's integration tests: a fake cluster behind a real proxy."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
from fakes import FakeEngine, LoopThread, ServerThread

from eldr.partition import Partition
from eldr.proxy.app import ProxyApp, build_app, server_for
from eldr.proxy.config import ServeConfig
from eldr.proxy.state import ProxyState
from eldr.signature import SignatureTransform

# first words whose "domain" (see FakeEngine.topk_ids) is 0 and 2: they belong to decode 0 and 1
WORD_OF_DECODE = {0: "d", 1: "b"}


def fake_partition(engine: FakeEngine, num_decode: int = 2) -> Partition:
    """One centroid per decode: the signature of domain 0 -> decode 0, domain 2 -> decode 1, ..."""
    transform = SignatureTransform(
        np.ones((engine.num_layers, engine.num_experts), np.float32), tuple(range(engine.num_layers))
    )
    words = ["d", "b", "a", "c"][:num_decode]
    centroids = transform.apply(np.stack([engine.counts_for(f"{w} x y") for w in words]))
    return Partition(transform, centroids.astype(np.float32), engine.top_k, tuple(range(num_decode)))


class ProxyThread:
    """The proxy's own HTTP server (`eldr.proxy.server`, as `eldr serve` runs it) on a background loop."""

    def __init__(self, app: ProxyApp, loop_thread: LoopThread) -> None:
        self.server = server_for(app)
        self.loop = loop_thread.loop

    def __enter__(self) -> ProxyThread:
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop).result(20)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def call(self, fn: Any) -> Any:
        """Run `fn` on the server's loop and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)


class Cluster:
    """Fake prefill and decode engines plus the proxy, each a real server on a loopback port."""

    def __init__(
        self,
        num_prefill: int = 2,
        num_decode: int = 2,
        signature: str = "eldr",
        engine_layers: int = 4,
        **config: Any,
    ) -> None:
        self.stack = ExitStack()
        self.loop_thread = LoopThread()  # every server of the cluster on one loop
        self.stack.callback(self.loop_thread.close)
        self.prefill = [
            FakeEngine("prefill", name=f"p{i}", signature=signature, num_layers=engine_layers)
            for i in range(num_prefill)
        ]
        self.decode = [FakeEngine("decode", name=f"d{i}") for i in range(num_decode)]
        self.prefill_servers = [
            self.stack.enter_context(ServerThread(e.app(), self.loop_thread)) for e in self.prefill
        ]
        self.decode_servers = [
            self.stack.enter_context(ServerThread(e.app(), self.loop_thread)) for e in self.decode
        ]
        partition = (
            fake_partition(FakeEngine("prefill"), num_decode)
            if config.get("policy", "eldr") == "eldr"
            else None
        )
        settings: dict[str, Any] = {"tau": 0.0, "health_interval_s": 0.2, "port": 0, **config}
        self.config = ServeConfig(
            prefill=tuple(s.url for s in self.prefill_servers),
            decode=tuple(s.url for s in self.decode_servers),
            partition="unused" if partition is not None else None,
            **settings,
        )
        self.app = build_app(self.config, partition)
        self.state: ProxyState = self.app.state.proxy
        self.proxy = self.stack.enter_context(ProxyThread(self.app, self.loop_thread))

    @property
    def url(self) -> str:
        return self.proxy.url

    def in_flight(self) -> list[int]:
        return self.proxy.call(lambda: [w.in_flight for w in self.state.all_workers()])  # type: ignore[no-any-return]

    def metric(self, name: str, **labels: str) -> float:
        value = self.state.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    def close(self) -> None:
        self.stack.close()


def body(prompt: str = "d some prompt", **extra: Any) -> dict[str, Any]:
    """A completion request; its first word picks the decode its signature belongs to."""
    return {"model": "fake-moe", "prompt": prompt, "max_tokens": 6, **extra}


def sse_texts(text: str) -> tuple[list[Any], bool]:
    """Parsed SSE data events and whether the stream ended with [DONE]."""
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    is_done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], is_done


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
