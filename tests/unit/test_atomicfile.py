from __future__ import annotations

import errno
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


def test_the_producers_own_file_errors_are_not_called_write_failures(tmp_path: Path) -> None:
    target = tmp_path / "t.npz"
    with pytest.raises(FileNotFoundError) as info, atomic_write(target, "trace") as fh:
        fh.write(b"half")
        (tmp_path / "missing-input.npz").read_bytes()  # the producer fails to read its input
    assert not isinstance(info.value, OutputFileError)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, no temporary file


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EIO])
def test_storage_errors_inside_the_block_are_write_failures(tmp_path: Path, code: int) -> None:
    target = tmp_path / "t.npz"
    target.write_bytes(b"old")
    with pytest.raises(OutputFileError, match="cannot write trace"), atomic_write(target, "trace") as fh:
        fh.write(b"half")
        raise OSError(code, os.strerror(code))  # what a write to a full disk raises
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["t.npz"]


def test_sigterm_removes_the_temporary_file(tmp_path: Path) -> None:
    """A command stopped by SIGTERM mid-write (a job scheduler, `timeout`) leaves no temporary file."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from eldr.cli import main\n"
        "import eldr.commands.fit as fit\n"
        "from eldr.atomicfile import atomic_write\n"
        "def slow(args):\n"
        "    with atomic_write(args.out, 'partition') as fh:\n"
        "        fh.write(b'half'); fh.flush(); print('writing', flush=True); time.sleep(60)\n"
        "    return 0\n"
        "fit.run = slow\n"
        "sys.exit(main(['fit', '--calibration', 'x.npz', '--workers', '2', '--out', sys.argv[1]]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "p.npz")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    assert len(os.listdir(tmp_path)) == 1  # the temporary file exists now
    process.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert process.wait(timeout=30) == 128 + signal.SIGTERM and time.monotonic() - start < 30
    assert os.listdir(tmp_path) == []
