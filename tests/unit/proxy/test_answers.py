"""Prefill answers (`eldr.proxy.answers`, `eldr.proxy.answer_signature`): large ones in the worker process,
with the same result as inline; hostile `.npy` headers; a worker that dies or is cut off."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re

import numpy as np
import orjson
import pytest

from eldr.errors import ParserFailed
from eldr.proxy.answer_signature import extract_signature
from eldr.proxy.answers import AnswerParser


def _ids(tokens: int = 6, layers: int = 4, k: int = 2, experts: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, experts, (tokens, layers, k)).astype(np.uint16)


def _npy(array: np.ndarray, shape: tuple[int, ...] | None = None, descr: str | None = None) -> str:
    buffer = io.BytesIO()
    header = {"descr": descr or array.dtype.str, "fortran_order": False, "shape": shape or array.shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(array.tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


def _answer(**extra: object) -> bytes:
    answer = {"choices": [{"text": "x"}], "kv_transfer_params": {"remote_engine_id": "p"}, **extra}
    return json.dumps(answer).encode()


@pytest.mark.parametrize(
    ("shape", "descr", "error"),
    [
        ((10**9, 4, 2), None, "declares shape"),  # 16 GB declared, 96 bytes held: not allocated
        ((6, 4), None, "shape \\[tokens, layers, k\\]"),
        (None, "<f4", "must be integers"),
        (None, "|O", "unreadable|integers"),
    ],
    ids=["huge-shape", "two-dimensions", "floats", "objects"],
)
def test_hostile_npy_headers_are_malformed_signatures(
    shape: tuple[int, ...] | None, descr: str | None, error: str
) -> None:
    encoded = _npy(_ids(), shape, descr)
    extracted = extract_signature({"choices": [{"routed_experts": encoded}]}, 8)
    assert extracted.counts is None and extracted.source == "routed_experts"
    assert extracted.error is not None
    assert re.search(error, extracted.error), extracted.error


def test_a_fortran_order_npy_is_read_as_its_shape_says() -> None:
    ids = _ids()
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(ids), allow_pickle=False)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    extracted = extract_signature({"choices": [{"routed_experts": encoded}]}, 8)
    expected = extract_signature({"prompt_routed_experts": ids.tolist()}, 8)
    assert extracted.counts is not None and expected.counts is not None
    assert np.array_equal(extracted.counts, expected.counts)


def test_large_answers_are_parsed_in_the_worker_with_the_inline_result() -> None:
    async def test() -> None:
        parser = AnswerParser(offload_bytes=100)  # everything but tiny answers goes to the worker
        try:
            content = _answer(prompt_routed_experts=_ids().tolist())
            offloaded = await parser.parse(content, 8)
            inline = await AnswerParser(offload_bytes=1 << 30).parse(content, 8)
            assert parser.num_offloaded == 1
            assert offloaded.kv_transfer_params == inline.kv_transfer_params == {"remote_engine_id": "p"}
            assert offloaded.signature.source == inline.signature.source
            assert np.array_equal(offloaded.signature.counts, inline.signature.counts)  # type: ignore[arg-type]
            with pytest.raises(orjson.JSONDecodeError):
                await parser.parse(b"{" * 200, 8)
            assert (await parser.parse(content, 8)).signature.counts is not None  # the worker goes on
        finally:
            await parser.close()

    asyncio.run(test())


def test_a_dead_or_cut_off_worker_fails_the_leg_and_is_replaced() -> None:
    async def test() -> None:
        parser = AnswerParser(offload_bytes=10)
        content = _answer()
        try:
            await parser.parse(content, 8)
            worker = parser._worker
            assert worker is not None
            worker.kill()  # dies as the next answer goes out (not reaped yet: it looks alive)
            with pytest.raises(ParserFailed, match="parser process failed"):
                await parser.parse(content, 8)
            assert (await parser.parse(content, 8)).kv_transfer_params == {"remote_engine_id": "p"}
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):  # past the leg's deadline: the worker is stopped
                await parser.parse(content, 8, deadline=loop.time())
            assert (await parser.parse(content, 8)).signature.source == "none"
        finally:
            await parser.close()

    asyncio.run(test())
