"""Discrete-event simulation of a PD-disaggregated decode pool driven by an `eldr.policy` policy.

Request life (all times in seconds):

1. arrival -> prefill: `num_prefill_workers` FCFS servers (cost model's prefill time), then the KV
   transfer; the request is *ready* for decode.
2. ready -> the router: `policy.choose(request, WorkersView(in_flight))`; in-flight of the chosen
   worker +1 (router-tracked, paper §4.3.2); the request joins that worker's FCFS waiting queue.
3. decode: a worker runs steps back to back while it has work (continuous batching). Before each
   step it admits waiting requests in order while the batch is below `max_batch` and the request's
   whole KV footprint (prompt + output tokens, reserved at admission) fits the free capacity. Every
   running request generates one token per step; the step's distinct experts per recorded layer are
   the union of the running requests' current-token top-k (`tokens.TokenPlan`), and the step lasts
   `StepCost.step_s`. A request finishes at the end of the step that generates its last token; its
   worker's in-flight count drops by 1 then, and `policy.release(request_id)` tells the policy (a
   stateful one forgets the request's experts; every dispatched request is released exactly once).

The first generated token is the decoder's first token (TTFT = its time - arrival) and
TPOT = (finish - first token) / (output_tokens - 1). Requests with 0 output tokens are dispatched and
finish at once. Events at equal times: step ends first, then dispatches, in request order.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError, InvalidInputError
from eldr.policy import Policy, RequestView, WorkersView
from eldr.sim.costmodel import StepCost
from eldr.sim.tokens import TokenPlan, distinct_per_layer


@dataclass(frozen=True)
class PoolConfig:
    num_workers: int
    max_batch: int
    kv_capacity_tokens: int

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.max_batch < 1 or self.kv_capacity_tokens < 1:
            raise ConfigError(
                f"workers, max batch and KV capacity must be >= 1, got {self.num_workers}, "
                f"{self.max_batch}, {self.kv_capacity_tokens}"
            )


@dataclass(frozen=True)
class Requests:
    """The measured requests, index-aligned; `plan` holds their generated tokens' experts."""

    arrival_s: npt.NDArray[np.float64]  # [N] sorted
    prompt_tokens: npt.NDArray[np.int64]  # [N]
    output_tokens: npt.NDArray[np.int64]  # [N]
    views: Sequence[RequestView]  # [N] what the router sees
    plan: TokenPlan

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.shape[0])


@dataclass(frozen=True)
class RunResult:
    policy: str
    arrival_s: npt.NDArray[np.float64]  # [N]
    ready_s: npt.NDArray[np.float64]  # [N] prefill + KV transfer done
    first_token_s: npt.NDArray[np.float64]  # [N]
    finish_s: npt.NDArray[np.float64]  # [N]
    output_tokens: npt.NDArray[np.int64]  # [N]
    worker: npt.NDArray[np.int64]  # [N]
    num_fallbacks: int
    num_steps: int
    distinct_sum: npt.NDArray[np.float64]  # [L] summed over steps
    steps_by_batch: npt.NDArray[np.int64]  # [max_batch + 1]
    distinct_by_batch: npt.NDArray[np.float64]  # [max_batch + 1, L] summed over steps of that batch
    imbalance_time_avg: float  # time average of max/mean in-flight while any is in flight
    final_in_flight: npt.NDArray[np.int64]  # [W]; all zeros when the run drained


def prefill_ready_s(
    arrival_s: npt.NDArray[np.float64], prompt_tokens: npt.NDArray[np.int64], step_cost: StepCost
) -> npt.NDArray[np.float64]:
    """When each request's KV reaches the decode pool: FCFS prefill servers, then the transfer."""
    model = step_cost.model
    service = model.prefill_s(prompt_tokens)
    transfer = model.kv_transfer_per_token_s * prompt_tokens
    free = [0.0] * model.num_prefill_workers  # heap of the servers' free times
    ready = np.empty_like(arrival_s)
    for i in range(arrival_s.shape[0]):
        start = max(float(arrival_s[i]), heapq.heappop(free))
        done = start + float(service[i])
        heapq.heappush(free, done)
        ready[i] = done + float(transfer[i])
    return ready


def simulate(
    requests: Requests,
    policy: Policy,
    step_cost: StepCost,
    pool: PoolConfig,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run every request through prefill, `policy` and the decode pool; see the module docstring."""
    n = requests.num_requests
    prompt, out = requests.prompt_tokens, requests.output_tokens
    need = prompt + out  # [N] KV tokens reserved at admission
    if n and int(need.max()) > pool.kv_capacity_tokens:
        worst = int(need.argmax())
        raise InvalidInputError(
            f"request {worst} needs {int(need[worst])} KV tokens, a worker holds {pool.kv_capacity_tokens}"
        )
    masks, offsets = requests.plan.masks, requests.plan.offsets
    views = requests.views
    num_layers, num_workers = requests.plan.num_layers, pool.num_workers
    ready = prefill_ready_s(requests.arrival_s, prompt, step_cost)
    order = np.argsort(ready, kind="stable")

    generated = np.zeros(n, dtype=np.int64)
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    chosen = np.full(n, -1, dtype=np.int64)
    in_flight = np.zeros(num_workers, dtype=np.int64)
    healthy = np.ones(num_workers, dtype=np.bool_)
    running = [np.zeros(0, dtype=np.int64) for _ in range(num_workers)]
    waiting: list[deque[int]] = [deque() for _ in range(num_workers)]
    kv_used = [0] * num_workers
    busy = [False] * num_workers
    steps_by_batch = np.zeros(pool.max_batch + 1, dtype=np.int64)
    distinct_by_batch = np.zeros((pool.max_batch + 1, num_layers), dtype=np.float64)
    heap: list[tuple[float, int]] = []  # (step end, worker)
    imbalance = [0.0, 0.0, 0.0]  # [integral of max/mean dt, time with load, last event time]
    num_fallbacks = 0

    def account(now: float) -> None:
        dt = now - imbalance[2]
        total = int(in_flight.sum())
        if dt > 0 and total > 0:
            imbalance[0] += dt * int(in_flight.max()) * num_workers / total
            imbalance[1] += dt
        imbalance[2] = now

    def start_step(w: int, now: float) -> None:
        batch = running[w]
        queue = waiting[w]
        if queue:
            admitted: list[int] = []
            while queue and batch.size + len(admitted) < pool.max_batch:
                i = queue[0]
                if kv_used[w] + int(need[i]) > pool.kv_capacity_tokens:
                    break
                kv_used[w] += int(need[i])
                admitted.append(queue.popleft())
            if admitted:
                batch = running[w] = np.concatenate([batch, np.asarray(admitted, dtype=np.int64)])
        if batch.size == 0:
            busy[w] = False
            return
        gen = generated[batch]
        distinct = distinct_per_layer(masks[offsets[batch] + gen])  # [L]
        context = int(prompt[batch].sum() + gen.sum())
        steps_by_batch[batch.size] += 1
        distinct_by_batch[batch.size] += distinct
        busy[w] = True
        heapq.heappush(heap, (now + step_cost.step_s(batch.size, distinct, context), w))

    def end_step(w: int, now: float) -> int:
        batch = running[w]
        generated[batch] += 1
        gen = generated[batch]
        first[batch[gen == 1]] = now
        done_mask = gen >= out[batch]
        if not done_mask.any():
            return 0
        done = batch[done_mask]
        finish[done] = now
        in_flight[w] -= done.size
        for i in done.tolist():
            policy.release(views[i].request_id)
        kv_used[w] -= int(need[done].sum())
        running[w] = batch[~done_mask]
        return int(done.size)

    next_arrival = 0
    while next_arrival < n or heap:
        if heap and (next_arrival >= n or heap[0][0] <= ready[order[next_arrival]]):
            now, w = heapq.heappop(heap)
            account(now)
            finished = end_step(w, now)
            start_step(w, now)
        else:
            i = int(order[next_arrival])
            next_arrival += 1
            now = float(ready[i])
            account(now)
            decision = policy.choose(requests.views[i], WorkersView(in_flight.copy(), healthy))
            w = decision.worker
            num_fallbacks += decision.is_fallback
            chosen[i] = w
            if out[i] == 0:
                first[i] = finish[i] = now
                policy.release(views[i].request_id)
                finished = 1
            else:
                in_flight[w] += 1
                waiting[w].append(i)
                finished = 0
                if not busy[w]:
                    start_step(w, now)
        if finished and progress is not None:
            progress(finished)

    return RunResult(
        policy=policy.name,
        arrival_s=requests.arrival_s,
        ready_s=ready,
        first_token_s=first,
        finish_s=finish,
        output_tokens=out,
        worker=chosen,
        num_fallbacks=int(num_fallbacks),
        num_steps=int(steps_by_batch.sum()),
        distinct_sum=distinct_by_batch.sum(axis=0),
        steps_by_batch=steps_by_batch,
        distinct_by_batch=distinct_by_batch,
        imbalance_time_avg=imbalance[0] / imbalance[1] if imbalance[1] > 0 else 1.0,
        final_in_flight=in_flight,
    )
