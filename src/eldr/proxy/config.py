"""The proxy's configuration: one frozen dataclass, built once from a YAML file and/or flags.

Keys of the YAML file are the field names below (snake_case); a flag given on the command line wins
over the file. `examples/serve.yaml` lists every key with its default; `docs/serving.md` explains them.
Everything that would make the proxy fail later is refused here, at start (docs/limits.md): numbers
outside `RANGES` or not finite, engine URLs listed twice (compared by `engineurl.url_identity`), an
empty or non-printable key or token, a host that listens on every interface unless
`allow_public_host` says so.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import reprlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eldr.engineurl import check_url, url_identity
from eldr.errors import ConfigError, InputFileError
from eldr.inputfile import read_text
from eldr.limits import GIB, MAX_CONFIG_BYTES, MAX_REFIT_WINDOW, MAX_SEED, MAX_TIMEOUT_S, MIB
from eldr.policy import DEFAULT_LAM, DEFAULT_TAU, FEWEST_NEW_EXPERTS, SERVE_POLICIES, check_tau
from eldr.policy.refit import DEFAULT_REFIT_WINDOW

KIB = 1024

PREFILL_POLICIES = ("least-loaded", "prefix-hash")
LOAD_SIGNALS = ("router", "blend")
AUTH_FORWARDING = ("none", "client", "engine-key")
LOG_LEVELS = ("debug", "info", "warning", "error")
__all__ = ["RANGES", "ServeConfig", "build_config", "check_url", "read_yaml"]

# numeric settings: (low, high, is_low_open); floats must also be finite. The flags use the same table.
RANGES: dict[str, tuple[float, float, bool]] = {
    "seed": (0, MAX_SEED, False),
    "port": (0, 65535, False),
    "prefix_bytes": (1, 1 * MIB, False),
    "hash_virtual_nodes": (1, 10_000, False),
    "hash_load_factor": (0.0, 1000.0, True),
    "connect_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "prefill_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "decode_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "stream_idle_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "max_attempts": (1, 100, False),
    "keep_alive_s": (0.0, MAX_TIMEOUT_S, True),
    "max_concurrency": (1, 1_000_000, False),
    "max_queue": (0, 1_000_000, False),
    "queue_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "max_body_bytes": (1, 1 * GIB, False),
    "max_body_bytes_in_flight": (1, 64 * GIB, False),
    "max_answer_bytes": (1, 4 * GIB, False),
    "max_answer_header_bytes": (1 * KIB, 16 * MIB, False),
    "offload_answer_bytes": (0, 4 * GIB, False),
    "max_header_bytes": (1 * KIB, 16 * MIB, False),
    "client_header_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "client_body_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "client_write_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "max_connections": (1, 1_000_000, False),
    "shutdown_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "health_interval_s": (0.0, MAX_TIMEOUT_S, True),
    "health_timeout_s": (0.0, MAX_TIMEOUT_S, True),
    "eject_after": (1, 1_000_000, False),
    "recover_after": (1, 1_000_000, False),
    "refit_every": (0, 1_000_000_000, False),
    "refit_window": (1, MAX_REFIT_WINDOW, False),
    "top_k": (0, 4096, False),
    "lam": (0.0, 1e6, False),
}
MAX_MODELS = 1024  # served model names
MAX_ENGINES = 4096  # prefill or decode URLs (also the most the admin API may add up to)
MAX_ALLOWED_HOSTS = 1024  # entries of admin_engine_hosts


@dataclass(frozen=True)
class ServeConfig:
    """Everything `eldr serve` needs; validates itself."""

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    partition: str | None = None  # path of the partition file (`eldr fit`); needed by policy eldr
    policy: str = "eldr"
    tau: float = DEFAULT_TAU
    # fewest-new-experts: experts per token (0: the partition's top_k) and the load weight
    top_k: int = 0
    lam: float = DEFAULT_LAM
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    allow_public_host: bool = False  # host may be 0.0.0.0 / :: (every interface)
    models: tuple[str, ...] = ()  # served model names; empty: learned from the engines' /v1/models
    # prefill choice
    prefill_policy: str = "least-loaded"
    prefix_bytes: int = 1024  # prefix-hash: hash the prompt's first bytes
    hash_virtual_nodes: int = 160
    hash_load_factor: float = 1.25  # prefix-hash: fall back to least-loaded above this x mean load
    # timeouts (seconds) and retries
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 60.0  # the whole prefill leg
    decode_timeout_s: float = 60.0  # decode leg: until its first byte
    stream_idle_timeout_s: float = 60.0  # decode leg: longest gap between two chunks
    max_attempts: int = 3  # prefill+decode attempts per request (failover to other instances)
    keep_alive_s: float = 75.0  # idle client connections are closed after this (longer than clients')
    # admission and input limits
    max_concurrency: int = 1024  # requests inside the proxy at once
    max_queue: int = 1024  # requests waiting for a slot; beyond: 429
    queue_timeout_s: float = 10.0  # longest wait for a slot; beyond: 503
    max_body_bytes: int = 16 * 1024 * 1024
    # request bodies held by the requests inside the proxy, together; beyond: 429 + Retry-After
    max_body_bytes_in_flight: int = 256 * 1024 * 1024
    max_answer_bytes: int = 256 * 1024 * 1024  # an engine's answer (or one SSE event); beyond: a failed leg
    max_answer_header_bytes: int = 64 * 1024  # an engine answer's status line + headers; beyond: a failed leg
    # prefill answers larger than this are parsed (JSON, routed experts) in a worker process, off the loop
    offload_answer_bytes: int = 1024 * 1024
    # client connections (eldr.proxy.server)
    max_header_bytes: int = 64 * 1024  # request line + headers; beyond: 431, connection closed
    client_header_timeout_s: float = 10.0  # the whole request head; beyond: 408, connection closed
    client_body_timeout_s: float = 60.0  # the whole request body after its head; beyond: 408
    client_write_timeout_s: float = 30.0  # a client that takes no bytes this long is disconnected
    max_connections: int = 4096  # open client connections; beyond: 503 + Retry-After, closed
    shutdown_timeout_s: float = 10.0  # on SIGTERM/SIGINT: running requests' time to finish
    # health checks
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    eject_after: int = 2  # consecutive failed checks
    recover_after: int = 1  # consecutive good checks
    # load signal: router-tracked in-flight, or blended with engines' vllm:num_requests_running/waiting
    load_signal: str = "router"
    # online refit of the eldr centroids (0: off)
    refit_every: int = 0
    refit_window: int = DEFAULT_REFIT_WINDOW
    # security
    api_key: str | None = None  # clients must send `Authorization: Bearer <api_key>`
    public_health_metrics: bool = False  # with api_key: /health and /metrics answer without it
    admin_token: str | None = None  # enables /admin/*; send `Authorization: Bearer <admin_token>`
    # hosts /admin/decode may add engines on: IP addresses, networks (10.0.0.0/8), host names;
    # empty: the hosts of the configured --prefill/--decode URLs only
    admin_engine_hosts: tuple[str, ...] = ()
    forward_auth: str = "none"  # none | client (relay the client's header) | engine-key
    engine_api_key: str | None = None  # sent to engines with forward_auth = engine-key
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.prefill:
            raise ConfigError("at least one --prefill URL is needed")
        if not self.decode:
            raise ConfigError("at least one --decode URL is needed")
        for role, urls in (("prefill", self.prefill), ("decode", self.decode)):
            _check_engines(role, urls)
        _check_host(self.host, self.allow_public_host)
        for name in ("api_key", "admin_token", "engine_api_key"):
            _check_secret(name, getattr(self, name))
        if len(self.models) > MAX_MODELS or any(not m.strip() or not m.isprintable() for m in self.models):
            raise ConfigError(f"models must be at most {MAX_MODELS} non-empty, printable names")
        if self.partition is not None and not self.partition.strip():
            raise ConfigError("partition must be a file path, got an empty one")
        for name, (low, high, is_low_open) in RANGES.items():
            _check_range(name, getattr(self, name), low, high, is_low_open)
        _choice("policy", self.policy, SERVE_POLICIES)
        _choice("prefill_policy", self.prefill_policy, PREFILL_POLICIES)
        _choice("load_signal", self.load_signal, LOAD_SIGNALS)
        _choice("forward_auth", self.forward_auth, AUTH_FORWARDING)
        _choice("log_level", self.log_level, LOG_LEVELS)
        if self.policy == "eldr" and self.partition is None:
            raise ConfigError("policy eldr needs --partition (fit one with `eldr fit`)")
        if self.policy == FEWEST_NEW_EXPERTS and not self.top_k and self.partition is None:
            raise ConfigError(f"policy {FEWEST_NEW_EXPERTS} needs --top-k (or a --partition that records it)")
        if self.forward_auth == "engine-key" and not self.engine_api_key:
            raise ConfigError("forward_auth engine-key needs engine_api_key")
        check_tau(self.tau)
        if self.refit_every and self.policy != "eldr":
            raise ConfigError("refit_every needs policy eldr")
        if self.refit_every and self.refit_window < len(self.decode):
            raise ConfigError("refit_window must hold at least one request per decode instance")
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ConfigError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be at least max_body_bytes "
                f"({self.max_body_bytes}): a request of the largest size could never be admitted"
            )
        _check_allowed_hosts(self.admin_engine_hosts)

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {reprlib.repr(value)}")


def _check_engines(role: str, urls: tuple[str, ...]) -> None:
    if len(urls) > MAX_ENGINES:
        raise ConfigError(f"at most {MAX_ENGINES} {role} URLs, got {len(urls)}")
    seen: dict[str, str] = {}
    for url in urls:
        identity = url_identity(url)
        if identity in seen:
            raise ConfigError(f"{role} URLs {seen[identity]!r} and {url!r} name the same engine ({identity})")
        seen[identity] = url


def _check_allowed_hosts(entries: tuple[str, ...]) -> None:
    if len(entries) > MAX_ALLOWED_HOSTS:
        raise ConfigError(f"admin_engine_hosts holds at most {MAX_ALLOWED_HOSTS} entries, got {len(entries)}")
    for entry in entries:
        try:
            parse_allowed_host(entry)
        except ValueError:
            raise ConfigError(
                "admin_engine_hosts entries must be IP addresses, networks (10.0.0.0/8) or host names, "
                f"got {reprlib.repr(entry)}"
            ) from None


AllowedHost = ipaddress.IPv4Network | ipaddress.IPv6Network | str


def parse_allowed_host(entry: str) -> AllowedHost:
    """An allowlist entry: a network (an address is a /32 or /128), a lower-case host name, or
    `.domain` (every name under it); `ValueError` for anything else. `localhost` is 127.0.0.1, as in
    `engineurl.url_identity`."""
    text = entry.strip().lower().rstrip(".")
    if not text or len(text) > 253 or not text.isprintable():
        raise ValueError(entry)
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    name = text[1:] if text.startswith(".") else text
    if not name or not all(c.isalnum() or c in "-._" for c in name) or name.startswith((".", "-")):
        raise ValueError(entry)
    if text == "localhost":
        return ipaddress.ip_network("127.0.0.1/32")
    return text


def is_allowed_host(host: str, allowed: tuple[AllowedHost, ...]) -> bool:
    """Whether `host` (canonical, as `url_identity` writes it) is in the allowlist."""
    try:
        address: Any = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    for entry in allowed:
        if isinstance(entry, str):
            if address is None and (host == entry or (entry.startswith(".") and host.endswith(entry))):
                return True
        elif address is not None and address.version == entry.version and address in entry:
            return True
    return False


def _check_host(host: str, allow_public_host: bool) -> None:
    """A host to listen on: an IP address or host name; every interface only when allowed."""
    name = host.strip().strip("[]")
    if not name or name != host.strip("[]") or not name.isprintable() or len(name) > 253:
        raise ConfigError(f"host must be an IP address or host name to listen on, got {host!r}")
    try:
        address: Any = ipaddress.ip_address(name)
    except ValueError:
        try:  # legacy IPv4 forms ("0", "0.0") that the resolver also accepts
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            address = None
    if address is None and not all(c.isalnum() or c in "-._" for c in name):
        raise ConfigError(f"host must be an IP address or host name to listen on, got {host!r}")
    if address is not None and address.is_unspecified and not allow_public_host:
        raise ConfigError(
            f"host {host!r} listens on every interface: pass --allow-public-host (allow_public_host: true) "
            "to mean it, or listen on one address such as 127.0.0.1"
        )


def _check_secret(name: str, value: str | None) -> None:
    if value is None:
        return
    if not value or not all(0x21 <= ord(c) <= 0x7E for c in value) or len(value) > 4096:
        raise ConfigError(
            f"{name} must be 1 to 4096 visible ASCII characters (no spaces); leave it unset for none"
        )


def _check_range(name: str, value: float, low: float, high: float, is_low_open: bool) -> None:
    above_low = value > low if is_low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        bounds = f"{'(' if is_low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{name} must be a finite number in {bounds}, got {value!r}")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ServeConfig))
_TUPLES = ("prefill", "decode", "models", "admin_engine_hosts")


_KINDS = {f.name: str(f.type) for f in dataclasses.fields(ServeConfig)}


def _typed(name: str, value: Any) -> Any:
    """`value` checked against the field's declared type (YAML may hold anything)."""
    kind = _KINDS[name]
    if value is None and kind.endswith("| None"):
        return None
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name} must be a finite number, got {reprlib.repr(value)}") from None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind.startswith("str") and isinstance(value, str):
        return value
    if kind.startswith("tuple") and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return value
    expected = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
        kind, "text" if kind.startswith("str") else "a list of text"
    )
    raise ConfigError(f"{name} must be {expected}, got {reprlib.repr(value)}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config file's mapping; unknown keys are an error (a typo must not pass silently)."""
    import yaml  # type: ignore[import-untyped]

    text = read_text(path, "config file", max_bytes=MAX_CONFIG_BYTES, limit_name="docs/limits.md")
    try:
        data = yaml.safe_load(text)
    except RecursionError as exc:
        raise InputFileError(f"config file {path} nests too deeply") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InputFileError(f"config file {path} is not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputFileError(f"config file {path} must hold a mapping of keys to values")
    unknown = sorted({str(key) for key in data} - set(FIELD_NAMES))
    if unknown or not all(isinstance(key, str) for key in data):
        raise ConfigError(f"unknown key(s) in {path}: {reprlib.repr(', '.join(unknown))}")
    return data


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ServeConfig:
    """Merge file values with flags (flags win; None means 'not given') into a validated config."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    for name in _TUPLES:
        value = merged.get(name)
        if isinstance(value, str):
            merged[name] = (value,)
        elif isinstance(value, list | tuple):
            merged[name] = tuple(value)
        elif value is not None:
            raise ConfigError(f"{name} must be a list of text, got {reprlib.repr(value)}")
    merged.setdefault("prefill", ())
    merged.setdefault("decode", ())
    for name, value in merged.items():
        merged[name] = _typed(name, value)
    try:
        return ServeConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc
