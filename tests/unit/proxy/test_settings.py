"""The hardening settings of `eldr serve` (issue 14): validated at start, and the small rules behind
them: the engine allowlist, the body budget, the public text of a failed leg."""

from __future__ import annotations

import pytest

from eldr.errors import (
    AnswerTooLarge,
    ConfigError,
    ParserFailed,
    Rejected,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from eldr.proxy.admin import allowed_hosts, identity_host
from eldr.proxy.admission import BodyBudget
from eldr.proxy.config import ServeConfig, is_allowed_host
from eldr.proxy.forwarding import _public

P, D = ("http://127.0.0.1:1",), ("http://10.0.0.2:2",)


def config(**settings: object) -> ServeConfig:
    return ServeConfig(prefill=P, decode=D, policy="rr", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_header_bytes": 100}, "max_header_bytes must be a finite number in"),
        ({"max_answer_header_bytes": 0}, "max_answer_header_bytes"),
        ({"client_header_timeout_s": 0.0}, "client_header_timeout_s"),
        ({"client_write_timeout_s": float("inf")}, "client_write_timeout_s"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_body_bytes_in_flight": 1000, "max_body_bytes": 2000}, "could never be admitted"),
        ({"admin_engine_hosts": ("10.0.0.0/8", "bad host!")}, "admin_engine_hosts entries"),
        ({"admin_engine_hosts": ("-x.example",)}, "admin_engine_hosts entries"),
    ],
)
def test_bad_hardening_settings_are_refused_at_start(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**settings)


def test_the_defaults_are_the_documented_safe_ones() -> None:
    c = config()
    assert (c.max_header_bytes, c.client_header_timeout_s, c.client_body_timeout_s) == (65536, 10.0, 60.0)
    assert (c.client_write_timeout_s, c.max_connections, c.max_body_bytes_in_flight) == (
        30.0,
        4096,
        256 << 20,
    )
    assert (c.max_answer_header_bytes, c.offload_answer_bytes) == (65536, 1 << 20)
    assert not c.public_health_metrics and c.admin_engine_hosts == ()


def test_the_engine_allowlist() -> None:
    default = allowed_hosts(config())  # the configured engines' own hosts
    assert is_allowed_host("127.0.0.1", default) and is_allowed_host("10.0.0.2", default)
    assert not is_allowed_host("10.0.0.3", default) and not is_allowed_host("169.254.169.254", default)
    listed = allowed_hosts(config(admin_engine_hosts=("10.1.0.0/16", "gpu-7.lan", ".pool.lan", "localhost")))
    for host, expected in [
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("gpu-7.lan", True),
        ("gpu-8.lan", False),
        ("a.pool.lan", True),
        ("pool.lan", False),
        ("evilpool.lan", False),
        ("127.0.0.1", True),
        ("::1", False),
    ]:
        assert is_allowed_host(host, listed) is expected, host
    assert identity_host("http://LOCALHOST:80/") == "127.0.0.1"
    assert identity_host("http://[::ffff:10.1.2.3]:8000") == "10.1.2.3"
    assert identity_host("http://[::1]:8000") == "::1"


def test_the_body_budget_refuses_what_does_not_fit_and_gives_back_once() -> None:
    budget = BodyBudget(100)
    a, b = budget.reserve(), budget.reserve()
    a.grow(60)
    with pytest.raises(Rejected) as refused:
        b.grow(41)
    assert refused.value.status == 429 and refused.value.reason == "body_budget"
    b.grow(40)
    assert budget.in_use == 100
    a.release()
    a.release()
    assert budget.in_use == 40
    b.release()
    assert budget.in_use == 0


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (
            UpstreamError("cannot connect to 10.0.0.2:8200: [Errno 111] Connection refused"),
            "engine connection failed",
        ),
        (ConnectionRefusedError(111, "Connection refused"), "engine connection failed"),
        (AnswerTooLarge("answer over 65536 bytes"), "answer too large"),
        (TimeoutError(), "timed out"),
        # the finer classes of eldr.errors keep the texts of the classes they refine
        (UpstreamConnectionError("cannot connect to 10.0.0.2:8200: refused"), "engine connection failed"),
        (UpstreamTimeout("no answer from the engine in time"), "timed out"),
        (UpstreamProtocolError("malformed answer: bad status line"), "engine connection failed"),
        (ParserFailed("the answer parser process failed"), "answer could not be parsed"),
    ],
)
def test_a_failed_leg_is_described_without_addresses(exc: BaseException, text: str) -> None:
    assert _public(exc) == text


def test_max_connections_is_fitted_to_the_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soft limit is raised to what the connections need; where the hard limit is lower,
    max_connections is lowered instead of failing on accept under load."""
    from eldr.commands import serve

    limits = {"soft": 1024, "hard": 2048}
    monkeypatch.setattr(serve.resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))

    def setrlimit(_: int, values: tuple[int, int]) -> None:
        limits["soft"] = values[0]

    monkeypatch.setattr(serve.resource, "setrlimit", setrlimit)
    fitted = serve.fit_to_open_files(config(max_connections=4096, max_concurrency=512))
    assert limits["soft"] == 2048 and fitted.max_connections == 2048 - 512 - 4 - serve.FD_RESERVE
    limits.update(soft=1024, hard=100_000)
    assert serve.fit_to_open_files(config()).max_connections == 4096 and limits["soft"] > 4096 + 1024
