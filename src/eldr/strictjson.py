"""Strict JSON for every `--json` output: never a bare NaN or Infinity.

A metric that is undefined (a percentile of no values, a correlation of constant counts) becomes
`null`; numpy scalars and arrays become plain numbers and lists. `json.dumps(..., allow_nan=False)`
then guarantees the text parses in every JSON reader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (anywhere inside) replaced by None."""
    if isinstance(value, bool | str | None):
        return value
    if isinstance(value, np.ndarray):
        return finite_or_none(value.tolist())
    if isinstance(value, np.generic):
        return finite_or_none(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any) -> str:
    """One line of strict JSON."""
    return json.dumps(finite_or_none(value), allow_nan=False)
