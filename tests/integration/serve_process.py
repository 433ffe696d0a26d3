"""`eldr serve` as a real process in front of fake engines (in this process), for the attack tests.

`ServeProcess` starts `python -m eldr.cli serve` on a free loopback port, waits for its /health, and
reads what an attacker's effect is measured by: the process's RSS (/proc), its /metrics, its log.
`ELDR_SERVE_SRC=/path/to/src` runs the `eldr serve` of another checkout (to watch a finding on the
code before its fix; flags that code does not know make it refuse to start).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from cluster_rig import fake_partition
from fakes import FakeEngine, LoopThread, ServerThread
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engines:
    """Fake prefill and decode engines on one background loop."""

    def __init__(self, num_prefill: int = 1, num_decode: int = 2, **engine: Any) -> None:
        self.stack = ExitStack()
        self.loop_thread = LoopThread()
        self.stack.callback(self.loop_thread.close)
        self.prefill = [FakeEngine("prefill", name=f"p{i}", **engine) for i in range(num_prefill)]
        self.decode = [FakeEngine("decode", name=f"d{i}") for i in range(num_decode)]
        self.servers = [
            self.stack.enter_context(ServerThread(e.app(), self.loop_thread))
            for e in (*self.prefill, *self.decode)
        ]
        self.prefill_urls = [s.url for s in self.servers[:num_prefill]]
        self.decode_urls = [s.url for s in self.servers[num_prefill:]]

    def close(self) -> None:
        self.stack.close()


class ServeProcess:
    """`eldr serve` in a subprocess; `args` are extra flags."""

    def __init__(
        self,
        prefill: list[str],
        decode: list[str],
        *args: str,
        partition_engine: FakeEngine | None = None,
        api_key: str | None = None,
    ) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="eldr-serve-"))
        engine = partition_engine or FakeEngine("prefill")
        fake_partition(engine, len(decode)).save(self.work / "part.npz")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        command = [
            sys.executable,
            "-m",
            "eldr.cli",
            "serve",
            *(a for u in prefill for a in ("--prefill", u)),
            *(a for u in decode for a in ("--decode", u)),
            "--partition",
            str(self.work / "part.npz"),
            "--tau",
            "0",
            "--port",
            str(self.port),
            *(("--api-key", api_key) if api_key else ()),
            *args,
        ]
        self.log_path = self.work / "serve.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ)
        if os.environ.get("ELDR_SERVE_SRC"):
            env["PYTHONPATH"] = os.environ["ELDR_SERVE_SRC"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", headers=self.headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"eldr serve did not start:\n{self.log()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """The process's resident memory, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
