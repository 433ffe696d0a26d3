"""The proxy's HTTP server (`eldr.proxy.server`) against raw loopback clients: HTTP/1.1 as clients
speak it, and every limit, each at its edge. Every test runs on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from eldr.proxy.server import HttpServer, ServerLimits

Message = dict[str, Any]


class Echo:
    """An ASGI app: answers the request's method, path and body; `/stream` answers in pieces,
    `/boom` raises, `/nothing` returns without answering; records what it saw."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.lifespan: list[str] = []
        self.block = asyncio.Event()
        self.fail_startup = False

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    if self.fail_startup:
                        raise LookupError("the app cannot start")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/nothing":
            return
        if path == "/wait":  # answers once unblocked, or notes the client gone
            waiter = asyncio.ensure_future(receive())
            blocked = asyncio.ensure_future(self.block.wait())
            done, _ = await asyncio.wait({waiter, blocked}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                self.disconnects += 1
                blocked.cancel()
                return
            waiter.cancel()
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-kind", b"stream")]})
            for i in range(int(scope["query_string"] or b"3")):
                await send({"type": "http.response.body", "body": b"piece %d;" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        text = b"%s %s %s" % (scope["method"].encode(), path.encode(), body)
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": text, "more_body": False})


@asynccontextmanager
async def serving(app: Echo, **limits: Any) -> AsyncIterator[HttpServer]:
    server = HttpServer(app, ServerLimits(**limits), on_event=events.append)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


events: list[str] = []


def run(test: Callable[[], Awaitable[None]]) -> None:
    for runner in (asyncio.run, uvloop.run):
        events.clear()
        runner(test())


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One whole answer (content-length or chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
    if b"content-length" in headers:
        return status, headers, await reader.readexactly(int(headers[b"content-length"]))
    body = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return status, headers, body
        body += await reader.readexactly(size)
        await reader.readline()


async def rest(reader: asyncio.StreamReader, timeout_s: float = 5) -> bytes:
    """Everything until the server closes (b"" if it reset the connection)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionError:
        return b""


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (path, len(body), extra, body)


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async def test() -> None:
        app = Echo()
        async with serving(app) as server:
            reader, writer = await connect(server)
            writer.write(post(b"/a", b"1") + post(b"/b", b"22") + b"GET /c?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await answer(reader))[2] == b"POST /a 1"
            assert (await answer(reader))[2] == b"POST /b 22"
            assert (await answer(reader))[2] == b"GET /c "
            writer.write(post(b"/d", b"4"))  # the same connection, later
            assert (await answer(reader))[2] == b"POST /d 4"
            writer.close()
        assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]

    run(test)


def test_chunked_bodies_both_ways_and_expect_continue() -> None:
    async def test() -> None:
        async with serving(Echo()) as server:
            reader, writer = await connect(server)
            writer.write(
                b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            assert (await answer(reader))[2] == b"POST /c abcde"
            writer.write(b"GET /stream?4 HTTP/1.1\r\nHost: x\r\n\r\n")
            _, headers, body = await answer(reader)
            assert headers[b"transfer-encoding"] == b"chunked" and headers[b"x-kind"] == b"stream"
            assert body == b"piece 0;piece 1;piece 2;piece 3;"
            writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            assert (
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
            )
            writer.write(b"hello")
            assert (await answer(reader))[2] == b"POST /e hello"
            writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"content-length: 8\r\n" in head  # "HEAD /h ": the length, no body
            writer.write(post(b"/f", b"x"))
            assert (await answer(reader))[2] == b"POST /f x"
            writer.close()

    run(test)


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-limit", "one-byte-over"])
def test_a_head_over_max_header_bytes_is_431_and_the_rest_unread(extra: int) -> None:
    async def test() -> None:
        async with serving(Echo(), max_header_bytes=4096) as server:
            start = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nX-Pad: "
            pad = b"p" * (4096 - len(start) - 4 + extra)
            reader, writer = await connect(server)
            writer.write(start + pad + b"\r\n\r\n1")
            if not extra:
                assert (await answer(reader))[2] == b"POST /a 1"
                writer.close()
                return
            status, headers, body = await answer(reader)
            assert status == 431 and headers[b"connection"] == b"close" and b"4096" in body
            writer.write(b"more" * 1000)  # never read: the server closes
            assert await rest(reader) == b""
            assert events == ["header_too_large"]

    run(test)


def test_bad_requests_get_400() -> None:
    async def test() -> None:
        async with serving(Echo()) as server:
            for raw in (
                b"NOT HTTP\r\n\r\n",
                b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            ):
                reader, writer = await connect(server)
                writer.write(raw)
                assert (await answer(reader))[0] == 400
                writer.close()
        assert events == ["malformed", "malformed"]

    run(test)


def test_a_slow_head_a_slow_body_and_an_idle_connection_time_out() -> None:
    async def test() -> None:
        app = Echo()
        async with serving(app, header_timeout_s=0.3, body_timeout_s=0.3, keep_alive_s=0.3) as server:
            loop = asyncio.get_running_loop()
            reader, writer = await connect(server)
            writer.write(b"POST /a HTTP/1.1\r\nHost")
            started = loop.time()
            assert (await answer(reader))[0] == 408 and 0.25 < loop.time() - started < 2
            reader, writer = await connect(server)
            writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
            assert (await answer(reader))[0] == 408
            await asyncio.sleep(0.05)
            assert app.disconnects == 1  # the app waiting for the body saw the client go
            reader, writer = await connect(server)  # nothing sent: closed without an answer
            assert await rest(reader) == b""
            reader, writer = await connect(server)  # one answer, then idle past keep_alive_s
            writer.write(post(b"/a", b"1"))
            assert (await answer(reader))[0] == 200
            started = loop.time()
            assert await rest(reader) == b"" and 0.25 < loop.time() - started < 2
        assert events == ["header_timeout", "body_timeout", "header_timeout"]

    run(test)


def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout() -> None:
    async def test() -> None:
        app = Echo()
        async with serving(app, write_timeout_s=0.3) as server:
            _, writer = await connect(server)
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            writer.write(b"GET /stream?2000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # ~20 MB, never read
            for _ in range(100):
                await asyncio.sleep(0.05)
                if events and not server.tasks:
                    break
            assert events == ["write_timeout"]
            assert not server.connections and not server.tasks  # aborted; the app's send loop ended
            writer.close()

    run(test)


def test_connections_over_max_connections_get_503() -> None:
    async def test() -> None:
        async with serving(Echo(), max_connections=2) as server:
            held = [await connect(server) for _ in range(2)]
            await asyncio.sleep(0.05)
            reader, _ = await connect(server)
            status, headers, _ = await answer(reader)
            assert status == 503 and headers[b"retry-after"] == b"1"
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.1)
            reader, writer = await connect(server)
            writer.write(post(b"/a", b"1"))
            assert (await answer(reader))[0] == 200
            writer.close()
        assert events == ["connection_limit"]

    run(test)


def test_an_app_failure_is_a_500_and_a_client_gone_is_seen() -> None:
    async def test() -> None:
        app = Echo()
        async with serving(app) as server:
            for path in (b"/boom", b"/nothing"):
                reader, writer = await connect(server)
                writer.write(post(path, b""))
                assert (await answer(reader))[0] == 500
                writer.close()
            reader, writer = await connect(server)
            writer.write(post(b"/wait", b""))
            await asyncio.sleep(0.1)
            writer.close()
            await asyncio.sleep(0.2)
            assert app.disconnects == 1 and not server.tasks

    run(test)


def test_chunk_framing_and_trailers_are_bounded() -> None:
    async def test() -> None:
        async with serving(Echo(), max_header_bytes=1024) as server:
            reader, writer = await connect(server)
            writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n")
            writer.write(b"X-Trailer: " + b"t" * 4096 + b"\r\n\r\n")
            assert (await answer(reader))[0] == 400
        assert events == ["malformed"]

    run(test)


def test_stop_finishes_running_requests_and_a_failed_startup_raises() -> None:
    async def test() -> None:
        app = Echo()
        server = HttpServer(app, ServerLimits(shutdown_timeout_s=5))
        await server.start("127.0.0.1", 0)
        reader, writer = await connect(server)
        writer.write(post(b"/wait", b""))
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.1)
        app.block.set()
        status, headers, _ = await answer(reader)
        assert status == 200 and headers[b"connection"] == b"close"
        await stopping
        assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
        broken = Echo()
        broken.fail_startup = True
        with pytest.raises(LookupError, match="cannot start"):
            await HttpServer(broken, ServerLimits()).start("127.0.0.1", 0)

    run(test)
