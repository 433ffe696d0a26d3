"""`eldr serve` refuses at start anything that would make it fail later; it never starts listening."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badfiles import Refused, partition_arrays, write_npz

pytest.importorskip("yaml")

from eldr.cli import build_parser
from eldr.commands.serve import load_config

P1, D1 = "http://127.0.0.1:8100", "http://127.0.0.1:8200"


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    uvicorn = pytest.importorskip("uvicorn")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("eldr serve started although its configuration is bad")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://127.0.0.1:8200", "http://127.0.0.1:8200/"),
        ("http://engine:8200", "http://ENGINE:8200"),
        ("http://engine", "http://engine:80"),
        ("https://engine", "https://engine:443/"),
        ("http://localhost:8200", "http://127.0.0.1:8200"),
        ("http://[::ffff:127.0.0.1]:8200", "http://127.0.0.1:8200"),
        ("http://engine.:8200", "http://engine:8200"),
    ],
    ids=["slash", "case", "http-port", "https-port", "localhost", "ipv4-mapped", "trailing-dot"],
)
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_the_same_engine_twice_is_refused(refused: Refused, role: str, first: str, second: str) -> None:
    urls = {"prefill": [P1], "decode": [D1]}
    urls[role] = [first, second]
    argv = ["serve", "--policy", "rr"]
    for name, values in urls.items():
        for url in values:
            argv += [f"--{name}", url]
    assert "name the same engine" in refused(argv)


def test_distinct_loopback_addresses_are_distinct_engines() -> None:
    from eldr.engineurl import url_identity

    names = {url_identity(u) for u in ("http://127.0.0.1:8200", "http://127.0.0.2:8200", "http://[::1]:8200")}
    assert len(names) == 3


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "0", "0.0"])
def test_listening_on_every_interface_needs_a_flag(refused: Refused, host: str) -> None:
    argv = ["serve", "--prefill", P1, "--decode", D1, "--policy", "rr", "--host", host]
    assert "--allow-public-host" in refused(argv)
    config = load_config(build_parser().parse_args([*argv, "--allow-public-host"]))
    assert config.allow_public_host and config.host == host


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("keep_alive_s: .inf\n", "keep_alive_s must be a finite number"),
        ("keep_alive_s: .nan\n", "keep_alive_s must be a finite number"),
        ("queue_timeout_s: 1.0e+400\n", "queue_timeout_s must be a finite number"),
        ("max_concurrency: 0\n", "max_concurrency must be a finite number in [1,"),
        ("max_body_bytes: 1000000000000000000000\n", "max_body_bytes"),
        ("port: 1e3\n", "port must be an integer"),
        ("port: true\n", "port must be an integer"),
        ("prefill: 5\n", "prefill must be a list of text"),
        ("prefill: {a: 1}\n", "prefill must be a list of text"),
        ("prefill: [5]\n", "prefill must be a list of text"),
        ("decode: [http://a:1, http://A:1/]\n", "name the same engine"),
        ("host: ''\n", "host must be an IP address"),
        ("host: 0\n", "host must be text"),
        ("host: 0.0.0.0\n", "--allow-public-host"),
        ("host: 'bad host'\n", "host must be an IP address"),
        ("allow_public_host: 1\n", "allow_public_host must be true or false"),
        ("api_key: ''\n", "api_key must be 1 to 4096 visible ASCII"),
        ("api_key: 'has space'\n", "api_key must be"),
        ('admin_token: "a\\nb"\n', "admin_token must be"),
        ("models: ['']\n", "models must be"),
        ("seed: -1\n", "seed must be a finite number in [0,"),
        ("tau: .inf\n", "tau must be finite"),
        ("refit_window: 0\n", "refit_window"),
        ("partition: ''\n", "partition must be a file path"),
        ("1: x\n", "unknown key"),
        ("? [a, b]\n: x\n", "not valid YAML"),
        ("models: &a [*a]\n", "models must be a list of text"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "config file"),
        ("prefill: !!python/object:os.system {}\n", "not valid YAML"),
        ("policy: " + "x" * 100_000 + "\n", "policy must be one of"),
    ],
    ids=lambda value: value[:24] if isinstance(value, str) else None,
)
def test_bad_config_values_are_refused(
    refused: Refused, tmp_path: Path, yaml_text: str, message: str
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"prefill: [{P1}]\ndecode: [{D1}]\npolicy: rr\n{yaml_text}", encoding="utf-8")
    err = refused(["serve", "--config", str(config)])
    assert message in err and len(err) < 2000, err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"prefill: [\xff\xfe]\n"), "is not UTF-8 text"),
        (lambda p: os.mkfifo(p), "a FIFO, not a regular file"),
        (lambda p: p.mkdir(), "a folder, not a regular file"),
        (lambda p: p.write_bytes(b"# " + b"x" * (1 << 20) + b"\n"), "above the limit of 1 MiB"),
        (lambda p: None, "No such file"),
    ],
    ids=["not-utf8", "fifo", "folder", "too-large", "missing"],
)
def test_bad_config_files_are_refused_at_once(
    refused: Refused, tmp_path: Path, make: Any, message: str
) -> None:
    path = tmp_path / "serve.yaml"
    make(path)
    assert message in refused(["serve", "--config", str(path)])


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_config_is_refused_at_once(refused: Refused, device: str) -> None:
    assert "a character device" in refused(["serve", "--config", device])


def test_a_poisoned_partition_stops_serve(refused: Refused, tmp_path: Path, good: dict[str, Path]) -> None:

    arrays = partition_arrays()
    arrays["idf"] = arrays["idf"].copy()
    arrays["idf"][0, 0] = np.inf
    path = write_npz(tmp_path / "inf-idf.npz", arrays)
    err = refused(
        [
            "serve",
            "--prefill",
            P1,
            "--decode",
            D1,
            "--decode",
            "http://127.0.0.1:8201",
            "--partition",
            str(path),
        ]
    )
    assert "idf must be non-empty, finite and in [0, 1000]" in err and str(path) in err
