"""Array adapters and argument checks shared by every public function.

A call names its arrays by role (``params``, ``grads``, state lists...). ``prepare`` turns
them into aligned Python lists of NumPy arrays for the CPU module, converting PyTorch CPU
tensors to NumPy views (same memory) on the way. The per-array structural checks (dtype,
shape, contiguity, writability, aliasing) run in the C++ binding, in one pass, because a
step over thousands of tensors must not pay Python's per-attribute cost for each; they
raise the same ``TypeError``/``ValueError`` naming the argument, before any write.
Hyper-parameter checks are here.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ArrayOrList = Any  # an array, or a list/tuple of arrays


def _cuda_unavailable(name: str) -> TypeError:
    from . import _build

    return TypeError(
        f"{name}: is a CUDA array, but {_build.cuda_unavailable_reason()}; "
        "pass NumPy arrays (or CPU tensors) to run on the CPU"
    )


def to_host_array(name: str, a: Any) -> Any:
    """A NumPy view of ``a`` sharing its memory; called by the C++ binding for any list
    element that is not an ndarray. ``name`` is the argument, e.g. "grads[3]"."""
    if hasattr(a, "__cuda_array_interface__"):
        raise _cuda_unavailable(name)
    mod = type(a).__module__
    if mod.startswith("torch"):
        if a.device.type != "cpu":
            raise _cuda_unavailable(name)
        try:
            return a.detach().numpy()  # shares memory; writes land in the tensor
        except (TypeError, RuntimeError) as exc:  # e.g. bfloat16 has no NumPy view
            raise TypeError(f"{name}: {a.dtype} tensor is not supported on the CPU "
                            f"(float32 or float64): {exc}") from None
    raise TypeError(f"{name}: expected a NumPy array or a PyTorch CPU tensor, got "
                    f"{type(a).__name__}")


def host_array(name: str, a: Any) -> Any:
    """``a`` itself if it is a NumPy array, else its NumPy view (``to_host_array``)."""
    return a if isinstance(a, np.ndarray) else to_host_array(name, a)


def as_list(name: str, value: Any, listed: bool) -> List[Any]:
    """``value`` as a list aligned with the params (``listed``: params was a list).
    Elements that are not ndarrays are converted by the C++ binding through
    ``to_host_array`` only when met, so NumPy lists pay nothing here."""
    if listed:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name}: params is a list, so {name} must be a list of arrays, "
                            f"got {type(value).__name__}")
        return value if type(value) is list else list(value)
    if isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: params is a single array, so {name} must be one array, got a "
                        f"{type(value).__name__}")
    return [value]


def prepare(params: ArrayOrList, **others: Optional[ArrayOrList]) -> Tuple[bool, List[Any], Dict[str, Optional[List[Any]]]]:
    """Normalise the arrays of one call: (listed, params list, {role: list or None})."""
    listed = isinstance(params, (list, tuple))
    plist = as_list("params", params, listed)
    lists = {k: (None if v is None else as_list(k, v, listed)) for k, v in others.items()}
    return listed, plist, lists


# ---- hyper-parameters -------------------------------------------------------------------

def real(name: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the given interval, else a ValueError/TypeError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
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
