"""Opening input files: regular files only, bounded in size, one clear error.

A FIFO, a device (`/dev/zero`, `/dev/urandom`), a socket or a folder is refused at once: the file is
opened non-blocking (opening a FIFO that has no writer would otherwise wait forever) and checked with
`fstat` before a byte is read. A file larger than the caller's limit is refused before it is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from eldr.errors import InputFileError
from eldr.limits import MAX_BYTES_ENV, size_text


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: str | Path, what: str, *, max_bytes: int, limit_name: str = MAX_BYTES_ENV) -> BinaryIO:
    """`path` opened for binary reading; `InputFileError` unless it is a regular file of <= `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputFileError(f"cannot read {what} {path}: {reason}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _kind(info.st_mode)
            raise InputFileError(f"cannot read {what} {path}: it is {kind}, not a regular file")
        if info.st_size > max_bytes:
            raise InputFileError(
                f"{what} {path} is {size_text(info.st_size)}, above the limit of {size_text(max_bytes)} "
                f"({limit_name})"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | Path, what: str, *, max_bytes: int, limit_name: str) -> str:
    """The whole UTF-8 text of a regular file of at most `max_bytes` bytes, newlines as '\\n'."""
    with open_input(path, what, max_bytes=max_bytes, limit_name=limit_name) as fh:
        try:
            raw = fh.read(max_bytes + 1)  # /proc-like files report size 0: the read itself is bounded
        except OSError as exc:
            raise InputFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(raw) > max_bytes:
        limit = size_text(max_bytes)
        raise InputFileError(f"{what} {path} is larger than the limit of {limit} ({limit_name})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads
