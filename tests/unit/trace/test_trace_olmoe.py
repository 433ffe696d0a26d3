"""The OLMoE builder on a tiny fake data folder with the real layout (runs without ../shared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from olmoe_fake import MISSING_ID, FakeData

from eldr.errors import ConfigError, InputFileError, InvalidInputError
from eldr.signature import counts_from_topk
from eldr.trace.azure import allocate, load_azure, replay_rows
from eldr.trace.olmoe import (
    DOMAINS,
    NUM_EXPERTS,
    TOP_K,
    OlmoeConfig,
    build_olmoe_trace,
    load_tokenizer,
    parse_mix,
    prefix_counts,
    route_domain,
)


def _build(fake: FakeData, **overrides: Any) -> Any:
    fields: dict[str, Any] = {"num_requests": 120, "num_calibration": 30, "max_prompt": 64, "max_output": 32}
    fields.update(overrides)
    return build_olmoe_trace(fake.root, OlmoeConfig(**fields))


def test_tokens_seen_once_get_their_recorded_top_k(fake_data: FakeData) -> None:
    tokenizer = load_tokenizer(fake_data.root)
    for domain in DOMAINS:
        routed = route_domain(fake_data.root, domain, tokenizer, np.random.default_rng(3))
        ids, truth = fake_data.token_ids[domain], fake_data.true_topk[domain]
        assert routed.num_positions == ids.size
        once = ids >= 30
        assert once.sum() == 10
        np.testing.assert_array_equal(routed.topk[once], np.sort(truth[once], axis=2))
        # repeated ids: every drawn expert is one the id was routed to somewhere in the text
        for layer in range(truth.shape[1]):
            seen = np.zeros((40, NUM_EXPERTS), dtype=bool)
            seen[np.repeat(ids, TOP_K), truth[:, layer].ravel()] = True
            known = ids != MISSING_ID
            assert np.all(seen[ids[known, None], routed.topk[known, layer]])
        assert routed.num_fallback == int(np.sum(ids == MISSING_ID))
        assert np.all(np.diff(routed.topk.astype(int), axis=2) > 0)  # k distinct experts


def test_prefix_counts_give_window_counts() -> None:
    rng = np.random.default_rng(0)
    topk = np.sort(
        np.stack([rng.choice(NUM_EXPERTS, size=(2, TOP_K), replace=False) for _ in range(50)]), axis=2
    )
    topk = topk.astype(np.uint8)
    cum = prefix_counts(topk)
    np.testing.assert_array_equal(cum[30] - cum[10], counts_from_topk(topk[10:30], NUM_EXPERTS))
    assert cum[0].sum() == 0 and cum[-1].sum() == 50 * 2 * TOP_K


def test_built_trace_conserves_counts_and_keeps_calibration_text_apart(fake_data: FakeData) -> None:
    trace = _build(fake_data, is_exact_decode=True)
    assert trace.num_requests == 120 and trace.top_k == TOP_K and trace.layers.tolist() == [0, 7, 15]
    assert np.all(trace.prefill_counts.sum(axis=2) == trace.prompt_tokens[:, None] * TOP_K)
    assert np.all(trace.decode_counts.sum(axis=2) == trace.output_tokens[:, None] * TOP_K)
    assert (
        trace.prompt_tokens.max() <= 64 and trace.output_tokens.max() <= 32 and trace.output_tokens.min() >= 1
    )
    # the first 30 arrivals are calibration requests
    np.testing.assert_array_equal(trace.calibration, np.arange(120) < 30)
    assert trace.decode_topk is not None and trace.text_offset is not None  # Trace validated their sums
    end = trace.text_offset + trace.prompt_tokens + trace.output_tokens
    for domain in DOMAINS:
        split = trace.meta["calibration_split"][domain]
        assert split == int(trace.meta["routed_positions"][domain] * 0.2)
        cal = trace.calibration & (trace.domain == domain)
        ev = ~trace.calibration & (trace.domain == domain)
        assert cal.any() and ev.any()
        assert np.all(end[cal] <= split) and np.all(trace.text_offset[ev] >= split)


def test_windows_are_the_texts_routing(fake_data: FakeData) -> None:
    trace = _build(fake_data, is_exact_decode=True, seed=4)
    tokenizer = load_tokenizer(fake_data.root)
    # route_domain draws with the per-domain seed [seed, domain index]: redraw and compare windows
    for d, domain in enumerate(DOMAINS):
        routed = route_domain(fake_data.root, domain, tokenizer, np.random.default_rng([4, d]))
        for i in np.flatnonzero(trace.domain == domain)[:5]:
            s, p, o = int(trace.text_offset[i]), int(trace.prompt_tokens[i]), int(trace.output_tokens[i])
            np.testing.assert_array_equal(
                trace.prefill_counts[i], counts_from_topk(routed.topk[s : s + p], NUM_EXPERTS)
            )
            rows = trace.decode_topk[trace.decode_offsets[i] : trace.decode_offsets[i + 1]]
            np.testing.assert_array_equal(rows, routed.topk[s + p : s + p + o])


def test_domains_follow_the_mix_and_the_seed_decides_everything(fake_data: FakeData) -> None:
    first = _build(fake_data, mix=(("book", 3.0), ("github", 1.0)))
    again = _build(fake_data, mix=(("book", 3.0), ("github", 1.0)))
    other = _build(fake_data, mix=(("book", 3.0), ("github", 1.0)), seed=1)
    for part, size in ((first.calibration, 30), (~first.calibration, 90)):
        names, counts = np.unique(first.domain[part], return_counts=True)
        expected = allocate({"book": 3.0, "github": 1.0}, size)
        assert dict(zip(names.tolist(), counts.tolist(), strict=True)) == expected
    np.testing.assert_array_equal(first.prefill_counts, again.prefill_counts)
    np.testing.assert_array_equal(first.arrival_s, again.arrival_s)
    assert not np.array_equal(first.prefill_counts, other.prefill_counts)


def test_poisson_and_replayed_arrivals(fake_data: FakeData) -> None:
    poisson = _build(fake_data, rate=10.0, num_requests=100, num_calibration=0)
    gaps = np.diff(poisson.arrival_s)
    assert poisson.arrival_s[0] == 0.0 and 0.05 < gaps.mean() < 0.2
    replay = _build(fake_data, is_replay=True, num_requests=60, num_calibration=0)
    azure = load_azure(fake_data.root / "workloads" / "azure2023_conv.csv")
    np.testing.assert_allclose(replay.arrival_s[:50], azure.arrival_s)
    np.testing.assert_array_equal(replay.prompt_tokens[:50], np.clip(azure.prompt_tokens, 1, 64))
    assert np.all(np.diff(replay.arrival_s) > 0)  # tiled past the end, still sorted


def test_prompts_are_cut_to_fit_a_small_region(fake_data: FakeData) -> None:
    # 3000 tokens x 0.02 = 60 calibration positions; outputs up to 32, prompts up to 300
    trace = _build(fake_data, max_prompt=300, calibration_fraction=0.02, num_calibration=40)
    cal = trace.calibration
    assert np.all(trace.prompt_tokens[cal] + trace.output_tokens[cal] <= 60)
    assert trace.meta["clipping"]["cut_to_fit_region"] > 0


def test_replay_rows_tile_the_trace(fake_data: FakeData) -> None:
    azure = load_azure(fake_data.root / "workloads" / "azure2023_code.csv")
    rows, arrival = replay_rows(azure, 25)
    np.testing.assert_array_equal(rows, np.arange(25) % 9)
    assert np.all(np.diff(arrival) > 0)


def test_allocate_and_parse_mix() -> None:
    assert allocate({"a": 3600, "b": 2779, "c": 2744, "d": 2545}, 1000) == {
        "a": 309,
        "b": 238,
        "c": 235,
        "d": 218,
    }
    assert sum(allocate({"a": 1, "b": 1, "c": 1}, 10).values()) == 10
    assert parse_mix("book=2, github=1") == (("book", 2.0), ("github", 1.0))
    with pytest.raises(ConfigError, match="DOMAIN=WEIGHT"):
        parse_mix("book")
    with pytest.raises(InvalidInputError):
        allocate({"a": 0.0}, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_requests": 0}, "number of requests"),
        ({"num_requests": 5, "num_calibration": 6}, "calibration requests"),
        ({"num_requests": 5, "num_calibration": 0, "azure": "chat"}, "azure trace"),
        ({"num_requests": 5, "num_calibration": 0, "rate": 0.0}, "rate"),
        ({"num_requests": 5, "num_calibration": 0, "calibration_fraction": 1.0}, "fraction"),
        ({"num_requests": 5, "num_calibration": 0, "mix": (("c4", 1.0),)}, "mix must name"),
        ({"num_requests": 5, "num_calibration": 0, "mix": (("book", -1.0),)}, "non-negative"),
    ],
    ids=["no-requests", "too-many-calibration", "azure-kind", "rate", "fraction", "unknown-domain", "weight"],
)
def test_bad_configs_are_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OlmoeConfig(**fields)


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"tokenizer\.json not found"):
        build_olmoe_trace(tmp_path, OlmoeConfig(num_requests=5, num_calibration=0))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputFileError, match="not an Azure 2023 trace"):
        load_azure(bad)
