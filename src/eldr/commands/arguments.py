"""Argument types shared by the subcommands: values checked when the command line is parsed."""

from __future__ import annotations

import argparse

from eldr.errors import ConfigError
from eldr.policy import check_tau


def tau_value(text: str) -> float:
    """`--tau`: a finite band width >= 0 (0 = pure locality, >= 1 = JSQ)."""
    try:
        return check_tau(float(text))
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from exc
