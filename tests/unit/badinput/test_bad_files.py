"""Every file eldr reads, broken in every way we could think of: one line naming it, exit 2, nothing left.

Each case builds its file from a valid one (badfiles.py) and runs every command that reads that kind
of file, in-process through `eldr.cli.main`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badfiles import (
    Arrays,
    Refused,
    calibration_arrays,
    npy_bytes,
    npy_header_bytes,
    partition_arrays,
    replace_member,
    trace_arrays,
    write_lying_npz,
    write_npz,
    write_zip,
)

Maker = Callable[[Path], Path]


def changed(base: Callable[[], Arrays], **changes: Any) -> Maker:
    """A file of `base()` arrays with `changes` applied (None drops an array)."""

    def make(path: Path) -> Path:
        arrays = {**base(), **changes}
        return write_npz(path, {k: v for k, v in arrays.items() if v is not None})

    return make


def edited(base: Callable[[], Arrays], name: str, edit: Callable[[Any], Any]) -> Maker:
    def make(path: Path) -> Path:
        arrays = base()
        arrays[name] = edit(np.array(arrays[name]))
        return write_npz(path, arrays)

    return make


def raw_member(base: Callable[[], Arrays], name: str, raw: bytes) -> Maker:
    return lambda path: replace_member(path, base(), name, raw)


def raw_file(content: bytes) -> Maker:
    def make(path: Path) -> Path:
        path.write_bytes(content)
        return path

    return make


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def device(_: Path) -> Path:
    return Path("/dev/zero")


def many_members(path: Path) -> Path:
    return write_zip(path, {f"a{i}.npy": b"" for i in range(1500)})


def huge_declared(base: Callable[[], Arrays], name: str, size: int) -> Maker:
    """Member `name` declares `size` (or -1) along every axis of its rank, and holds no data."""
    array = np.asarray(base()[name])
    descr = np.lib.format.dtype_to_descr(array.dtype)
    return raw_member(base, name, npy_header_bytes((size,) * array.ndim, descr))


def lying_zip(base: Callable[[], Arrays], name: str) -> Maker:
    """A few KiB on disk; the zip says member `name` holds 3 GiB, and its header agrees."""
    array = np.asarray(base()[name])
    shape = (3 * 2**30 // array.dtype.itemsize,) + (1,) * (array.ndim - 1)
    data = npy_header_bytes(shape, np.lib.format.dtype_to_descr(array.dtype)) + bytes(1024)
    return lambda path: write_lying_npz(path, base(), name, data, 3 * 2**30 + 128)


def with_nan(value: Any) -> Any:
    out = np.asarray(value, dtype=np.float64).copy()
    out.flat[0] = np.nan
    return out


def with_inf(value: Any) -> Any:
    out = np.asarray(value, dtype=np.float64).copy()
    out.flat[-1] = np.inf
    return out


def with_negative(value: Any) -> Any:
    out = np.asarray(value).copy()
    out.flat[0] = -1
    return out


def as_objects(value: Any) -> Any:
    return np.asarray(value).astype(object)


def not_utf8(length: int) -> Any:
    return np.array([b"\xff\xfe"] * length)


def bad_code_points(length: int) -> Any:
    return np.full(length, 0xD800, dtype="<u4").view("<U1")


def bad_npy_version(base: Callable[[], Arrays], name: str) -> Maker:
    raw = bytearray(npy_bytes(np.asarray(base()[name])))
    raw[6] = 9  # format version 9.0
    return raw_member(base, name, bytes(raw))


def truncated(base: Callable[[], Arrays], name: str) -> Maker:
    raw = npy_bytes(np.asarray(base()[name]))
    return raw_member(base, name, raw[: len(raw) - 16])


STRUCTURE: list[tuple[str, Callable[[Callable[[], Arrays], str], Maker], str]] = [
    ("object-array", lambda b, n: edited(b, n, as_objects), "Python objects"),
    ("complex", lambda b, n: edited(b, n, lambda v: v.astype(np.complex128)), "must hold"),
    ("text", lambda b, n: edited(b, n, lambda v: v.astype(str)), "must hold"),
    ("huge-shape", lambda b, n: huge_declared(b, n, 10**5), "declares shape"),
    ("negative-dim", lambda b, n: huge_declared(b, n, -1), "negative dimension"),
    ("npy-version", bad_npy_version, "not supported"),
    ("truncated", truncated, "declares shape"),
    ("garbage-member", lambda b, n: raw_member(b, n, b"\x93NUMPY\x01\x00garbage"), "cannot read"),
    ("lying-zip", lying_zip, "above the limit"),
]
WHOLE_FILE: list[tuple[str, Maker, str]] = [
    ("empty", raw_file(b""), "cannot read"),
    ("garbage", raw_file(b"not a zip archive at all"), "cannot read"),
    ("fifo", fifo, "a FIFO, not a regular file"),
    ("folder", folder, "a folder, not a regular file"),
    ("dev-zero", device, "a character device"),
    ("many-members", many_members, "members"),
]


def _structure_cases(base: Callable[[], Arrays], names: list[str]) -> list[tuple[str, Maker, str]]:
    return [
        (f"{name}-{case}", make(base, name), message)
        for name in names
        for case, make, message in STRUCTURE
        if not (case in ("text", "complex") and name in ("labels", "domain", "meta"))
    ]


C, P, T = calibration_arrays, partition_arrays, trace_arrays
CALIBRATION: list[tuple[str, Maker, str]] = [
    *WHOLE_FILE,
    *_structure_cases(C, ["prefill_counts"]),
    ("no-prefill", changed(C, prefill_counts=None), "no 'prefill_counts'"),
    ("prefill-2d", edited(C, "prefill_counts", lambda v: v[:, 0]), "prefill_counts must have 3 dimensions"),
    ("prefill-nan", edited(C, "prefill_counts", with_nan), "NaN"),
    ("prefill-inf", edited(C, "prefill_counts", with_inf), "infinite"),
    ("prefill-negative", edited(C, "prefill_counts", with_negative), "negative"),
    ("prefill-fraction", edited(C, "prefill_counts", lambda v: v + 0.5), "whole"),
    ("prefill-huge", edited(C, "prefill_counts", lambda v: v * 1e15), "above"),
    ("prefill-uint64-wrap", edited(C, "prefill_counts", lambda v: v.astype(np.uint64) + 2**63), "above"),
    ("prefill-empty", edited(C, "prefill_counts", lambda v: v[:0]), "empty"),
    ("prefill-all-zero", edited(C, "prefill_counts", np.zeros_like), "all zero"),
    ("decode-shape", edited(C, "decode_counts", lambda v: v[:-1]), "decode_counts has shape"),
    ("decode-nan", edited(C, "decode_counts", with_nan), "decode_counts contains NaN"),
    ("labels-length", edited(C, "labels", lambda v: v[:-1]), "labels has shape"),
    ("labels-numbers", edited(C, "labels", lambda v: np.arange(v.size)), "labels must hold text"),
    ("labels-not-utf8", edited(C, "labels", lambda v: not_utf8(v.size)), "UTF-8"),
    ("labels-code-points", edited(C, "labels", lambda v: bad_code_points(v.size)), "invalid text"),
    ("top_k-text", changed(C, top_k=np.str_("8")), "top_k must hold"),
    ("top_k-nan", changed(C, top_k=np.float64("nan")), "top_k must be a whole number"),
    ("top_k-fraction", changed(C, top_k=2.5), "top_k must be a whole number"),
    ("top_k-zero", changed(C, top_k=0), "top_k must lie in"),
    ("top_k-above-E", changed(C, top_k=99), "top_k must lie in"),
    ("top_k-vector", changed(C, top_k=np.array([2, 2])), "top_k must be a scalar"),
    ("top_k-bool", changed(C, top_k=True), "top_k must hold"),
    ("flags-int", changed(C, calibration=np.ones(40, dtype=np.int64)), "calibration must hold booleans"),
    ("flags-none", changed(C, calibration=np.zeros(40, dtype=bool)), "no request is flagged"),
    ("flags-length", changed(C, calibration=np.ones(3, dtype=bool)), "one flag per request"),
    ("no-usable-signature", changed(C, prefill_counts=np.ones((40, 2, 8)) * 3), "weight zero"),
]
PARTITION: list[tuple[str, Maker, str]] = [
    *WHOLE_FILE,
    *_structure_cases(P, ["centroids", "idf", "worker_of"]),
    ("not-a-partition", lambda p: write_npz(p, {"x": np.ones(3)}), "not an eldr partition"),
    ("no-centroids", changed(P, centroids=None), "missing ['centroids']"),
    ("no-meta", changed(P, meta=None), "missing ['meta']"),
    ("centroid-nan", edited(P, "centroids", with_nan), "centroids must be finite"),
    ("centroid-inf", edited(P, "centroids", with_inf), "centroids must be finite"),
    ("centroid-zero", edited(P, "centroids", lambda v: np.vstack([v[:1], 0 * v[1:]])), "norm 0"),
    ("centroid-not-unit", edited(P, "centroids", lambda v: 2 * v), "unit vectors"),
    (
        "centroid-ints",
        edited(P, "centroids", lambda v: (v > 0).astype(np.int64)),
        "centroids must hold floats",
    ),
    ("centroid-1d", edited(P, "centroids", lambda v: v[0]), "centroids must have 2 dimensions"),
    ("centroid-none", edited(P, "centroids", lambda v: v[:0]), "centroids must have shape"),
    ("centroid-dim", edited(P, "centroids", lambda v: _unit(v[:, :-1])), "dimension"),
    ("idf-nan", edited(P, "idf", with_nan), "idf must be non-empty, finite and in [0, 1000]"),
    ("idf-inf", edited(P, "idf", with_inf), "idf must be non-empty, finite and in [0, 1000]"),
    ("idf-negative", edited(P, "idf", lambda v: -v), "idf must be non-empty, finite and in [0, 1000]"),
    ("idf-huge", edited(P, "idf", lambda v: v + 1e30), "idf must be non-empty, finite and in [0, 1000]"),
    ("idf-1d", edited(P, "idf", lambda v: v.ravel()), "idf must have 2 dimensions"),
    ("idf-empty", edited(P, "idf", lambda v: v[:0]), "idf must be non-empty"),
    ("layers-duplicate", changed(P, layers=np.array([0, 0])), "layers must be distinct"),
    ("layers-range", changed(P, layers=np.array([0, 5])), "layers must lie in"),
    ("layers-negative", changed(P, layers=np.array([-1, 0])), "layers must lie in"),
    ("layers-float", changed(P, layers=np.array([0.0, 1.0])), "layers must hold integers"),
    ("layers-empty", changed(P, layers=np.array([], dtype=np.int64)), "layers must be distinct"),
    ("worker_of-float", changed(P, worker_of=np.array([0.0, 1.0])), "worker_of must hold integers"),
    ("worker_of-repeat", changed(P, worker_of=np.array([0, 0])), "permutation"),
    ("worker_of-length", changed(P, worker_of=np.array([0, 1, 2])), "permutation"),
    ("meta-not-json", changed(P, meta=np.asarray("{not json")), "meta is not a JSON"),
    ("meta-list", changed(P, meta=np.asarray("[1, 2]")), "meta must be a JSON object"),
    ("meta-bytes", changed(P, meta=np.asarray(b"{}")), "meta must hold text"),
    ("meta-format", changed(P, meta=np.asarray('{"format": "x", "version": 1}')), "not an eldr partition"),
    ("meta-version", changed(P, meta=np.asarray('{"format": "eldr-partition", "version": 2}')), "version 2"),
]


def _meta_top_k(value: Any) -> Maker:
    meta = json.dumps({"format": "eldr-partition", "version": 1, "top_k": value})
    return changed(P, meta=np.asarray(meta))


PARTITION += [
    ("meta-top_k-text", _meta_top_k("8"), "top_k"),
    ("meta-top_k-zero", _meta_top_k(0), "top_k"),
    ("meta-top_k-bool", _meta_top_k(True), "top_k"),
    ("meta-top_k-float", _meta_top_k(2.5), "top_k"),
]
TRACE: list[tuple[str, Maker, str]] = [
    *WHOLE_FILE,
    *_structure_cases(T, ["prefill_counts", "arrival_s", "domain"]),
    ("no-arrival", changed(T, arrival_s=None), "missing ['arrival_s']"),
    ("arrival-text", edited(T, "arrival_s", lambda v: v.astype(str)), "arrival_s must hold"),
    ("arrival-nan", edited(T, "arrival_s", with_nan), "arrival_s must be finite"),
    ("arrival-unsorted", edited(T, "arrival_s", lambda v: v[::-1]), "sorted"),
    ("prompt-fraction", edited(T, "prompt_tokens", lambda v: v + 0.5), "prompt_tokens must hold whole"),
    ("prompt-zero", edited(T, "prompt_tokens", lambda v: v * 0), "prompt_tokens must lie in"),
    ("prompt-length", edited(T, "prompt_tokens", lambda v: v[:-1]), "prompt_tokens has shape"),
    ("prompt-huge", edited(T, "prompt_tokens", lambda v: v * 2**40), "prompt_tokens must lie in"),
    ("output-negative", edited(T, "output_tokens", with_negative), "output_tokens must lie in"),
    ("output-text", edited(T, "output_tokens", lambda v: v.astype(str)), "output_tokens must hold"),
    ("layers-duplicate", changed(T, layers=np.array([3, 3])), "distinct"),
    ("layers-negative", changed(T, layers=np.array([-1, 3])), "layers must lie in"),
    ("layers-beyond-model", changed(T, layers=np.array([0, 9])), "do not fit"),
    ("layers-fraction", changed(T, layers=np.array([0.5, 3])), "layers must hold whole"),
    ("top_k-text", changed(T, top_k=np.str_("2")), "top_k must hold"),
    ("top_k-nan", changed(T, top_k=np.nan), "top_k must be a whole number"),
    ("top_k-zero", changed(T, top_k=0), "top_k must lie in"),
    ("top_k-above-E", changed(T, top_k=9), "top_k must lie in"),
    ("model-layers-small", changed(T, num_model_layers=1), "num_model_layers must lie in"),
    ("counts-negative", edited(T, "decode_counts", with_negative), "negative"),
    ("counts-shape", edited(T, "decode_counts", lambda v: v[:, :1]), "differs"),
    ("domain-numbers", edited(T, "domain", lambda v: np.arange(v.size)), "domain must hold text"),
    ("domain-not-utf8", edited(T, "domain", lambda v: not_utf8(v.size)), "UTF-8"),
    ("domain-code-points", edited(T, "domain", lambda v: bad_code_points(v.size)), "invalid text"),
    ("calibration-int", edited(T, "calibration", lambda v: v.astype(np.int64)), "must hold booleans"),
    ("topk-alone", changed(T, decode_topk=np.zeros((3, 2, 2), dtype=np.uint8)), "come together"),
    ("meta-not-json", changed(T, meta=np.asarray("{")), "meta is not a JSON"),
]
COUNTS: list[tuple[str, Maker, str]] = [
    *[case for case in WHOLE_FILE if case[0] != "many-members"],
    ("npz", lambda p: write_npz(p, {"x": np.ones(3)}), "cannot read counts"),
    ("text", lambda p: _npy(p, np.array([["a"]])), "counts must hold"),
    ("objects", lambda p: _npy(p, np.array([[1, None]], dtype=object)), "Python objects"),
    ("1d", lambda p: _npy(p, np.ones(8)), "got shape (8,)"),
    ("4d", lambda p: _npy(p, np.ones((1, 1, 2, 8))), "got shape"),
    ("empty", lambda p: _npy(p, np.ones((0, 8))), "empty"),
    ("nan", lambda p: _npy(p, np.full((2, 8), np.nan)), "NaN"),
    ("negative", lambda p: _npy(p, -np.ones((2, 8))), "negative"),
    ("shape", lambda p: _npy(p, np.ones((3, 8))), "the partition expects 2 layers x 8 experts"),
    ("ids-range", lambda p: _npy(p, np.full((4, 2, 2), 8)), "must lie in [0, 8)"),
    ("ids-float", lambda p: _npy(p, np.zeros((4, 2, 2))), "must be integers"),
    ("ids-empty", lambda p: _npy(p, np.zeros((0, 2, 2), dtype=np.int64)), "top-k ids must have shape"),
    ("huge-header", lambda p: _raw(p, npy_header_bytes((10**9, 10**9))), "declares shape"),
]


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _npy(path: Path, array: np.ndarray) -> Path:
    path.write_bytes(npy_bytes(array))
    return path


def _raw(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _ids(cases: list[tuple[str, Maker, str]]) -> list[str]:
    return [case[0] for case in cases]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """`eldr serve` must refuse before listening: starting the server fails the test."""
    uvicorn = pytest.importorskip("uvicorn")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("eldr serve started although its input is bad")

    monkeypatch.setattr(uvicorn, "run", refuse)


DECODE_TWO = ["--decode", "http://127.0.0.1:2", "--decode", "http://127.0.0.1:3"]


def _check(refused: Refused, argv: list[str], path: Path, message: str, out: Path | None = None) -> None:
    err = refused(argv, absent=[out] if out is not None else [], folder=out.parent if out else None)
    assert message in err, err
    assert str(path) in err or message in ("weight zero",), err


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CALIBRATION], ids=_ids(CALIBRATION))
@pytest.mark.parametrize("command", ["fit", "simulate"])
def test_bad_calibration_file(
    refused: Refused, good: dict[str, Path], tmp_path: Path, command: str, make: Maker, message: str
) -> None:
    path = make(tmp_path / "cal.npz")
    out = tmp_path / "out" / "part.npz"
    out.parent.mkdir()
    if command == "fit":
        argv = ["fit", "--calibration", str(path), "--workers", "2", "--out", str(out)]
    else:
        argv = ["simulate", "--trace", str(good["trace"]), "--workers", "2", "--policies", "eldr"]
        argv += ["--calibration", str(path), "--requests", "4"]
    _check(refused, argv, path, message, out)


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in PARTITION], ids=_ids(PARTITION))
@pytest.mark.parametrize("command", ["route", "simulate", "serve"])
def test_bad_partition_file(
    refused: Refused,
    good: dict[str, Path],
    tmp_path: Path,
    no_server: None,
    command: str,
    make: Maker,
    message: str,
) -> None:
    path = make(tmp_path / "part.npz")
    argv = {
        "route": ["route", "--counts", str(good["counts"]), "--loads", "0,1"],
        "simulate": ["simulate", "--trace", str(good["trace"]), "--workers", "2", "--policies", "eldr"],
        "serve": ["serve", "--prefill", "http://127.0.0.1:1", *DECODE_TWO],
    }[command]
    _check(refused, [*argv, "--partition", str(path)], path, message)


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in TRACE], ids=_ids(TRACE))
@pytest.mark.parametrize("command", ["info", "simulate"])
def test_bad_trace_file(refused: Refused, tmp_path: Path, command: str, make: Maker, message: str) -> None:
    path = make(tmp_path / "trace.npz")
    if command == "info":
        argv = ["trace", "info", str(path), "--json"]
    else:
        argv = ["simulate", "--trace", str(path), "--workers", "2", "--policies", "rr", "--json"]
    _check(refused, argv, path, message)


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in COUNTS], ids=_ids(COUNTS))
def test_bad_counts_file(
    refused: Refused, good: dict[str, Path], tmp_path: Path, make: Maker, message: str
) -> None:
    path = make(tmp_path / "counts.npy")
    argv = ["route", "--partition", str(good["partition"]), "--counts", str(path), "--loads", "0,1"]
    _check(refused, argv, path, message)


def test_the_valid_files_are_accepted(good: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from eldr.cli import main

    argv = ["route", "--partition", str(good["partition"]), "--counts", str(good["counts"])]
    assert main([*argv, "--loads", "0,1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["worker"] in (0, 1)
    assert main(["trace", "info", str(good["trace"]), "--json", "--steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["num_requests"] == 40


def test_a_budget_set_by_environment_refuses_a_real_deflate_bomb(
    refused: Refused, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64 MiB member that compresses to a few KiB: refused by its header under a 16 MiB budget."""
    bomb = np.zeros((2**20, 2, 4), dtype=np.int64)
    path = write_zip(tmp_path / "bomb.npz", {"prefill_counts.npy": npy_bytes(bomb)}, compress=True)
    assert path.stat().st_size < 1_000_000
    monkeypatch.setenv("ELDR_MAX_BYTES", str(16 * 2**20))
    err = refused(["fit", "--calibration", str(path), "--workers", "2", "--out", str(tmp_path / "p.npz")])
    assert "64 MiB in memory" in err and "ELDR_MAX_BYTES" in err
    monkeypatch.setenv("ELDR_MAX_BYTES", "lots")
    assert "ELDR_MAX_BYTES must be a positive number" in refused(["trace", "info", str(path)])


def test_only_the_needed_members_are_read(good: dict[str, Path], tmp_path: Path) -> None:
    """A trace with a poisoned member eldr does not use loads; its data is never decompressed."""
    from eldr.calibration_data import load_calibration
    from eldr.trace.format import Trace

    arrays = {**trace_arrays(), "junk": np.zeros(3)}
    path = replace_member(tmp_path / "t.npz", arrays, "junk", npy_header_bytes((10**12,)))
    assert Trace.load(path).num_requests == 40
    assert load_calibration(path).num_requests == 16  # the flagged calibration requests
    poisoned = replace_member(tmp_path / "x.npz", trace_arrays(), "arrival_s", npy_header_bytes((10**12,)))
    assert load_calibration(poisoned).num_requests == 16  # a calibration reads no arrival times


def test_fortran_order_and_big_endian_files_load(tmp_path: Path) -> None:
    from eldr.trace.format import Trace

    arrays = trace_arrays()
    arrays["prefill_counts"] = np.asfortranarray(arrays["prefill_counts"]).astype(">i4")
    arrays["domain"] = arrays["domain"].astype(">U4")
    trace = Trace.load(write_npz(tmp_path / "t.npz", arrays))
    assert np.array_equal(trace.prefill_counts, trace_arrays()["prefill_counts"])
    assert trace.domain is not None and trace.domain[1] == "odd"
