"""Hostile clients of `eldr serve`, over raw loopback sockets (bounded in time and bytes).

Each attack returns what it saw, for the tests to assert on: the status the proxy answered (0 for
none), how many bytes it managed to send, how long it took.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MB = 1 << 20


@dataclass
class Seen:
    status: int = 0  # the proxy's answer, 0 if none
    sent_bytes: int = 0
    seconds: float = 0.0
    head: bytes = b""  # the answer's first bytes


def _connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_answer(sock: socket.socket, timeout_s: float) -> bytes:
    """What the proxy sent until it closed, `timeout_s` passed, or 64 KiB arrived."""
    sock.settimeout(timeout_s)
    data = b""
    deadline = time.monotonic() + timeout_s
    try:
        while len(data) < 65536 and time.monotonic() < deadline:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
            if b"\r\n\r\n" in data and (b"content-length: 0" in data.lower() or data.endswith(b"}")):
                break
    except (TimeoutError, ConnectionError, OSError):
        pass
    return data


def _status(data: bytes) -> int:
    if data.startswith(b"HTTP/1.1 ") and len(data) >= 12:
        return int(data[9:12])
    return 0


def header_bomb(port: int, total_bytes: int = 64 * MB, chunk_bytes: int = MB, stall_s: float = 1.0) -> Seen:
    """A request whose header block is `total_bytes` long, sent as fast as the proxy takes it; stops
    when a send has been blocked for `stall_s` (the proxy stopped reading) or the connection broke."""
    seen = Seen()
    started = time.monotonic()
    sock = _connect(port)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Big: ")
        sock.settimeout(stall_s)
        piece = b"a" * chunk_bytes
        while seen.sent_bytes < total_bytes:
            try:
                seen.sent_bytes += sock.send(piece)
            except (TimeoutError, OSError):
                break
        data = _read_answer(sock, 5.0)
        seen.status, seen.head = _status(data), data[:200]
    finally:
        sock.close()
    seen.seconds = time.monotonic() - started
    return seen


def slow_head(port: int, wait_s: float, *, send_nothing: bool = False) -> Seen:
    """Part of a request head, then silence; what the proxy answers within `wait_s`."""
    seen = Seen()
    started = time.monotonic()
    sock = _connect(port)
    try:
        if not send_nothing:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        data = _read_answer(sock, wait_s)
        seen.status, seen.head = _status(data), data[:200]
    finally:
        sock.close()
    seen.seconds = time.monotonic() - started
    return seen


def slow_body(port: int, wait_s: float, declared: int = 1000) -> Seen:
    """A whole head declaring `declared` body bytes, a few of them, then silence."""
    seen = Seen()
    started = time.monotonic()
    sock = _connect(port)
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + b'{"prompt": "'
        )
        data = _read_answer(sock, wait_s)
        seen.status, seen.head = _status(data), data[:200]
    finally:
        sock.close()
    seen.seconds = time.monotonic() - started
    return seen


def stalled_stream(port: int, hold_s: float, *, tokens: int = 2000, pad_bytes: int = 4096) -> Seen:
    """A streaming request (large events: `tokens` x `pad_bytes`) whose answer is never read; the
    socket is held for `hold_s`, then closed. `status` is 1 when the proxy cut the connection."""
    seen = Seen()
    started = time.monotonic()
    sock = _connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        body = json.dumps(
            {
                "model": "fake-moe",
                "prompt": "d stall",
                "max_tokens": tokens,
                "stream": True,
                "pad_bytes": pad_bytes,
            }
        ).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen.sent_bytes = len(body)
        time.sleep(hold_s)
        # read what is buffered: a connection the proxy cut ends (EOF or reset) instead of stalling
        sock.settimeout(0.5)
        try:
            while True:
                piece = sock.recv(1 << 20)
                if not piece:
                    seen.status = 1
                    break
        except ConnectionResetError:
            seen.status = 1
        except (TimeoutError, OSError):
            pass
    finally:
        sock.close()
    seen.seconds = time.monotonic() - started
    return seen


def idle_connections(port: int, count: int) -> tuple[list[socket.socket], list[int]]:
    """Open `count` connections that send nothing; the statuses of those the proxy refused at once."""
    socks, refused = [], []
    for _ in range(count):
        sock = _connect(port)
        socks.append(sock)
    time.sleep(0.1)
    readable, _, _ = select.select(socks, [], [], 0.2)  # a refused one has its answer by now
    for sock in readable:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        refused.append(_status(data) if data else -1)
    return socks, refused


_PROBE = """
import json, sys, threading, time
import httpx
url, every_s, headers = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
ms, statuses = [], []
with httpx.Client(timeout=30, headers=headers) as client:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            status = client.get(url).status_code
        except httpx.HTTPError:
            status = 0
        ms.append((time.perf_counter() - started) * 1e3)
        statuses.append(status)
        time.sleep(every_s)
print(json.dumps({"ms": ms, "statuses": statuses}))
"""


@dataclass
class Probe:
    """GET `path` every `every_s` on one keep-alive connection, from a process of its own (so that
    this process's threads, fake engines included, do not delay it); latencies in ms."""

    url: str
    path: str = "/health"
    every_s: float = 0.02
    headers: dict[str, str] = field(default_factory=dict)
    ms: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    _process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Probe:
        args = [
            sys.executable,
            "-c",
            _PROBE,
            self.url + self.path,
            str(self.every_s),
            json.dumps(self.headers),
        ]
        self._process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # its imports
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._process is not None
        out, _ = self._process.communicate("", timeout=60)
        result = json.loads(out)
        self.ms, self.statuses = result["ms"], result["statuses"]

    def worst_ms(self) -> float:
        return max(self.ms, default=0.0)
