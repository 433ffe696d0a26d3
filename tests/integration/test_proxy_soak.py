"""Soak: 5,000 requests at concurrency 200 through the proxy, prefill and decode failures injected.

Every request must end with exactly one full answer or one clear error; afterwards every in-flight
counter is zero, no task is left on the proxy's loop and no socket is left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import httpx
import pytest
from cluster_rig import Cluster
from fakes import answer_words

NUM_REQUESTS = int(os.environ.get("SOAK_N", 5000))
CONCURRENCY = 200
CLIENT_TIMEOUT_S = 120.0  # > max_attempts x every leg timeout: a request timing out here hung in the proxy


def open_sockets() -> int:
    fds = os.listdir("/proc/self/fd")
    count = 0
    for fd in fds:
        with contextlib.suppress(OSError):  # closed while listing
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def classify(payload: dict[str, Any], status: int, text: str) -> str:
    """'answer' for one complete answer, 'error' for one clear error; anything else fails the test."""
    expected = "".join(answer_words(payload))
    if status != 200:
        error = json.loads(text)["error"]
        assert error["code"] == status and error["message"], text
        return "error"
    if not payload.get("stream"):
        assert json.loads(text)["choices"][0]["text"] == expected, text
        return "answer"
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", text
    parsed = [json.loads(e) for e in events[:-1]]
    errors = [e for e in parsed if "error" in e]
    if errors:
        assert len(errors) == 1 and parsed[-1] is errors[0], text
        return "error"
    assert "".join(e["choices"][0]["text"] for e in parsed) == expected, text
    return "answer"


async def drive(url: str) -> dict[str, int]:
    outcomes = {"answer": 0, "error": 0}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=CLIENT_TIMEOUT_S) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(NUM_REQUESTS):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                payload = {
                    "model": "fake-moe",
                    "prompt": f"{'db'[i % 2]} request {i}",
                    "max_tokens": 1 + i % 8,
                    "stream": i % 3 != 0,
                }
                r = await client.post(url + "/v1/completions", json=payload)
                outcomes[classify(payload, r.status_code, r.text)] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


@pytest.mark.slow
def test_soak_with_random_failures() -> None:
    baseline_sockets = open_sockets()
    sys.setswitchinterval(1e-4)  # six server threads + the client share the GIL: hand it over often
    c = Cluster(
        num_prefill=2,
        num_decode=3,
        max_attempts=3,
        health_interval_s=5.0,
        prefill_timeout_s=15.0,
        decode_timeout_s=15.0,
        stream_idle_timeout_s=15.0,
    )
    try:
        for i, engine in enumerate((*c.prefill, *c.decode)):
            engine.fail_rate, engine.seed, engine.is_recording = 0.05, i, False
            engine.__post_init__()
        tasks_before = c.proxy.call(lambda: len(asyncio.all_tasks()))
        started = time.perf_counter()
        outcomes = asyncio.run(drive(c.url))
        elapsed_s = time.perf_counter() - started
        assert outcomes["answer"] + outcomes["error"] == NUM_REQUESTS
        assert outcomes["answer"] > 0.9 * NUM_REQUESTS  # failover turns most injected failures into answers
        assert (
            c.metric("eldr_retries_total", role="prefill") > 0
            and c.metric("eldr_retries_total", role="decode") > 0
        )
        assert c.metric("eldr_stream_errors_total", reason="upstream") > 0
        time.sleep(0.5)
        assert c.in_flight() == [0] * 5
        assert c.proxy.call(lambda: c.state.admission.active) == 0
        assert c.proxy.call(lambda: len(asyncio.all_tasks())) <= tasks_before
        client = c.state.client
        assert client is not None
        assert c.proxy.call(lambda: client.num_in_use) == 0  # every upstream connection released or closed
        print(f"soak: {outcomes} in {elapsed_s:.1f} s ({NUM_REQUESTS / elapsed_s:.0f} req/s)")
    finally:
        c.close()
    time.sleep(0.5)
    left = open_sockets()
    assert left <= baseline_sockets + 2, (
        baseline_sockets,
        left,
    )  # every connection of proxy, fakes and client closed
