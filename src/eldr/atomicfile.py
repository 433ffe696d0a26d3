"""Output files written atomically: a temporary file in the target's folder, fsync, then rename.

Readers never see a half-written file, and a write that fails part-way (disk full, file-size limit, an
error while producing the data) leaves the previous file exactly as it was and no temporary file
behind. Commands call `check_output_path` before their work starts, so a bad `--out` costs nothing.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from eldr.errors import EldrError, OutputFileError


def check_output_path(path: str | Path, what: str) -> Path:
    """`path` as a Path if a file can be written there: its folder exists and is writable, and the
    path is not a folder, device or FIFO. Otherwise `OutputFileError`."""
    text = os.fspath(path)
    target = Path(text)
    if not text or target.name in ("", ".", "..") or text.endswith(os.sep):
        raise OutputFileError(f"{what} path {text!r} is not a file name")
    target = Path(os.path.realpath(target))  # a symlink is written through, never replaced by a file
    folder = target.parent
    if not folder.is_dir():
        raise OutputFileError(f"cannot write {what} {text}: folder {folder} does not exist")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except (OSError, ValueError) as exc:
        raise OutputFileError(f"cannot write {what} {text}: {exc}") from exc
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise OutputFileError(f"cannot write {what} {text}: it is {kind}")
    if mode is not None and not os.access(target, os.W_OK):
        raise OutputFileError(f"cannot write {what} {text}: the file is read-only")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFileError(f"cannot write {what} {text}: folder {folder} is not writable")
    return target


def _new_file_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)  # replacing a file keeps its permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


# errors of the storage being written (as opposed to errors of the data's producer, which pass unchanged)
_STORAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO") if hasattr(errno, name)
)


@contextmanager
def atomic_path(path: str | Path, what: str) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write; on success it replaces `path`.

    An exception inside the block leaves `path` as it was and removes the temporary file. It is
    reported as `OutputFileError` ("cannot write ...") only when it is the storage's (disk full, quota,
    file-size limit, read-only filesystem, I/O error, or an error that names no other file); the
    producer's own errors (e.g. an input file it failed to read) pass through unchanged.
    """
    target = check_output_path(path, what)
    temp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
        temp = Path(name)
        os.close(fd)
    except OSError as exc:
        raise _write_error(what, target, exc) from exc
    try:
        yield temp
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, EldrError) and _is_storage_error(exc, temp):
            raise _write_error(what, target, exc) from exc
        raise
    try:
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(temp, _new_file_mode(target))
        os.replace(temp, target)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(what, target, exc) from exc
        raise
    _sync_folder(target.parent)


def _is_storage_error(exc: OSError, temp: Path) -> bool:
    names = {os.fspath(n) for n in (exc.filename, exc.filename2) if n is not None}
    # an error that names another file is the producer's (reading an input); anything else is the write's
    return exc.errno in _STORAGE_ERRNOS or not names or os.fspath(temp) in names


def _write_error(what: str, target: Path, exc: OSError) -> OutputFileError:
    return OutputFileError(
        f"cannot write {what} {target}: {exc.strerror or exc} (any previous file is unchanged)"
    )


@contextmanager
def atomic_write(path: str | Path, what: str) -> Iterator[BinaryIO]:
    """A binary file object to write; on success its content replaces `path` atomically."""
    with atomic_path(path, what) as temp, open(temp, "wb") as fh:
        yield fh
        fh.flush()


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: some filesystems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
