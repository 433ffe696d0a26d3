"""Active health checks: eject an instance after `eject_after` failed checks, bring it back after
`recover_after` good ones. A check is `GET /health` answering 200 within `health_timeout_s`. With the
blended load signal the same round scrapes `vllm:num_requests_running` and `vllm:num_requests_waiting`
from the engine's `/metrics`; the first good check of an instance also reads its `/v1/models`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from eldr.errors import UpstreamError
from eldr.proxy.metrics import Metrics
from eldr.proxy.upstream import UpstreamClient
from eldr.proxy.workers import Worker

log = logging.getLogger("eldr.proxy")

_GAUGE = re.compile(rb"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


def parse_engine_load(text: bytes) -> int | None:
    """running + waiting requests from a vLLM /metrics page (summed over label sets), or None."""
    found = _GAUGE.findall(text)
    if not found:
        return None
    return int(sum(float(value) for _, value in found))


CHECK_MAX_BYTES = 16 * 1024 * 1024  # a /health, /metrics or /v1/models page larger than this fails the check


async def _get(client: UpstreamClient, worker: Worker, path: str, deadline: float) -> tuple[int, bytes]:
    response = await client.request(client.endpoint(worker.url), "GET", path, {}, b"", deadline)
    try:
        return response.status, await response.read(deadline, CHECK_MAX_BYTES)
    finally:
        response.close()


async def check_worker(client: UpstreamClient, worker: Worker, *, timeout_s: float, is_blended: bool) -> bool:
    """One check of one instance; True when healthy. Never raises (except cancellation)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        status, _ = await _get(client, worker, "/health", deadline)
        if status != 200:
            return False
        if is_blended:
            status, text = await _get(client, worker, "/metrics", deadline)
            worker.engine_load = parse_engine_load(text) if status == 200 else None
        if not worker.models:
            status, listed = await _get(client, worker, "/v1/models", deadline)
            if status == 200:
                data = json.loads(listed).get("data")
                listed_models = data if isinstance(data, list) else []
                worker.models = tuple(str(m.get("id")) for m in listed_models if isinstance(m, dict))
        return True
    except (UpstreamError, OSError, TimeoutError, ValueError, AttributeError):
        return False


def record(worker: Worker, is_ok: bool, *, eject_after: int, recover_after: int, metrics: Metrics) -> None:
    """Update the instance's health state from one check."""
    if is_ok:
        worker.failed_checks, worker.good_checks = 0, worker.good_checks + 1
        if not worker.is_healthy and worker.good_checks >= recover_after:
            worker.is_healthy = True
            log.warning("%s instance %s recovered", worker.role, worker.url)
    else:
        worker.good_checks, worker.failed_checks = 0, worker.failed_checks + 1
        if worker.is_healthy and worker.failed_checks >= eject_after:
            worker.is_healthy = False
            log.warning("%s instance %s ejected after %d failed checks", worker.role, worker.url, eject_after)
    metrics.healthy.labels(worker.role, worker.url).set(1.0 if worker.is_routable else 0.0)


async def check_all(
    client: UpstreamClient,
    workers: list[Worker],
    *,
    timeout_s: float,
    is_blended: bool,
    eject_after: int,
    recover_after: int,
    metrics: Metrics,
) -> None:
    results = await asyncio.gather(
        *(check_worker(client, w, timeout_s=timeout_s, is_blended=is_blended) for w in workers)
    )
    for worker, is_ok in zip(workers, results, strict=True):
        record(worker, is_ok, eject_after=eject_after, recover_after=recover_after, metrics=metrics)
