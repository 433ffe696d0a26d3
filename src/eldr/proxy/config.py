"""The proxy's configuration: one frozen dataclass, built once from a YAML file and/or flags.

Keys of the YAML file are the field names below (snake_case); a flag given on the command line wins
over the file. `examples/serve.yaml` lists every key with its default; `docs/serving.md` explains them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from eldr.errors import ConfigError, InputFileError
from eldr.policy import DEFAULT_TAU, LOAD_BALANCERS, check_tau

DECODE_POLICIES = (*LOAD_BALANCERS, "eldr")
PREFILL_POLICIES = ("least-loaded", "prefix-hash")
LOAD_SIGNALS = ("router", "blend")
AUTH_FORWARDING = ("none", "client", "engine-key")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `eldr serve` needs; validates itself."""

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    partition: str | None = None  # path of the partition file (`eldr fit`); needed by policy eldr
    policy: str = "eldr"
    tau: float = DEFAULT_TAU
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
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
    max_answer_bytes: int = 256 * 1024 * 1024  # an engine's answer (or one SSE event); beyond: a failed leg
    # health checks
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    eject_after: int = 2  # consecutive failed checks
    recover_after: int = 1  # consecutive good checks
    # load signal: router-tracked in-flight, or blended with engines' vllm:num_requests_running/waiting
    load_signal: str = "router"
    # online refit of the eldr centroids (0: off)
    refit_every: int = 0
    refit_window: int = 2000
    # security
    api_key: str | None = None  # clients must send `Authorization: Bearer <api_key>`
    admin_token: str | None = None  # enables /admin/*; send `Authorization: Bearer <admin_token>`
    forward_auth: str = "none"  # none | client (relay the client's header) | engine-key
    engine_api_key: str | None = None  # sent to engines with forward_auth = engine-key
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.prefill:
            raise ConfigError("at least one --prefill URL is needed")
        if not self.decode:
            raise ConfigError("at least one --decode URL is needed")
        for url in (*self.prefill, *self.decode):
            check_url(url)
        if len(set(self.decode)) != len(self.decode) or len(set(self.prefill)) != len(self.prefill):
            raise ConfigError("a URL is listed twice among the prefill or decode instances")
        _choice("policy", self.policy, DECODE_POLICIES)
        _choice("prefill_policy", self.prefill_policy, PREFILL_POLICIES)
        _choice("load_signal", self.load_signal, LOAD_SIGNALS)
        _choice("forward_auth", self.forward_auth, AUTH_FORWARDING)
        _choice("log_level", self.log_level, LOG_LEVELS)
        if self.policy == "eldr" and self.partition is None:
            raise ConfigError("policy eldr needs --partition (fit one with `eldr fit`)")
        if self.forward_auth == "engine-key" and not self.engine_api_key:
            raise ConfigError("forward_auth engine-key needs engine_api_key")
        check_tau(self.tau)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        positive = (
            "keep_alive_s",
            "connect_timeout_s",
            "prefill_timeout_s",
            "decode_timeout_s",
            "stream_idle_timeout_s",
            "queue_timeout_s",
            "health_interval_s",
            "health_timeout_s",
            "hash_load_factor",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        at_least_one = (
            "max_attempts",
            "max_concurrency",
            "max_body_bytes",
            "max_answer_bytes",
            "eject_after",
            "recover_after",
            "prefix_bytes",
            "hash_virtual_nodes",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.refit_every < 0:
            raise ConfigError("max_queue and refit_every must be >= 0")
        if self.refit_every and self.policy != "eldr":
            raise ConfigError("refit_every needs policy eldr")
        if self.refit_every and self.refit_window < len(self.decode):
            raise ConfigError("refit_window must hold at least one request per decode instance")

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_url(url: str) -> str:
    """An engine base URL: http(s)://host:port, no path beyond '/'."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError outside 0-65535
    except ValueError:
        raise ConfigError(f"engine URL has an invalid port: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"engine URL must look like http://host:port, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"engine URL must not hold credentials (use forward_auth: engine-key), got {url!r}")
    return url.rstrip("/")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ServeConfig))
_TUPLES = ("prefill", "decode", "models")


_KINDS = {f.name: str(f.type) for f in dataclasses.fields(ServeConfig)}


def _typed(name: str, value: Any) -> Any:
    """`value` checked against the field's declared type (YAML may hold anything)."""
    kind = _KINDS[name]
    if value is None and kind.endswith("| None"):
        return None
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("str") and isinstance(value, str):
        return value
    if kind.startswith("tuple") and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return value
    expected = {"int": "an integer", "float": "a number"}.get(
        kind, "text" if kind.startswith("str") else "a list of text"
    )
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config file's mapping; unknown keys are an error (a typo must not pass silently)."""
    import yaml  # type: ignore[import-untyped]

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputFileError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InputFileError(f"config file {path} is not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputFileError(f"config file {path} must hold a mapping of keys to values")
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(map(str, unknown))}")
    return data


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ServeConfig:
    """Merge file values with flags (flags win; None means 'not given') into a validated config."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    for name in _TUPLES:
        value = merged.get(name)
        if isinstance(value, str):
            merged[name] = (value,)
        elif value is not None:
            merged[name] = tuple(value)
    merged.setdefault("prefill", ())
    merged.setdefault("decode", ())
    for name, value in merged.items():
        merged[name] = _typed(name, value)
    try:
        return ServeConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc
