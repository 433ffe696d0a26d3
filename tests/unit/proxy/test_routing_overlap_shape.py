"""fewest-new-experts in the proxy: a partition gives it L x E, so vLLM's own expert ids become counts."""

from __future__ import annotations

import numpy as np

from eldr.partition import Partition
from eldr.policy import RequestView
from eldr.proxy.answer_signature import extract_signature
from eldr.proxy.routing import DecodeRouter
from eldr.proxy.workers import Pool
from eldr.signature import SignatureTransform


def _partition(num_layers: int, num_experts: int) -> Partition:
    rows = np.eye(2, num_layers * num_experts, dtype=np.float32)
    transform = SignatureTransform(idf=np.ones((num_layers, num_experts), np.float32), layers=(0, 1))
    return Partition(transform=transform, centroids=rows, top_k=2, worker_of=(0, 1))


def test_a_partition_gives_fewest_new_experts_its_shape() -> None:
    pool = Pool("decode", ("http://a:1", "http://b:2"))
    router = DecodeRouter(pool, "fewest-new-experts", _partition(2, 4), tau=0.1, seed=0, top_k=2)
    assert router.num_experts == 4
    answer = {"prompt_routed_experts": [[[0, 1], [2, 3]]] * 5}  # vLLM's own ids: [T, L, k]
    extracted = extract_signature(answer, router.num_experts)
    assert extracted.counts is not None and extracted.counts.shape == (2, 4)
    decision = router.choose(RequestView("r#0", extracted.counts), set())
    assert not decision.is_fallback
    router.release("r#0")


def test_without_a_partition_the_shape_is_unknown_until_counts_arrive() -> None:
    pool = Pool("decode", ("http://a:1", "http://b:2"))
    router = DecodeRouter(pool, "fewest-new-experts", None, tau=0.1, seed=0, top_k=2)
    assert router.num_experts is None
    decision = router.choose(RequestView("r#0", np.ones((2, 4), np.int64)), set())
    assert not decision.is_fallback and router.num_experts == 4
    router.release("r#0")
