"""The one exception tree (`eldr.errors`): every public exception class of the package is in it, the
groups are the ones its docstring draws, and catching `EldrError` catches an engine's failure."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import eldr
from eldr import errors
from eldr.errors import (
    AnswerTooLarge,
    ConfigError,
    DataError,
    DuplicateRequestError,
    EldrError,
    InputFileError,
    InvalidInputError,
    LegFailed,
    ListenError,
    NoHealthyWorkerError,
    OutputFileError,
    ParserFailed,
    PartitionMismatchError,
    PoolChangeError,
    ProxyError,
    Rejected,
    RoutingError,
    ServeError,
    UnknownWorkerError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
)
from eldr.proxy.upstream import UpstreamClient

# class -> (its group, the builtins it also derives from): the tree of the errors.py docstring
TREE: dict[type[EldrError], tuple[type[EldrError], tuple[type[Exception], ...]]] = {
    ConfigError: (EldrError, (ValueError,)),
    DataError: (EldrError, ()),
    InvalidInputError: (DataError, (ValueError,)),
    InputFileError: (DataError, (OSError,)),
    OutputFileError: (DataError, (OSError,)),
    PartitionMismatchError: (DataError, ()),
    RoutingError: (EldrError, ()),
    NoHealthyWorkerError: (RoutingError, ()),
    DuplicateRequestError: (RoutingError, (ValueError,)),
    ServeError: (EldrError, ()),
    ListenError: (ServeError, (OSError,)),
    Rejected: (ServeError, ()),
    ProxyError: (ServeError, ()),
    PoolChangeError: (ServeError, ()),
    UnknownWorkerError: (ServeError, (LookupError,)),
    UpstreamError: (EldrError, ()),
    UpstreamConnectionError: (UpstreamError, ()),
    UpstreamTimeout: (UpstreamError, (TimeoutError,)),
    UpstreamProtocolError: (UpstreamError, ()),
    AnswerTooLarge: (UpstreamError, ()),
    ParserFailed: (UpstreamError, ()),
    UpstreamRefused: (UpstreamError, ()),
    LegFailed: (UpstreamError, ()),
}


def _module_names() -> list[str]:
    """Every module under `eldr`, the namespace packages (no `__init__.py`: `proxy/`, `vllm/`) included,
    which `pkgutil.walk_packages` would skip."""
    names: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        names.extend(info.name for info in pkgutil.iter_modules([str(folder)], prefix))
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and sub.name.isidentifier() and any(sub.glob("*.py")):
                walk(sub, f"{prefix}{sub.name}.")

    walk(Path(eldr.__path__[0]), "eldr.")
    return sorted(set(names))


def _exception_classes() -> list[type[BaseException]]:
    """The exception classes defined at the top of any module of `eldr` (imported modules whose
    optional dependencies, such as vLLM, are not installed are left out)."""
    found: list[type[BaseException]] = []
    imported: list[str] = []
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if (exc.name or "eldr").partition(".")[0] == "eldr":
                raise
            continue  # an extra that is not installed
        imported.append(name)
        found.extend(
            value
            for value in vars(module).values()
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name
        )
    assert {"eldr.errors", "eldr.proxy.upstream", "eldr.proxy.forwarding", "eldr.cli"} <= set(imported)
    return found


def test_every_public_exception_class_is_in_the_tree() -> None:
    """Found by walking the package, not from a list: a new class raised from a module, or one
    moved back out of `eldr.errors`, fails here."""
    classes = _exception_classes()
    public = [c for c in classes if not c.__name__.startswith("_")]
    assert {UpstreamError, ProxyError, EldrError} <= set(public)  # the walk saw the tree itself
    outside = [f"{c.__module__}.{c.__qualname__}" for c in public if not issubclass(c, EldrError)]
    assert outside == [], "derive these from eldr.errors.EldrError"
    elsewhere = [f"{c.__module__}.{c.__qualname__}" for c in public if c.__module__ != "eldr.errors"]
    assert elsewhere == [], "define these in eldr.errors, the one place the tree is documented"


@pytest.mark.parametrize(
    ("cls", "group", "builtins"), [(c, g, b) for c, (g, b) in TREE.items()], ids=[c.__name__ for c in TREE]
)
def test_each_class_is_in_its_group(
    cls: type[EldrError], group: type[EldrError], builtins: tuple[type[Exception], ...]
) -> None:
    eldr_bases = [b for b in cls.__bases__ if issubclass(b, EldrError)]
    other_bases = tuple(b for b in cls.__bases__ if not issubclass(b, EldrError))
    assert eldr_bases == [group] and other_bases == builtins


def test_the_docstring_draws_the_tree() -> None:
    """Each line of the diagram in `eldr.errors`'s docstring sits under its group (four columns a
    level), names its builtins in brackets, and the diagram holds every class of the module."""
    assert errors.__doc__ is not None
    drawn: dict[str, tuple[str, tuple[str, ...]]] = {}
    path: list[str] = []  # the groups above the current line
    for line in errors.__doc__.splitlines():
        match = re.fullmatch(r" {4}([ │]*[├└]── )?(\w+)(?: \[([\w, ]+)\])?(?:\s.*)?", line)
        if match is None or not hasattr(errors, match[2]):
            continue
        depth = len(match[1] or "") // 4
        path[depth:] = [match[2]]
        builtins = tuple(match[3].split(", ")) if match[3] else ()
        drawn[match[2]] = (path[depth - 1] if depth else "", builtins)
    expected = {c.__name__: (g.__name__, tuple(b.__name__ for b in bs)) for c, (g, bs) in TREE.items()}
    assert drawn == {"EldrError": ("", ()), **expected}
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == "eldr.errors"
    }
    assert defined == set(drawn)


async def _engine(answer: bytes | None) -> tuple[asyncio.Server, str]:
    """A loopback engine that reads one request head and writes `answer` (None: never answers)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await asyncio.sleep(30)
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once it is closed


def _body(size: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode() + b"x" * size


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (_body(4096), AnswerTooLarge),  # over the 1 KiB limit below
        (None, UpstreamTimeout),
        (b"NOT HTTP AT ALL\r\n\r\n", UpstreamProtocolError),
        (b"", UpstreamConnectionError),  # the engine closes without a byte
        ("closed port", UpstreamConnectionError),
    ],
    ids=["too-large", "timeout", "malformed", "closed", "refused"],
)
def test_catching_eldr_error_catches_an_engine_failure(
    answer: bytes | str | None, expected: type[UpstreamError]
) -> None:
    """The proxy's upstream client against a real loopback engine: each way the engine fails is
    caught by `except EldrError`, as its own class of the `UpstreamError` group."""

    async def fetch(url: str) -> bytes:
        client = UpstreamClient(connect_timeout_s=2.0, keepalive_s=2.0)
        try:
            deadline = asyncio.get_running_loop().time() + (0.3 if answer is None else 10.0)
            response = await client.request(
                client.endpoint(url), "POST", "/v1/completions", {}, b"{}", deadline
            )
            return await response.read(deadline, max_bytes=1024)
        finally:
            await client.close()

    async def main() -> EldrError | None:
        if isinstance(answer, str):
            return await _caught(lambda: fetch(_closed_port()))
        server, url = await _engine(answer)
        try:
            return await _caught(lambda: fetch(url))
        finally:
            server.close()

    caught = asyncio.run(main())
    assert type(caught) is expected and isinstance(caught, UpstreamError)
    if expected is UpstreamTimeout:
        assert isinstance(caught, TimeoutError)  # callers that catch the builtin still do


async def _caught(call: Callable[[], Awaitable[bytes]]) -> EldrError | None:
    try:
        await call()
    except EldrError as exc:  # what a caller of eldr writes
        return exc
    return None
