"""`eldr capture`: send prompts to a plugin-enabled engine, write the calibration file `eldr fit` reads.

Each prompt is sent once to `/v1/completions` (greedy, `ignore_eos`). The prefill counts come from
the answer's `kv_transfer_params["eldr"]`; with `--decode-tokens N > 0` the request generates N tokens
and the engine must run the plugin in decode-recording mode (`"eldr_record_decode": true`), which adds
the generated tokens' counts as `kv_transfer_params["eldr_decode"]`. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eldr.errors import ConfigError, InputFileError, InvalidInputError
from eldr.payload import PAYLOAD_KEY, decode_counts

DECODE_KEY = "eldr_decode"


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
        "--engine", required=True, metavar="URL", help="engine base URL, e.g. http://127.0.0.1:8100"
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='prompts: .jsonl with {"prompt": str, "label": str (optional)} per line, '
        "or plain text, one prompt per line",
    )
    p.add_argument("--out", required=True, metavar="CAL.npz", help="calibration file to write")
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=128,
        metavar="N",
        help="tokens to generate per prompt for decode counts (default 128; 0: prefill counts only). "
        "Needs the plugin's decode-recording mode (eldr_record_decode) on the engine",
    )
    p.add_argument("--model", default=None, help="model name to request (default: the engine's first model)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout in seconds")
    p.set_defaults(func=run)


def read_prompts(path: Path) -> tuple[list[str], list[str] | None]:
    """Prompts (and labels when every line has one) from a .jsonl or plain-text file."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read prompts file {path}: {exc}") from exc
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
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"{url} answered {exc.code}: {exc.read()[:300].decode(errors='replace')}") from exc
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot reach engine at {url}: {exc}") from exc


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
    if PAYLOAD_KEY not in params:
        raise ConfigError(
            f"engine {engine} returned no kv_transfer_params['{PAYLOAD_KEY}']: is it running the eldr "
            "engine plugin (docs/engine-plugin.md)?"
        )
    prefill = decode_counts(params[PAYLOAD_KEY])
    decode = None
    if decode_tokens > 0:
        if DECODE_KEY not in params:
            raise ConfigError(
                f"engine {engine} returned no '{DECODE_KEY}': start it with "
                '"eldr_record_decode": true in kv_connector_extra_config (and --no-async-scheduling)'
            )
        decode = decode_counts(params[DECODE_KEY])
    return prefill, decode, int(params[PAYLOAD_KEY]["top_k"])


def run(args: argparse.Namespace) -> int:
    if args.decode_tokens < 0 or args.concurrency < 1:
        raise InvalidInputError("--decode-tokens must be >= 0 and --concurrency >= 1")
    prompts, labels = read_prompts(Path(args.prompts))
    engine = args.engine.rstrip("/")
    model = args.model
    if model is None:
        models = _http(f"{engine}/v1/models", None, args.timeout).get("data") or []
        if not models:
            raise ConfigError(f"engine {engine} lists no model")
        model = str(models[0]["id"])
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(
            pool.map(lambda p: capture_one(engine, model, p, args.decode_tokens, args.timeout), prompts)
        )
    arrays: dict[str, Any] = {
        "prefill_counts": np.stack([r[0] for r in results]),
        "top_k": np.int64(results[0][2]),
    }
    if args.decode_tokens > 0:
        arrays["decode_counts"] = np.stack([r[1] for r in results if r[1] is not None])
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.str_)
    np.savez_compressed(args.out, **arrays)
    shape = arrays["prefill_counts"].shape
    print(
        f"wrote {args.out}: {shape[0]} prompts, {shape[1]} layers x {shape[2]} experts, top-{results[0][2]}"
        + (f", decode counts over {args.decode_tokens} tokens" if args.decode_tokens > 0 else "")
    )
    return 0
