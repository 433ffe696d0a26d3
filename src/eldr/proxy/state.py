"""The proxy's state, built once from the config: pools, router, metrics, HTTP client, tasks.

No module-level state: everything lives on one `ProxyState`, created by `build_app` and reached by the
routes through `request.app.state.proxy`.
"""

from __future__ import annotations

import asyncio
import logging

from eldr.errors import PartitionMismatchError
from eldr.partition import Partition
from eldr.policy import FEWEST_NEW_EXPERTS
from eldr.proxy.admission import Admission, BodyBudget
from eldr.proxy.answers import AnswerParser
from eldr.proxy.config import ServeConfig
from eldr.proxy.forwarding import Forwarder
from eldr.proxy.health import check_all
from eldr.proxy.metrics import Metrics
from eldr.proxy.routing import DecodeRouter, PrefillChooser, compute_refit
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
            refit_window=config.refit_window if config.refit_every else 0,
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

    def reap_drained(self) -> None:
        """Remove drained decode instances that have finished their requests."""
        for index in reversed(range(len(self.decode))):
            worker = self.decode.workers[index]
            if worker.is_draining and worker.in_flight == 0 and len(self.decode) > 1:
                del self.decode.workers[index]
                self.router.remove_centroid(index)
                if self.client is not None:
                    self.client.forget(worker.url)
                self.metrics.healthy.remove(worker.role, worker.url)
                log.warning("decode instance %s drained and removed", worker.url)

    def maybe_refit(self) -> None:
        """Start a refit off the event loop when one is due and none is running."""
        r = self.router
        if not self.config.refit_every or r.since_refit < self.config.refit_every or self._refitting:
            return
        data = r.refit_input()
        if data is not None:
            self._refitting = True
            self.spawn(self._refit(*data))

    _refitting = False

    async def _refit(self, signatures: object, old: object) -> None:
        try:
            new = await asyncio.to_thread(compute_refit, signatures, old, self.config.seed)  # type: ignore[arg-type]
            if self.router.install(new, old):  # type: ignore[arg-type]
                self.metrics.refits.inc()
        except Exception:  # a failed refit keeps the old centroids; the proxy goes on
            log.exception("online refit failed; keeping the current centroids")
        finally:
            self._refitting = False
