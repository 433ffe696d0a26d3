"""`eldr.proxy.config` on its own: file + flags -> one validated `ServeConfig`."""

from __future__ import annotations

from pathlib import Path

import pytest

from eldr.errors import ConfigError, InputFileError
from eldr.policy import SERVE_POLICIES
from eldr.proxy.config import build_config, read_yaml

ENGINES = {"prefill": ["http://127.0.0.1:8001"], "decode": ["http://127.0.0.1:8101", "http://127.0.0.1:8102"]}


def test_flags_win_over_the_file_and_none_means_not_given() -> None:
    config = build_config({**ENGINES, "policy": "rr", "tau": 0.3, "port": 9000}, {"tau": 0.2, "port": None})
    assert config.tau == 0.2 and config.port == 9000 and config.policy == "rr"
    assert config.prefill == ("http://127.0.0.1:8001",)  # a list in YAML becomes a tuple
    single = build_config(
        {"prefill": "http://127.0.0.1:8001", "decode": "http://127.0.0.1:8101"}, {"policy": "jsq"}
    )
    assert single.decode == ("http://127.0.0.1:8101",)  # one URL may be written as text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": "80"}, "port must be an integer"),
        ({"port": True}, "port must be an integer"),
        ({"tau": "0.1"}, "tau must be a number"),
        ({"tau": 10**400}, "tau must be a finite number"),
        ({"public_health_metrics": "yes"}, "public_health_metrics must be true or false"),
        ({"decode": 5}, "decode must be a list of text"),
        ({"models": [1, 2]}, "models must be a list of text"),
        ({"policy": "oracle"}, "policy"),
        ({"policy": "eldr"}, "needs --partition"),
        ({"refit_every": 10, "policy": "jsq"}, "refit_every needs policy eldr"),
        (
            {"refit_every": 10, "refit_window": 1, "partition": "p.npz", "policy": "eldr"},
            "refit_window must hold",
        ),
    ],
)
def test_bad_values_are_one_clear_config_error(values: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {**ENGINES, "policy": "rr", **values}
    with pytest.raises(ConfigError, match=message):
        build_config(settings, {})


def test_every_servable_policy_is_accepted_and_only_those() -> None:
    for name in SERVE_POLICIES:
        build_config({**ENGINES, "policy": name, "partition": "p.npz", "top_k": 2}, {})
    with pytest.raises(ConfigError, match=", ".join(SERVE_POLICIES)):
        build_config({**ENGINES, "policy": "domain"}, {})


def test_the_config_file_refuses_unknown_keys_non_mappings_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("prefill: [http://127.0.0.1:8001]\ndecode: http://127.0.0.1:8101\npolicy: rr\n")
    assert read_yaml(path) == {
        "prefill": ["http://127.0.0.1:8001"],
        "decode": "http://127.0.0.1:8101",
        "policy": "rr",
    }
    path.write_text("polcy: rr\n")
    with pytest.raises(ConfigError, match="unknown key"):
        read_yaml(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(InputFileError, match="mapping"):
        read_yaml(path)
    path.write_text("policy: [rr\n")
    with pytest.raises(InputFileError, match="not valid YAML at line"):
        read_yaml(path)
    path.write_text("")
    assert read_yaml(path) == {}
