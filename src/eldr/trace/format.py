"""The trace file: one `.npz` per trace, written with numpy alone, read without pickle.

See docs/trace-format.md for the full table. Required arrays:

    prefill_counts [N, L, E]  per-request prefill expert counts (tokens x top-k per layer)
    decode_counts  [N, L, E]  per-request counts over the generated tokens
    prompt_tokens  [N]        prompt length in tokens
    output_tokens  [N]        generated tokens
    arrival_s      [N]        arrival times in seconds, sorted ascending
    top_k          scalar     experts per token
    layers         [L]        the model's layer ids these L columns stand for
    num_model_layers scalar   MoE layers the model has (>= L)

Optional: `domain` [N] str, `calibration` [N] bool (requests reserved for fitting),
`decode_topk` [sum(output_tokens), L, k] with `decode_offsets` [N + 1] (exact per-token decode
choices: request i owns rows offsets[i]:offsets[i + 1], as many as its output tokens, and they sum to
its decode_counts), `text_offset` [N] int (where the request's prompt starts in its source text, for
builders that cut requests from texts), `meta` 0-d JSON string (source, attribution, builder settings).

`Trace.load` reads only the arrays above, checks ranks and dtypes from the `.npy` headers and the memory
budget before decompressing anything (`eldr.npzfile`, docs/limits.md), then every value rule below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.atomicfile import atomic_write
from eldr.errors import InvalidInputError
from eldr.limits import MAX_LENGTH, MAX_REQUESTS
from eldr.npzfile import ArraySpec, read_meta, read_npz, scalar_int, whole_numbers
from eldr.signature import as_counts

CHECK_ROWS = 262_144  # decode_topk rows per chunk when checking them against decode_counts
OPTIONAL = ("domain", "calibration", "decode_topk", "decode_offsets", "text_offset")
REQUIRED = (
    "prefill_counts",
    "decode_counts",
    "prompt_tokens",
    "output_tokens",
    "arrival_s",
    "top_k",
    "layers",
    "num_model_layers",
)
ARRAYS = (
    ArraySpec("prefill_counts", 3, "biuf"),
    ArraySpec("decode_counts", 3, "biuf"),
    ArraySpec("prompt_tokens", 1, "iuf"),
    ArraySpec("output_tokens", 1, "iuf"),
    ArraySpec("arrival_s", 1, "iuf"),
    ArraySpec("top_k", 0, "iuf"),
    ArraySpec("layers", 1, "iuf"),
    ArraySpec("num_model_layers", 0, "iuf"),
    ArraySpec("domain", 1, "US", is_required=False),
    ArraySpec("calibration", 1, "b", is_required=False),
    ArraySpec("decode_topk", 3, "iu", is_required=False),
    ArraySpec("decode_offsets", 1, "iu", is_required=False),
    ArraySpec("text_offset", 1, "iu", is_required=False),
    ArraySpec("meta", 0, "U", is_required=False),
)
EXACT_DECODE = ("decode_topk", "decode_offsets")


@dataclass(frozen=True)
class Trace:
    prefill_counts: npt.NDArray[np.integer]  # [N, L, E]
    decode_counts: npt.NDArray[np.integer]  # [N, L, E]
    prompt_tokens: npt.NDArray[np.int64]  # [N]
    output_tokens: npt.NDArray[np.int64]  # [N]
    arrival_s: npt.NDArray[np.float64]  # [N], sorted
    top_k: int
    layers: npt.NDArray[np.int64]  # [L] model layer ids
    num_model_layers: int
    domain: npt.NDArray[np.str_] | None = None  # [N]
    calibration: npt.NDArray[np.bool_] | None = None  # [N]
    decode_topk: npt.NDArray[np.integer] | None = None  # [sum(output_tokens), L, k]
    decode_offsets: npt.NDArray[np.int64] | None = None  # [N + 1]
    text_offset: npt.NDArray[np.int64] | None = None  # [N] prompt start in its source text
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_requests(self) -> int:
        return int(self.prefill_counts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.prefill_counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.prefill_counts.shape[2])

    def save(self, path: str | Path) -> None:
        arrays: dict[str, Any] = {
            name: getattr(self, name) for name in (*REQUIRED, *OPTIONAL) if getattr(self, name) is not None
        }
        arrays["meta"] = np.asarray(json.dumps(self.meta, sort_keys=True))
        with atomic_write(path, "trace") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path, *, with_exact_decode: bool = True) -> Trace:
        """Read and check a trace; `with_exact_decode=False` leaves decode_topk/decode_offsets unread."""
        specs = ARRAYS if with_exact_decode else tuple(a for a in ARRAYS if a.name not in EXACT_DECODE)
        arrays = read_npz(path, "trace", specs)
        meta = read_meta(arrays, path)
        arrays.pop("meta", None)
        where = f"{path}: "
        num_layers = max(int(arrays["prefill_counts"].shape[1]), 1)
        kwargs: dict[str, Any] = {
            **arrays,
            "top_k": scalar_int(arrays["top_k"], "top_k", where, low=1, high=MAX_LENGTH),
            "num_model_layers": scalar_int(
                arrays["num_model_layers"], "num_model_layers", where, low=num_layers, high=MAX_LENGTH
            ),
            "arrival_s": arrays["arrival_s"].astype(np.float64),
        }
        for name, low in (("prompt_tokens", 1), ("output_tokens", 0), ("layers", 0)):
            kwargs[name] = whole_numbers(arrays[name], name, where, low=low, high=MAX_LENGTH)
        if "domain" in arrays and arrays["domain"].dtype.kind == "S":
            try:
                kwargs["domain"] = np.char.decode(arrays["domain"], "utf-8").astype(str)
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"{where}domain is not UTF-8 text: {exc.reason}") from exc
        try:
            return cls(**kwargs, meta=meta)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}{exc}") from exc


def validate(trace: Trace) -> None:
    """Raise `InvalidInputError` naming the first problem of a trace."""
    prefill = as_counts(trace.prefill_counts, name="prefill_counts", ndim=3)
    decode = as_counts(trace.decode_counts, name="decode_counts", ndim=3)
    n, num_layers, num_experts = prefill.shape
    if n > MAX_REQUESTS:
        raise InvalidInputError(f"a trace holds at most {MAX_REQUESTS} requests, this one {n}")
    if decode.shape != prefill.shape:
        raise InvalidInputError(f"decode_counts {decode.shape} differs from prefill_counts {prefill.shape}")
    for name in ("prompt_tokens", "output_tokens", "arrival_s"):
        arr = getattr(trace, name)
        if arr.shape != (n,):
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({n},)")
    for name in ("prompt_tokens", "output_tokens", "layers"):
        if getattr(trace, name).dtype.kind not in "iu":
            raise InvalidInputError(f"{name} must hold integers, got dtype {getattr(trace, name).dtype}")
    if np.any(trace.prompt_tokens < 1) or np.any(trace.output_tokens < 0):
        raise InvalidInputError("prompt_tokens must be >= 1 and output_tokens >= 0")
    if max(int(trace.prompt_tokens.max()), int(trace.output_tokens.max())) > MAX_LENGTH:
        raise InvalidInputError(f"prompt_tokens and output_tokens must be <= {MAX_LENGTH}")
    if trace.arrival_s.dtype.kind not in "iuf":
        raise InvalidInputError(f"arrival_s must hold numbers, got dtype {trace.arrival_s.dtype}")
    if not np.all(np.isfinite(trace.arrival_s)) or np.any(np.diff(trace.arrival_s) < 0):
        raise InvalidInputError("arrival_s must be finite and sorted ascending")
    if not 1 <= trace.top_k <= num_experts:
        raise InvalidInputError(f"top_k must lie in [1, E={num_experts}], got {trace.top_k}")
    if trace.layers.shape != (num_layers,):
        raise InvalidInputError(f"layers has shape {trace.layers.shape}, expected ({num_layers},)")
    if np.any(trace.layers < 0) or np.unique(trace.layers).size != num_layers:
        raise InvalidInputError(f"layers must be distinct layer ids >= 0, got {trace.layers.tolist()[:20]}")
    if trace.num_model_layers < num_layers or np.any(trace.layers >= trace.num_model_layers):
        raise InvalidInputError(
            f"layers {trace.layers.tolist()[:20]} do not fit a model of {trace.num_model_layers} layers"
        )
    for name in ("domain", "calibration", "text_offset"):
        arr = getattr(trace, name)
        if arr is not None and arr.shape != (n,):
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({n},)")
    if trace.domain is not None and trace.domain.dtype.kind not in "US":
        raise InvalidInputError(f"domain must hold strings, got dtype {trace.domain.dtype}")
    if trace.calibration is not None and trace.calibration.dtype != np.bool_:
        raise InvalidInputError(f"calibration must be boolean, got dtype {trace.calibration.dtype}")
    if trace.text_offset is not None and (
        trace.text_offset.dtype.kind not in "iu" or np.any(trace.text_offset < 0)
    ):
        raise InvalidInputError("text_offset must hold non-negative integers")
    if (trace.decode_topk is None) != (trace.decode_offsets is None):
        raise InvalidInputError("decode_topk and decode_offsets come together")
    if trace.decode_offsets is not None and trace.decode_topk is not None:
        _validate_decode_topk(trace, decode)


def _validate_decode_topk(trace: Trace, decode: npt.NDArray[np.int64]) -> None:
    assert trace.decode_offsets is not None and trace.decode_topk is not None
    n, num_layers, num_experts = decode.shape
    offsets, topk = trace.decode_offsets, trace.decode_topk
    if offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise InvalidInputError("decode_offsets must be [N + 1], start at 0 and not decrease")
    if topk.shape != (int(offsets[-1]), num_layers, trace.top_k):
        raise InvalidInputError(
            f"decode_topk has shape {topk.shape}, expected [{int(offsets[-1])}, {num_layers}, {trace.top_k}]"
        )
    if not np.array_equal(np.diff(offsets), trace.output_tokens):
        raise InvalidInputError("decode_offsets must give every request as many rows as its output_tokens")
    if topk.dtype.kind not in "iu":
        raise InvalidInputError(f"decode_topk must hold integer expert ids, got dtype {topk.dtype}")
    if topk.size and (int(topk.min()) < 0 or int(topk.max()) >= num_experts):
        raise InvalidInputError(f"decode_topk ids must lie in [0, {num_experts})")
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))  # [T] request of each row
    counts = np.zeros(n * num_layers * num_experts, dtype=np.int64)
    layer = np.arange(num_layers)[None, :, None]
    for start in range(0, owner.size, CHECK_ROWS):  # chunks keep the index arrays small
        rows = slice(start, start + CHECK_ROWS)
        flat = (owner[rows, None, None] * num_layers + layer) * num_experts + topk[rows]
        counts += np.bincount(flat.ravel(), minlength=counts.size)
    if not np.array_equal(counts.reshape(decode.shape), decode):
        raise InvalidInputError("decode_topk does not add up to decode_counts")
