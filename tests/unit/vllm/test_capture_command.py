from __future__ import annotations

from pathlib import Path

import pytest

from eldr.cli import main
from eldr.commands.capture import read_prompts
from eldr.errors import InputFileError, InvalidInputError


def test_jsonl_prompts_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b", "label": "x"}\n\n{"prompt": "c", "label": "y"}\n')
    assert read_prompts(path) == (["a b", "c"], ["x", "y"])


def test_labels_dropped_unless_every_prompt_has_one(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "label": "x"}\n{"prompt": "c"}\n')
    assert read_prompts(path) == (["a", "c"], None)


def test_plain_text_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("first prompt\nsecond one\n")
    assert read_prompts(path) == (["first prompt", "second one"], None)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("", InvalidInputError, "holds no prompt"),
        ("{not json\n", InputFileError, "p.jsonl:1: not JSON"),
        ('{"text": "a"}\n', InputFileError, 'string "prompt"'),
    ],
    ids=["empty", "not-json", "no-prompt-key"],
)
def test_bad_prompt_files(tmp_path: Path, text: str, error: type[Exception], match: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(error, match=match):
        read_prompts(path)


def test_unreachable_engine_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    argv = [
        "capture",
        "--engine",
        "http://127.0.0.1:9",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "c"),
    ]
    assert main([*argv, "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach engine" in err and "\n" not in err
