"""The OLMoE builder on the real shared data (../shared/data beside the project root; skipped if absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eldr.trace.format import Trace
from eldr.trace.olmoe import (
    DOMAINS,
    LAYERS,
    NUM_EXPERTS,
    TOP_K,
    OlmoeConfig,
    build_olmoe_trace,
    load_tokenizer,
    route_domain,
)
from eldr.trace.sampling import topk_from_counts
from eldr.trace.stats import batch_locality, correlations, distinct_experts

DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "olmoe" / "tokenizer.json").is_file(),
    reason=f"real OLMoE routing data not found at {DATA_DIR} (the project's ../shared/data)",
)
pytestmark = [needs_data, pytest.mark.slow]


def test_tokens_seen_once_reproduce_their_recorded_routing() -> None:
    pytest.importorskip("tokenizers", reason="needs the 'trace' extra (tokenizers)")
    domain = "arxiv"
    routed = route_domain(DATA_DIR, domain, load_tokenizer(DATA_DIR), np.random.default_rng(0))
    assert routed.num_positions == 208_896 and routed.num_fallback == 0
    tokens = load_tokenizer(DATA_DIR).encode(
        (DATA_DIR / "olmoe" / "text" / f"{domain}.txt").read_text(encoding="utf-8")[: 5 * 208_896],
        add_special_tokens=False,
    )
    ids = np.asarray(tokens.ids[:208_896])
    with np.load(DATA_DIR / "olmoe" / f"token_routing_{domain}.npz") as data:
        for idx, layer in enumerate(LAYERS):
            tid, eid, cnt = (data[f"layer{layer}_{x}"] for x in ("token_id", "expert_id", "count"))
            table = np.zeros((int(max(tid.max(), ids.max())) + 1, NUM_EXPERTS), dtype=np.int64)
            np.add.at(table, (tid, eid), cnt)
            once = table.sum(axis=1) == TOP_K  # ids that occur once in the routed text
            positions = np.flatnonzero(once[ids])
            assert positions.size > 1000
            recorded = np.sort(np.nonzero(table[ids[positions]])[1].reshape(-1, TOP_K), axis=1)
            np.testing.assert_array_equal(routed.topk[positions, idx], recorded)


def test_real_trace_conserves_counts_and_separates_calibration() -> None:
    pytest.importorskip("tokenizers", reason="needs the 'trace' extra (tokenizers)")
    mix = (("book", 1.0), ("wikipedia", 1.0))
    config = OlmoeConfig(num_requests=600, num_calibration=200, mix=mix, seed=3, is_exact_decode=True)
    trace = build_olmoe_trace(DATA_DIR, config)
    assert np.all(trace.prefill_counts.sum(axis=2) == trace.prompt_tokens[:, None] * TOP_K)
    assert np.all(trace.decode_counts.sum(axis=2) == trace.output_tokens[:, None] * TOP_K)
    assert trace.prompt_tokens.max() <= 1024 and trace.output_tokens.max() <= 512
    assert trace.text_offset is not None and trace.calibration is not None
    end = trace.text_offset + trace.prompt_tokens + trace.output_tokens
    for name, _ in mix:
        split = trace.meta["calibration_split"][name]
        cal = trace.calibration & (trace.domain == name)
        assert np.all(end[cal] <= split) and np.all(
            trace.text_offset[~trace.calibration & (trace.domain == name)] >= split
        )
    corr = correlations(trace)
    assert all(np.isfinite(v) for v in corr.request.values())
    locality = batch_locality(trace, 16, num_steps=400)
    assert 0 < locality.same_overall <= NUM_EXPERTS and 0 < locality.mixed <= NUM_EXPERTS
    # decode steps drawn from the counts (systematic sampling) match the exact per-token choices
    sampled = batch_locality(
        Trace(**{**trace.__dict__, "decode_topk": None, "decode_offsets": None}), 16, 400
    )
    assert sampled.mixed == pytest.approx(locality.mixed, rel=0.02)
    assert sampled.same_overall == pytest.approx(locality.same_overall, rel=0.02)
    # successive sampling (Gumbel top-k over counts / sum) flattens the per-token distribution: more distinct
    # experts than the exact tokens; systematic sampling matches them (docs/trace-format.md)
    assert trace.decode_topk is not None and trace.decode_offsets is not None
    rng = np.random.default_rng(0)
    picks = rng.choice(trace.num_requests, size=(400, 16))
    flat = picks.ravel()
    lo = trace.decode_offsets[flat]
    width = trace.decode_offsets[flat + 1] - lo
    exact = trace.decode_topk[lo + (rng.random(flat.size) * width).astype(np.int64)].astype(np.int64)
    systematic = topk_from_counts(trace.decode_counts[flat], trace.output_tokens[flat], TOP_K, rng)
    with np.errstate(divide="ignore"):
        keys = np.log(trace.decode_counts[flat].astype(np.float64)) + rng.gumbel(
            size=(flat.size, trace.num_layers, NUM_EXPERTS)
        )
    gumbel = np.argsort(-keys, axis=2)[:, :, :TOP_K]
    exact_d, syst_d, gumbel_d = (
        distinct_experts(x.reshape(400, 16, trace.num_layers, TOP_K), NUM_EXPERTS).mean()
        for x in (exact, systematic, gumbel)
    )
    assert abs(syst_d - exact_d) < 0.01 * exact_d < gumbel_d - exact_d
    assert set(trace.domain.tolist()) == {"book", "wikipedia"} and set(DOMAINS) >= set(locality.same)
