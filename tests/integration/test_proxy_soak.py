"""Soak: 5,000 requests at concurrency 200 through the proxy, prefill and decode failures injected.

Every request must end with exactly one full answer or one clear error; afterwards every in-flight
counter is zero, no task is left on the proxy's loop and no socket is left open. The second soak runs
a real `eldr serve` process with the attacks of test_proxy_hostile.py looping beside the requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import attacks
import httpx
import pytest
from cluster_rig import Cluster, wait_for
from fakes import answer_words, prompt_digest
from serve_process import Engines, ServeProcess

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


async def drive(
    url: str,
    num_requests: int,
    concurrency: int,
    check: Callable[[dict[str, Any], int, str], str] = classify,
    lost: list[str] | None = None,
) -> dict[str, int]:
    """`num_requests` mixed requests at `concurrency`, each answer checked by `check`. A transport
    error fails the test, or with `lost` is counted and recorded there."""
    outcomes = {"answer": 0, "error": 0, "lost": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=CLIENT_TIMEOUT_S) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(num_requests):
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
                try:
                    r = await client.post(url + "/v1/completions", json=payload)
                except httpx.HTTPError as exc:
                    if lost is None:
                        raise
                    outcomes["lost"] += 1
                    lost.append(f"{type(exc).__name__}: {exc}")
                    continue
                outcomes[check(payload, r.status_code, r.text)] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
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
        outcomes = asyncio.run(drive(c.url, NUM_REQUESTS, CONCURRENCY))
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


# ---------------------------------------------------------------- the soak with attacks beside it

ATTACK_N = int(os.environ.get("SOAK_ATTACK_N", 400))
ATTACK_CONCURRENCY = int(os.environ.get("SOAK_ATTACK_CONCURRENCY", 100))
# the proxy's client timeouts in this soak: short, so the slow attackers come round often, but not so
# short that a legitimate client of this busy process (fakes, 200 clients, attackers) trips them
HEAD_TIMEOUT_S = 3.0
WRITE_TIMEOUT_S = 1.0


def check_answer(payload: dict[str, Any], status: int, text: str) -> str:
    """`classify`, plus: the answer is for this request's prompt (no crossed answers)."""
    kind = classify(payload, status, text)
    if status != 200:
        return kind
    digest = prompt_digest(payload)
    if payload.get("stream"):
        events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
        assert all(e.get("for") == digest for e in events if "error" not in e), text
    else:
        assert json.loads(text)["for"] == digest, text
    return kind


class Attackers:
    """Every attack of test_proxy_hostile.py in a loop, each in its own thread, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.seen: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.threads = [
            threading.Thread(target=self._loop, args=(name, fn), daemon=True)
            for name, fn in (
                ("header_bomb_64MB", lambda: attacks.header_bomb(port, 64 * attacks.MB).status),
                ("slow_head", lambda: attacks.slow_head(port, 10).status),
                ("silent_connection", lambda: attacks.slow_head(port, 10, send_nothing=True).status),
                ("slow_body", lambda: attacks.slow_body(port, 10).status),
                ("stalled_stream_8MB", lambda: attacks.stalled_stream(port, WRITE_TIMEOUT_S + 1.5).status),
                ("idle_flood_100", self._flood),
                ("big_body_1.5MB", self._big_body),
                ("big_body_1.5MB_2", self._big_body),
                ("big_body_1.5MB_3", self._big_body),
            )
        ]

    def _loop(self, name: str, attack: Any) -> None:
        while not self.stop.is_set():
            try:
                self.seen[name][attack()] += 1
            except OSError:
                self.seen[name][-1] += 1

    def _flood(self) -> int:
        """Connections refused of 100 opened at once (0 while the cap is not reached)."""
        socks, refused = attacks.idle_connections(self.port, 100)
        time.sleep(0.5)
        for sock in socks:
            sock.close()
        return len(refused)

    def _big_body(self) -> int:
        payload = {"model": "fake-moe", "prompt": "d big", "max_tokens": 2, "junk": "x" * 1_500_000}
        try:
            return httpx.post(self.port_url + "/v1/completions", json=payload, timeout=60).status_code
        except httpx.HTTPError:
            return -1

    @property
    def port_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Attackers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.mark.slow
def test_soak_with_attacks_beside_it() -> None:
    """`SOAK_ATTACK_N` requests (400 here; 5,000 for the published figures, docs/serving.md) at
    `SOAK_ATTACK_CONCURRENCY` through a real `eldr serve` process, 5% random engine failures, while
    nine attackers loop beside them: 64 MB header blocks, slow heads, silent connections, slow
    bodies, streams never read, floods of 100 idle connections, three senders of 1.5 MB bodies
    against a 4 MiB body budget. Every request ends in one full answer for its own prompt or one
    clear error, none is lost; afterwards every gauge is back to 0 and the RSS stayed bounded."""
    engines = Engines(num_prefill=2, num_decode=3)
    for i, engine in enumerate((*engines.prefill, *engines.decode)):
        engine.fail_rate, engine.seed, engine.is_recording = 0.05, i, False
        engine.__post_init__()
    proxy = ServeProcess(
        engines.prefill_urls,
        engines.decode_urls,
        "--max-attempts",
        "3",
        "--health-interval-s",
        "1",
        "--prefill-timeout-s",
        "15",
        "--decode-timeout-s",
        "15",
        "--stream-idle-timeout-s",
        "15",
        "--client-header-timeout-s",
        str(HEAD_TIMEOUT_S),
        "--client-body-timeout-s",
        str(HEAD_TIMEOUT_S),
        "--client-write-timeout-s",
        str(WRITE_TIMEOUT_S),
        "--max-connections",
        "400",
        "--max-body-bytes",
        str(2 * attacks.MB),
        "--max-body-bytes-in-flight",
        str(4 * attacks.MB),
        "--log-level",
        "warning",
    )
    try:
        rss_start = proxy.rss_bytes()
        rss: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                rss.append(proxy.rss_bytes())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        with Attackers(proxy.port) as attackers:
            time.sleep(0.5)
            lost: list[str] = []
            outcomes = asyncio.run(drive(proxy.url, ATTACK_N, ATTACK_CONCURRENCY, check_answer, lost))
            elapsed_s = time.perf_counter() - started
        sampling.set()
        sampler.join()
        assert outcomes["lost"] == 0 and outcomes["answer"] + outcomes["error"] == ATTACK_N, (
            outcomes,
            lost[:5],
        )
        assert outcomes["answer"] > 0.8 * ATTACK_N, outcomes
        seen = {name: dict(counter) for name, counter in attackers.seen.items()}
        assert set(seen["header_bomb_64MB"]) == {431}, seen
        assert set(seen["slow_head"]) == {408} and set(seen["slow_body"]) == {408}, seen
        # cut off by the write timeout; a stream that an injected engine failure ended early (an error
        # event after a few KB) fits in the socket buffers and ends without a cut
        stalled = seen["stalled_stream_8MB"]
        assert set(stalled) <= {0, 1} and stalled.get(1, 0) >= 0.8 * sum(stalled.values()), seen
        assert set(seen["idle_flood_100"]) == {0}, seen  # 400 connections allowed: none refused
        assert proxy.process.poll() is None
        wait_for(lambda: settled(proxy), timeout_s=30)
        wait_for(lambda: all(e.active == 0 for e in (*engines.prefill, *engines.decode)))
        errors = {
            labels[0][1]: value
            for (name, labels), value in proxy.metrics().items()
            if name == "eldr_client_protocol_errors_total"
        }
        rejected = proxy.metric("eldr_admission_rejections_total", reason="body_budget")
        assert errors.get("write_timeout", 0) >= stalled.get(1, 0), errors
        rss_end = proxy.rss_bytes()
        print(
            f"\nsoak with attacks: {ATTACK_N} requests at concurrency {ATTACK_CONCURRENCY} "
            f"in {elapsed_s:.1f} s ({ATTACK_N / elapsed_s:.0f} req/s): {outcomes}\n"
            f"attacks (outcome: count): {seen}\n"
            f"proxy protocol errors: {errors}; body-budget 429s: {rejected:.0f}\n"
            f"proxy RSS MB: start {rss_start / attacks.MB:.0f}, max {max(rss) / attacks.MB:.0f}, "
            f"end {rss_end / attacks.MB:.0f}; gauges back to 0"
        )
        assert max(rss) < rss_start + 128 * attacks.MB, (rss_start, max(rss))
    finally:
        proxy.close()
        engines.close()


def settled(proxy: ServeProcess) -> bool:
    """Every request gauge at 0, and no client connection but the scrape's own."""
    metrics = proxy.metrics()
    gauges = ("eldr_in_flight", "eldr_requests_inside", "eldr_requests_queued", "eldr_body_bytes_in_flight")
    held = [v for (name, _), v in metrics.items() if name in gauges]
    return not any(held) and metrics[("eldr_client_connections", ())] <= 1
