"""Argument types shared by the subcommands: values checked when the command line is parsed.

Every numeric flag has a documented range (docs/limits.md, `eldr.limits`): a value outside it, a
non-finite float or a number in the wrong form is refused with one line and exit status 2 before any
work starts; nothing is reinterpreted (`--num-calibration=-5` is an error, not "all but 5").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from eldr.engineurl import check_url
from eldr.errors import ConfigError
from eldr.limits import MAX_LOAD, MAX_SEED, MAX_WORKERS
from eldr.policy import check_tau


def tau_value(text: str) -> float:
    """`--tau`: a finite band width >= 0 (0 = pure locality, >= 1 = JSQ)."""
    try:
        return check_tau(float(text))
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from exc


def _parse_int(text: str) -> int | None:
    stripped = text.strip()
    if not stripped or len(stripped) > 30:
        return None
    try:
        return int(stripped, 10)
    except ValueError:
        return None


def int_in(low: int, high: int) -> Callable[[str], int]:
    """A flag type: a whole number in [low, high] ('1e3', '2.0' and '0x10' are refused)."""

    def parse(text: str) -> int:
        value = _parse_int(text)
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def float_in(low: float, high: float, *, is_low_open: bool = False) -> Callable[[str], float]:
    """A flag type: a finite number in [low, high] (or (low, high] with `is_low_open`)."""
    bounds = f"{'(' if is_low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above_low = value > low if is_low_open else value >= low
        if not (math.isfinite(value) and above_low and value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text!r}")
        return value

    parse.__name__ = f"number in {bounds}"
    return parse


def int_list(low: int, high: int, *, max_items: int) -> Callable[[str], list[int]]:
    """A flag type: 1..max_items comma-separated whole numbers, each in [low, high]."""
    item = int_in(low, high)

    def parse(text: str) -> list[int]:
        parts = text.split(",")
        if len(parts) > max_items:
            raise argparse.ArgumentTypeError(f"takes at most {max_items} values, got {len(parts)}")
        try:
            return [item(part) for part in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be up to {max_items} comma-separated integers in [{low}, {high}], got {text!r}"
            ) from None

    parse.__name__ = "integer list"
    return parse


seed_value = int_in(0, MAX_SEED)
workers_value = int_in(1, MAX_WORKERS)
loads_value = int_list(0, MAX_LOAD, max_items=MAX_WORKERS)


def nonempty_text(text: str) -> str:
    """A flag type: text that is not empty or blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def engine_url(text: str) -> str:
    """A flag type: an engine base URL, http(s)://host:port, no path, no credentials."""
    try:
        return check_url(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
