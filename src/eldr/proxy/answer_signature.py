"""A request's expert counts `[L, E]` from a prefill engine's answer, in order of preference:

1. `kv_transfer_params["eldr"]`: this project's versioned payload (`eldr.payload`), written by the
   engine plugin;
2. vLLM's own routed-experts output, where the engine returns it: `prompt_routed_experts` as nested
   lists `[T][L][k]` (top level or per choice), or `choices[i].routed_experts`, a base64 `.npy` array
   `[T, L, k]` of expert ids; both are folded into counts with `counts_from_topk`;
3. nothing usable: `counts` is None and the request is routed by JSQ (a counted fallback).

A present but malformed signature gives `error` (a one-line reason) and no counts; it never fails the
request. `.npy` data is never unpickled, and its header is checked before anything is allocated: an
integer dtype, three dimensions, and a shape whose data is exactly what the bytes hold (a header that
declares a huge shape is malformed, not a `MemoryError`).
"""

from __future__ import annotations

import base64
import binascii
import io
import tokenize
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError
from eldr.limits import MAX_NPY_HEADER_BYTES
from eldr.payload import PAYLOAD_KEY, wire_counts
from eldr.signature import counts_from_topk

SOURCES = ("eldr", "prompt_routed_experts", "routed_experts", "none")


@dataclass(frozen=True)
class Extracted:
    counts: npt.NDArray[np.integer] | None  # [L, E]
    source: str  # one of SOURCES: where the counts came from (or "none")
    error: str | None = None  # why a present signature was unusable


def extract_signature(answer: Any, num_experts: int | None) -> Extracted:
    """The counts carried by a prefill answer (see module docstring). Never raises."""
    if not isinstance(answer, dict):
        return Extracted(None, "none")
    params = answer.get("kv_transfer_params")
    if isinstance(params, dict) and PAYLOAD_KEY in params:
        try:
            return Extracted(wire_counts(params[PAYLOAD_KEY]), "eldr")
        except InvalidInputError as exc:
            return Extracted(None, "eldr", str(exc))
    choices = answer.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    nested = answer.get("prompt_routed_experts", first.get("prompt_routed_experts"))
    if nested is not None:
        return _from_ids("prompt_routed_experts", lambda: np.asarray(nested), num_experts)
    encoded = first.get("routed_experts")
    if encoded is not None:
        return _from_ids("routed_experts", lambda: _load_npy(encoded), num_experts)
    return Extracted(None, "none")


def _from_ids(source: str, load: Any, num_experts: int | None) -> Extracted:
    if num_experts is None:
        return Extracted(None, source, "expert ids need the number of experts (no partition loaded)")
    try:
        ids = load()
        if ids.dtype.kind not in "iu":
            raise InvalidInputError(f"expert ids must be integers, got dtype {ids.dtype}")
        return Extracted(counts_from_topk(ids, num_experts), source)
    except (InvalidInputError, ValueError, TypeError, binascii.Error) as exc:
        return Extracted(None, source, f"malformed {source}: {exc}")
    except MemoryError:
        return Extracted(None, source, f"malformed {source}: too large to decode")


def _load_npy(encoded: Any) -> npt.NDArray[Any]:
    """The `[T, L, k]` ids of a base64 `.npy`: header checked first, data viewed, never copied."""
    if not isinstance(encoded, str):
        raise InvalidInputError(f"routed_experts must be a base64 string, got {type(encoded).__name__}")
    raw = base64.b64decode(encoded, validate=True)
    stream = io.BytesIO(raw)
    npy: Any = np.lib.format  # untyped in numpy's stubs
    try:
        version = npy.read_magic(stream)
        readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
        if version not in readers:
            raise InvalidInputError(f"routed_experts: unsupported .npy version {version}")
        shape, is_fortran, dtype = readers[version](stream, max_header_size=MAX_NPY_HEADER_BYTES)
    except (ValueError, SyntaxError, RecursionError, tokenize.TokenError) as exc:
        raise InvalidInputError(f"routed_experts: unreadable .npy header ({exc})") from None
    if dtype.kind not in "iu" or dtype.hasobject:
        raise InvalidInputError(f"expert ids must be integers, got dtype {dtype}")
    if len(shape) != 3:
        raise InvalidInputError(f"routed_experts must have shape [tokens, layers, k], got {shape}")
    data = memoryview(raw)[stream.tell() :]
    num_elements = 1
    for n in shape:
        num_elements *= n
    if num_elements * dtype.itemsize != len(data):
        raise InvalidInputError(
            f"routed_experts declares shape {shape} of {dtype} ({num_elements * dtype.itemsize} bytes) "
            f"but holds {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape[::-1]).T if is_fortran else array.reshape(shape)


def strip_payload(params: Any) -> dict[str, Any] | None:
    """The engine's kv_transfer_params for the decode leg, without our signature key."""
    if not isinstance(params, dict):
        return None
    return {k: v for k, v in params.items() if k != PAYLOAD_KEY}
