"""The proxy's state, built once from the config: pools, router, metrics, HTTP client, tasks.

No module-level state: everything lives on one `ProxyState`, created by `build_app` and reached by the
routes through `state_of(request)`. It owns the decode pool's membership: `add_decode`,
`drain_decode` and `reap_drained` (which removes drained instances) are the only code that changes
it, and each keeps the pool, the router's rows (centroids, expert sets, the refit generation), the
HTTP client's connections and the health metrics in step.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from eldr.errors import PartitionMismatchError, PoolChangeError, UnknownWorkerError
from eldr.partition import Partition
from eldr.policy import FEWEST_NEW_EXPERTS
from eldr.policy.refit import RefitJob
from eldr.proxy.admission import Admission, BodyBudget
from eldr.proxy.answers import AnswerParser
from eldr.proxy.config import MAX_ENGINES, ServeConfig
from eldr.proxy.forwarding import Forwarder
from eldr.proxy.health import check_all
from eldr.proxy.metrics import Metrics
from eldr.proxy.routing import DecodeRouter, PrefillChooser
from eldr.proxy.server import HttpServer
from eldr.proxy.upstream import UpstreamClient
from eldr.proxy.workers import Pool, Worker

log = logging.getLogger("eldr.proxy")


class ProxyState:
    """Everything one proxy process holds."""

    def __init__(self, config: ServeConfig, partition: Partition | None) -> None:
        if partition is not None and config.policy == "eldr" and partition.num_workers != len(config.decode):
            raise PartitionMismatchError(
                f"the partition has K={partition.num_workers} decode workers but {len(config.decode)} "
                "--decode URLs were given (centroid k maps to the k-th --decode URL)"
            )
        self.config = config
        if config.policy == "eldr" and config.tau > 0 and len(config.decode) == 2:
            log.warning(
                "eldr with 2 decode instances and tau %g: the locality band always holds its runner-up, "
                "so both instances are in every band and eldr balances by load (similarity breaks ties "
                "only); --tau 0 routes by similarity alone (docs/serving.md#two-decode-instances)",
                config.tau,
            )
        # eldr routes by the partition; fewest-new-experts takes only its shape (L x E) and top_k
        self.partition = partition if config.policy in ("eldr", FEWEST_NEW_EXPERTS) else None
        # fewest-new-experts: top_k from the config, else from the partition's meta
        top_k = config.top_k or (partition.top_k if partition is not None else None)
        is_blended = config.load_signal == "blend"
        self.prefill = Pool("prefill", config.prefill, is_blended=is_blended)
        self.decode = Pool("decode", config.decode, is_blended=is_blended)
        self.metrics = Metrics()
        self.admission = Admission(config.max_concurrency, config.max_queue, config.queue_timeout_s)
        self.bodies = BodyBudget(config.max_body_bytes_in_flight)
        self.answers = AnswerParser(config.offload_answer_bytes)
        self.server: HttpServer | None = None  # set by app.server_for (connection counts for /metrics)
        self.router = DecodeRouter(
            self.decode,
            config.policy,
            self.partition,
            tau=config.tau,
            seed=config.seed,
            refit_every=config.refit_every,
            refit_window=config.refit_window,
            top_k=top_k,
            lam=config.lam,
        )
        self.chooser = PrefillChooser(
            self.prefill,
            config.prefill_policy,
            prefix_bytes=config.prefix_bytes,
            virtual_nodes=config.hash_virtual_nodes,
            load_factor=config.hash_load_factor,
            seed=config.seed,
        )
        self.client: UpstreamClient | None = None
        self.forwarder: Forwarder | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        for w in self.all_workers():
            self.metrics.healthy.labels(w.role, w.url).set(1.0)

    def all_workers(self) -> list[Worker]:
        return [*self.prefill.workers, *self.decode.workers]

    def known_models(self) -> tuple[str, ...]:
        if self.config.models:
            return self.config.models
        key = tuple(w.models for w in self.all_workers())
        if key != self._models_key:  # recomputed only when an instance's model list changed
            self._models_key, self._models = key, tuple(sorted({m for models in key for m in models}))
        return self._models

    _models_key: tuple[tuple[str, ...], ...] = ()
    _models: tuple[str, ...] = ()

    async def start(self) -> None:
        # idle connections expire before the engines' (uvicorn's 5 s) keep-alive timeout to avoid reuse races
        self.client = UpstreamClient(
            connect_timeout_s=self.config.connect_timeout_s,
            keepalive_s=2.0,
            max_head_bytes=self.config.max_answer_header_bytes,
        )
        self.forwarder = Forwarder(
            self.config, self.prefill, self.chooser, self.router, self.metrics, self.client, self.answers
        )
        self.forwarder.on_routed = self.maybe_refit
        await self.check_health()
        self.spawn(self.health_loop())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        await self.answers.close()

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check_health(self) -> None:
        assert self.client is not None
        c = self.config
        await check_all(
            self.client,
            self.all_workers(),
            timeout_s=c.health_timeout_s,
            is_blended=self.decode.is_blended,
            eject_after=c.eject_after,
            recover_after=c.recover_after,
            metrics=self.metrics,
        )
        self.reap_drained()

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.check_health()

    # ------------------------------------------------------------------ decode pool membership

    def add_decode(self, url: str) -> Worker:
        """Append a decode instance (health-checked with the others from the next check on).

        Raises `PoolChangeError` when it is in the pool already (any spelling of its URL) or the pool
        is full (`MAX_ENGINES`)."""
        if self.decode.index_of(url) is not None:
            raise PoolChangeError(f"decode instance {url} is already in the pool")
        if len(self.decode) >= MAX_ENGINES:
            raise PoolChangeError(f"the pool holds {MAX_ENGINES} decode instances already")
        worker = Worker(url, "decode")
        self.decode.workers.append(worker)
        self.router.add_centroid()
        self.metrics.healthy.labels("decode", url).set(1.0)
        return worker

    def drain_decode(self, url: str) -> Worker:
        """Stop routing to the decode instance `url`; it is removed (`reap_drained`) once idle.

        Raises `UnknownWorkerError` when no instance has that URL, `PoolChangeError` when it is the
        last one not draining."""
        index = self.decode.index_of(url)
        if index is None:
            raise UnknownWorkerError(f"no decode instance {url}")
        worker = self.decode.workers[index]
        if not worker.is_draining and sum(not w.is_draining for w in self.decode.workers) <= 1:
            raise PoolChangeError("cannot drain the last decode instance")
        worker.is_draining = True
        self.metrics.healthy.labels("decode", worker.url).set(0.0)
        self.reap_drained()
        return worker

    def reap_drained(self) -> list[Worker]:
        """Remove drained decode instances that have finished their requests; the removed ones."""
        removed: list[Worker] = []
        for index in reversed(range(len(self.decode))):
            worker = self.decode.workers[index]
            if worker.is_draining and worker.in_flight == 0 and len(self.decode) > 1:
                del self.decode.workers[index]
                self.router.remove_centroid(index)
                if self.client is not None:
                    self.client.forget(worker.url)
                self.metrics.healthy.remove(worker.role, worker.url)
                log.warning("decode instance %s drained and removed", worker.url)
                removed.append(worker)
        return removed

    # ------------------------------------------------------------------ online refit

    def maybe_refit(self) -> None:
        """Start a refit off the event loop when one is due and none is running."""
        job = self.router.refit_job()
        if job is not None:
            self.spawn(self._refit(job))

    async def _refit(self, job: RefitJob) -> None:
        try:
            result = await asyncio.to_thread(job.compute)
        except Exception:  # a failed refit keeps the old centroids; the proxy goes on
            self.router.abandon_refit()
            log.exception("online refit failed; keeping the current centroids")
            return
        if self.router.install(result):
            self.metrics.refits.inc()
        else:
            log.info("online refit dropped: the decode pool changed while it ran")


def state_of(request: Any) -> ProxyState:
    """The `ProxyState` of the app a route's request arrived on (typed access for the routes)."""
    state = request.app.state.proxy
    assert isinstance(state, ProxyState)
    return state
