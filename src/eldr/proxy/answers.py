"""Prefill answers: JSON parse and signature decode, inline or in a worker process.

A prefill answer with the eldr payload is a few KiB and is parsed on the event loop (~0.1 ms). One
with vLLM's own routed experts grows with the prompt: `prompt_routed_experts` for 32k tokens at
L = 48, k = 8 is 12.6 million numbers (~40 MB of JSON), whose parse and fold into counts took the
event loop seconds, stalling every other request and the health checks. A thread would not help:
orjson and numpy's list conversion hold the GIL throughout. So an answer larger than
`offload_answer_bytes` goes to a worker process (`python -m eldr.proxy.answers`, started on first
use), which returns only what the request path needs: the engine's `kv_transfer_params` and the
`[L, E]` counts. The event loop only writes the bytes into a pipe.

The worker takes one answer at a time (the others wait their turn, within their leg's deadline). A
worker that dies (out of memory, killed) fails the leg, which fails over; a leg cancelled half-way
through an exchange (timeout, client gone) stops the worker, since the pipe is then mid-message; in
both cases the next large answer starts a new one.

Pipe protocol: request = `<q num_experts (-1: none)> <Q length> <answer bytes>`; reply = `<Q length>`
and a pickle (the worker is this package, started by this process) of `(kv_transfer_params,
Extracted)` or `("not-json", message)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from eldr.errors import ParserFailed
from eldr.proxy.answer_signature import Extracted, extract_signature

log = logging.getLogger("eldr.proxy")


_REQUEST = struct.Struct("<qQ")
_REPLY = struct.Struct("<Q")
_NOT_JSON = "not-json"


@dataclass(frozen=True)
class ParsedAnswer:
    """What the request path takes from a prefill answer."""

    kv_transfer_params: Any  # the engine's, as sent (the eldr key is stripped for the decode leg)
    signature: Extracted
    parse_started: float  # perf_counter() when the signature decode began (the decision's timing)


def parse_answer(content: bytes, num_experts: int | None) -> tuple[Any, Extracted]:
    """The answer's `kv_transfer_params` and signature (`orjson.JSONDecodeError` if it is not JSON)."""
    answer = orjson.loads(content)
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return params, extract_signature(answer, num_experts)


class AnswerParser:
    """Parses prefill answers, handing those above `offload_bytes` to the worker process."""

    def __init__(self, offload_bytes: int) -> None:
        self.offload_bytes = offload_bytes
        self.num_offloaded = 0
        self._worker: asyncio.subprocess.Process | None = None
        self._lock: asyncio.Lock | None = None
        self._reaping: set[asyncio.Task[int]] = set()  # stopped workers being waited for

    async def parse(
        self, content: bytes, num_experts: int | None, deadline: float | None = None
    ) -> ParsedAnswer:
        """`orjson.JSONDecodeError` for an answer that is not JSON, `ParserFailed` when the worker
        failed, `TimeoutError` past `deadline` (event-loop time)."""
        if len(content) <= self.offload_bytes:
            answer = orjson.loads(content)
            started = time.perf_counter()
            params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
            return ParsedAnswer(params, extract_signature(answer, num_experts), started)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        timeout_s = None if deadline is None else max(deadline - loop.time(), 0.0)
        async with asyncio.timeout(timeout_s):
            params, extracted = await self._offload(content, num_experts)
        return ParsedAnswer(params, extracted, started)

    async def _offload(self, content: bytes, num_experts: int | None) -> tuple[Any, Extracted]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            worker = await self._running_worker()
            assert worker.stdin is not None and worker.stdout is not None
            self.num_offloaded += 1
            is_done = False
            try:
                worker.stdin.write(_REQUEST.pack(-1 if num_experts is None else num_experts, len(content)))
                worker.stdin.write(content)
                await worker.stdin.drain()
                (size,) = _REPLY.unpack(await worker.stdout.readexactly(_REPLY.size))
                reply = pickle.loads(await worker.stdout.readexactly(size))
                is_done = True
            except (OSError, asyncio.IncompleteReadError, pickle.UnpicklingError) as exc:
                raise ParserFailed(f"the answer parser process failed: {exc!r}") from exc
            finally:
                if not is_done:  # dead, or cancelled mid-message: the pipe is out of step
                    self._stop_worker()
        if reply[0] == _NOT_JSON:
            raise orjson.JSONDecodeError(reply[1], "", 0)
        params, extracted = reply
        return params, extracted

    async def _running_worker(self) -> asyncio.subprocess.Process:
        worker = self._worker
        if worker is None or worker.returncode is not None:
            worker = self._worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "eldr.proxy.answers",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            log.info("started the process that parses large prefill answers (pid %d)", worker.pid)
        return worker

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.kill()
        task = asyncio.ensure_future(worker.wait())  # reaps it and closes its pipes
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """Stop the worker (if any) and wait for it."""
        self._stop_worker()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)


def worker_main() -> None:
    """The worker process: answers from stdin, results to stdout, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            return
        num_experts, length = _REQUEST.unpack(head)
        content = stdin.read(length)
        if len(content) < length:
            return
        try:
            result: Any = parse_answer(content, None if num_experts < 0 else num_experts)
        except orjson.JSONDecodeError as exc:
            result = (_NOT_JSON, str(exc)[:200])
        except MemoryError:
            result = (_NOT_JSON, "the answer is too large to parse")
        del content
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_REPLY.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    worker_main()
