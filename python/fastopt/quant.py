"""int8 quantization: per tensor, per channel and blockwise; affine and symmetric; round
half to even or stochastic rounding.

Inputs are float32, float16 or bfloat16 (``ml_dtypes.bfloat16`` for NumPy) NumPy arrays
or PyTorch CPU tensors, or CUDA arrays (PyTorch CUDA tensors, CuPy arrays; run by the CUDA
kernels on ``stream=``, default the library's current stream, with results identical to
the CPU's); outputs come back as the input's kind of array, or go into ``out=``. On the
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

import functools
import math
import numbers
import secrets
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _arrays
from ._arrays import host_array, real
from ._ext import _cpu

__all__ = ["quantize_per_tensor", "quantize_per_channel", "dequantize", "choose_qparams",
           "quantize_blockwise", "dequantize_blockwise"]

QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}
_IN_TYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


class _Kind:
    """Remembers whether the caller gave a torch tensor, to hand results back alike."""

    def __init__(self, obj: Any):
        self.torch = not isinstance(obj, np.ndarray) and type(obj).__module__.startswith("torch")

    def wrap(self, a: np.ndarray) -> Any:
        if not self.torch:
            return a
        import torch

        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def _host(name: str, x: Any) -> Tuple[np.ndarray, _Kind]:
    kind = _Kind(x)
    if kind.torch and x.device.type == "cpu":
        import torch

        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: view the bits through ml_dtypes
            import ml_dtypes

            return x.detach().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16), kind
    return host_array(name, x), kind


@functools.lru_cache(maxsize=None)
def _host_in_type(dtype: np.dtype) -> Optional[int]:
    """The kernels' input type code of a NumPy dtype, None if unsupported (cached per
    dtype: ``dtype.name`` costs microseconds)."""
    return _IN_TYPES.get(dtype.name) if dtype.isnative else None


def _float_input(name: str, x: Any) -> Tuple[np.ndarray, int, _Kind]:
    a, kind = _host(name, x)
    in_type = _host_in_type(a.dtype)
    if in_type is None:
        raise TypeError(f"{name}: dtype {a.dtype} is not supported (float32, float16, bfloat16 "
                        f"in native byte order)")
    _check_layout(name, a)
    return a, in_type, kind


def _check_layout(name: str, a: np.ndarray) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if not a.flags.aligned:
        raise ValueError(f"{name}: data is not aligned to its dtype")


_QDTYPES = {np.dtype(name): (np.dtype(name), *QRANGE[name]) for name in QRANGE}


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
_F32_ROUNDS_POSITIVE = 2.0 ** -150
_F32_ROUNDS_FINITE = 2.0 ** 128 - 2.0 ** 103


def _scale(name: str, s: Any) -> float:
    v = real(name, s, lo=0.0, lo_open=True)
    if not _F32_ROUNDS_POSITIVE < v < _F32_ROUNDS_FINITE:
        raise ValueError(f"{name}: {v} is not representable as a positive finite float32")
    return v


def _axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis: expected an integer, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: {axis} is out of range for an array with {ndim} dimensions")
    return int(axis) % ndim


def _channel_params(scales: Any, zero_points: Any, channels: int, qmin: int, qmax: int
                    ) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scales, dtype=np.float64)
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


def _affine_params(scale: Any, zero_point: Any, axis: Optional[int], shape: Tuple[int, ...],
                   qmin: int, qmax: int) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """(scales, zero points) as float32 arrays and the axis made non-negative: one of each
    for the tensor when axis is None, else one per channel along axis."""
    if axis is None:
        return (np.array([_scale("scale", scale)], dtype=np.float32),
                np.array([_zero_point("zero_point", zero_point, qmin, qmax)], dtype=np.float32),
                None)
    axis = _axis(axis, len(shape))
    return (*_channel_params(scale, zero_point, shape[axis], qmin, qmax), axis)


def _check_out_dtype(out_dtype: Any) -> None:
    if out_dtype not in ("float32", np.float32):
        raise ValueError(f"out_dtype: only 'float32' is supported, got {out_dtype!r}")


def _layout(shape: Tuple[int, ...], axis: Optional[int]) -> Tuple[int, int]:
    """(channels, inner) of the (outer, channels, inner) view."""
    if axis is None:
        return 1, max(1, math.prod(shape))
    return shape[axis], max(1, math.prod(shape[axis + 1:]))


def _raise_nonfinite(name: str, shape: Tuple[int, ...], flat: int) -> None:
    where = np.unravel_index(flat, shape) if shape else ()
    raise ValueError(f"{name}: non-finite value at index {tuple(int(i) for i in where)} "
                     f"(flat {flat}); nothing was written")


def _check_out(out: Any, shape: Tuple[int, ...], dtype: np.dtype, name: str,
               *others: np.ndarray) -> Optional[np.ndarray]:
    """Host output ``out`` (a NumPy array or a PyTorch CPU tensor) checked, as a NumPy
    array sharing its memory; None if out is None."""
    if out is None:
        return None
    out = host_array(name, out)
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"{name}: expected shape {shape} and dtype {dtype}, got "
                         f"{out.shape} {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: must be writeable")
    _check_layout(name, out)
    for o in others:
        if out.size and o.size and np.may_share_memory(out, o):
            raise ValueError(f"{name}: overlaps an input in memory")
    return out


# ---- CUDA arrays: checked here, run by fastopt._cuda ---------------------------------------

def _cuda_call(name: str, x: Any, stream: Any) -> Tuple[Any, int]:
    """(fastopt._cuda, stream handle) for a call on CUDA array ``x`` (argument ``name``)."""
    kernels, extra = _arrays.backend([x], stream, name=name)
    return kernels, extra["stream"]


def _host_only(stream: Any) -> None:
    if stream is not None:
        raise ValueError("stream: only applies to CUDA arrays; this input is a host array")


def _device_input(cuda: Any, name: str, x: Any, allowed: Tuple[str, ...]) -> Tuple[str, Tuple[int, ...]]:
    dtype, shape, _ = cuda.describe(x, name)
    if dtype not in allowed:
        raise TypeError(f"{name}: dtype {dtype} is not supported ({', '.join(allowed)})")
    return dtype, tuple(shape)


def _device_output(cuda: Any, handle: int, name: str, out: Any, like: Any,
                   shape: Tuple[int, ...], dtype: str) -> Any:
    """``out`` checked against (shape, dtype), or a new array like ``like``'s library."""
    if out is None:
        return _arrays.device_empty(like, shape, dtype, handle)
    got_dtype, got_shape, _ = cuda.describe(out, name)
    if tuple(got_shape) != shape or got_dtype != dtype:
        raise ValueError(f"{name}: expected shape {shape} and dtype {dtype}, got "
                         f"{tuple(got_shape)} {got_dtype}")
    return out


def _device_quantize_affine(x: Any, scales: np.ndarray, zps: np.ndarray, axis: Optional[int],
                            qdt: np.dtype, out: Any, stream: Any, check_finite: bool) -> Any:
    cuda, handle = _cuda_call("x", x, stream)
    _, shape = _device_input(cuda, "x", x, tuple(_IN_TYPES))
    if axis is not None and scales.shape != (shape[axis],):
        raise ValueError(f"scales: expected shape ({shape[axis]},), got {scales.shape}")
    if out is not None:
        _device_output(cuda, handle, "out", out, x, shape, qdt.name)
        cuda.check_arrays([("out", out)], [("x", x)], handle)
    direct = out is not None and not check_finite  # else out gets only a clean result
    target = out if direct else _arrays.device_empty(x, shape, qdt.name, handle)
    channels, inner = _layout(shape, axis)
    if math.prod(shape):
        bad = cuda.quantize_affine(x, target, qdt == np.uint8, channels, inner, scales, zps,
                                   check_finite, handle)
        if bad >= 0:
            _raise_nonfinite("x", shape, bad)
    if out is None or direct:
        return target
    cuda.copy(out, target, handle)
    return out


def _quantize_affine(x: Any, scales: np.ndarray, zps: np.ndarray, axis: Optional[int],
                     qdt: np.dtype, out: Optional[np.ndarray], stream: Any,
                     check_finite: Any) -> Any:
    check_finite = _arrays.flag("check_finite", check_finite)
    if _arrays.on_device(x):
        return _device_quantize_affine(x, scales, zps, axis, qdt, out, stream, check_finite)
    _host_only(stream)
    a, in_type, kind = _float_input("x", x)
    host_out = _check_out(out, a.shape, qdt, "out", a)
    channels, inner = _layout(a.shape, axis)
    direct = out is not None and not check_finite  # else out receives only a clean result
    target = host_out if direct else np.empty(a.shape, dtype=qdt)
    if a.size:
        bad = _cpu.quantize_affine(a, in_type, target, qdt == np.uint8, channels, inner,
                                   scales, zps)
        if bad >= 0 and check_finite:
            _raise_nonfinite("x", a.shape, bad)
    if out is not None and not direct:
        np.copyto(host_out, target)
    return out if out is not None else kind.wrap(target)


def quantize_per_tensor(x: Any, scale: float, zero_point: int, dtype: str = "int8", *,
                        out: Optional[Any] = None, stream: Any = None,
                        check_finite: bool = True) -> Any:
    """q = clamp(rint(x / scale) + zero_point, qmin, qmax), round half to even, as
    ``torch.quantize_per_tensor(...).int_repr()``; int8 [-128, 127] or uint8 [0, 255].
    ``check_finite=False``: see the module docstring."""
    qdt, qmin, qmax = _qdtype(dtype)
    s, z, _ = _affine_params(scale, zero_point, None, (), qmin, qmax)
    return _quantize_affine(x, s, z, None, qdt, out, stream, check_finite)


def quantize_per_channel(x: Any, scales: Any, zero_points: Any, axis: int,
                         dtype: str = "int8", *, out: Optional[Any] = None,
                         stream: Any = None, check_finite: bool = True) -> Any:
    """Per-channel affine quantization along ``axis``: channel c uses scales[c] and
    zero_points[c]; as ``torch.quantize_per_channel(...).int_repr()``.
    ``check_finite=False``: see the module docstring."""
    qdt, qmin, qmax = _qdtype(dtype)
    shape = tuple(x.shape) if _arrays.on_device(x) else _float_input("x", x)[0].shape
    ax = _axis(axis, len(shape))
    s, z = _channel_params(scales, zero_points, shape[ax], qmin, qmax)
    return _quantize_affine(x, s, z, ax, qdt, out, stream, check_finite)


def dequantize(q: Any, scale: Union[float, Any], zero_point: Union[int, Any],
               axis: Optional[int] = None, out_dtype: str = "float32", *,
               out: Optional[Any] = None, stream: Any = None) -> Any:
    """x = (q - zero_point) * scale in float32; per channel along ``axis`` when given
    (scale and zero_point then 1-D)."""
    if _arrays.on_device(q):
        return _device_dequantize(q, scale, zero_point, axis, out_dtype, out, stream)
    _host_only(stream)
    a, kind = _host("q", q)
    if a.dtype not in (np.int8, np.uint8):
        raise TypeError(f"q: dtype {a.dtype} is not supported (int8 or uint8)")
    _check_layout("q", a)
    _check_out_dtype(out_dtype)
    _, qmin, qmax = _qdtype(a.dtype)
    s, z, axis = _affine_params(scale, zero_point, axis, a.shape, qmin, qmax)
    host_out = _check_out(out, a.shape, np.dtype(np.float32), "out", a)
    target = host_out if out is not None else np.empty(a.shape, dtype=np.float32)
    if a.size:
        channels, inner = _layout(a.shape, axis)
        _cpu.dequantize_affine(a, a.dtype == np.uint8, target, channels, inner, s, z)
    return out if out is not None else kind.wrap(target)


def _device_dequantize(q: Any, scale: Any, zero_point: Any, axis: Optional[int], out_dtype: str,
                       out: Any, stream: Any) -> Any:
    cuda, handle = _cuda_call("q", q, stream)
    qname, shape = _device_input(cuda, "q", q, ("int8", "uint8"))
    _check_out_dtype(out_dtype)
    _, qmin, qmax = _qdtype(qname)
    s, z, axis = _affine_params(scale, zero_point, axis, shape, qmin, qmax)
    target = _device_output(cuda, handle, "out", out, q, shape, "float32")
    if math.prod(shape):
        channels, inner = _layout(shape, axis)
        cuda.dequantize_affine(q, qname == "uint8", target, channels, inner, s, z, handle)
    return target


def choose_qparams(x: Any, *, symmetric: bool = True, axis: Optional[int] = None,
                   dtype: str = "int8", stream: Any = None) -> Tuple[Any, Any]:
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
    on_gpu = _arrays.on_device(x)
    if on_gpu:
        cuda, handle = _cuda_call("x", x, stream)
        _, shape = _device_input(cuda, "x", x, tuple(_IN_TYPES))
    else:
        _host_only(stream)
        a, in_type, _ = _float_input("x", x)
        shape = a.shape
    if axis is not None:
        axis = _axis(axis, len(shape))
    channels, inner = _layout(shape, axis)
    mins = np.full(channels, np.inf, dtype=np.float32)
    maxs = np.full(channels, -np.inf, dtype=np.float32)
    if math.prod(shape):
        if on_gpu:
            bad, mins, maxs = cuda.minmax(x, channels, inner, handle)
        else:
            bad = _cpu.minmax(a, in_type, channels, inner, mins, maxs)
        if bad >= 0:
            _raise_nonfinite("x", shape, bad)
    scale, zp = _qparams_from_minmax(mins, maxs, bool(symmetric), qmin, qmax, qdt)
    if axis is None:
        return float(scale[0]), int(zp[0])
    return scale, zp


_EPS32 = np.finfo(np.float32).eps


def _qparams_from_minmax(mins: np.ndarray, maxs: np.ndarray, symmetric: bool, qmin: int,
                         qmax: int, qdt: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Float32 throughout; rint(lo / scale) is an integer within [-256, 0] (scale is at
    least (hi - lo) / (qmax - qmin)), so the zero point's float32 arithmetic is exact."""
    f32 = np.float32
    lo = np.minimum(mins, f32(0))
    hi = np.maximum(maxs, f32(0))
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / f32(127), _EPS32)
        return scale, np.full(mins.shape, 0 if qdt == np.int8 else 128, dtype=np.int32)
    scale = np.maximum((hi - lo) / f32(qmax - qmin), _EPS32)
    zp = np.clip(f32(qmin) - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    return scale, zp


def _block_size(block_size: Any) -> int:
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size: expected a positive integer, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size: must be > 0, got {block_size}")
    return int(block_size)


def quantize_blockwise(x: Any, block_size: int = 256, *, rounding: str = "nearest",
                       seed: Optional[int] = None, out: Optional[Tuple[Any, Any]] = None,
                       stream: Any = None, check_finite: bool = True) -> Tuple[Any, Any]:
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
    if seed is None:
        seed = secrets.randbits(64)
    elif isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) \
            or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    if out is not None and (not isinstance(out, tuple) or len(out) != 2):
        raise TypeError("out: expected a tuple (q, absmax)")
    check_finite = _arrays.flag("check_finite", check_finite)
    if _arrays.on_device(x):
        return _device_quantize_blockwise(x, block, rounding == "stochastic", int(seed), out,
                                          stream, check_finite)
    _host_only(stream)
    a, in_type, kind = _float_input("x", x)
    blocks = -(-a.size // block)
    if out is not None:
        q_out = _check_out(out[0], a.shape, np.dtype(np.int8), "out[0]", a)
        absmax_out = _check_out(out[1], (blocks,), np.dtype(np.float32), "out[1]", a, q_out)
    direct = out is not None and not check_finite  # else out receives only a clean result
    q = q_out if direct else np.empty(a.shape, dtype=np.int8)
    absmax = absmax_out if direct else np.empty(blocks, dtype=np.float32)
    if a.size:
        bad = _cpu.quantize_blockwise(a, in_type, q, absmax, min(block, a.size),
                                      rounding == "stochastic", int(seed))
        if bad >= 0 and check_finite:
            _raise_nonfinite("x", a.shape, bad)
    if out is not None and not direct:
        np.copyto(q_out, q)
        np.copyto(absmax_out, absmax)
    return out if out is not None else (kind.wrap(q), kind.wrap(absmax))


def _device_quantize_blockwise(x: Any, block: int, stochastic: bool, seed: int,
                               out: Optional[Tuple[Any, Any]], stream: Any,
                               check_finite: bool) -> Tuple[Any, Any]:
    cuda, handle = _cuda_call("x", x, stream)
    _, shape = _device_input(cuda, "x", x, tuple(_IN_TYPES))
    n = math.prod(shape)
    blocks = -(-n // block)
    if out is not None:
        _device_output(cuda, handle, "out[0]", out[0], x, shape, "int8")
        _device_output(cuda, handle, "out[1]", out[1], x, (blocks,), "float32")
        cuda.check_arrays([("out[0]", out[0]), ("out[1]", out[1])], [("x", x)], handle)
    direct = out is not None and not check_finite  # else out gets only a clean result
    q = out[0] if direct else _arrays.device_empty(x, shape, "int8", handle)
    absmax = out[1] if direct else _arrays.device_empty(x, (blocks,), "float32", handle)
    if n:
        bad = cuda.quantize_blockwise(x, q, absmax, min(block, n), stochastic, seed,
                                      check_finite, handle)
        if bad >= 0:
            _raise_nonfinite("x", shape, bad)
    if out is None:
        return q, absmax
    if direct:
        return out
    cuda.copy(out[0], q, handle)
    cuda.copy(out[1], absmax, handle)
    return out


def _device_dequantize_blockwise(q: Any, absmax: Any, block: int, out_dtype: str, out: Any,
                                 stream: Any) -> Any:
    cuda, handle = _cuda_call("q", q, stream)
    _, shape = _device_input(cuda, "q", q, ("int8",))
    _, am_shape = _device_input(cuda, "absmax", absmax, ("float32",))
    n = math.prod(shape)
    blocks = -(-n // block)
    if am_shape != (blocks,):
        raise ValueError(f"absmax: expected shape ({blocks},) for {n} elements in blocks "
                         f"of {block}, got {am_shape}")
    _check_out_dtype(out_dtype)
    target = _device_output(cuda, handle, "out", out, q, shape, "float32")
    if n:
        cuda.dequantize_blockwise(q, absmax, target, min(block, n), handle)
    return target


def dequantize_blockwise(q: Any, absmax: Any, block_size: int = 256,
                         out_dtype: str = "float32", *, out: Optional[Any] = None,
                         stream: Any = None) -> Any:
    """x = q * (absmax / 127) per block of ``block_size`` consecutive elements, float32."""
    block = _block_size(block_size)
    if _arrays.on_device(q):
        return _device_dequantize_blockwise(q, absmax, block, out_dtype, out, stream)
    _host_only(stream)
    qa, kind = _host("q", q)
    am, _ = _host("absmax", absmax)
    if qa.dtype != np.int8:
        raise TypeError(f"q: dtype {qa.dtype} is not supported (int8)")
    if am.dtype != np.float32 or not am.dtype.isnative:
        raise TypeError(f"absmax: dtype {am.dtype} is not supported (native float32)")
    blocks = -(-qa.size // block)
    if am.shape != (blocks,):
        raise ValueError(f"absmax: expected shape ({blocks},) for {qa.size} elements in blocks "
                         f"of {block}, got {am.shape}")
    _check_layout("q", qa)
    _check_layout("absmax", am)
    _check_out_dtype(out_dtype)
    host_out = _check_out(out, qa.shape, np.dtype(np.float32), "out", qa, am)
    target = host_out if out is not None else np.empty(qa.shape, dtype=np.float32)
    if qa.size:
        _cpu.dequantize_blockwise(qa, am, target, min(block, qa.size))
    return out if out is not None else kind.wrap(target)
