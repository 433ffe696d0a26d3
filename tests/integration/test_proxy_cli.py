"""`eldr serve` at the command line: help, config merging, and one-line errors with exit status 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_rig import fake_partition
from fakes import FakeEngine

from eldr.cli import build_parser, main
from eldr.commands.serve import _FLAGS, load_config


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eldr.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_documents_every_flag() -> None:
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    for flag, *_ in _FLAGS:
        assert flag in out.stdout
    for flag in ("--config", "--prefill", "--decode", "--model"):
        assert flag in out.stdout


@pytest.mark.parametrize(
    ("extra", "config_text", "message"),
    [
        ((), None, "at least one --prefill URL"),
        (("--prefill", "http://127.0.0.1:1"), None, "at least one --decode URL"),
        (("--prefill", "ftp://x", "--decode", "http://127.0.0.1:2", "--policy", "rr"), None, "engine URL"),
        (("--prefill", "http://a:1", "--decode", "http://b:2"), None, "needs --partition"),
        (("--prefill", "http://a:1", "--decode", "http://b:2", "--policy", "nope"), None, "policy must be"),
        ((), "prefill: [http://a:1]\ndecode: [http://b:2]\npolicy: rr\nbogus: 1\n", "unknown key(s)"),
        (
            (),
            "prefill: [http://a:1]\ndecode: [http://b:2]\npolicy: rr\nport: high\n",
            "port must be an integer",
        ),
        ((), "- just\n- a list\n", "must hold a mapping"),
        ((), "prefill: [http://a:1\n", "not valid YAML"),
    ],
    ids=[
        "no-prefill",
        "no-decode",
        "bad-url",
        "eldr-without-partition",
        "bad-policy",
        "unknown-key",
        "wrong-type",
        "not-a-mapping",
        "bad-yaml",
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, extra: tuple[str, ...], config_text: str | None, message: str
) -> None:
    args = ["serve", *extra]
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        args += ["--config", str(tmp_path / "c.yaml")]
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_partition_size_must_match_decode_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_partition(FakeEngine("prefill"), 2).save(tmp_path / "part.npz")
    code = main(
        [
            "serve",
            "--prefill",
            "http://127.0.0.1:1",
            "--decode",
            "http://127.0.0.1:2",
            "--partition",
            str(tmp_path / "part.npz"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "K=2" in err and len(err.strip().splitlines()) == 1


def test_flags_win_over_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "prefill: [http://a:1]\ndecode: [http://b:2, http://c:3]\npolicy: rr\ntau: 0.3\nport: 9000\n"
    )
    args = build_parser().parse_args(
        ["serve", "--config", str(tmp_path / "c.yaml"), "--port", "9100", "--decode", "http://d:4"]
    )
    config = load_config(args)
    assert config.port == 9100 and config.tau == 0.3 and config.decode == ("http://d:4",)
    assert config.prefill == ("http://a:1",) and config.host == "127.0.0.1"


def test_sample_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    args = build_parser().parse_args(["serve", "--config", str(root / "examples" / "serve.yaml")])
    config = load_config(args)
    assert config.policy == "eldr" and len(config.decode) == 2 and config.partition == "partition.npz"


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ("--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--policy", "rr")
        out = run_cli("serve", *args, "--port", port, "--health-timeout-s", "0.2")
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
