"""`eldr capture`: send prompts to a plugin-enabled engine, write the calibration file `eldr fit` reads.

Each prompt is sent once to `/v1/completions` (greedy, `ignore_eos`). The prefill counts come from
the answer's `kv_transfer_params["eldr"]`; with `--decode-tokens N > 0` the request generates N tokens
and the engine must run the plugin in decode-recording mode (`"eldr_record_decode": true`), which adds
the generated tokens' counts as `kv_transfer_params["eldr_decode"]`. HTTP through the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.atomicfile import atomic_write, check_output_path
from eldr.commands.arguments import engine_url, float_in, int_in, nonempty_text
from eldr.errors import ConfigError, InputFileError, InvalidInputError
from eldr.inputfile import read_text
from eldr.limits import MAX_CONCURRENCY, MAX_ENGINE_ANSWER_BYTES, MAX_PROMPTS_BYTES, MAX_TIMEOUT_S, MAX_TOKENS
from eldr.payload import DECODE_PAYLOAD_KEY, PAYLOAD_KEY, decode_counts


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "capture",
        help="collect a calibration file (prefill and decode expert counts) from a plugin-enabled engine",
        description=(
            "Send every prompt of FILE to a vLLM engine running the eldr engine plugin and write the "
            "calibration file (prefill_counts [N,L,E], decode_counts [N,L,E] when --decode-tokens > 0, "
            "labels [N] when the prompts have labels, top_k) that `eldr fit` reads."
        ),
    )
    p.add_argument(
        "--engine",
        type=engine_url,
        required=True,
        metavar="URL",
        help="engine base URL, http(s)://host:port, e.g. http://127.0.0.1:8100",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='prompts: .jsonl with {"prompt": str, "label": str (optional)} per line, '
        "or plain text, one prompt per line; a regular UTF-8 file of at most 256 MiB",
    )
    p.add_argument("--out", required=True, metavar="CAL.npz", help="calibration file to write")
    p.add_argument(
        "--decode-tokens",
        type=int_in(0, MAX_TOKENS),
        default=128,
        metavar="N",
        help=f"tokens to generate per prompt for decode counts, 0 to {MAX_TOKENS} (default 128; 0: prefill "
        "counts only). "
        "Needs the plugin's decode-recording mode (eldr_record_decode) on the engine",
    )
    p.add_argument(
        "--model",
        type=nonempty_text,
        default=None,
        help="model name to request (default: the engine's first model)",
    )
    p.add_argument(
        "--concurrency",
        type=int_in(1, MAX_CONCURRENCY),
        default=8,
        help=f"requests in flight at once, 1 to {MAX_CONCURRENCY} (default 8)",
    )
    p.add_argument(
        "--timeout",
        type=float_in(0.0, MAX_TIMEOUT_S, is_low_open=True),
        default=600.0,
        metavar="S",
        help=f"per-request timeout in seconds, (0, {MAX_TIMEOUT_S:g}] (default 600)",
    )
    p.set_defaults(func=run)


def read_prompts(path: Path) -> tuple[list[str], list[str] | None]:
    """Prompts (and labels when every line has one) from a .jsonl or plain-text file."""
    text = read_text(path, "prompts file", max_bytes=MAX_PROMPTS_BYTES, limit_name="docs/limits.md")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidInputError(f"prompts file {path} holds no prompt")
    if path.suffix != ".jsonl":
        return lines, None
    prompts: list[str] = []
    labels: list[str] = []
    for number, line in enumerate(lines, start=1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise InputFileError(f"{path}:{number}: JSON nested too deeply") from exc
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise InputFileError(f'{path}:{number}: expected an object with a string "prompt"')
        prompts.append(item["prompt"])
        if isinstance(item.get("label"), str):
            labels.append(item["label"])
    return prompts, labels if len(labels) == len(prompts) else None


def _http(url: str, body: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read(MAX_ENGINE_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"{url} answered {exc.code}: {exc.read(300).decode(errors='replace')}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise ConfigError(f"cannot reach engine at {url}: {exc}") from exc
    if len(raw) > MAX_ENGINE_ANSWER_BYTES:
        raise ConfigError(f"{url} answered more than {MAX_ENGINE_ANSWER_BYTES} bytes")
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{url} answered something that is not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise ConfigError(f"{url} answered JSON that is not an object")
    return answer


def capture_one(
    engine: str, model: str, prompt: str, decode_tokens: int, timeout_s: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64] | None, int]:
    """(prefill counts, decode counts or None, top_k) of one prompt."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max(decode_tokens, 1),
        "temperature": 0,
        "ignore_eos": True,
    }
    answer = _http(f"{engine}/v1/completions", body, timeout_s)
    params = answer.get("kv_transfer_params") or {}
    if not isinstance(params, dict) or PAYLOAD_KEY not in params:
        raise ConfigError(
            f"engine {engine} returned no kv_transfer_params['{PAYLOAD_KEY}']: is it running the eldr "
            "engine plugin (docs/engine-plugin.md)?"
        )
    try:
        prefill = decode_counts(params[PAYLOAD_KEY])
    except InvalidInputError as exc:
        raise InvalidInputError(f"engine {engine} returned a malformed '{PAYLOAD_KEY}': {exc}") from exc
    decode = None
    if decode_tokens > 0:
        if DECODE_PAYLOAD_KEY not in params:
            raise ConfigError(
                f"engine {engine} returned no '{DECODE_PAYLOAD_KEY}': start it with "
                '"eldr_record_decode": true in kv_connector_extra_config (and --no-async-scheduling)'
            )
        try:
            decode = decode_counts(params[DECODE_PAYLOAD_KEY])
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"engine {engine} returned a malformed '{DECODE_PAYLOAD_KEY}': {exc}"
            ) from exc
        if decode.shape != prefill.shape:
            raise InvalidInputError(
                f"engine {engine} returned decode counts {decode.shape} for prefill counts {prefill.shape}"
            )
    return prefill, decode, int(params[PAYLOAD_KEY]["top_k"])


def run(args: argparse.Namespace) -> int:
    check_output_path(args.out, "calibration file")
    prompts, labels = read_prompts(Path(args.prompts))
    engine = args.engine
    model = args.model
    if model is None:
        models = _http(f"{engine}/v1/models", None, args.timeout).get("data")
        if not isinstance(models, list) or not models:
            raise ConfigError(f"engine {engine} lists no model")
        if not isinstance(models[0], dict) or not isinstance(models[0].get("id"), str):
            raise ConfigError(f'engine {engine} answered /v1/models without a model "id"')
        model = models[0]["id"]
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(
            pool.map(lambda p: capture_one(engine, model, p, args.decode_tokens, args.timeout), prompts)
        )
    shapes = {r[0].shape for r in results}
    top_ks = {r[2] for r in results}
    if len(shapes) != 1 or len(top_ks) != 1:
        raise InvalidInputError(
            f"engine {engine} returned counts of different shapes {sorted(shapes)} or top-k {sorted(top_ks)}"
        )
    arrays: dict[str, Any] = {
        "prefill_counts": np.stack([r[0] for r in results]),
        "top_k": np.int64(results[0][2]),
    }
    if args.decode_tokens > 0:
        arrays["decode_counts"] = np.stack([r[1] for r in results if r[1] is not None])
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.str_)
    with atomic_write(args.out, "calibration file") as fh:
        np.savez_compressed(fh, **arrays)
    shape = arrays["prefill_counts"].shape
    print(
        f"wrote {args.out}: {shape[0]} prompts, {shape[1]} layers x {shape[2]} experts, top-{results[0][2]}"
        + (f", decode counts over {args.decode_tokens} tokens" if args.decode_tokens > 0 else "")
    )
    return 0
