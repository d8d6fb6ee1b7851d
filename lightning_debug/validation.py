"""Constructor-argument checks: a ValueError that names the argument and what it accepts."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, low: int) -> None:
    """``value`` must be an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")


def check_float(name: str, value: Any, low: float, high: float | None = None) -> None:
    """``value`` must be a finite number in the open interval (``low``, ``high``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > low
    if ok and high is not None:
        ok = value < high
    if not ok:
        accepted = f"in ({low:g}, {high:g})" if high is not None else f"> {low:g}"
        raise ValueError(f"`{name}` must be a number {accepted}, got {value!r}")
