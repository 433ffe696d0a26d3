"""Admission control: at most `max_concurrency` requests inside, at most `max_queue` waiting, and at
most `max_body_bytes_in_flight` bytes of request bodies held by the requests being read or served.

A request over the queue limit is refused at once (429); one that waited `queue_timeout_s` for a
slot is refused then (503); a body that would take the bytes in flight over their budget is refused
at once (429: its declared `Content-Length` before a byte of it is read, a chunked one as it
arrives). All three answers carry `Retry-After`; the refusals are `eldr.errors.Rejected`.
"""

from __future__ import annotations

import asyncio
from collections import deque

from eldr.errors import Rejected


class Admission:
    """A FIFO semaphore with a bounded queue and a wait limit."""

    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.active < self.max_concurrency and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Rejected(429, "queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Rejected(503, "queue_timeout") from None
            raise

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class BodyBudget:
    """Bytes of request bodies held by the requests inside the proxy, against one limit."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_use = 0

    def reserve(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One request's share of the `BodyBudget`; `release` gives it back (idempotent)."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def grow(self, num_bytes: int) -> None:
        """Hold `num_bytes` more; `Rejected(429, "body_budget")` when the budget has no room."""
        budget = self.budget
        if budget.in_use + num_bytes > budget.max_bytes:
            raise Rejected(429, "body_budget")
        budget.in_use += num_bytes
        self.held += num_bytes

    def release(self) -> None:
        self.budget.in_use -= self.held
        self.held = 0
