"""Gradient clipping by the global norm, as ``torch.nn.utils.clip_grad_norm_``, in two
multi-tensor passes: the norm (one pass reading every grad), then ``g <- g * c`` with
c = min(max_norm / (norm + 1e-6), 1) (skipped on the host when c is 1).

The norm is accumulated in float64 whatever the grads' type (squares of float32, float16
and bfloat16 values are exact there), in a fixed order: the CPU result is bit-identical
on the scalar and AVX2 paths and for every thread count (csrc/cpu/clip_kernels.cpp). On
the GPU the norm stays on the device: it is a 0-d array of the grads' library, and the
scaling pass reads it from device memory, so nothing waits for the GPU (unless
``error_if_nonfinite``, which must look at it).

The optimizer steps take ``max_grad_norm=`` (see ``fastopt.functional``), which runs the
norm pass and hands the coefficient to the step kernel as its grad scale: the grads are
read twice in all and never written.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Tuple

import numpy as np

from . import _arrays, _ext
from ._arrays import ArrayOrList
from ._validate import flag, is_inf, real

__all__ = ["clip_grad_norm_"]


def norm_type_of(value: Any) -> float:
    """``norm_type`` checked: a real number > 0, inf included."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"norm_type: expected a real number > 0 (or inf), got {type(value).__name__}"
        )
    try:
        p = float(value)
    except OverflowError:  # an int past the float range: 10**400
        raise ValueError(
            "norm_type: must be > 0 (or inf), got a value out of the float range"
        ) from None
    if not p > 0.0:
        raise ValueError(f"norm_type: must be > 0 (or inf), got {p}")
    return p


def max_norm_of(value: Any, name: str = "max_norm") -> float:
    """``max_norm`` checked: a real number >= 0 (inf: measure the norm, never clip)."""
    if is_inf(value):
        return math.inf
    return real(name, value, lo=0.0)


def coefficient(max_norm: float, norm: float) -> float:
    """The clip factor: min(max_norm / (norm + 1e-6), 1); NaN stays NaN (as torch.clamp)."""
    c = max_norm / (norm + 1e-6)
    return c if c < 1.0 or math.isnan(c) else 1.0


def nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
        "so it cannot be clipped. To disable this error and scale the gradients by the "
        "non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def finish(total: float, norm_type: float) -> float:
    """The norm from the kernels' total (sum |g|^p, or max |g|)."""
    if norm_type == 2.0:
        return math.sqrt(total)
    if norm_type == 1.0 or math.isinf(norm_type):
        return total
    try:
        return total ** (1.0 / norm_type)
    except OverflowError:  # a tiny norm_type: the root past the float range, as torch's inf
        return math.inf


def host_norm(grads: List[Any], listed: bool, norm_type: float, writeable: bool) -> float:
    """The norm of a list of host grads of one dtype (``writeable``: they must be, since
    they are scaled next)."""
    return finish(_ext._cpu.grad_norm_total(grads, listed, norm_type, writeable), norm_type)


def _lists(grads: ArrayOrList) -> Tuple[List[Any], bool]:
    if isinstance(grads, (list, tuple)):
        return list(grads), True
    return [grads], False


def device_norm(grads: List[Any], listed: bool, norm_type: float, stream: Any) -> Tuple[Any, int]:
    """(the norm as a 0-d array on the grads' device -- float64 for float64 grads, else
    float32 -- and the stream handle it is computed on), without waiting for it."""
    kernels, extra = _arrays.backend(grads, stream, name="grads")
    handle = extra["stream"]
    dtype = "float64" if _arrays.dtype_name(grads[0]) == "float64" else "float32"
    out = _arrays.device_empty(grads[0], (), dtype, handle)
    kernels.grad_norm(grads, listed, out, norm_type, handle)
    return out, handle


def clip_grad_norm_(
    grads: ArrayOrList,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    *,
    stream: Any = None,
) -> Any:
    """Scale ``grads`` (an array or a list of arrays, one dtype: float32, float64, float16,
    or bfloat16 -- ``ml_dtypes.bfloat16`` for NumPy) in place so that their norm, taken
    over all elements together, is at most ``max_norm``; returns the norm before clipping.

    norm_type 2: sqrt(sum g^2); 1: sum |g|; inf: max |g|; any other p > 0:
    (sum |g|^p)^(1/p). Then g <- g * min(max_norm / (norm + 1e-6), 1), the coefficient
    rounded to float32 for float32/16-bit grads (torch's rule). A NaN grad makes the norm
    NaN and, unless ``error_if_nonfinite`` (RuntimeError, nothing scaled), every grad NaN;
    an inf grad makes the norm inf and the coefficient 0 -- both as torch does.

    Host arrays (NumPy, PyTorch CPU tensors): returns the norm as a Python float (its
    float64 value). CUDA arrays: returns a 0-d array of the grads' library on their device
    (float64 for float64 grads, else float32), queued on ``stream`` (default: the library's
    current stream) with the scaling pass, without synchronising. Bad input raises
    TypeError/ValueError naming the argument, before anything is written; an empty list
    or zero-size arrays give a norm of 0 and change nothing.
    """
    max_norm = max_norm_of(max_norm)
    norm_type = norm_type_of(norm_type)
    error_if_nonfinite = flag("error_if_nonfinite", error_if_nonfinite)
    lists, listed = _lists(grads)
    if not lists or not _arrays.on_device(lists[0]):
        if stream is not None:
            raise ValueError("stream: only applies to CUDA arrays; grads are host arrays")
        norm = host_norm(lists, listed, norm_type, True)
        if error_if_nonfinite and not math.isfinite(norm):
            raise nonfinite_error(norm_type)
        c = coefficient(max_norm, norm)
        if c != 1.0:
            _ext._cpu.scale_grads(lists, listed, c)
        return norm
    out, handle = device_norm(lists, listed, norm_type, stream)
    if error_if_nonfinite:
        _arrays.wait_for_stream(out, handle)
        if not math.isfinite(float(_arrays.to_numpy(out))):
            raise nonfinite_error(norm_type)
    kernels, _ = _arrays.backend(lists, handle, name="grads")
    kernels.clip_grads(lists, listed, out, max_norm, handle)
    return out


def step_grad_scale(grads: List[Any], listed: bool, max_grad_norm: float) -> Tuple[float, float]:
    """For a step with ``max_grad_norm`` over host grads (lists, checked by the binding):
    (the grads' 2-norm, and the clip coefficient, which the step kernel multiplies the
    grads by as it loads them: ``grad_clip``). The grads are never written."""
    norm = host_norm(grads, listed, 2.0, False)
    return norm, coefficient(max_grad_norm, norm)


def device_clip(
    grads: List[Any], listed: bool, max_grad_norm: float, stream: Any
) -> Tuple[Any, Dict[str, Any]]:
    """``max_grad_norm`` on CUDA grads before a step: (their 2-norm, in device memory; the
    step kernel's keywords that read it there and scale the grads as they are loaded: two
    passes, the grads never written, nothing waits for the device)."""
    out, _ = device_norm(grads, listed, 2.0, stream)
    return out, {"grad_norm": out, "max_grad_norm": max_grad_norm}
