"""int8 quantization: per tensor, per channel and blockwise; affine and symmetric; round
half to even or stochastic rounding.

Inputs are float32, float16 or bfloat16 (``ml_dtypes.bfloat16`` for NumPy) NumPy arrays
or PyTorch CPU tensors, or CUDA arrays (PyTorch CUDA tensors, CuPy arrays; run by the CUDA
kernels on ``stream=``, default the library's current stream, with results identical to
the CPU's); outputs come back as the input's kind of array, or go into ``out=``. The
dequantizers compute in float32 and store float32, float16 or bfloat16 (``out_dtype``:
rounded to nearest even, NaN as 0x7FFF; CuPy has no bfloat16). On the
GPU the quantizing functions and ``choose_qparams`` wait for their stream once, to report
non-finite input (and, for the observer, to return its host-side results). All
arithmetic is float32 and follows ``fastopt.reference`` (same float32 operations: results
are exact, not approximate). Non-finite input raises ``ValueError``
naming the first bad element, and nothing is written to caller-provided outputs.

``check_finite=False`` (the quantizing functions) skips that report, as SciPy's option of
the name does: no error, no temporary for ``out=`` (the result is written there directly),
and on the GPU no wait for the stream, so the call stays asynchronous. A block holding
NaN or Inf (blockwise) then gets absmax NaN and q 0, so that it dequantizes to NaN;
per tensor or channel, such elements get unspecified values. All others are exact.

Per-tensor and per-channel quantization divide by the scale, q = clamp(rint(x / scale)
+ zero_point, qmin, qmax), as the formula says; torch's CPU path multiplies by a rounded
reciprocal instead, so on inputs lying exactly on a rounding tie of x/scale the two can
differ by one (torch's own CUDA path divides, like fastopt).
"""

from __future__ import annotations

import math
import numbers
import secrets
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _arrays
from ._kernels import Call
from ._validate import flag, real

__all__ = [
    "quantize_per_tensor",
    "quantize_per_channel",
    "dequantize",
    "choose_qparams",
    "quantize_blockwise",
    "dequantize_blockwise",
]

QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}

_QDTYPES = {np.dtype(name): (np.dtype(name), *QRANGE[name]) for name in QRANGE}
_INT8, _FLOAT32 = np.dtype(np.int8), np.dtype(np.float32)  # (dtype.name costs microseconds)
_FLOAT16 = np.dtype(np.float16)


def _qdtype(dtype: Any) -> Tuple[np.dtype, int, int]:
    """(dtype, qmin, qmax) of "int8"/"uint8" (or those NumPy dtypes)."""
    try:
        return _QDTYPES[np.dtype(dtype)]
    except (TypeError, KeyError):
        raise ValueError(f"dtype: expected 'int8' or 'uint8', got {dtype!r}") from None


def _zero_point(name: str, z: Any, qmin: int, qmax: int) -> int:
    if isinstance(z, (bool, np.bool_)) or not isinstance(z, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(z).__name__}")
    if not qmin <= int(z) <= qmax:
        raise ValueError(f"{name}: {int(z)} is outside the dtype's range [{qmin}, {qmax}]")
    return int(z)


# float64 values in (2^-150, 2^128 - 2^103) and only those round to a positive finite
# float32 (round to nearest even: 2^-150 is the tie with 0, 2^128 - 2^103 the one with inf).
_F32_ROUNDS_POSITIVE = 2.0**-150
_F32_ROUNDS_FINITE = 2.0**128 - 2.0**103


def _scale(name: str, s: Any) -> float:
    v = real(name, s, lo=0.0, lo_open=True)
    if not _F32_ROUNDS_POSITIVE < v < _F32_ROUNDS_FINITE:
        raise ValueError(f"{name}: {v} is not representable as a positive finite float32")
    return v


def _axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an integer, got {type(axis).__name__}")
    index = int(axis)
    if not -ndim <= index < ndim:
        raise ValueError(f"axis: {index} is out of range for an array with {ndim} dimensions")
    return index % ndim


def _channel_params(
    scales: Any, zero_points: Any, channels: int, qmin: int, qmax: int
) -> Tuple[np.ndarray, np.ndarray]:
    for name, given in (("scales", scales), ("zero_points", zero_points)):
        if isinstance(given, (np.ma.MaskedArray, np.matrix)):
            raise TypeError(f"{name}: {type(given).__name__} is not supported; pass a plain array")
    s = np.asarray(scales)
    if s.dtype.kind not in "iuf":  # complex would drop its imaginary part, bool mean 1.0
        raise TypeError(f"scales: expected real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    z = np.asarray(zero_points)
    if s.shape != (channels,):
        raise ValueError(f"scales: expected shape ({channels},), got {s.shape}")
    if z.shape != (channels,):
        raise ValueError(f"zero_points: expected shape ({channels},), got {z.shape}")
    with np.errstate(over="ignore", under="ignore"):
        s32 = s.astype(np.float32)
    if not (np.all(np.isfinite(s32)) and np.all(s32 > 0)):
        raise ValueError("scales: every scale must be finite and > 0, as a float32 too")
    if not np.issubdtype(z.dtype, np.integer):
        raise TypeError(f"zero_points: expected integers, got dtype {z.dtype}")
    if z.size and (z.min() < qmin or z.max() > qmax):
        raise ValueError(f"zero_points: outside the dtype's range [{qmin}, {qmax}]")
    return s.astype(np.float32), z.astype(np.float32)


def _affine_params(
    scale: Any, zero_point: Any, axis: Optional[int], shape: Tuple[int, ...], qmin: int, qmax: int
) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """(scales, zero points) as float32 arrays and the axis made non-negative: one of each
    for the tensor when axis is None, else one per channel along axis."""
    if axis is None:
        return (
            np.array([_scale("scale", scale)], dtype=np.float32),
            np.array([_zero_point("zero_point", zero_point, qmin, qmax)], dtype=np.float32),
            None,
        )
    axis = _axis(axis, len(shape))
    return (*_channel_params(scale, zero_point, shape[axis], qmin, qmax), axis)


_OUT_DTYPES = ("float32", "float16", "bfloat16")


def out_dtype_name(out_dtype: Any) -> str:
    """ "float32", "float16" or "bfloat16" for ``out_dtype`` given as that name or as such a
    NumPy, ml_dtypes or torch dtype; ValueError naming out_dtype otherwise."""
    if isinstance(out_dtype, str):
        name: Optional[str] = out_dtype
    elif type(out_dtype).__module__.startswith("torch"):
        name = str(out_dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(out_dtype).name
        except TypeError:
            name = None
    if name not in _OUT_DTYPES:
        raise ValueError(
            f"out_dtype: expected 'float32', 'float16' or 'bfloat16', got {out_dtype!r}"
        )
    return name


def _out_dtype(out_dtype: Any, call: Call, q: Any) -> np.dtype:
    """The NumPy dtype of ``out_dtype`` for the call's arrays (bfloat16: ml_dtypes' on the
    host; not with CuPy, which has none)."""
    name = out_dtype_name(out_dtype)
    if name != "bfloat16":
        return _FLOAT32 if name == "float32" else _FLOAT16
    if not call.host and _arrays._is_cupy(q):
        raise TypeError("out_dtype: CuPy has no bfloat16; ask for 'float16' or 'float32'")
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("out_dtype: bfloat16 results need the ml_dtypes package") from None
    return np.dtype(ml_dtypes.bfloat16)


def _raise_nonfinite(name: str, shape: Tuple[int, ...], flat: int) -> None:
    where = np.unravel_index(flat, shape) if shape else ()
    raise ValueError(
        f"{name}: non-finite value at index {tuple(int(i) for i in where)} "
        f"(flat {flat}); nothing was written"
    )


def _quantize_affine(
    x: Any,
    scale: Any,
    zero_point: Any,
    axis: Optional[int],
    dtype: Any,
    out: Optional[Any],
    stream: Any,
    check_finite: Any,
) -> Any:
    qdt, qmin, qmax = _qdtype(dtype)
    check_finite = flag("check_finite", check_finite)
    call = Call("x", x, stream)
    xa, shape, _, kind = call.input("x", x)
    scales, zero_points, axis = _affine_params(scale, zero_point, axis, shape, qmin, qmax)
    if out is not None:
        out_array = call.out("out", out, shape, qdt, [("x", xa)])
    direct = out is not None and not check_finite  # else out receives only a clean result
    q = out_array if direct else call.empty(xa, shape, qdt)
    bad = call.kernels.quantize_affine(xa, q, scales, zero_points, axis, check_finite, call.stream)
    if bad >= 0:
        _raise_nonfinite("x", shape, bad)
    if out is None:
        return kind.wrap(q)
    if not direct:
        call.copy(out_array, q)
    _arrays.bump_versions([out])
    return out


def quantize_per_tensor(
    x: Any,
    scale: float,
    zero_point: int,
    dtype: str = "int8",
    *,
    out: Optional[Any] = None,
    stream: Any = None,
    check_finite: bool = True,
) -> Any:
    """q = clamp(rint(x / scale) + zero_point, qmin, qmax), round half to even, as
    ``torch.quantize_per_tensor(...).int_repr()``; int8 [-128, 127] or uint8 [0, 255].
    ``check_finite=False``: see the module docstring."""
    return _quantize_affine(x, scale, zero_point, None, dtype, out, stream, check_finite)


def quantize_per_channel(
    x: Any,
    scales: Any,
    zero_points: Any,
    axis: int,
    dtype: str = "int8",
    *,
    out: Optional[Any] = None,
    stream: Any = None,
    check_finite: bool = True,
) -> Any:
    """Per-channel affine quantization along ``axis``: channel c uses scales[c] and
    zero_points[c]; as ``torch.quantize_per_channel(...).int_repr()``.
    ``check_finite=False``: see the module docstring."""
    if axis is None:  # None means per tensor to the kernels: an axis is required here
        raise TypeError("axis: expected an integer, got NoneType")
    return _quantize_affine(x, scales, zero_points, axis, dtype, out, stream, check_finite)


def dequantize(
    q: Any,
    scale: Union[float, Any],
    zero_point: Union[int, Any],
    axis: Optional[int] = None,
    out_dtype: Any = "float32",
    *,
    out: Optional[Any] = None,
    stream: Any = None,
) -> Any:
    """x = (q - zero_point) * scale computed in float32; per channel along ``axis`` when
    given (scale and zero_point then 1-D). ``out_dtype`` "float16" or "bfloat16" (or such a
    dtype) stores that float32 value rounded to nearest even (NaN as 0x7FFF)."""
    call = Call("q", q, stream)
    qa, shape, qname, kind = call.input("q", q)
    if qname not in QRANGE:
        raise TypeError(f"q: dtype {qname} is not supported (int8 or uint8)")
    xdt = _out_dtype(out_dtype, call, qa)
    _, qmin, qmax = _qdtype(qname)
    scales, zero_points, axis = _affine_params(scale, zero_point, axis, shape, qmin, qmax)
    x = (
        call.out("out", out, shape, xdt, [("q", qa)])
        if out is not None
        else call.empty(qa, shape, xdt)
    )
    call.kernels.dequantize_affine(qa, x, scales, zero_points, axis, call.stream)
    if out is None:
        return kind.wrap(x)
    _arrays.bump_versions([out])
    return out


def choose_qparams(
    x: Any,
    *,
    symmetric: bool = True,
    axis: Optional[int] = None,
    dtype: str = "int8",
    stream: Any = None,
) -> Tuple[Any, Any]:
    """Min/max observer: (scale, zero_point) per tensor (float, int) or per channel along
    ``axis`` (float32 and int32 arrays), as torch's MinMaxObserver.

    affine: lo = min(min x, 0), hi = max(max x, 0); scale = (hi - lo) / (qmax - qmin);
    zero_point = clamp(qmin - rint(lo / scale), qmin, qmax).
    symmetric: the restricted range [-127, 127]: scale = max(|lo|, hi) / 127 and zero_point
    0 (int8) or 128 (uint8). Scale is never below float32 eps (all-zero input: eps), so
    never 0. A channel with no elements gives scale eps, zero_point as for 0. For a CUDA
    array the min/max pass runs on the GPU and the (small) results come back as NumPy.
    """
    qdt, qmin, qmax = _qdtype(dtype)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
    call = Call("x", x, stream)
    xa, shape, _, _ = call.input("x", x)
    if axis is not None:
        axis = _axis(axis, len(shape))
    bad, mins, maxs = call.kernels.minmax(xa, axis, call.stream)
    if bad >= 0:
        _raise_nonfinite("x", shape, bad)
    scale, zp = _qparams_from_minmax(mins, maxs, bool(symmetric), qmin, qmax, qdt)
    if axis is None:
        return float(scale[0]), int(zp[0])
    return scale, zp


_EPS32 = np.finfo(np.float32).eps


def _qparams_from_minmax(
    mins: np.ndarray, maxs: np.ndarray, symmetric: bool, qmin: int, qmax: int, qdt: np.dtype
) -> Tuple[np.ndarray, np.ndarray]:
    """Float32 throughout (but hi - lo past float32's range, taken in float64); rint(lo /
    scale) is an integer within [-256, 0] (scale is at least (hi - lo) / (qmax - qmin)), so
    the zero point's float32 arithmetic is exact."""
    f32 = np.float32
    lo = np.minimum(mins, f32(0))
    hi = np.maximum(maxs, f32(0))
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / f32(127), _EPS32)
        return scale, np.full(mins.shape, 0 if qdt == np.int8 else 128, dtype=np.int32)
    with np.errstate(over="ignore"):
        scale = (hi - lo) / f32(qmax - qmin)
    wide = np.isinf(scale)  # (finite ends, past float32's range apart: the quotient fits)
    if wide.any():
        scale[wide] = ((hi[wide].astype(np.float64) - lo[wide]) / (qmax - qmin)).astype(f32)
    scale = np.maximum(scale, _EPS32)
    zp = np.clip(f32(qmin) - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    return scale, zp


def _block_size(block_size: Any) -> int:
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size: expected a positive integer, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size: must be > 0, got {block_size}")
    return int(block_size)


def _seed(value: Any) -> int:
    """A stochastic-rounding seed: an integer in [0, 2**64) (not a bool)."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not 0 <= int(value) < 2**64
    ):
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {value!r}")
    return int(value)


def quantize_blockwise(
    x: Any,
    block_size: int = 256,
    *,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    out: Any = None,  # a (q, absmax) pair, checked below
    stream: Any = None,
    check_finite: bool = True,
) -> Tuple[Any, Any]:
    """(q, absmax): over consecutive blocks of ``block_size`` elements of the flattened x
    (the last block may be partial), absmax = max |x| (float32, one per block) and
    q = rint(x * (127 / absmax)) in [-127, 127] (int8, shaped like x); an all-zero block
    gives absmax 0 and q 0. ``rounding="stochastic"`` rounds v = x * 127/absmax up with
    probability frac(v) (floor(v) + (u < v - floor(v))), u uniform in [0, 1) from a
    counter-based generator keyed by ``seed`` and the element index: unbiased, exact values
    stay exact, reproducible from ``seed`` (None draws a fresh one), identical on CPU and
    GPU. Blocks with absmax < 2^-64 are rescaled by 2^64 first (exact) so that 127/absmax
    stays finite. ``out=(q, absmax)`` receives the result only if every input is finite
    (``check_finite=False``: see the module docstring).
    """
    block = _block_size(block_size)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    seed_bits = secrets.randbits(64) if seed is None else _seed(seed)
    if out is not None and (not isinstance(out, tuple) or len(out) != 2):
        raise TypeError("out: expected a tuple (q, absmax)")
    check_finite = flag("check_finite", check_finite)
    call = Call("x", x, stream)
    xa, shape, _, kind = call.input("x", x)
    blocks = -(-math.prod(shape) // block)
    if out is not None:  # both checked before anything is written
        q_out = call.out("out[0]", out[0], shape, _INT8, [("x", xa)])
        absmax_out = call.out("out[1]", out[1], (blocks,), _FLOAT32, [("x", xa), ("out[0]", q_out)])
    direct = out is not None and not check_finite  # else out receives only a clean result
    q = q_out if direct else call.empty(xa, shape, _INT8)
    absmax = absmax_out if direct else call.empty(xa, (blocks,), _FLOAT32)
    bad = call.kernels.quantize_blockwise(
        xa, q, absmax, block, rounding == "stochastic", seed_bits, check_finite, call.stream
    )
    if bad >= 0:
        _raise_nonfinite("x", shape, bad)
    if out is None:
        return kind.wrap(q), kind.wrap(absmax)
    if not direct:
        call.copy(q_out, q)
        call.copy(absmax_out, absmax)
    _arrays.bump_versions(out)
    return out


def dequantize_blockwise(
    q: Any,
    absmax: Any,
    block_size: int = 256,
    out_dtype: Any = "float32",
    *,
    out: Optional[Any] = None,
    stream: Any = None,
) -> Any:
    """x = q * (absmax / 127) per block of ``block_size`` consecutive elements, computed in
    float32 and stored as ``out_dtype`` (float16/bfloat16: rounded as in ``dequantize``)."""
    block = _block_size(block_size)
    call = Call("q", q, stream)
    qa, shape, _, kind = call.input("q", q)
    am = call.input("absmax", absmax)[0]
    xdt = _out_dtype(out_dtype, call, qa)
    x = (
        call.out("out", out, shape, xdt, [("q", qa), ("absmax", am)])
        if out is not None
        else call.empty(qa, shape, xdt)
    )
    call.kernels.dequantize_blockwise(qa, am, x, block, call.stream)
    if out is None:
        return kind.wrap(x)
    _arrays.bump_versions([out])
    return out
