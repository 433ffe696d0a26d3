from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eldr.errors import EldrError, InputFileError, InvalidInputError
from eldr.trace.format import Trace


def test_round_trip_keeps_every_array_and_meta(make_tiny_trace: Callable[..., Trace], tmp_path: Path) -> None:
    trace = make_tiny_trace(text_offset=np.array([5, 9]), meta={"source": "test", "n": 1})
    trace.save(tmp_path / "t.npz")
    loaded = Trace.load(tmp_path / "t.npz")
    for name in ("prefill_counts", "decode_counts", "prompt_tokens", "output_tokens", "arrival_s", "layers"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    for name in ("domain", "calibration", "decode_topk", "decode_offsets", "text_offset"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    assert (loaded.top_k, loaded.num_model_layers, loaded.meta) == (2, 4, {"source": "test", "n": 1})
    assert (loaded.num_requests, loaded.num_layers, loaded.num_experts) == (2, 1, 4)


def test_a_trace_written_by_hand_with_numpy_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # the example of docs/trace-format.md (the same statements, formatted by ruff)
    rng = np.random.default_rng(0)
    n, num_layers, num_experts, k = 100, 2, 16, 2
    prompt, output = rng.integers(1, 200, n), rng.integers(1, 50, n)
    uniform = np.ones(num_experts) / num_experts
    prefill = np.stack([rng.multinomial(p * k, uniform, size=num_layers) for p in prompt])  # [N, L, E]
    decode = np.stack([rng.multinomial(o * k, uniform, size=num_layers) for o in output])  # [N, L, E]
    np.savez(
        "hand.npz",
        prefill_counts=prefill,
        decode_counts=decode,
        prompt_tokens=prompt,
        output_tokens=output,
        arrival_s=np.cumsum(rng.exponential(1 / 20, n)),
        top_k=k,
        layers=np.array([0, 1]),
        num_model_layers=2,
        domain=np.where(np.arange(n) % 2 == 0, "math", "code"),
    )
    trace = Trace.load(tmp_path / "hand.npz")
    assert trace.num_requests == n and trace.domain is not None and trace.meta == {}
    assert trace.num_layers == num_layers and trace.num_experts == num_experts and trace.top_k == k


BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("negative-count", {"prefill_counts": np.array([[[-1, 1, 1, 0]], [[0, 0, 1, 1]]])}, "negative"),
    ("fractional-count", {"decode_counts": np.array([[[2.5, 1, 1, 0]], [[0, 0, 1, 1]]])}, "whole"),
    ("2d-counts", {"prefill_counts": np.array([[2, 1, 1, 0], [0, 0, 1, 1]])}, "3 dimensions"),
    ("decode-shape", {"decode_counts": np.zeros((2, 1, 5), dtype=int)}, "differs"),
    ("prompt-shape", {"prompt_tokens": np.array([2, 1, 3])}, "prompt_tokens has shape"),
    ("zero-prompt", {"prompt_tokens": np.array([0, 1])}, "prompt_tokens must be >= 1"),
    ("unsorted-arrival", {"arrival_s": np.array([1.0, 0.5])}, "sorted"),
    ("nan-arrival", {"arrival_s": np.array([0.0, np.nan])}, "finite"),
    ("top-k", {"top_k": 0}, "top_k"),
    ("layers-shape", {"layers": np.array([0, 1])}, "layers has shape"),
    ("layer-beyond-model", {"layers": np.array([4])}, "do not fit"),
    ("domain-shape", {"domain": np.array(["a"])}, "domain has shape"),
    ("domain-dtype", {"domain": np.array([1, 2])}, "strings"),
    ("calibration-dtype", {"calibration": np.array([1, 0])}, "boolean"),
    ("text-offset", {"text_offset": np.array([-1, 3])}, "text_offset"),
    ("topk-alone", {"decode_offsets": None}, "come together"),
    ("offsets-start", {"decode_offsets": np.array([1, 2, 3])}, "start at 0"),
    ("offsets-vs-output", {"decode_offsets": np.array([0, 1, 3])}, "as many rows"),
    ("topk-shape", {"decode_topk": np.zeros((3, 1, 3), dtype=np.uint8)}, "decode_topk has shape"),
    ("topk-range", {"decode_topk": np.array([[[0, 1]], [[0, 2]], [[2, 4]]])}, "lie in"),
    ("topk-sum", {"decode_topk": np.array([[[0, 1]], [[0, 3]], [[2, 3]]])}, "add up"),
]


@pytest.mark.parametrize(
    ("fields", "message"), [(f, m) for _, f, m in BAD_FIELDS], ids=[i for i, _, _ in BAD_FIELDS]
)
def test_malformed_trace_is_rejected_with_a_clear_message(
    make_tiny_trace: Callable[..., Trace], fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        make_tiny_trace(**fields)


def _save_raw(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _good_arrays() -> dict[str, Any]:
    return {
        "prefill_counts": np.ones((2, 1, 4), dtype=np.int64),
        "decode_counts": np.ones((2, 1, 4), dtype=np.int64),
        "prompt_tokens": np.array([2, 2]),
        "output_tokens": np.array([2, 2]),
        "arrival_s": np.array([0.0, 1.0]),
        "top_k": np.int64(2),
        "layers": np.array([0]),
        "num_model_layers": np.int64(1),
    }


def test_bad_files_raise_input_file_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(InputFileError, match="cannot read trace"):
        Trace.load(garbage)
    with pytest.raises(InputFileError, match="cannot read trace"):
        Trace.load(tmp_path / "absent.npz")
    missing = {k: v for k, v in _good_arrays().items() if k != "arrival_s"}
    with pytest.raises(InputFileError, match=r"missing \['arrival_s'\]"):
        Trace.load(_save_raw(tmp_path / "missing.npz", **missing))
    with pytest.raises(InputFileError, match="top_k must be a scalar"):
        Trace.load(_save_raw(tmp_path / "k.npz", **{**_good_arrays(), "top_k": np.array([2, 2])}))
    with pytest.raises(InputFileError, match="meta"):
        Trace.load(_save_raw(tmp_path / "meta.npz", **_good_arrays(), meta=np.asarray("{not json")))
    pickled = {**_good_arrays(), "domain": np.array([{"a": 1}, None], dtype=object)}
    with pytest.raises(InputFileError):
        Trace.load(_save_raw(tmp_path / "pickled.npz", **pickled))
    with pytest.raises(InvalidInputError, match=r"unsorted\.npz: arrival_s"):
        Trace.load(
            _save_raw(tmp_path / "unsorted.npz", **{**_good_arrays(), "arrival_s": np.array([2.0, 1.0])})
        )
    assert Trace.load(_save_raw(tmp_path / "good.npz", **_good_arrays())).num_requests == 2


def test_meta_is_json(make_tiny_trace: Callable[..., Trace], tmp_path: Path) -> None:
    make_tiny_trace(meta={"a": [1, 2]}).save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as data:
        assert json.loads(str(data["meta"])) == {"a": [1, 2]}


def test_every_error_is_an_eldr_error() -> None:
    assert issubclass(InvalidInputError, EldrError) and issubclass(InputFileError, EldrError)
