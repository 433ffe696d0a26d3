"""Property: a valid partition, calibration or trace file, mutated at random (dtypes, shapes, dropped
arrays, NaN/inf/negative/huge values, corrupted bytes), either loads cleanly and then works, or is
refused with one `InvalidInputError`/`InputFileError`. Never another exception."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badfiles import NUM_EXPERTS, NUM_LAYERS, Arrays, calibration_arrays, partition_arrays, trace_arrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eldr.calibrate import FitConfig, fit_partition
from eldr.calibration_data import load_calibration
from eldr.errors import EldrError, InputFileError, InvalidInputError
from eldr.partition import Partition
from eldr.policy import LocalityBandPolicy, RequestView, WorkersView
from eldr.strictjson import dumps
from eldr.trace.format import Trace

REFUSALS = (InvalidInputError, InputFileError)
DTYPES = [
    "int8",
    "uint8",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "bool",
    "complex64",
    "U3",
    "S3",
    "O",
]
VALUES = [np.nan, np.inf, -np.inf, -1, 0, 0.5, 1e30, 2**63, 2**40 + 1, -(2**62)]
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    try:
        return array.astype(dtype)
    except (ValueError, TypeError, OverflowError):
        return array.astype(str).astype(dtype) if dtype[0] in "US" else array.astype(object)


def _reshape(array: np.ndarray, how: str) -> np.ndarray:
    if how == "ravel":
        return array.ravel()
    if how == "add-axis":
        return array[None]
    if how == "first-row" and array.ndim and array.shape[0]:
        return array[0]
    if how == "empty" and array.ndim:
        return array[:0]
    if how == "shorter" and array.ndim and array.shape[0] > 1:
        return array[:-1]
    if how == "transpose":
        return array.T
    return array


def _inject(array: np.ndarray, value: Any, where: int) -> np.ndarray:
    if array.size == 0 or array.dtype.kind in "USOb":
        return array
    out = array.copy()
    try:
        out.flat[where % out.size] = value
    except (ValueError, OverflowError):
        out = array.astype(np.float64)
        out.flat[where % out.size] = value
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Callable[[], Arrays]) -> Arrays:
    arrays = base()
    for _ in range(draw(st.integers(1, 3))):
        if not arrays:
            break
        name = draw(st.sampled_from(sorted(arrays)))
        array = np.asarray(arrays[name])
        kind = draw(st.sampled_from(["drop", "dtype", "reshape", "value", "value", "extra", "meta"]))
        if kind == "drop":
            del arrays[name]
        elif kind == "dtype":
            arrays[name] = _cast(array, draw(st.sampled_from(DTYPES)))
        elif kind == "reshape":
            how = draw(st.sampled_from(["ravel", "add-axis", "first-row", "empty", "shorter", "transpose"]))
            arrays[name] = _reshape(array, how)
        elif kind == "value":
            arrays[name] = _inject(array, draw(st.sampled_from(VALUES)), draw(st.integers(0, 10_000)))
        elif kind == "extra":
            arrays[draw(st.sampled_from(["junk", "x", "meta2"]))] = np.zeros(draw(st.integers(0, 3)))
        elif "meta" in arrays and np.asarray(arrays["meta"]).dtype.kind == "U":
            try:
                meta = json.loads(str(arrays["meta"]))
            except ValueError:
                continue
            if not isinstance(meta, dict):
                continue
            key = draw(st.sampled_from(["format", "version", "top_k", "source"]))
            meta[key] = draw(st.sampled_from([None, 0, -1, 2, 2.5, "8", True, [1], {"a": 1}, 1e308]))
            arrays["meta"] = np.asarray(json.dumps(meta))
    return arrays


def _write(folder: Path, arrays: Arrays) -> Path:
    path = folder / "mutated.npz"
    np.savez(path, **arrays)
    return path


def _route(part: Partition) -> None:
    policy = LocalityBandPolicy(part, tau=0.1)
    counts = np.ones((part.num_layers, part.num_experts), dtype=np.int64)
    decision = policy.choose(RequestView(counts=counts), WorkersView.of([0] * part.num_workers))
    assert 0 <= decision.worker < part.num_workers
    assert decision.similarities is None or np.isfinite(decision.similarities).all()


@SETTINGS
@given(arrays=mutated(partition_arrays))
def test_mutated_partitions(folder: Path, arrays: Arrays) -> None:
    path = _write(folder, arrays)
    try:
        part = Partition.load(path)
    except REFUSALS:
        return
    assert np.isfinite(part.centroids).all() and np.isfinite(part.transform.idf).all()
    _route(part)


@SETTINGS
@given(arrays=mutated(calibration_arrays))
def test_mutated_calibration_files(folder: Path, arrays: Arrays) -> None:
    path = _write(folder, arrays)
    try:
        cal = load_calibration(path)
    except REFUSALS:
        return
    assert cal.prefill_counts.dtype == np.int64 and cal.prefill_counts.min() >= 0
    try:
        part = fit_partition(cal.prefill_counts, FitConfig(num_workers=2, max_iter=5), top_k=cal.top_k)
    except EldrError:
        return
    _route(part)


@SETTINGS
@given(arrays=mutated(trace_arrays))
def test_mutated_traces(folder: Path, arrays: Arrays) -> None:
    from eldr.commands.trace import summarise

    path = _write(folder, arrays)
    try:
        trace = Trace.load(path)
    except REFUSALS:
        return
    assert trace.num_layers <= NUM_LAYERS + 1 and trace.num_experts <= NUM_EXPERTS + 1
    try:
        info = summarise(trace, [2], 3, 0)
    except EldrError:
        return
    json.loads(dumps(info), parse_constant=lambda text: pytest.fail(f"bare {text} in JSON"))


@SETTINGS
@given(data=st.data())
def test_corrupted_bytes(folder: Path, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["partition", "calibration", "trace"]))
    base = {"partition": partition_arrays, "calibration": calibration_arrays, "trace": trace_arrays}[kind]
    raw = bytearray((_write(folder, base())).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = folder / "corrupted.npz"
    path.write_bytes(bytes(raw))
    load = {"partition": Partition.load, "calibration": load_calibration, "trace": Trace.load}[kind]
    with contextlib.suppress(*REFUSALS):
        load(path)
