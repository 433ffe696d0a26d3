"""Fake vLLM prefill and decode engines speaking the real disaggregation protocol.

A prefill fake answers `max_tokens: 1` requests with `kv_transfer_params` naming its blocks (as
NixlConnector does) plus, on demand, a signature: the eldr payload, vLLM's `prompt_routed_experts`
nested lists, `choices[0].routed_experts` base64 `.npy`, or a malformed one. A decode fake checks that
it got those `kv_transfer_params` (without the eldr key) and answers with JSON or an SSE stream.
Failures on demand: HTTP 500, a dropped connection before the first byte, a stream cut mid-way,
delays, failing health checks. Hostile answers on demand (`signature_next`): a `.npy` whose header
declares a huge shape. A request's `pad_bytes` field pads each streamed event (large streams for
clients that stop reading). Decode answers carry `for`, a digest of the prompt they answer, so that a
crossed answer shows. Run as a script to serve one fake on a port (the benchmark does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from eldr.payload import encode_counts

MODEL = "fake-moe"


class Dropped(Exception):
    """Raised inside a response body to cut the connection (uvicorn closes it)."""


@dataclass
class FakeEngine:
    """One fake engine; tests flip its attributes to inject behaviour."""

    role: str  # "prefill" | "decode"
    name: str = "fake"
    model: str = MODEL
    signature: str = "eldr"  # prefill: eldr | prompt_routed_experts | routed_experts | malformed | none
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    delay_s: float = 0.0  # before answering
    token_delay_s: float = 0.0  # between stream chunks
    is_healthy: bool = True
    # per request: "500", "drop", "midstream", "hang", "huge" (a prefill answer padded to 1 MiB)
    fail_next: list[str] = field(default_factory=list)
    # prefill, per request: a signature kind for this answer instead of `signature` (also
    # "npy_huge_shape": a routed_experts .npy whose header declares 10^9 x L x k ids)
    signature_next: list[str] = field(default_factory=list)
    fail_rate: float = 0.0  # random failures ("500" or "drop", or "midstream" for decode streams)
    seed: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    active: int = 0
    cancelled: int = 0
    is_recording: bool = True
    is_strict: bool = True  # decode: refuse kv_transfer_params still holding the eldr key

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._payloads: dict[str, dict[str, Any]] = {}

    def next_failure(self, is_stream: bool) -> str | None:
        if self.fail_next:
            return self.fail_next.pop(0)
        if self.fail_rate and self._rng.random() < self.fail_rate:
            kinds = ["500", "drop", "midstream"] if is_stream and self.role == "decode" else ["500", "drop"]
            return self._rng.choice(kinds)
        return None

    def counts_for(self, prompt: str) -> np.ndarray:
        """Prefill expert counts [L, E] that depend on the prompt's first word (its 'domain')."""
        ids = self.topk_ids(prompt)
        counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            np.add.at(counts[layer], ids[:, layer, :].ravel(), 1)
        return counts

    def topk_ids(self, prompt: str) -> np.ndarray:
        """[T, L, k] expert ids: the word's domain picks a block of experts."""
        words = prompt.split() or ["x"]
        domain = sum(map(ord, words[0])) % max(self.num_experts // self.top_k, 1)
        base = (domain * self.top_k) % self.num_experts
        row = [(base + j) % self.num_experts for j in range(self.top_k)]
        return np.array([[row] * self.num_layers] * len(words), dtype=np.int32)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        return Starlette(routes=routes)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.is_healthy else 503)

    async def metrics(self, request: Request) -> Response:
        text = f'vllm:num_requests_running{{model_name="{self.model}"}} {self.active}.0\n'
        text += f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0.0\n'
        return PlainTextResponse(text)

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        if self.is_recording:
            self.received.append(body)
            self.headers_seen.append(dict(request.headers))
        is_stream = bool(body.get("stream"))
        failure = self.next_failure(is_stream)
        self.active += 1
        try:
            delay_s = 3600.0 if failure == "hang" else self.delay_s
            if delay_s and await _client_left_within(request, delay_s):
                self.cancelled += 1
                return Response(status_code=499)
            if failure == "500":
                return JSONResponse({"error": {"message": "injected", "code": 500}}, 500)
            if failure == "400":
                return JSONResponse({"error": {"message": "injected refusal", "code": 400}}, 400)
            if body.get("model") not in (None, self.model):
                return JSONResponse({"error": {"message": "unknown model", "code": 404}}, 404)
            if self.role == "prefill":
                signature = self.signature_next.pop(0) if self.signature_next else self.signature
                return self.prefill_answer(body, failure, signature)
            return self.decode_answer(request.url.path, body, failure)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def prefill_answer(self, body: dict[str, Any], failure: str | None, signature: str) -> Response:
        params = body.get("kv_transfer_params") or {}
        if body.get("max_tokens") != 1 or body.get("stream") or not params.get("do_remote_decode"):
            return JSONResponse({"error": {"message": "not a prefill request", "code": 400}}, 400)
        prompt = prompt_of(body)
        kv: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.name,
            "remote_block_ids": [1, 2, 3],
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
        }
        answer: dict[str, Any] = {
            "id": "cmpl-prefill",
            "object": "text_completion",
            "model": self.model,
            "choices": [{"index": 0, "text": "t0", "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 1},
        }
        routed = None
        if signature == "eldr":
            if prompt not in self._payloads:  # answer at once: a prompt's payload is computed once
                counts = self.counts_for(prompt)
                self._payloads[prompt] = encode_counts(
                    counts, num_tokens=len(prompt.split() or ["x"]), top_k=self.top_k
                )
            kv["eldr"] = self._payloads[prompt]
        elif signature == "malformed":
            kv["eldr"] = {"v": 1, "layers": self.num_layers, "experts": self.num_experts, "counts": "!!"}
        elif signature == "prompt_routed_experts":
            routed = self.routed_json(prompt)
        elif signature == "routed_experts":
            buffer = io.BytesIO()
            np.save(buffer, self.topk_ids(prompt).astype(np.uint16), allow_pickle=False)
            answer["choices"][0]["routed_experts"] = base64.b64encode(buffer.getvalue()).decode()
        elif signature == "npy_huge_shape":
            buffer = io.BytesIO()
            ids = self.topk_ids(prompt).astype(np.uint16)
            header = {"descr": "<u2", "fortran_order": False, "shape": (10**9, *ids.shape[1:])}
            np.lib.format.write_array_header_1_0(buffer, header)
            buffer.write(ids.tobytes())
            answer["choices"][0]["routed_experts"] = base64.b64encode(buffer.getvalue()).decode()
        answer["kv_transfer_params"] = kv
        if failure == "huge":
            answer["padding"] = "x" * (1 << 20)
        if failure == "drop":
            return StreamingResponse(_dropped(b""), media_type="application/json")
        if routed is not None:  # spliced in as text: json.dumps of millions of ids would take seconds
            content = json.dumps(answer)[:-1] + ', "prompt_routed_experts": ' + routed + "}"
            return Response(content, media_type="application/json")
        return JSONResponse(answer)

    def routed_json(self, prompt: str) -> str:
        """`topk_ids(prompt).tolist()` as JSON, fast for long prompts (every token's row is the same)."""
        ids = self.topk_ids(prompt[:200])  # the domain depends on the first word only
        token = json.dumps(ids[0].tolist())
        return "[" + ",".join([token] * len(prompt.split() or ["x"])) + "]"

    def decode_answer(self, path: str, body: dict[str, Any], failure: str | None) -> Response:
        params = body.get("kv_transfer_params")
        is_bad = not isinstance(params, dict) or not params.get("do_remote_prefill")
        if is_bad or (self.is_strict and "eldr" in params):
            return JSONResponse(
                {"error": {"message": f"bad kv_transfer_params {params!r}", "code": 400}}, 400
            )
        words = answer_words(body)
        digest = prompt_digest(body)
        if failure == "drop":
            return StreamingResponse(_dropped(b""), media_type="text/event-stream")
        if not body.get("stream"):
            is_chat = path.endswith("chat/completions")
            text = "".join(words)
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if is_chat else {"text": text})
            return JSONResponse(
                {
                    "id": "cmpl-decode",
                    "model": self.model,
                    "choices": [choice],
                    "served_by": self.name,
                    "for": digest,
                }
            )
        cut = len(words) // 2 if failure == "midstream" else None
        pad = "x" * int(body.get("pad_bytes") or 0)
        return StreamingResponse(self.sse(path, words, cut, digest, pad), media_type="text/event-stream")

    async def sse(
        self, path: str, words: list[str], cut: int | None, digest: str = "", pad: str = ""
    ) -> AsyncIterator[bytes]:
        is_chat = path.endswith("chat/completions")
        for i, word in enumerate(words):
            if cut is not None and i == cut:
                raise Dropped("injected mid-stream failure")
            choice = {"index": 0, "delta": {"content": word}} if is_chat else {"index": 0, "text": word}
            event: dict[str, Any] = {"id": "cmpl-decode", "choices": [choice], "for": digest}
            if pad:
                event["pad"] = pad
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
        yield b"data: [DONE]\n\n"


async def _client_left_within(request: Request, delay_s: float) -> bool:
    """Sleep `delay_s`, polling for the client (the proxy) closing the connection."""
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
    return False


async def _dropped(first: bytes) -> AsyncIterator[bytes]:
    raise Dropped("injected dropped connection")
    yield first  # pragma: no cover - makes this an async generator


def prompt_of(body: dict[str, Any]) -> str:
    if "prompt" in body:
        return str(body["prompt"])
    return " ".join(str(m.get("content", "")) for m in body.get("messages", []))


def prompt_digest(body: dict[str, Any]) -> str:
    """What a decode answer says it answers: a digest of the request's prompt."""
    return hashlib.sha1(prompt_of(body).encode()).hexdigest()[:12]


def answer_words(body: dict[str, Any]) -> list[str]:
    """The deterministic answer: `max_tokens` words derived from the prompt."""
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 4)
    seed = sum(map(ord, prompt_of(body)))
    return [f" w{(seed + i) % 97}" for i in range(n)]


class LoopThread:
    """An event loop in a background thread, shared by several servers (one GIL holder, not six)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()  # its self-pipe sockets too


class ServerThread:
    """A uvicorn server on 127.0.0.1, port 0, on a background loop (its own, or a shared one)."""

    def __init__(self, app: Any, loop_thread: LoopThread | None = None, **config: Any) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, **config)
        )
        self.is_own_loop = loop_thread is None
        self.loop_thread = loop_thread or LoopThread()
        self.loop = self.loop_thread.loop
        self.done: Any = None

    def __enter__(self) -> ServerThread:
        self.done = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 20
        while not self.server.started:
            if self.done.done() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.done.result(15)
        if self.is_own_loop:
            self.loop_thread.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="serve one fake vLLM engine (for benchmarks)")
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--signature", default="eldr")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--lenient", action="store_true", help="decode: accept the eldr key (other routers)")
    args = parser.parse_args()
    engine = FakeEngine(
        args.role,
        name=f"{args.role}-{args.port}",
        signature=args.signature,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        is_recording=False,
        is_strict=not args.lenient,
    )
    uvicorn.run(engine.app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
