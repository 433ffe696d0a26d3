"""The proxy's upstream HTTP client against a scripted loopback server (every case it must survive)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from eldr.errors import AnswerTooLarge, ConfigError, UpstreamError, UpstreamTimeout
from eldr.proxy.upstream import HIGH_WATER_BYTES, Endpoint, UpstreamClient

# one scripted answer: (reader, writer, request head, request body) -> None
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes, bytes], Awaitable[None]]


def answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


@dataclass
class ScriptedServer:
    """A loopback server that answers request i with scripts[i]; records connections and requests."""

    scripts: list[Script]
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    num_connections: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def https_url(self) -> str:
        return self.url.replace("http://127.0.0.1", "https://localhost")

    async def start(self, tls: ssl.SSLContext | None = None) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                await self.scripts[len(self.requests) - 1](reader, writer, head, body)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def respond(data: bytes, *, close: bool = False) -> Script:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        w.write(data)
        await w.drain()
        if close:
            w.close()

    return script


def hang() -> Script:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        await asyncio.sleep(30)

    return script


def run(test: Callable[[UpstreamClient], Awaitable[None]], tls: ssl.SSLContext | None = None) -> None:
    """Run the test on asyncio's own loop and on uvloop (what `eldr serve` runs on)."""

    async def main() -> None:
        client = UpstreamClient(connect_timeout_s=2.0, keepalive_s=2.0, tls=tls)
        try:
            await test(client)
            assert client.num_in_use == 0
        finally:
            await client.close()

    asyncio.run(main())
    uvloop.run(main())


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def test_answers_are_read_and_connections_reused() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(answer(b'{"a": 1}')), respond(answer(b"{}", status="404 Not Found"))]
        ).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "POST", "/v1/completions", {"X-Request-Id": "r1"}, b'{"q": 1}')
        assert (r.status, r.content_type, await r.read()) == (200, b"application/json", b'{"a": 1}')
        r = await client.request(ep, "GET", "/health", {})
        assert (r.status, await r.read()) == (404, b"{}")
        assert srv.num_connections == 1  # keep-alive
        head, body = srv.requests[0]
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and body == b'{"q": 1}'
        assert (
            b"X-Request-Id: r1\r\n" in head
            and b"Content-Length: 8\r\n" in head
            and b"Host: 127.0.0.1:" in head
        )
        assert (
            srv.requests[1][0].startswith(b"GET /health HTTP/1.1\r\n")
            and b"Content-Length" not in srv.requests[1][0]
        )
        await srv.stop()

    run(test)


def test_chunked_answer_streams_as_it_arrives() -> None:
    events = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]

    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            w.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
        w.write(b"0\r\n\r\n")

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([stream, respond(answer(b"ok"))]).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "POST", "/v1/completions", {}, b"{}")
        assert r.content_type == b"text/event-stream"
        got = [chunk async for chunk in r.chunks(idle_timeout_s=5)]
        assert got == events  # one chunk per write: relayed as it came, not buffered to the end
        r = await client.request(ep, "POST", "/v1/completions", {}, b"{}")
        assert await r.read() == b"ok" and srv.num_connections == 1
        await srv.stop()

    run(test)


def test_connection_close_answer_is_not_reused() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(answer(b"1", extra="connection: close\r\n"), close=True), respond(answer(b"2"))]
        ).start()
        ep = client.endpoint(srv.url)
        for expected in (b"1", b"2"):
            r = await client.request(ep, "GET", "/x", {})
            assert await r.read() == expected
        assert srv.num_connections == 2
        await srv.stop()

    run(test)


def test_idle_connection_closed_by_engine_is_replaced() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"1"), close=True), respond(answer(b"2"))]).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "GET", "/x", {})
        assert await r.read() == b"1"
        await asyncio.sleep(0.1)  # the engine's FIN arrives while the connection is idle
        r = await client.request(ep, "GET", "/x", {})
        assert await r.read() == b"2" and srv.num_connections == 2
        await srv.stop()

    run(test)


def test_reused_connection_closed_as_the_request_goes_out_is_retried_once() -> None:
    async def close_silently(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        w.close()  # the keep-alive race: the engine closes instead of answering

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"1")), close_silently, respond(answer(b"3"))]).start()
        ep = client.endpoint(srv.url)
        assert await (await client.request(ep, "POST", "/x", {}, b"a")).read() == b"1"
        assert await (await client.request(ep, "POST", "/x", {}, b"b")).read() == b"3"
        assert srv.num_connections == 2 and [b for _, b in srv.requests] == [b"a", b"b", b"b"]
        await srv.stop()

    run(test)


def test_new_connection_closed_without_answer_is_an_error() -> None:
    async def close_silently(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        w.close()

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([close_silently, respond(answer(b"never"))]).start()
        with pytest.raises(UpstreamError, match="closed"):
            await client.request(client.endpoint(srv.url), "POST", "/x", {}, b"a")
        assert len(srv.requests) == 1  # not replayed
        await srv.stop()

    run(test)


def test_answer_cut_half_way_is_an_error() -> None:
    async def test(client: UpstreamClient) -> None:
        full = answer(b"0123456789")
        srv = await ScriptedServer([respond(full[:-4], close=True)]).start()
        r = await client.request(client.endpoint(srv.url), "GET", "/x", {})
        with pytest.raises(UpstreamError):
            await r.read()
        await srv.stop()

    run(test)


def test_timeouts_close_the_connection() -> None:
    async def stall_after_first(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await w.drain()
        await asyncio.sleep(30)

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([hang(), stall_after_first, respond(answer(b"ok"))]).start()
        ep = client.endpoint(srv.url)
        with pytest.raises(TimeoutError):
            await client.request(ep, "GET", "/x", {}, deadline=deadline(0.2))
        r = await client.request(ep, "GET", "/x", {}, deadline=deadline(5))
        assert await r.next_chunk(1.0) == b"abc"
        with pytest.raises(TimeoutError):
            await r.next_chunk(0.2)
        r.close()
        assert not ep.idle  # neither connection went back to the pool
        await srv.stop()

    run(test)


def test_read_deadline_bounds_the_whole_body() -> None:
    async def trickle(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        for _ in range(100):
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.01)

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([trickle]).start()
        r = await client.request(client.endpoint(srv.url), "GET", "/x", {})
        with pytest.raises(TimeoutError):
            await r.read(deadline(0.3))
        await srv.stop()

    run(test)


def test_malformed_answer_is_an_error() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(b"SPAM/9 what\r\n\r\n")]).start()
        with pytest.raises(UpstreamError, match="malformed"):
            await client.request(client.endpoint(srv.url), "GET", "/x", {})
        await srv.stop()

    run(test)


def test_header_injection_is_refused_before_sending() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"ok"))]).start()
        with pytest.raises(UpstreamError, match="line break"):
            await client.request(client.endpoint(srv.url), "GET", "/x", {"X-Request-Id": "a\r\nEvil: 1"})
        assert srv.num_connections == 0
        await srv.stop()

    run(test)


def test_connection_refused_is_an_error() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([]).start()
        url = srv.url
        await srv.stop()
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await client.request(client.endpoint(url), "GET", "/x", {})

    run(test)


def test_a_slow_consumer_pauses_reading() -> None:
    body = bytes(range(256)) * (4 * HIGH_WATER_BYTES // 256)

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(body))]).start()
        r = await client.request(client.endpoint(srv.url), "GET", "/x", {})
        conn = r._conn
        for _ in range(100):
            if conn.is_paused:
                break
            await asyncio.sleep(0.01)
        assert conn.is_paused  # nothing consumed: reading stopped above the high-water mark
        got = bytearray()
        while chunk := await r.next_chunk(5):
            got += chunk
        assert bytes(got) == body and not conn.is_paused
        await srv.stop()

    run(test)


def test_a_large_answer_is_read_whole() -> None:
    body = bytes(range(256)) * (16 * HIGH_WATER_BYTES // 256)  # e.g. prompt_routed_experts of a long prompt

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(body)), respond(answer(b"next"))]).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "POST", "/x", {}, b"{}")
        assert await r.read(deadline(10)) == body  # reading pauses and resumes on the way
        assert await (await client.request(ep, "GET", "/x", {})).read() == b"next"
        assert srv.num_connections == 1
        await srv.stop()

    run(test)


def test_an_answer_over_the_size_limit_fails_and_closes_its_connection() -> None:
    body = b"x" * (4 * HIGH_WATER_BYTES)

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(answer(body)), respond(answer(body)), respond(answer(b"ok"))]
        ).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "POST", "/x", {}, b"{}")
        with pytest.raises(AnswerTooLarge, match=f"over {HIGH_WATER_BYTES} bytes"):
            await r.read(deadline(10), max_bytes=HIGH_WATER_BYTES)
        assert not ep.idle  # the rest of that answer is never read: its connection is closed
        r = await client.request(ep, "POST", "/x", {}, b"{}")
        assert await r.read(deadline(10), max_bytes=len(body)) == body  # exactly at the limit: fine
        assert await (await client.request(ep, "GET", "/x", {})).read() == b"ok"
        assert srv.num_connections == 2
        await srv.stop()

    run(test)


def test_an_answer_dropped_half_read_closes_its_connection() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"x" * 10, extra="")[:-5]), respond(answer(b"2"))]).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "GET", "/x", {})
        r.close()
        r.close()  # idempotent
        assert not ep.idle
        assert await (await client.request(ep, "GET", "/x", {})).read() == b"2"
        assert srv.num_connections == 2
        await srv.stop()

    run(test)


def test_cancelled_request_releases_its_connection() -> None:
    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([hang()]).start()
        task = asyncio.ensure_future(client.request(client.endpoint(srv.url), "GET", "/x", {}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await srv.stop()

    run(test)


def in_two_writes(first: bytes, second: bytes, delay_s: float = 0.2) -> Script:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        w.write(first)
        await w.drain()
        await asyncio.sleep(delay_s)
        w.write(second)
        await w.drain()

    return script


async def close_silently(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
    w.close()


def test_interim_1xx_answers_are_skipped() -> None:
    """A 100 Continue / 103 Early Hints is not the answer: the one after it is."""

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [in_two_writes(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", answer(b'{"a": 1}'))]
        ).start()
        r = await client.request(client.endpoint(srv.url), "POST", "/x", {}, b"{}", deadline(2))
        assert r.status == 200
        assert await r.read(deadline(2)) == b'{"a": 1}'
        await srv.stop()

    run(test)


def test_the_answer_after_a_1xx_belongs_to_its_own_request() -> None:
    """The real answer after a 1xx is read by its own request, never by the next one on the connection."""

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [
                in_two_writes(b"HTTP/1.1 100 Continue\r\n\r\n", answer(b"answer-of-A")),
                respond(answer(b"answer-of-B")),
            ]
        ).start()
        ep = client.endpoint(srv.url)
        a = await client.request(ep, "POST", "/x", {}, b"A", deadline(2))
        body_a = await a.read(deadline(2))
        b = await client.request(ep, "POST", "/x", {}, b"B", deadline(2))
        body_b = await b.read(deadline(2))
        assert body_b != b"answer-of-A"
        assert (body_a, body_b) == (b"answer-of-A", b"answer-of-B")
        await srv.stop()

    run(test)


def test_bytes_after_a_complete_answer_close_the_connection() -> None:
    """Bytes after a complete answer (a stray second answer) neither change it nor let the
    connection be reused."""

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(answer(b"1") + answer(b"2", status="500 Oops")), respond(answer(b"3"))]
        ).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "GET", "/x", {}, b"", deadline(2))
        status, body = r.status, await r.read(deadline(2))
        assert (status, body) == (200, b"1")
        assert not ep.idle  # a connection that talked out of turn is not reused
        await srv.stop()

    run(test)


def test_an_answer_head_over_its_limit_fails_and_the_rest_is_not_read() -> None:
    """Status line + headers over `max_head_bytes` (an engine streaming an endless header): the
    request fails with AnswerTooLarge once the limit is passed and the connection is closed; the
    next answer, on a new connection, is fine."""
    fill = b"x-pad: " + b"p" * 4000 + b"\r\n"

    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(10_000):  # 40 MB, if it were read
                w.write(fill)
                await w.drain()

    async def test(_: UpstreamClient) -> None:
        client = UpstreamClient(connect_timeout_s=2.0, max_head_bytes=16 * 1024)
        srv = await ScriptedServer([endless, respond(answer(b"{}"))]).start()
        ep = client.endpoint(srv.url)
        with pytest.raises(AnswerTooLarge, match="answer head over 16384 bytes"):
            await client.request(ep, "GET", "/x", {}, b"", deadline(5))
        assert client.num_in_use == 0 and not ep.idle
        r = await client.request(ep, "GET", "/x", {}, b"", deadline(5))
        assert await r.read(deadline(5)) == b"{}"
        await srv.stop()
        await client.close()

    run(test)


def test_chunk_framing_and_trailers_over_their_limit_fail() -> None:
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"t" * 1000) for i in range(40))
    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n" + trailers + b"\r\n"
    )

    async def test(_: UpstreamClient) -> None:
        client = UpstreamClient(connect_timeout_s=2.0, max_head_bytes=16 * 1024)
        srv = await ScriptedServer([respond(chunked)]).start()
        r = await client.request(client.endpoint(srv.url), "GET", "/x", {}, b"", deadline(2))
        with pytest.raises(AnswerTooLarge, match="framing and trailers"):
            await r.read(deadline(2))
        await srv.stop()
        await client.close()

    run(test)


def test_trailers_do_not_replace_the_answer_headers() -> None:
    """Trailer fields of a chunked answer do not overwrite its headers (content-type is relayed)."""

    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\ncontent-type: text/html\r\n\r\n"
    )

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(chunked), respond(answer(b"2"))]).start()
        ep = client.endpoint(srv.url)
        r = await client.request(ep, "GET", "/x", {}, b"", deadline(2))
        assert await r.read(deadline(2)) == b"{}"
        assert r.content_type == b"application/json"
        await srv.stop()

    run(test)


def test_an_answer_delimited_by_the_connection_end_is_read() -> None:
    """An answer with neither Content-Length nor chunked encoding ends at EOF (RFC 9112 §6.3)."""

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(b'HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{"a": 1}', close=True)]
        ).start()
        r = await client.request(client.endpoint(srv.url), "GET", "/x", {}, b"", deadline(2))
        assert await r.read(deadline(2)) == b'{"a": 1}'
        await srv.stop()

    run(test)


def test_the_retry_of_a_stale_connection_uses_a_new_one() -> None:
    """The one retry after a stale reused connection goes to a new connection, not to the next
    idle one, which can be as stale (an engine closing its idle connections as requests go out)."""

    async def test(client: UpstreamClient) -> None:
        num_connections = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # connections 1 and 2 answer one request, then close at the next one; later ones answer
            nonlocal num_connections
            num_connections += 1
            is_stale_later = num_connections <= 2
            try:
                for i in range(100):
                    await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(1)  # every body here is one byte
                    if is_stale_later and i == 1:
                        return
                    await asyncio.sleep(0.1 if is_stale_later else 0)
                    writer.write(answer(b"fresh" if not is_stale_later else b"s"))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        ep = client.endpoint(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

        async def one() -> bytes:
            r = await client.request(ep, "POST", "/x", {}, b"a", deadline(2))
            return await r.read(deadline(2))

        assert await asyncio.gather(one(), one()) == [b"s", b"s"] and len(ep.idle) == 2
        assert await one() == b"fresh"  # UpstreamError('connection closed by the engine') now
        server.close()

    run(test)


def test_a_request_that_must_not_run_twice_is_not_replayed() -> None:
    """A decode leg (`is_replayable=False`) on a reused connection that the engine closes without an
    answer is not sent again (its kv_transfer_params must never be replayed: the forwarder re-runs the
    prefill instead); a replayable request in the same situation is retried on a new connection."""

    async def hold_then_close(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        await asyncio.sleep(0.5)
        w.close()

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer(
            [respond(answer(b"1")), hold_then_close, respond(answer(b"replayed"))]
        ).start()
        ep = client.endpoint(srv.url)
        assert await (await client.request(ep, "POST", "/x", {}, b"a")).read() == b"1"
        with pytest.raises(UpstreamError):
            await client.request(ep, "POST", "/x", {}, b"decode-body", deadline(5), is_replayable=False)
        assert [b for _, b in srv.requests] == [b"a", b"decode-body"]
        await srv.stop()
        srv = await ScriptedServer(
            [respond(answer(b"1")), hold_then_close, respond(answer(b"again"))]
        ).start()
        ep = client.endpoint(srv.url)
        assert await (await client.request(ep, "POST", "/x", {}, b"a")).read() == b"1"
        assert await (await client.request(ep, "POST", "/x", {}, b"prefill", deadline(5))).read() == b"again"
        assert [b for _, b in srv.requests] == [b"a", b"prefill", b"prefill"] and srv.num_connections == 2
        await srv.stop()

    run(test)


def test_a_timeout_on_a_reused_connection_is_not_sent_again() -> None:
    """An `UpstreamTimeout` is an `UpstreamError`, but no sign of a connection the engine closed: a
    replayable request whose answer did not come in time on a reused connection fails as the
    timeout it is, and is not sent again on a new connection."""

    async def test(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"1")), hang(), respond(answer(b"again"))]).start()
        ep = client.endpoint(srv.url)
        assert await (await client.request(ep, "POST", "/x", {}, b"a")).read() == b"1"
        with pytest.raises(UpstreamTimeout):
            await client.request(ep, "POST", "/x", {}, b"prefill", deadline(0.2))
        assert [b for _, b in srv.requests] == [b"a", b"prefill"] and srv.num_connections == 1
        await srv.stop()

    run(test)


@pytest.mark.parametrize(
    "url", ["http://user:secret@127.0.0.1:8000", "http://127.0.0.1:99999", "http://127.0.0.1:x"]
)
def test_engine_urls_with_credentials_or_bad_ports_are_refused(url: str) -> None:
    """Credentials would land in the Host header (use forward_auth); a bad port is a config error."""
    from eldr.proxy.config import check_url

    with pytest.raises(ConfigError):
        Endpoint.of(url)
    with pytest.raises(ConfigError):
        check_url(url)


def test_the_host_header_names_host_and_port() -> None:
    assert Endpoint.of("http://[::1]:8000").host_header == b"[::1]:8000"
    assert Endpoint.of("http://[::1]:8000").host == "::1"
    assert Endpoint.of("https://example.org").host_header == b"example.org"
    assert Endpoint.of("https://example.org").port == 443


@pytest.mark.parametrize("url", ["ftp://a", "http://", "a:80"])
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        Endpoint.of(url)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (made with the openssl command)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_engines_are_verified(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def trusted(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"1")), respond(answer(b"2"))]).start(server_tls)
        ep = client.endpoint(srv.https_url)
        for expected in (b"1", b"2"):
            assert await (await client.request(ep, "GET", "/x", {})).read() == expected
        assert srv.num_connections == 1 and b"Host: localhost:" in srv.requests[0][0]
        await srv.stop()

    async def untrusted(client: UpstreamClient) -> None:
        srv = await ScriptedServer([respond(answer(b"1"))]).start(server_tls)
        with pytest.raises(UpstreamError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await client.request(client.endpoint(srv.https_url), "GET", "/x", {})
        await srv.stop()

    run(trusted, ssl.create_default_context(cafile=cert))
    run(untrusted)  # the system's CAs do not know this certificate
