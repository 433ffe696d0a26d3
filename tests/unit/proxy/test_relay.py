"""The SSE relay (`eldr.proxy.relay`) against a scripted engine: what the client gets when the engine
or the client misbehaves."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from test_upstream import ScriptedServer, deadline, run

from eldr.errors import AnswerTooLarge
from eldr.proxy.metrics import Metrics
from eldr.proxy.relay import StreamReply, _EventCutter
from eldr.proxy.upstream import HIGH_WATER_BYTES, UpstreamClient


class _Watch:
    def has_cancelled(self) -> bool:
        return False


async def _relay(
    client: UpstreamClient,
    url: str,
    send: Any,
    idle_timeout_s: float = 2.0,
    max_event_bytes: int | None = None,
) -> tuple[list[str], Any]:
    r = await client.request(client.endpoint(url), "POST", "/v1/completions", {}, b"{}", deadline(5))
    first = await r.next_chunk(2)
    outcomes: list[str] = []
    reply = StreamReply(r.status, first, r, outcomes.append, idle_timeout_s, max_event_bytes=max_event_bytes)
    await reply.send(send, _Watch(), Metrics())  # type: ignore[arg-type]
    return outcomes, r


def _body_collector() -> tuple[list[bytes], Any]:
    """`(sent, send)`: an ASGI `send` that keeps the bodies it is given in `sent`."""
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    return sent, send


def _sse_events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e.strip()]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def test_a_cut_in_the_middle_of_an_event_sends_no_broken_event() -> None:
    """The engine's connection breaks after half an SSE event: the client gets the whole events,
    then the error event and [DONE], never the half event."""

    async def cut_mid_event(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        w.write(SSE_HEAD + _chunk(b'data: {"id": 1}\n\n'))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(_chunk(b'data: {"id": 2, "choi'))
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([cut_mid_event]).start()
        sent, send = _body_collector()

        outcomes, _ = await _relay(client, srv.url, send)
        events = _sse_events(b"".join(sent))
        assert outcomes[0] == "error" and events[-1] == b"data: [DONE]"
        for event in events[:-1]:
            orjson.loads(event.removeprefix(b"data: "))  # every data event the client sees is JSON
        await srv.stop()

    run(test)


def test_an_event_over_the_size_limit_ends_the_stream_with_an_error_event() -> None:
    """An engine that streams without ever closing its event (no blank line): the relay holds back
    at most `max_event_bytes`, then ends the stream with the error event and [DONE]."""

    async def endless_event(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        w.write(SSE_HEAD + _chunk(b'data: {"id": 1}\n\n') + _chunk(b"data: "))
        for _ in range(64):
            w.write(_chunk(b"x" * 4096))
            await w.drain()
            await asyncio.sleep(0)
        await asyncio.sleep(5)

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([endless_event]).start()
        sent, send = _body_collector()

        outcomes, _ = await _relay(client, srv.url, send, max_event_bytes=64 * 1024)
        events = _sse_events(b"".join(sent))
        assert outcomes[0] == "error"  # (the lease's release is idempotent)
        assert events[0] == b'data: {"id": 1}' and events[-1] == b"data: [DONE]"
        error = orjson.loads(events[1].removeprefix(b"data: "))["error"]
        assert error["code"] == 502 and "AnswerTooLarge" in error["message"]
        assert len(b"".join(sent)) < 4096  # the held-back event never went out
        await srv.stop()

    run(test)


def test_a_failure_after_done_adds_no_error_and_no_second_done() -> None:
    """The engine sent `data: [DONE]` and the connection broke before the chunked terminator: the
    answer is complete, so no error event and no second [DONE]."""

    async def cut_after_done(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        w.write(SSE_HEAD + _chunk(b'data: {"id": 1}\n\n') + _chunk(b"data: [DONE]\n\n"))
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([cut_after_done]).start()
        sent, send = _body_collector()

        await _relay(client, srv.url, send)
        assert b"".join(sent).count(b"[DONE]") == 1
        await srv.stop()

    run(test)


def test_a_slow_client_pauses_the_engine_and_bounds_the_buffer() -> None:
    """A client that stops reading (its send blocks) stops the relay from reading the engine:
    reading is paused and at most about HIGH_WATER_BYTES wait in the proxy."""
    event = b"data: " + b"x" * 1000 + b"\n\n"
    many = b"".join(_chunk(event) for _ in range(4000))  # ~4 MB

    async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        w.write(SSE_HEAD + many + b"0\r\n\r\n")
        await w.drain()

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([flood]).start()
        gate = asyncio.Event()
        got = bytearray()
        peak = 0
        seen: list[Any] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal peak
            if message["type"] == "http.response.body":
                got.extend(message["body"])
                if len(got) > 100_000 and not gate.is_set():
                    upstream = seen[0]
                    for _ in range(50):  # the client is stuck: wait for the proxy to stop reading
                        peak = max(peak, upstream._num_buffered)
                        if upstream._conn.is_paused:
                            break
                        await asyncio.sleep(0.01)
                    assert upstream._conn.is_paused
                    peak = max(peak, upstream._num_buffered)
                    gate.set()

        original = StreamReply.send

        async def spy(self: StreamReply, send_: Any, watch: Any, metrics: Metrics) -> None:
            seen.append(self.upstream)
            await original(self, send_, watch, metrics)

        StreamReply.send = spy  # type: ignore[method-assign]
        try:
            outcomes, _ = await _relay(client, srv.url, send)
        finally:
            StreamReply.send = original  # type: ignore[method-assign]
        assert outcomes == ["ok"] and gate.is_set()
        assert peak < HIGH_WATER_BYTES + 256 * 1024  # bounded, not the whole 4 MB
        assert bytes(got).count(b"data: ") == 4000
        await srv.stop()

    run(test)


@pytest.mark.parametrize(
    ("chunks", "sent", "tail"),
    [
        ([b"data: 1\n\n"], [b"data: 1\n\n"], b""),
        ([b"data: 1\n\nda", b"ta: 2\n\n"], [b"data: 1\n\n", b"data: 2\n\n"], b""),
        ([b"data: 1\r\n\r\ndata: 2"], [b"data: 1\r\n\r\n"], b"data: 2"),
        ([b"data: 1", b" more", b"\n\n"], [b"", b"", b"data: 1 more\n\n"], b""),
    ],
    ids=["whole", "split", "crlf", "no-boundary-yet"],
)
def test_events_go_out_whole(chunks: list[bytes], sent: list[bytes], tail: bytes) -> None:
    cutter = _EventCutter()
    assert [cutter.whole_events(c) for c in chunks] == sent
    assert cutter.tail == tail


def test_an_event_held_back_past_the_limit_is_refused() -> None:
    cutter = _EventCutter(max_bytes=10)
    assert cutter.whole_events(b"data: 12") == b""
    assert cutter.whole_events(b"\n\ndata: 1234") == b"data: 12\n\n"  # the limit is per event
    with pytest.raises(AnswerTooLarge, match="SSE event over 10 bytes"):
        cutter.whole_events(b"56")


def test_done_is_recognised_only_as_the_last_event() -> None:
    cutter = _EventCutter()
    cutter.whole_events(b"data: [DONE]\n\n")
    assert cutter.is_done
    cutter.whole_events(b'data: {"after": 1}\n\n')
    assert not cutter.is_done
