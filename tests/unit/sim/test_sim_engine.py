from __future__ import annotations

import numpy as np
import pytest

from eldr.errors import InvalidInputError
from eldr.policy import RequestView, make_policy
from eldr.sim.costmodel import CostModel, StepCost, bind, layer_weights
from eldr.sim.engine import PoolConfig, Requests, simulate
from eldr.sim.tokens import TokenPlan, topk_to_masks

HAND = CostModel(
    name="hand",
    num_layers=1,
    num_experts=8,
    base_s=1.0,
    per_request_s=0.5,
    moe_layer_s=0.25,
    per_expert_s=0.1,
    attn_per_token_s=0.01,
    prefill_base_s=0.0,
    prefill_per_token_s=0.0,
    kv_transfer_per_token_s=0.0,
    num_prefill_workers=1,
    max_batch=64,
    kv_capacity_tokens=10_000,
)


def two_requests() -> Requests:
    # A: prompt 10, tokens {0,1} then {0,2}; B: prompt 20, one token {1,3}; both arrive at t=0
    topk = np.array([[[0, 1]], [[0, 2]], [[1, 3]]])
    plan = TokenPlan(topk_to_masks(topk, 8), np.array([0, 2, 3]))
    return Requests(
        arrival_s=np.zeros(2),
        prompt_tokens=np.array([10, 20]),
        output_tokens=np.array([2, 1]),
        views=[RequestView("a"), RequestView("b")],
        plan=plan,
    )


def hand_cost() -> StepCost:
    return bind(HAND, np.array([0]), 1, 8)


def test_single_worker_hand_computed() -> None:
    run = simulate(two_requests(), make_policy("rr"), hand_cost(), PoolConfig(1, 64, 10_000))
    # step 1 at t=0: A alone (B is dispatched after A's step started): 1 + .5 + .25 + .1*2 + .01*10
    # step 2: A's 2nd token {0,2} with B's {1,3}: union 4, context 30 + 1: 1 + 1 + .25 + .4 + .31
    assert run.first_token_s == pytest.approx([2.05, 5.01])
    assert run.finish_s == pytest.approx([5.01, 5.01])
    assert run.steps_by_batch[1] == 1 and run.steps_by_batch[2] == 1 and run.num_steps == 2
    assert run.distinct_sum.tolist() == [6.0]
    assert run.final_in_flight.tolist() == [0]


@pytest.mark.parametrize(
    ("max_batch", "kv_capacity"), [(1, 10_000), (64, 32)], ids=["batch-limit", "kv-limit"]
)
def test_limits_serialise_requests(max_batch: int, kv_capacity: int) -> None:
    # A needs 12 KV tokens, B 21: either limit keeps B out until A finishes
    run = simulate(two_requests(), make_policy("rr"), hand_cost(), PoolConfig(1, max_batch, kv_capacity))
    # A: 2.05, then {0,2} ctx 11: 2.06; B: {1,3} ctx 20: 2.15
    assert run.finish_s == pytest.approx([4.11, 6.26])
    assert run.steps_by_batch[1] == 3 and run.num_steps == 3


def test_request_larger_than_kv_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="KV tokens"):
        simulate(two_requests(), make_policy("rr"), hand_cost(), PoolConfig(1, 64, 20))


def test_round_robin_splits_two_workers() -> None:
    run = simulate(two_requests(), make_policy("rr"), hand_cost(), PoolConfig(2, 64, 10_000))
    assert run.worker.tolist() == [0, 1]
    # B alone on worker 1: {1,3}, ctx 20: 1 + .5 + .25 + .2 + .2
    assert run.finish_s == pytest.approx([2.05 + 2.06, 2.15])


def test_step_cost_terms() -> None:
    step = hand_cost()
    assert step.step_s(3, np.array([5]), 100) == pytest.approx(1 + 1.5 + 0.25 + 0.5 + 1.0)
    # expert scale: a 4-expert trace driving the 8-expert model doubles the active experts
    assert bind(HAND, np.array([0]), 1, 4).step_s(1, np.array([2]), 0) == pytest.approx(1.75 + 0.4)


def test_layer_maps() -> None:
    nearest = layer_weights(np.array([0, 7, 15]), 16, 48, "nearest")
    assert nearest.tolist() == [11, 24, 13]
    assert layer_weights(np.array([0, 7, 15]), 16, 48, "uniform").tolist() == [16, 16, 16]
    assert layer_weights(np.arange(4), 4, 4, "nearest").tolist() == [1, 1, 1, 1]
