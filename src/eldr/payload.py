"""The compact, versioned signature payload an engine returns with the prefill answer.

The engine plugin writes it into `kv_transfer_params["eldr"]`; the proxy reads and removes it before
the decode leg. Version 1 is a JSON object:

    {"v": 1, "layers": L, "experts": E, "top_k": k, "num_tokens": T,
     "dtype": "<u1" | "<u2" | "<u4", "counts": "<base64 of the [L, E] counts, C order, little-endian>"}

The narrowest of `<u1`, `<u2`, `<u4` that holds the largest count is used: for L = 48, E = 128 (the
paper's model) 6 KiB raw while no expert of a layer was chosen more than 255 times (always for
prompts of at most 255 tokens; longer ones while their routing is spread), 12 KiB up to 65,535.
Readers accept all three; an older eldr that knew only `<u2`/`<u4` counts a `<u1` payload as
malformed and routes the request by load.
`num_tokens` lets the reader check conservation: each layer sums to T x k.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.errors import InvalidInputError
from eldr.signature import check_conservation

PAYLOAD_KEY = "eldr"  # kv_transfer_params key of the prompt's counts
DECODE_PAYLOAD_KEY = "eldr_decode"  # ... and of the generated tokens' (decode recording, `eldr capture`)
PAYLOAD_VERSION = 1
_DTYPES: dict[str, np.dtype[np.unsignedinteger]] = {
    "<u1": np.dtype("<u1"),
    "<u2": np.dtype("<u2"),
    "<u4": np.dtype("<u4"),
}


def encode_counts(counts: npt.NDArray[np.integer], *, num_tokens: int, top_k: int) -> dict[str, Any]:
    """`[L, E]` counts -> the version-1 payload object."""
    if counts.ndim != 2:
        raise InvalidInputError(f"counts must have shape [layers, experts], got {counts.shape}")
    largest = int(counts.max(initial=0))
    dtype = "<u1" if largest <= 0xFF else "<u2" if largest <= 0xFFFF else "<u4"
    raw = np.ascontiguousarray(counts, dtype=_DTYPES[dtype]).tobytes()
    return {
        "v": PAYLOAD_VERSION,
        "layers": int(counts.shape[0]),
        "experts": int(counts.shape[1]),
        "top_k": int(top_k),
        "num_tokens": int(num_tokens),
        "dtype": dtype,
        "counts": base64.b64encode(raw).decode("ascii"),
    }


def decode_counts(payload: Any) -> npt.NDArray[np.int64]:
    """The version-1 payload object -> `[L, E]` int64 counts; `InvalidInputError` if malformed."""
    return wire_counts(payload).astype(np.int64)


def wire_counts(payload: Any) -> npt.NDArray[np.unsignedinteger]:
    """`decode_counts` in the payload's own unsigned type: a read-only view of the decoded bytes (what
    the router needs, without a copy)."""
    if not isinstance(payload, dict):
        raise InvalidInputError(f"signature payload must be an object, got {type(payload).__name__}")
    if payload.get("v") != PAYLOAD_VERSION:
        raise InvalidInputError(f"unsupported signature payload version {payload.get('v')!r}")
    try:
        layers, experts = int(payload["layers"]), int(payload["experts"])
        top_k, num_tokens = int(payload["top_k"]), int(payload["num_tokens"])
        dtype = _DTYPES[payload["dtype"]]
        raw = binascii.a2b_base64(payload["counts"], strict_mode=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise InvalidInputError(f"malformed signature payload: {exc!r}") from exc
    if layers < 1 or experts < 1 or len(raw) != layers * experts * dtype.itemsize:
        raise InvalidInputError(
            f"signature payload holds {len(raw)} bytes, expected {layers} x {experts} x {dtype.itemsize}"
        )
    counts = np.frombuffer(raw, dtype=dtype).reshape(layers, experts)
    check_conservation(counts, num_tokens, top_k)
    return counts
