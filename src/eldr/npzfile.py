"""Reading eldr's `.npz` and `.npy` files (calibration, partition, trace, counts): no pickle, bounded
memory, one clear error.

Every reader names the arrays it needs (`ArraySpec`: rank and dtype kinds) and only those members are
decompressed. Before any array data is read, each needed member's `.npy` header is parsed and checked:

- its dtype kind and rank against the spec (object arrays are refused: nothing is ever unpickled);
- the data it declares against what the member holds (a header claiming more is refused, not allocated);
- the memory the needed arrays take together against the budget `limits.max_bytes()` (2 GiB by default,
  `ELDR_MAX_BYTES`), counting 8 bytes per element since eldr widens counts to int64.

The zip's own directory is bounded too (`MAX_NPZ_MEMBERS`, `MAX_NPZ_DIRECTORY_BYTES`), and the file
must be a regular file no larger than the budget (`inputfile.open_input`). Structural problems
(missing array, wrong rank or dtype, unreadable file) are `InputFileError`; the format modules check
values and raise `InvalidInputError`.
"""

from __future__ import annotations

import json
import math
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from eldr.errors import EldrError, InputFileError, InvalidInputError
from eldr.inputfile import open_input
from eldr.limits import (
    MAX_BYTES_ENV,
    MAX_NPY_HEADER_BYTES,
    MAX_NPZ_DIRECTORY_BYTES,
    MAX_NPZ_MEMBERS,
    max_bytes,
    size_text,
)

CHUNK_BYTES = 1 << 20  # array data is read in chunks of this size into the final array
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "text", "S": "text"}
# what a broken file, member or header can raise while being read (never our own errors)
_READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    RuntimeError,  # encrypted member; also RecursionError from a hostile header
    NotImplementedError,  # unknown compression
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    OverflowError,
    KeyError,
    TypeError,
    SyntaxError,  # a header that is not a Python literal (numpy parses it with ast)
    tokenize.TokenError,  # the same, on numpy's fallback path for Python-2 headers
)


@dataclass(frozen=True)
class ArraySpec:
    """One array a reader needs: its name, rank (None: any; 0: a scalar, shape () or (1,)) and kinds."""

    name: str
    ndim: int | None
    kinds: str  # accepted numpy dtype kinds: "b" bool, "iu" integers, "f" floats, "US" text
    is_required: bool = True

    def describe_kinds(self) -> str:
        return " or ".join(dict.fromkeys(_KIND_NAMES[k] for k in self.kinds))


@dataclass(frozen=True)
class Header:
    """What an `.npy` header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    is_fortran: bool

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        return self.num_elements * self.dtype.itemsize

    @property
    def memory_bytes(self) -> int:
        """Memory charged against the budget: 8 bytes per element at least (int64/float64 copies)."""
        return self.num_elements * max(self.dtype.itemsize, 8)


def read_npz(
    path: str | Path, what: str, specs: Sequence[ArraySpec], *, budget_bytes: int | None = None
) -> dict[str, npt.NDArray[Any]]:
    """The arrays of `specs` present in `path` (required ones must be), headers checked before reading.

    `InputFileError` naming `what`, the file and the array when the file is unreadable or an array has
    the wrong rank or dtype; nothing else is decompressed.
    """
    budget = max_bytes() if budget_bytes is None else budget_bytes
    with open_input(path, what, max_bytes=budget) as fh:
        try:
            _check_directory(fh)
            with zipfile.ZipFile(fh) as archive:
                members = {n.removesuffix(".npy"): n for n in archive.namelist()}
                missing = [s.name for s in specs if s.is_required and s.name not in members]
                if missing:
                    found = sorted(members)[:20]
                    raise InputFileError(f"{path} is not an eldr {what}: missing {missing} (found: {found})")
                headers: dict[str, Header] = {}
                for spec in specs:
                    if spec.name in members:
                        with archive.open(members[spec.name]) as member:
                            size = archive.getinfo(members[spec.name]).file_size
                            headers[spec.name] = _read_header(member, size, spec, path)
                _check_budget(headers, budget, path)
                arrays: dict[str, npt.NDArray[Any]] = {}
                for name, header in headers.items():
                    with archive.open(members[name]) as member:
                        _skip_header(member)
                        arrays[name] = _read_data(member, header, name, path)
                return arrays
        except EldrError:
            raise
        except _READ_ERRORS as exc:
            raise InputFileError(f"cannot read {what} {path}: {_one_line(exc)}") from exc


def read_npy(
    path: str | Path, what: str, spec: ArraySpec, *, budget_bytes: int | None = None
) -> npt.NDArray[Any]:
    """The one array of an `.npy` file, checked against `spec` and the budget before it is read."""
    budget = max_bytes() if budget_bytes is None else budget_bytes
    with open_input(path, what, max_bytes=budget) as fh:
        try:
            size = fh.seek(0, 2)
            fh.seek(0)
            header = _read_header(fh, size, spec, path)
            _check_budget({spec.name: header}, budget, path)
            return _read_data(fh, header, spec.name, path)
        except EldrError:
            raise
        except _READ_ERRORS as exc:
            raise InputFileError(f"cannot read {what} {path}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_directory(fh: IO[bytes]) -> None:
    """Refuse a zip whose central directory is huge before `zipfile` reads all of it."""
    size = fh.seek(0, 2)
    tail_size = min(size, 22 + 65_535)  # end record + the longest comment
    fh.seek(size - tail_size)
    tail = fh.read(tail_size)
    fh.seek(0)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(tail):
        raise zipfile.BadZipFile("not an .npz (zip) archive")
    (num_members,) = struct.unpack_from("<H", tail, end + 10)
    (directory_bytes,) = struct.unpack_from("<I", tail, end + 12)
    if num_members > MAX_NPZ_MEMBERS or (
        directory_bytes != 0xFFFFFFFF and directory_bytes > MAX_NPZ_DIRECTORY_BYTES
    ):
        raise zipfile.BadZipFile(
            f"the archive lists {num_members} members in a {size_text(directory_bytes)} directory, "
            f"more than the {MAX_NPZ_MEMBERS} members / {size_text(MAX_NPZ_DIRECTORY_BYTES)} eldr reads"
        )


def _parse_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    npy: Any = np.lib.format  # untyped in numpy's stubs
    version = npy.read_magic(fp)
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    with warnings.catch_warnings():  # a Python-2 header warns; its problems are errors below
        warnings.simplefilter("ignore")
        shape, is_fortran, dtype = readers[version](fp, max_header_size=MAX_NPY_HEADER_BYTES)
    return tuple(shape), bool(is_fortran), dtype


def _skip_header(fp: IO[bytes]) -> None:
    _parse_header(fp)


def _read_header(fp: IO[bytes], stored_bytes: int, spec: ArraySpec, path: str | Path) -> Header:
    shape, is_fortran, dtype = _parse_header(fp)
    name = spec.name
    if any(dim < 0 for dim in shape):
        raise InputFileError(f"{path}: {name} declares a negative dimension, shape {shape}")
    if dtype.hasobject:
        raise InputFileError(f"{path}: {name} holds Python objects (dtype {dtype}); eldr never unpickles")
    if dtype.kind not in spec.kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise InputFileError(f"{path}: {name} must hold {spec.describe_kinds()}, got dtype {dtype}")
    if spec.ndim == 0:
        if shape not in ((), (1,)):
            raise InputFileError(f"{path}: {name} must be a scalar, got shape {shape}")
    elif spec.ndim is not None and len(shape) != spec.ndim:
        raise InputFileError(f"{path}: {name} must have {spec.ndim} dimensions, got shape {shape}")
    header = Header(shape, dtype, is_fortran)
    available = stored_bytes - fp.tell()
    if header.data_bytes > available:
        raise InputFileError(
            f"{path}: {name} declares shape {shape} of {dtype} ({size_text(header.data_bytes)}), "
            f"the file holds {size_text(max(available, 0))} of it"
        )
    return header


def _check_budget(headers: dict[str, Header], budget: int, path: str | Path) -> None:
    total = sum(h.memory_bytes for h in headers.values())
    if total > budget:
        biggest = max(headers, key=lambda n: headers[n].memory_bytes)
        raise InputFileError(
            f"{path}: its arrays would take {size_text(total)} in memory "
            f"({biggest} {headers[biggest].shape}), "
            f"above the limit of {size_text(budget)} (set {MAX_BYTES_ENV} to raise it)"
        )


def _read_data(fp: IO[bytes], header: Header, name: str, path: str | Path) -> npt.NDArray[Any]:
    flat = np.empty(header.num_elements, dtype=header.dtype)
    if header.data_bytes:
        view = flat.view(np.uint8)
        done = 0
        while done < header.data_bytes:
            chunk = fp.read(min(CHUNK_BYTES, header.data_bytes - done))
            if not chunk:
                raise InputFileError(f"{path}: {name} is truncated ({done} of {header.data_bytes} bytes)")
            view[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            done += len(chunk)
    if header.dtype.kind == "U" and flat.size:
        order = "=" if header.dtype.byteorder in "=|" else header.dtype.byteorder
        codes = flat.view(np.dtype(f"{order}u4"))
        if np.any((codes > 0x10FFFF) | ((codes >= 0xD800) & (codes <= 0xDFFF))):
            raise InputFileError(f"{path}: {name} holds invalid text (code points outside Unicode)")
    if header.is_fortran:
        return flat.reshape(header.shape[::-1]).transpose()
    return flat.reshape(header.shape)


def read_meta(arrays: dict[str, npt.NDArray[Any]], path: str | Path) -> dict[str, Any]:
    """The 0-d JSON string array `meta` as a dict (empty when absent)."""
    if "meta" not in arrays:
        return {}
    try:
        meta = json.loads(str(arrays["meta"].reshape(())))
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise InputFileError(f"{path}: meta is not a JSON string: {exc}") from exc
    if not isinstance(meta, dict):
        raise InputFileError(f"{path}: meta must be a JSON object")
    return meta


def scalar_int(array: npt.NDArray[Any], name: str, where: str, *, low: int, high: int) -> int:
    """A scalar array as an int in [low, high]: an integer, or a float holding a whole number."""
    item = array.reshape(())[()]
    if array.dtype.kind == "f":
        number = float(item)
        if not math.isfinite(number) or number != round(number):
            raise InvalidInputError(f"{where}{name} must be a whole number, got {number}")
        value = int(number)
    elif array.dtype.kind in "iu":
        value = int(item)
    else:
        raise InvalidInputError(f"{where}{name} must be an integer, got dtype {array.dtype}")
    if not low <= value <= high:
        raise InvalidInputError(f"{where}{name} must lie in [{low}, {high}], got {value}")
    return value


def whole_numbers(
    array: npt.NDArray[Any], name: str, where: str, *, low: int, high: int
) -> npt.NDArray[np.int64]:
    """An integer array, or a float array of whole numbers, within [low, high], as int64."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InvalidInputError(f"{where}{name} contains NaN or infinite values")
        if np.any(array != np.round(array)):
            raise InvalidInputError(f"{where}{name} must hold whole numbers, found fractions")
    elif array.dtype.kind not in "iu":
        raise InvalidInputError(f"{where}{name} must hold integers, got dtype {array.dtype}")
    if array.size and (int(array.min()) < low or int(array.max()) > high):
        raise InvalidInputError(
            f"{where}{name} must lie in [{low}, {high}], found values in [{array.min()}, {array.max()}]"
        )
    return array.astype(np.int64)
