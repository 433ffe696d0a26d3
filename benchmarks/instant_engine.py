"""Fake vLLM engines that answer at once, for measuring what a router adds (benchmarks only).

The integration-test fakes (`tests/integration/fakes.py`) are Starlette apps: they check the protocol,
inject failures and record what they got, and take ~0.3 ms of Python per request for it. On the prefill
leg that time is the fake's, not the router's, yet it lands in a router's "added latency". These fakes
do the least an engine must: a bare asyncio protocol parses the request with httptools (the parser
uvicorn uses), reads the JSON body once, and writes an answer rendered when the fake started:

- prefill role: a completion with `kv_transfer_params` (as NixlConnector names its blocks) carrying the
  eldr signature payload of an L x E model (`--layers`, `--experts`, `--top-k`), for any POST;
- decode role: `--tokens` tokens, as one JSON completion or as an SSE stream (one event per token and
  `[DONE]`, written at once, chunked encoding), as the body's `stream` asks; a body without
  `kv_transfer_params.do_remote_prefill` gets 400 (the router did not run the protocol);
- `GET /health`, `/v1/models`, `/metrics` (vLLM's running/waiting gauges).

    python benchmarks/instant_engine.py --role prefill --port 8100 [--layers 48 --experts 128 --top-k 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httptools
import numpy as np

from eldr.payload import encode_counts

MODEL = "fake-moe"


def _http(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Answers:
    """Every answer a fake gives, rendered once."""

    def __init__(self, role: str, num_layers: int, num_experts: int, top_k: int, num_tokens: int) -> None:
        self.role = role
        models = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        self.health = _http("200 OK", "application/json", b"")
        self.models = _http("200 OK", "application/json", json.dumps(models).encode())
        gauges = f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n'
        gauges += f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0\n'
        self.metrics = _http("200 OK", "text/plain", gauges.encode())
        self.not_found = _http("404 Not Found", "application/json", b'{"error": {"message": "not found"}}')
        self.bad = _http("400 Bad Request", "application/json", b'{"error": {"message": "no kv params"}}')
        self.prefill = _http(
            "200 OK", "application/json", json.dumps(_prefill_answer(num_layers, num_experts, top_k)).encode()
        )
        words = [f" w{i}" for i in range(num_tokens)]
        done = {
            "id": "cmpl-decode",
            "model": MODEL,
            "choices": [{"index": 0, "text": "".join(words), "finish_reason": "length"}],
        }
        self.decode_json = _http("200 OK", "application/json", json.dumps(done).encode())
        events = b"".join(
            _chunk(
                b"data: "
                + json.dumps({"id": "cmpl-decode", "choices": [{"index": 0, "text": w}]}).encode()
                + b"\n\n"
            )
            for w in words
        )
        self.decode_sse = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + events
            + _chunk(b"data: [DONE]\n\n")
            + b"0\r\n\r\n"
        )

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"GET":
            return {b"/health": self.health, b"/v1/models": self.models, b"/metrics": self.metrics}.get(
                path, self.not_found
            )
        if self.role == "prefill":
            return self.prefill
        request = json.loads(body)
        params = request.get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            return self.bad
        return self.decode_sse if request.get("stream") else self.decode_json


def _prefill_answer(num_layers: int, num_experts: int, top_k: int) -> dict[str, Any]:
    num_tokens = 200
    rng = np.random.default_rng(0)
    ids = rng.integers(0, num_experts, (num_layers, num_tokens * top_k))
    counts = np.stack([np.bincount(row, minlength=num_experts) for row in ids])
    # top-k ids of one token are distinct in a real model; the counts' sums are what the payload checks
    kv = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "prefill-0",
        "remote_block_ids": [1, 2, 3],
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
        "eldr": encode_counts(counts, num_tokens=num_tokens, top_k=top_k),
    }
    return {
        "id": "cmpl-prefill",
        "object": "text_completion",
        "model": MODEL,
        "choices": [{"index": 0, "text": "t0", "finish_reason": "length"}],
        "usage": {"prompt_tokens": num_tokens, "completion_tokens": 1},
        "kv_transfer_params": kv,
    }


class Connection(asyncio.Protocol):
    """One keep-alive client connection: parse, answer, repeat."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        self.transport.write(self.answers.answer(self.parser.get_method(), path, b"".join(self.body)))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(answers: Answers, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answers), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="decode: tokens per answer")
    args = parser.parse_args()
    answers = Answers(args.role, args.layers, args.experts, args.top_k, args.tokens)
    import uvloop

    uvloop.run(serve(answers, args.port))


if __name__ == "__main__":
    main()
