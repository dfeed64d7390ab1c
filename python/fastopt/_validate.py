"""Hyper-parameter checks shared by every public function: a bad value raises a
TypeError/ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["real", "flag", "step_count", "whole", "renamed_entries"]


def is_inf(value: Any) -> bool:
    """Whether ``value`` is +inf as a float (Python's or NumPy's, any width): where an
    option takes inf beside finite reals (a clip that never clips)."""
    return isinstance(value, (float, np.floating)) and value == math.inf


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


def whole(name: str, value: Any, lo: int, hi: Optional[int] = None, what: str = "") -> int:
    """``value`` (a Python or NumPy integer, not a bool) as an int in [lo, hi) (hi None: no
    bound), else a TypeError/ValueError naming it; ``what`` follows "an integer" in the
    message for another type."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer{what}, got {type(value).__name__}")
    v = int(value)
    if hi is None and v < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {v}")
    if hi is not None and not lo <= v < hi:
        power = hi.bit_length() - 1
        top = f"2**{power}" if hi == 1 << power and power > 16 else str(hi)
        raise ValueError(f"{name}: must be in [{lo}, {top}), got {v}")
    return v


# An entry of a list argument in a binding's message: "grads[3]", "absmax['exp_avgs'][3]".
_ENTRY = re.compile(r"\b([A-Za-z_]+(?:\['[A-Za-z_]+'\])?)\[(\d+)\]")


def renamed_entries(exc: Exception, name: Callable[[str, int], str]) -> Exception:
    """``exc`` (a binding's TypeError/ValueError) again, with each list entry its message
    names (``grads[3]``: role "grads", index 3) as ``name(role, index)``: a call over part
    of the caller's lists names the entry the caller knows."""
    return type(exc)(_ENTRY.sub(lambda m: name(m[1], int(m[2])), str(exc)))
