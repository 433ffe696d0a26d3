"""Every numeric or textual flag, given a bad value: refused when parsed (or before any work), one line.

Nothing is reinterpreted: `--num-calibration=-5` is not "all but 5" and `--max-batch 0` is not "the
default". Upper bounds keep a typo from allocating without bound (docs/limits.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from badfiles import Refused

GOOD = "{good}"  # replaced by the good file of the kind named after the colon, e.g. {good}:trace
OUT = "{out}"

FIT = ["fit", "--calibration", f"{GOOD}:calibration", "--workers", "2", "--out", OUT]
ROUTE = ["route", "--partition", f"{GOOD}:partition", "--counts", f"{GOOD}:counts", "--loads", "0,1"]
SIMULATE = ["simulate", "--trace", f"{GOOD}:trace", "--workers", "2", "--policies", "rr", "--json"]
INFO = ["trace", "info", f"{GOOD}:trace", "--json"]
BUILD = ["trace", "build", "olmoe", "--data-dir", "/nonexistent", "--num-requests", "10", "--out", OUT]
CAPTURE = ["capture", "--engine", "http://127.0.0.1:9", "--prompts", f"{GOOD}:prompts", "--out", OUT]
SERVE = ["serve", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--policy", "rr"]
DEMO = ["demo", "--no-plot", "--json"]

CASES: list[tuple[str, list[str], list[str], str]] = [
    # (id, base argv, extra flags, expected text)
    ("fit-workers-zero", FIT, ["--workers", "0"], "--workers: must be an integer in [1, 4096]"),
    ("fit-workers-negative", FIT, ["--workers", "-1"], "--workers"),
    ("fit-workers-huge", FIT, ["--workers", "100000000"], "--workers"),
    ("fit-workers-float", FIT, ["--workers", "2.5"], "--workers"),
    ("fit-workers-exponent", FIT, ["--workers", "1e3"], "--workers"),
    ("fit-workers-empty", FIT, ["--workers", ""], "--workers"),
    ("fit-seed-negative", FIT, ["--seed", "-1"], "--seed: must be an integer in [0,"),
    ("fit-seed-huge", FIT, ["--seed", str(2**64)], "--seed"),
    ("fit-max-iter-zero", FIT, ["--max-iter", "0"], "--max-iter"),
    ("fit-max-iter-huge", FIT, ["--max-iter", "1000000"], "--max-iter"),
    ("fit-pairs-small", FIT, ["--pairs", "9"], "--pairs"),
    ("fit-pairs-huge", FIT, ["--pairs", "1000000000"], "--pairs"),
    ("fit-kmeans", FIT, ["--kmeans", "bogus"], "--kmeans"),
    ("route-loads-text", ROUTE, ["--loads", "a,b"], "--loads"),
    ("route-loads-negative", ROUTE, ["--loads", "1,-2"], "--loads"),
    ("route-loads-int64", ROUTE, ["--loads", f"1,{2**70}"], "--loads"),
    ("route-loads-empty", ROUTE, ["--loads", ""], "--loads"),
    ("route-loads-gap", ROUTE, ["--loads", "1,,2"], "--loads"),
    ("route-loads-nan", ROUTE, ["--loads", "nan,1"], "--loads"),
    ("route-loads-too-many", ROUTE, ["--loads", ",".join(["0"] * 4097)], "--loads: takes at most 4096"),
    ("route-loads-count", ROUTE, ["--loads", "0,0,0"], "fitted for 2 decode workers, this setup has 3"),
    ("route-tau-inf", ROUTE, ["--tau", "inf"], "--tau"),
    ("sim-workers-huge", SIMULATE, ["--workers", "100000000"], "--workers"),
    ("sim-rate-zero", SIMULATE, ["--rate", "0"], "--rate: must be a finite number in (0, 1e+06]"),
    ("sim-rate-negative", SIMULATE, ["--rate", "-1"], "--rate"),
    ("sim-rate-nan", SIMULATE, ["--rate", "nan"], "--rate"),
    ("sim-rate-inf", SIMULATE, ["--rate", "inf"], "--rate"),
    ("sim-seed-negative", SIMULATE, ["--seed", "-3"], "--seed"),
    ("sim-num-calibration-negative", SIMULATE, ["--num-calibration=-5"], "--num-calibration"),
    ("sim-num-calibration-zero", SIMULATE, ["--num-calibration", "0"], "--num-calibration"),
    ("sim-max-batch-zero", SIMULATE, ["--max-batch", "0"], "--max-batch"),
    ("sim-max-batch-huge", SIMULATE, ["--max-batch", "10000000"], "--max-batch"),
    ("sim-kv-capacity-zero", SIMULATE, ["--kv-capacity", "0"], "--kv-capacity"),
    ("sim-requests-zero", SIMULATE, ["--requests", "0"], "--requests"),
    ("sim-requests-negative", SIMULATE, ["--requests", "-1"], "--requests"),
    ("sim-output-tokens-zero", SIMULATE, ["--output-tokens", "0"], "--output-tokens"),
    ("sim-output-tokens-huge", SIMULATE, ["--output-tokens", "1000000000"], "--output-tokens"),
    ("sim-tau-nan", SIMULATE, ["--tau", "nan"], "--tau"),
    ("sim-refit-every-zero", SIMULATE, ["--refit-every", "0"], "--refit-every"),
    ("sim-refit-window-huge", SIMULATE, ["--refit-window", "100001"], "--refit-window"),
    ("sim-refit-window-workers", SIMULATE, ["--policies", "eldr-refit", "--refit-window", "1"], "window 1"),
    ("sim-cost-model", SIMULATE, ["--cost-model", "bogus"], "--cost-model"),
    ("sim-policies-empty", SIMULATE, ["--policies", ","], "unknown policies"),
    ("sim-workers-vs-calibration", SIMULATE, ["--workers", "4096", "--policies", "eldr"], "cannot fit"),
    ("demo-workers-huge", DEMO, ["--workers", "100000000"], "--workers"),
    ("demo-output-tokens-huge", DEMO, ["--output-tokens", "1000000000"], "--output-tokens"),
    ("demo-max-batch-zero", DEMO, ["--max-batch", "0"], "--max-batch"),
    ("demo-num-calibration-negative", DEMO, ["--num-calibration=-5"], "--num-calibration"),
    ("demo-plan-too-big", DEMO, ["--output-tokens", "1048576"], "token plan"),
    ("info-batch-sizes-text", INFO, ["--batch-sizes", "x"], "--batch-sizes"),
    ("info-batch-sizes-zero", INFO, ["--batch-sizes", "0,16"], "--batch-sizes"),
    ("info-batch-sizes-empty", INFO, ["--batch-sizes", ""], "--batch-sizes"),
    ("info-batch-sizes-huge", INFO, ["--batch-sizes", "100000"], "--batch-sizes"),
    ("info-batch-sizes-many", INFO, ["--batch-sizes", ",".join(["1"] * 17)], "--batch-sizes"),
    ("info-steps-zero", INFO, ["--steps", "0"], "--steps"),
    ("info-steps-huge", INFO, ["--steps", "1000000"], "--steps"),
    ("info-seed-negative", INFO, ["--seed", "-1"], "--seed"),
    ("info-sample-too-big", INFO, ["--steps", "100000", "--batch-sizes", "65536"], "above the limit"),
    ("build-num-requests-zero", BUILD, ["--num-requests", "0"], "--num-requests"),
    ("build-num-requests-huge", BUILD, ["--num-requests", "100000000"], "--num-requests"),
    ("build-rate-nan", BUILD, ["--rate", "nan"], "--rate"),
    ("build-max-prompt-zero", BUILD, ["--max-prompt", "0"], "--max-prompt"),
    ("build-max-output-huge", BUILD, ["--max-output", "10000000"], "--max-output"),
    ("build-calibration-negative", BUILD, ["--calibration", "-1"], "--calibration"),
    ("build-fraction-one", BUILD, ["--calibration-fraction", "1"], "--calibration-fraction"),
    ("build-fraction-nan", BUILD, ["--calibration-fraction", "nan"], "--calibration-fraction"),
    ("build-seed-negative", BUILD, ["--seed", "-1"], "--seed"),
    ("build-mix-empty", BUILD, ["--mix", ""], "--mix"),
    ("capture-engine-file", CAPTURE, ["--engine", "file:///etc/passwd"], "--engine"),
    ("capture-engine-empty", CAPTURE, ["--engine", ""], "--engine"),
    ("capture-engine-port", CAPTURE, ["--engine", "http://127.0.0.1:99999"], "--engine"),
    ("capture-engine-path", CAPTURE, ["--engine", "http://127.0.0.1:1/v1"], "--engine"),
    ("capture-decode-tokens-negative", CAPTURE, ["--decode-tokens", "-1"], "--decode-tokens"),
    ("capture-decode-tokens-huge", CAPTURE, ["--decode-tokens", "1000000000"], "--decode-tokens"),
    ("capture-concurrency-zero", CAPTURE, ["--concurrency", "0"], "--concurrency"),
    ("capture-concurrency-huge", CAPTURE, ["--concurrency", "1000000"], "--concurrency"),
    ("capture-timeout-zero", CAPTURE, ["--timeout", "0"], "--timeout"),
    ("capture-timeout-nan", CAPTURE, ["--timeout", "nan"], "--timeout"),
    ("capture-timeout-inf", CAPTURE, ["--timeout", "inf"], "--timeout"),
    ("capture-model-empty", CAPTURE, ["--model", ""], "--model"),
    ("serve-port-negative", SERVE, ["--port", "-1"], "--port"),
    ("serve-port-huge", SERVE, ["--port", "70000"], "--port"),
    ("serve-keep-alive-inf", SERVE, ["--keep-alive-s", "inf"], "--keep-alive-s"),
    ("serve-keep-alive-nan", SERVE, ["--keep-alive-s", "nan"], "--keep-alive-s"),
    ("serve-keep-alive-zero", SERVE, ["--keep-alive-s", "0"], "--keep-alive-s"),
    ("serve-max-concurrency-zero", SERVE, ["--max-concurrency", "0"], "--max-concurrency"),
    ("serve-max-attempts-zero", SERVE, ["--max-attempts", "0"], "--max-attempts"),
    ("serve-max-body-huge", SERVE, ["--max-body-bytes", str(10**12)], "--max-body-bytes"),
    ("serve-seed-negative", SERVE, ["--seed", "-1"], "--seed"),
    ("serve-timeout-inf", SERVE, ["--decode-timeout-s", "inf"], "--decode-timeout-s"),
    ("serve-host-empty", SERVE, ["--host", ""], "--host: must not be empty"),
    ("serve-api-key-empty", SERVE, ["--api-key", ""], "--api-key: must not be empty"),
    ("serve-admin-token-empty", SERVE, ["--admin-token", ""], "--admin-token"),
    ("serve-prefill-file", SERVE, ["--prefill", "file:///x"], "--prefill"),
    ("serve-decode-empty", SERVE, ["--decode", ""], "--decode"),
    ("serve-tau-nan", SERVE, ["--tau", "nan"], "--tau"),
    ("serve-config-empty", SERVE, ["--config", ""], "--config"),
    ("serve-refit-window-huge", SERVE, ["--refit-window", "100000000"], "--refit-window"),
]


def _argv(base: list[str], extra: list[str], good: dict[str, Path], out: Path) -> list[str]:
    argv = []
    for item in [*base, *extra]:
        if item.startswith(GOOD):
            item = str(good[item.split(":", 1)[1]])
        argv.append(str(out) if item == OUT else item)
    return argv


@pytest.fixture
def flag_files(good: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", encoding="utf-8")
    return {**good, "prompts": prompts}


@pytest.mark.parametrize(("base", "extra", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_flag_is_refused_before_any_work(
    refused: Refused,
    flag_files: dict[str, Path],
    tmp_path: Path,
    base: list[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out" / "result.npz"
    out.parent.mkdir()
    err = refused(_argv(base, extra, flag_files, out), folder=out.parent)
    assert message in err, err


def test_every_numeric_flag_documents_its_range() -> None:
    """--help names the range of each bounded flag (the parse-time rule is what the text says)."""
    from eldr.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert isinstance(commands, dict)

    def text(name: str) -> str:
        return " ".join(commands[name].format_help().split())

    assert "1 to 4096" in text("fit") and "0 to 2147483647" in text("route")
    assert "1 to 1048576" in text("simulate") and "1 to 65536" in text("simulate")
    assert "(0, 86400]" in text("capture") and "--allow-public-host" in text("serve")
