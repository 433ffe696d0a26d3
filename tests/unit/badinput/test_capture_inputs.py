"""`eldr capture`: bounded prompt files, and every malformed engine answer as one line, exit 2."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badfiles import Refused

from eldr.calibration_data import load_calibration
from eldr.cli import main
from eldr.payload import encode_counts

COUNTS = np.array([[2, 0, 1, 1], [0, 2, 2, 0]])  # [L=2, E=4], 2 tokens x top-2
GOOD_PAYLOAD = encode_counts(COUNTS, num_tokens=2, top_k=2)
Answer = Callable[[str, int], tuple[int, bytes]]  # (path, request number) -> (status, body)


def _json(value: Any) -> tuple[int, bytes]:
    return 200, json.dumps(value).encode()


def completion(params: Any) -> Answer:
    return lambda path, n: _json(
        {"data": [{"id": "m"}]} if path == "/v1/models" else {"kv_transfer_params": params}
    )


class Engine:
    """A fake engine on a loopback port that answers whatever `answer` says."""

    def __init__(self, answer: Answer) -> None:
        count = [0]

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                count[0] += 1
                status, body = answer(self.path, count[0])
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) + (100 if body == b"TRUNCATED" else 0)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def engine() -> Iterator[Callable[[Answer], Engine]]:
    started: list[Engine] = []

    def start(answer: Answer) -> Engine:
        started.append(Engine(answer))
        return started[-1]

    yield start
    for item in started:
        item.close()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("first prompt\nsecond prompt\n", encoding="utf-8")
    return path


def _capture(url: str, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "capture",
        "--engine",
        url,
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--timeout",
        "10",
        *extra,
    ]


ANSWERS: list[tuple[str, Answer, list[str], str]] = [
    ("models-not-json", lambda p, n: (200, b"<html>"), [], "not JSON"),
    ("models-not-utf8", lambda p, n: (200, b'{"data": "\xff"}'), [], "not JSON"),
    ("models-list", lambda p, n: _json([1, 2]), [], "not an object"),
    ("models-empty", lambda p, n: _json({"data": []}), [], "lists no model"),
    ("models-no-id", lambda p, n: _json({"data": [{"name": "m"}]}), [], 'without a model "id"'),
    ("models-500", lambda p, n: (500, b"boom"), [], "answered 500"),
    ("truncated", lambda p, n: (200, b"TRUNCATED"), [], "not JSON"),
    ("no-params", completion(None), ["--decode-tokens", "0"], "returned no kv_transfer_params"),
    ("params-text", completion("x"), ["--decode-tokens", "0"], "returned no kv_transfer_params"),
    ("payload-text", completion({"eldr": "x"}), ["--decode-tokens", "0"], "malformed 'eldr'"),
    (
        "payload-base64",
        completion({"eldr": {**GOOD_PAYLOAD, "counts": "%%%"}}),
        ["--decode-tokens", "0"],
        "malformed 'eldr'",
    ),
    (
        "payload-version",
        completion({"eldr": {**GOOD_PAYLOAD, "v": 9}}),
        ["--decode-tokens", "0"],
        "malformed 'eldr'",
    ),
    (
        "payload-conservation",
        completion({"eldr": {**GOOD_PAYLOAD, "num_tokens": 5}}),
        ["--decode-tokens", "0"],
        "malformed 'eldr'",
    ),
    ("no-decode", completion({"eldr": GOOD_PAYLOAD}), ["--decode-tokens", "4"], "returned no 'eldr_decode'"),
    (
        "decode-shape",
        completion({"eldr": GOOD_PAYLOAD, "eldr_decode": encode_counts(COUNTS[:1], num_tokens=2, top_k=2)}),
        ["--decode-tokens", "4"],
        "decode counts (1, 4) for prefill counts (2, 4)",
    ),
    (
        "shapes-differ",
        lambda p, n: _json(
            {"kv_transfer_params": {"eldr": encode_counts(COUNTS[: 1 + n % 2], num_tokens=2, top_k=2)}}
        ),
        ["--decode-tokens", "0", "--model", "m", "--concurrency", "1"],
        "different shapes",
    ),
]


@pytest.mark.parametrize(
    ("answer", "extra", "message"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS]
)
def test_malformed_engine_answers(
    refused: Refused,
    engine: Callable[[Answer], Engine],
    prompts: Path,
    tmp_path: Path,
    answer: Answer,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out" / "cal.npz"
    out.parent.mkdir()
    err = refused(_capture(engine(answer).url, prompts, out, *extra), folder=out.parent)
    assert message in err, err


def test_a_too_large_answer_is_refused(
    refused: Refused, engine: Callable[[Answer], Engine], prompts: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr("eldr.commands.capture.MAX_ENGINE_ANSWER_BYTES", 64)
    url = engine(lambda p, n: _json({"data": [{"id": "m" * 100}]})).url
    assert "answered more than 64 bytes" in refused(_capture(url, prompts, tmp_path / "c.npz"))


def test_a_good_capture_writes_a_loadable_calibration_file(
    engine: Callable[[Answer], Engine], prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = engine(completion({"eldr": GOOD_PAYLOAD, "eldr_decode": GOOD_PAYLOAD})).url
    out = tmp_path / "cal.npz"
    assert main(_capture(url, prompts, out, "--decode-tokens", "2")) == 0
    assert "wrote" in capsys.readouterr().out
    cal = load_calibration(out)
    assert cal.num_requests == 2 and cal.top_k == 2 and cal.decode_counts is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "p.txt"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.mkfifo(p), "a FIFO, not a regular file"),
        (lambda p: p.mkdir(), "a folder"),
        (lambda p: p.write_bytes(b"caf\xe9\n"), "not UTF-8 text"),
        (lambda p: p.write_bytes(b"\n\n"), "holds no prompt"),
        (lambda p: p.with_suffix(".jsonl").write_text('{"prompt": 5}\n'), 'string "prompt"'),
        (lambda p: p.with_suffix(".jsonl").write_text("[" * 100_000 + "\n"), "p.jsonl:1"),
    ],
    ids=["fifo", "folder", "not-utf8", "empty", "jsonl-type", "jsonl-deep"],
)
def test_bad_prompt_files(refused: Refused, tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "p.txt"
    make(path)
    if path.with_suffix(".jsonl").exists():
        path = path.with_suffix(".jsonl")
    out = tmp_path / "cal.npz"
    err = refused(_capture("http://127.0.0.1:9", path, out), absent=[out])
    assert message in err, err


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_prompts_is_refused_at_once(refused: Refused, tmp_path: Path, device: str) -> None:
    assert "a character device" in refused(_capture("http://127.0.0.1:9", Path(device), tmp_path / "c.npz"))


def test_a_prompts_file_above_the_limit_is_refused_unread(refused: Refused, tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    with open(path, "wb") as fh:  # sparse: 257 MiB on paper, nothing on disk
        fh.truncate(257 * 2**20)
    assert "above the limit of 256 MiB" in refused(_capture("http://127.0.0.1:9", path, tmp_path / "c.npz"))
