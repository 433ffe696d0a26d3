"""The demo data shipped in the package (src/eldr/data): valid, small, credited, reproducible."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from eldr.data import demo_partition_path, demo_trace_path
from eldr.partition import Partition
from eldr.trace.format import Trace

DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def test_demo_trace_and_partition_are_valid_and_small() -> None:
    trace = Trace.load(demo_trace_path())
    assert trace.num_requests == 4000 and trace.calibration is not None
    np.testing.assert_array_equal(trace.calibration, np.arange(4000) < 1000)
    assert trace.output_tokens.max() <= 512 and trace.domain is not None
    assert set(trace.domain.tolist()) == {"arxiv", "book", "github", "wikipedia"}
    assert demo_trace_path().stat().st_size < 4 * 2**20
    part = Partition.load(demo_partition_path())
    part.check_fits(num_workers=16, num_layers=trace.num_layers, num_experts=trace.num_experts)
    assert part.meta["num_requests"] == 1000


def test_notice_credits_the_sources() -> None:
    notice = files("eldr.data").joinpath("NOTICE").read_text(encoding="utf-8")
    assert "allenai/OLMoE" in notice and "Apache License, Version 2.0" in notice
    assert "AzurePublicDataset" in notice and "CC-BY-4.0" in notice


@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA_DIR / "olmoe" / "tokenizer.json").is_file(), reason=f"real OLMoE data not found at {DATA_DIR}"
)
def test_demo_trace_is_reproduced_from_the_shared_data() -> None:
    pytest.importorskip("tokenizers", reason="needs the 'trace' extra (tokenizers)")
    from eldr.trace.olmoe import OlmoeConfig, build_olmoe_trace

    shipped = Trace.load(demo_trace_path())
    config = OlmoeConfig(
        num_requests=4000, num_calibration=1000, rate=60.0, max_prompt=1024, max_output=512, seed=0
    )
    rebuilt = build_olmoe_trace(DATA_DIR, config)
    for name in ("prefill_counts", "decode_counts", "prompt_tokens", "output_tokens", "arrival_s", "domain"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(shipped, name))
