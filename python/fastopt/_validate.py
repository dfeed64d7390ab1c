"""Hyper-parameter checks shared by every public function: a bad value raises a
TypeError/ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["real", "flag", "step_count"]


def real(
    name: str,
    value: Any,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite float in the given interval, else a ValueError/TypeError naming it."""
    if (
        type(value) is not float
        and type(value) is not int
        and (  # the ABC check is slow
            isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
        )
    ):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int (or Real) past the float range: 10**400
        raise ValueError(f"{name}: must be finite, got a value out of the float range") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    lo_ok = v > lo if lo_open else v >= lo
    hi_ok = v < hi if hi_open else v <= hi
    if not (lo_ok and hi_ok):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: must be in {interval}, got {v}")
    return v


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def step_count(value: Any, name: str = "step") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 1, got {type(value).__name__}")
    v = int(value)
    if v < 1:
        raise ValueError(f"{name}: must be >= 1 (the 1-based count of this step), got {v}")
    return v
