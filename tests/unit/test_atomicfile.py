from __future__ import annotations

import os
from pathlib import Path

import pytest

from eldr.atomicfile import atomic_write
from eldr.errors import OutputFileError


def test_a_symlink_is_written_through_not_replaced(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "p.npz").write_bytes(b"old")
    link = tmp_path / "link.npz"
    link.symlink_to(real / "p.npz")
    with atomic_write(link, "partition") as fh:
        fh.write(b"new")
    assert link.is_symlink() and (real / "p.npz").read_bytes() == b"new"
    assert sorted(p.name for p in real.iterdir()) == ["p.npz"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target, "trace") as fh:
        fh.write(b"half")
        raise RuntimeError("producer failed")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["t.npz"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files")
def test_a_read_only_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "r.npz"
    target.write_bytes(b"old")
    target.chmod(0o444)
    with pytest.raises(OutputFileError, match="read-only"), atomic_write(target, "partition") as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"old"
