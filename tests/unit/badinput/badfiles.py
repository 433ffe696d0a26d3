"""Valid eldr files as plain arrays, and writers for the broken variants the bad-input suite needs."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eldr.calibrate import FitConfig, fit_partition

NUM_REQUESTS, NUM_LAYERS, NUM_EXPERTS, TOP_K, NUM_WORKERS = 40, 2, 8, 2, 2
Arrays = dict[str, Any]
Refused = Callable[..., str]  # the `refused` fixture: run argv, check the refusal, return the line


def _counts(rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
    """[N, L, E] counts of `tokens[n]` tokens each choosing TOP_K distinct experts per layer."""
    out = np.zeros((tokens.size, NUM_LAYERS, NUM_EXPERTS), dtype=np.int64)
    for n, t in enumerate(tokens):
        for layer in range(NUM_LAYERS):
            base = (n % 2) * 4  # two planted groups of experts: 0-3 and 4-7
            for _ in range(int(t)):
                out[n, layer, base + rng.choice(4, TOP_K, replace=False)] += 1
    return out


def trace_arrays(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 12, NUM_REQUESTS)
    output = rng.integers(1, 6, NUM_REQUESTS)
    calibration = np.zeros(NUM_REQUESTS, dtype=bool)
    calibration[:16] = True
    return {
        "prefill_counts": _counts(rng, prompt),
        "decode_counts": _counts(rng, output),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "arrival_s": np.cumsum(rng.exponential(0.05, NUM_REQUESTS)),
        "top_k": np.int64(TOP_K),
        "layers": np.array([0, 3]),
        "num_model_layers": np.int64(4),
        "domain": np.where(np.arange(NUM_REQUESTS) % 2 == 0, "even", "odd"),
        "calibration": calibration,
        "meta": np.asarray(json.dumps({"source": "badinput tests"})),
    }


def calibration_arrays(seed: int = 0) -> Arrays:
    trace = trace_arrays(seed)
    return {
        "prefill_counts": trace["prefill_counts"],
        "decode_counts": trace["decode_counts"],
        "labels": trace["domain"],
        "top_k": np.int64(TOP_K),
    }


def partition_arrays(seed: int = 0) -> Arrays:
    cal = calibration_arrays(seed)
    part = fit_partition(
        cal["prefill_counts"], FitConfig(num_workers=NUM_WORKERS), decode_counts=cal["decode_counts"], top_k=2
    )
    meta = {**part.meta, "format": "eldr-partition", "version": 1, "top_k": part.top_k, "fit_seconds": 0.0}
    return {
        "centroids": part.centroids.astype(np.float32),
        "idf": part.transform.idf.astype(np.float32),
        "layers": np.asarray(part.transform.layers, dtype=np.int64),
        "worker_of": np.asarray(part.worker_of, dtype=np.int64),
        "meta": np.asarray(json.dumps(meta)),
    }


def write_npz(path: Path, arrays: Arrays) -> Path:
    np.savez(path, **arrays)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_header_bytes(shape: tuple[int, ...], descr: str = "<i8") -> bytes:
    """A version-1.0 .npy header declaring `shape` of `descr`, with no data after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes], *, compress: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_lying_npz(path: Path, arrays: Arrays, name: str, data: bytes, declared_size: int) -> Path:
    """An .npz of `arrays` whose member `name` holds `data` while the zip says `declared_size` bytes."""
    members = {f"{key}.npy": npy_bytes(np.asarray(value)) for key, value in arrays.items() if key != name}
    members[f"{name}.npy"] = data
    write_zip(path, members)
    raw = bytearray(path.read_bytes())
    encoded = f"{name}.npy".encode()
    for signature, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            if raw[start + name_at : start + name_at + len(encoded)] == encoded:
                raw[start + size_at : start + size_at + 4] = struct.pack("<I", declared_size)
            start += 4
    path.write_bytes(bytes(raw))
    return path


def replace_member(path: Path, arrays: Arrays, name: str, raw: bytes) -> Path:
    """An .npz holding `arrays`, with member `name` replaced by the raw bytes `raw`."""
    members = {f"{key}.npy": npy_bytes(np.asarray(value)) for key, value in arrays.items() if key != name}
    members[f"{name}.npy"] = raw
    return write_zip(path, members)
