from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from olmoe_fake import FakeData

from eldr.cli import main
from eldr.trace.format import Trace


def test_info_prints_sizes_domains_and_statistics(
    make_tiny_trace: Callable[..., Trace], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.npz"
    make_tiny_trace().save(path)
    assert main(["trace", "info", str(path), "--json", "--batch-sizes", "1,2", "--steps", "10"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_requests"], info["num_layers"], info["num_experts"], info["top_k"]) == (2, 1, 4, 2)
    assert info["domains"] == {"a": 1, "b": 1} and info["num_calibration"] == 1
    assert info["has_exact_decode"] and info["conservation_violations"] == 0
    assert info["prompt_tokens"]["max"] == 2.0 and info["output_tokens"]["min"] == 1.0
    assert set(info["distinct_experts"]) == {"1", "2"}
    assert info["distinct_experts"]["1"]["reduction"]["all"] == 0.0
    assert main(["trace", "info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "N=2" in text and "prefill-decode correlation" in text and "same-domain" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not an npz", "cannot read trace"),
        (None, "missing"),
        (b"", "cannot read trace"),
    ],
    ids=["garbage", "missing-arrays", "empty"],
)
def test_info_on_a_bad_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "bad.npz"
    if content is None:
        np.savez(path, prefill_counts=np.ones((1, 1, 2)))
    else:
        path.write_bytes(content)
    assert main(["trace", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eldr trace: error:") and message in err


def test_info_on_invalid_values_is_exit_2(
    make_tiny_trace: Callable[..., Trace], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = {
        name: getattr(make_tiny_trace(), name) for name in ("prefill_counts", "decode_counts", "layers")
    }
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        **arrays,
        prompt_tokens=np.array([2, 1]),
        output_tokens=np.array([2, 1]),
        arrival_s=np.array([1.0, 0.0]),
        top_k=2,
        num_model_layers=4,
    )
    assert main(["trace", "info", str(path)]) == 2
    assert "arrival_s must be finite and sorted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # flags are checked when parsed, before the file is read
        main(["trace", "info", str(path), "--batch-sizes", "x"])
    assert exc.value.code == 2 and "--batch-sizes" in capsys.readouterr().err


def test_build_then_info(fake_data: FakeData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "olmoe.npz"
    argv = ["trace", "build", "olmoe", "--data-dir", str(fake_data.root), "--num-requests", "80"]
    argv += [
        "--calibration",
        "20",
        "--max-prompt",
        "50",
        "--max-output",
        "20",
        "--exact-decode",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    trace = Trace.load(out)
    assert trace.num_requests == 80 and trace.decode_topk is not None and trace.meta["source"] == "olmoe"
    assert "Apache-2.0" in trace.meta["attribution"] and "CC-BY-4.0" in trace.meta["attribution"]
    assert main(["trace", "info", str(out), "--json", "--steps", "20"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_calibration"] == 20 and sum(info["domains"].values()) == 80


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data-dir", "/nonexistent/data"], "not found"),
        (["--mix", "book"], "DOMAIN=WEIGHT"),
        (["--mix", "c4=1"], "mix must name"),
        (["--calibration", "99"], "calibration requests"),
    ],
    ids=["no-data", "bad-mix", "unknown-domain", "too-many-calibration"],
)
def test_build_bad_input_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = [
        "trace",
        "build",
        "olmoe",
        "--num-requests",
        "10",
        "--calibration",
        "0",
        "--out",
        str(tmp_path / "t.npz"),
    ]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_info_without_domains_skips_the_batch_comparison(
    make_tiny_trace: Callable[..., Trace], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.npz"
    make_tiny_trace(domain=None).save(path)
    assert main(["trace", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["domains"] == {} and info["distinct_experts"] == {}
    assert set(info["request_correlation"]) == {"all"}
    assert main(["trace", "info", str(path)]) == 0
    assert "n/a (the trace has no domain labels)" in capsys.readouterr().out


def test_info_tolerates_foreign_meta(
    make_tiny_trace: Callable[..., Trace], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.npz"
    make_tiny_trace(meta={"source": "someone's script", "clipping": {"prompts": 3}}).save(path)
    assert main(["trace", "info", str(path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "source: someone's script  (no attribution recorded)" in out and "clipped when built" not in out


def test_build_without_the_tokenizer_extra_is_one_line(
    fake_data: FakeData, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    argv = ["trace", "build", "olmoe", "--data-dir", str(fake_data.root), "--num-requests", "5"]
    assert main([*argv, "--calibration", "0", "--out", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'eldr[trace]'" in err
