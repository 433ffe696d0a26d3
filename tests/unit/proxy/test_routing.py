"""`eldr.proxy.routing` on its own: the decode router's pool changes and the prefill choice."""

from __future__ import annotations

import numpy as np

from eldr.partition import Partition
from eldr.policy import RequestView
from eldr.proxy.routing import DecodeRouter, PrefillChooser
from eldr.proxy.workers import Pool

DECODE = tuple(f"http://127.0.0.1:{8100 + w}" for w in range(4))


def test_an_added_instance_copies_the_busiest_centroid_and_a_removed_one_takes_its_row(
    partition: Partition,
) -> None:
    pool = Pool("decode", DECODE)
    router = DecodeRouter(pool, "eldr", partition, tau=0.1, seed=0, refit_every=5, refit_window=8)
    assert router.band is not None and router.refitter is not None
    before = router.band.centroids.copy()
    for w, load in enumerate((1, 7, 2, 0)):
        pool.workers[w].in_flight = load
    generation = router.refitter.generation
    router.add_centroid()
    np.testing.assert_array_equal(router.band.centroids, np.vstack([before, before[1:2]]))
    router.remove_centroid(0)
    np.testing.assert_array_equal(router.band.centroids, np.vstack([before[1:], before[1:2]]))
    assert router.refitter.generation == generation + 2  # each change invalidates refits in flight


def test_fewest_new_experts_rows_follow_the_pool(partition: Partition) -> None:
    pool = Pool("decode", DECODE)
    router = DecodeRouter(pool, "fewest-new-experts", partition, tau=0.1, seed=0, top_k=2)
    assert router.overlap is not None and router.refitter is None
    counts = np.zeros((partition.num_layers, partition.num_experts), dtype=np.int64)
    counts[:, :2] = 3
    decision = router.choose(RequestView("leg-0", counts), set())
    router.remove_centroid(decision.worker)  # its row leaves with it, the leg's record too
    router.release("leg-0")  # released after its instance left: a no-op, not an error
    router.add_centroid()  # an added instance starts with an empty row
    assert router.overlap.num_workers == 4


def test_refit_jobs_come_only_when_due_and_one_at_a_time(partition: Partition) -> None:
    router = DecodeRouter(
        Pool("decode", DECODE), "eldr", partition, tau=0.1, seed=0, refit_every=3, refit_window=8
    )
    rng = np.random.default_rng(0)

    def route() -> None:
        counts = rng.integers(0, 4, size=(partition.num_layers, partition.num_experts))
        router.choose(RequestView(counts=counts), set())

    for _ in range(3):
        assert router.refit_job() is None  # the window must hold one signature per instance first
        route()
    route()
    job = router.refit_job()
    assert job is not None and router.refit_job() is None
    router.abandon_refit()  # it failed: the next one may come
    for _ in range(3):
        route()
    assert router.refit_job() is not None


def test_no_refit_without_eldr_or_without_refit_every(partition: Partition) -> None:
    assert DecodeRouter(Pool("decode", DECODE), "eldr", partition, tau=0.1, seed=0).refitter is None
    assert DecodeRouter(Pool("decode", DECODE), "jsq", None, tau=0.1, seed=0, refit_every=3).refitter is None


def test_prefix_hash_keeps_a_prompt_and_falls_back_when_its_instance_is_hot() -> None:
    pool = Pool("prefill", tuple(f"http://127.0.0.1:{8000 + p}" for p in range(3)))
    chooser = PrefillChooser(pool, "prefix-hash", prefix_bytes=16, virtual_nodes=64, load_factor=1.25, seed=0)
    first = chooser.choose(lambda: b"the same prompt, long enough", set())
    assert all(chooser.choose(lambda: b"the same prompt, long enough", set()) == first for _ in range(5))
    pool.workers[first].in_flight = 9  # far above 1.25 x the mean load: least loaded instead
    assert chooser.choose(lambda: b"the same prompt, long enough", set()) != first
    assert (
        chooser.choose(lambda: b"the same prompt", {pool.workers[first]}) != first
    )  # failed there: never again
