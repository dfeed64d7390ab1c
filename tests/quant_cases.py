"""What the quantization tests share (test_quant_affine.py, test_quant_blockwise.py,
test_quant_checks.py, test_quant_outputs.py, test_cuda_quant.py): dtypes and sizes of the
cases, input and parameter generators, poisoned outputs on any backend, and the float32
reference results."""
from __future__ import annotations

import types
from typing import Any, Callable, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import CPU, assert_bits

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
IN_DTYPES = [F32, np.dtype(np.float16), BF16]
IN_IDS = ["f32", "f16", "bf16"]
OUT_DTYPES, OUT_IDS = IN_DTYPES, ["out_f32", "out_f16", "out_bf16"]  # dequantize's out_dtype
QRANGE = {"int8": (np.dtype(np.int8), -128, 127), "uint8": (np.dtype(np.uint8), 0, 255)}
QDTYPES = ["int8", "uint8"]
EPS32 = float(np.finfo(np.float32).eps)

# Odd sizes (1, 31: AVX2 tails only; 4097: bodies plus a 1-element tail; 1_000_003: several
# threads and scheduling chunks) and one multi-dimensional shape.
SHAPES = [(1,), (31,), (4097,), (1_000_003,), (3, 37, 41)]
LARGER = "larger"  # a block size larger than the whole array: one partial block
# On the GPU, blocks of up to 4096 elements take one warp each, larger ones (4097, 5000,
# 10_000: for inputs longer than 4096 elements, the kernel sees min(block_size, n)) one
# thread block each.
LARGE_BLOCK = 5000  # a block for the thread-block kernel in the smaller tests
BLOCKS = [1, 7, 64, 256, 4096, 4097, LARGE_BLOCK, 10_000, LARGER]

# (shape, axis) of the per-channel cases: channels first, in the middle and last (inner 1:
# every channel segment is a scalar tail), negative axes, 1M channels of one element.
CHANNEL_CASES = [((1,), 0), ((31,), -1), ((4097,), 0), ((3, 4097), 0), ((3, 4097), -1),
                 ((5, 31, 67), 1), ((5, 31, 67), 2), ((2, 3, 4, 33), -2), ((4, 250_001), 0),
                 ((1_000_003,), -1)]

TORCH_DEPRECATION = pytest.mark.filterwarnings("ignore:.*deprecated.*:UserWarning")


def shape_id(shape: Tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def case_id(case) -> str:
    shape, axis = case
    return f"{shape_id(shape)}-ax{axis}"


# ---- helpers ------------------------------------------------------------------------------

def fresh(rng: np.random.Generator, shape, dtype, spread: float = 3.0) -> np.ndarray:
    """Normal draws times ``spread`` in ``dtype``, with no (near) zero: no element is 0 after
    the cast, so an output left at 0 is never mistaken for a result."""
    x = (rng.standard_normal(shape) * spread).astype(np.float32)
    x[np.abs(x) < 1e-3] = 0.5
    return x.astype(dtype)


def with_ties(rng: np.random.Generator, x32: np.ndarray, scale_b, frac: float = 0.02
              ) -> np.ndarray:
    """x32 with a fraction of the elements moved onto rounding ties x = (k + 1/2) * scale
    (scale_b broadcasts against x32: one scale or per-channel scales)."""
    x32 = np.array(x32, dtype=np.float32, copy=True)
    mask = rng.random(x32.shape) < frac
    k = rng.integers(-200, 200, x32.shape)
    tie = ((k + 0.5) * np.broadcast_to(np.asarray(scale_b, np.float64), x32.shape))
    x32[mask] = tie[mask].astype(np.float32)
    return x32


def channel_shape(ndim: int, axis: int) -> Tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def poisoned(shape, dtype, k: int) -> np.ndarray:
    """An output array filled with sentinel number k (0 or 1). Two different fillings: an
    element a call leaves unwritten equals the expected value under at most one of them."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):  # float16: -inf
            return np.full(shape, [np.nan, -7.25e30][k], dtype=dtype)
    if dtype == BF16:
        return np.full(shape, [np.nan, -7.25e30][k], dtype=np.float32).astype(BF16)
    return np.full(shape, [0x5A, 0xA5][k], dtype=np.uint8).view(dtype)


def run_with_out(call: Callable[[Any], Any], want: Sequence[np.ndarray], backend=CPU) -> None:
    """call(out) with outs of ``backend`` poisoned by each sentinel in turn: it returns that
    very out, and every element of it equals NumPy ``want`` (so every element was
    written)."""
    for k in (0, 1):
        outs = tuple(backend.asarray(poisoned(w.shape, w.dtype, k)) for w in want)
        arg = outs if len(outs) > 1 else outs[0]
        got = call(arg)
        assert got is arg
        for i, (o, w) in enumerate(zip(outs, want)):
            assert_bits(backend.to_numpy(o), w, f"out[{i}] (sentinel {k})")


def ref_quantize(x: np.ndarray, scale, zp, qdtype: str, axis: Optional[int] = None
                 ) -> np.ndarray:
    dt, lo, hi = QRANGE[qdtype]
    return reference.quantize_affine(x.astype(np.float32), scale, zp, lo, hi, axis).astype(dt)


def ref_blockwise(x: np.ndarray, block: int, rounding: str, seed: int = 0):
    return reference.quantize_blockwise(x.astype(np.float32), block, rounding=rounding,
                                        seed=seed)


def tensor_params(rng: np.random.Generator, qdtype: str):
    """(scale, zero_point) sets: a power of two (ties stay ties in float32), the extremes of
    the zero point's range, and a random one (scale a float32 value)."""
    _, lo, hi = QRANGE[qdtype]
    mid = (lo + hi + 1) // 2
    rand_scale = float(np.float32(rng.uniform(0.005, 0.2)))
    return [(2.0 ** -4, mid), (0.05, lo), (0.05, hi), (0.0371, 0),
            (rand_scale, int(rng.integers(lo, hi + 1)))] if qdtype == "int8" else \
        [(2.0 ** -4, mid), (0.05, lo), (0.05, hi), (0.0371, 3),
         (rand_scale, int(rng.integers(lo, hi + 1)))]


def channel_params(rng: np.random.Generator, qdtype: str, channels: int):
    _, lo, hi = QRANGE[qdtype]
    scales = rng.uniform(0.005, 0.2, channels).astype(np.float32)
    scales[::3] = 2.0 ** -4
    zps = rng.integers(lo, hi + 1, channels)
    zps[1::5] = lo
    zps[2::5] = hi
    return scales, zps


def block_of(block, size: int) -> int:
    return size + 5 if block == LARGER else block


def kernel_v(x32: np.ndarray, absmax: np.ndarray, block: int) -> np.ndarray:
    """x * (127 / absmax) exactly as the kernels compute it (float32), flattened."""
    with np.errstate(divide="ignore"):
        f = np.where(absmax > 0, np.float32(127) / absmax, np.float32(0)).astype(np.float32)
    return x32.reshape(-1) * np.repeat(f, block)[:x32.size]


NONFINITE_SHAPE = (3, 7, 50)  # 1050 elements: blocks of 256 leave a partial block [1024, 1050)
# 12600 elements: partial last blocks of 256 and of LARGE_BLOCK (GPU: the thread-block kernel)
NONFINITE_SHAPE_LARGE = (3, 7, 600)


def _nf_per_channel(x, out):
    axis = min(1, x.ndim - 1)
    c = x.shape[axis]
    return fastopt.quantize_per_channel(x, np.full(c, 0.05, np.float32), np.zeros(c, np.int64),
                                        axis=axis, out=out)


def _nf_per_channel_last(x, out):
    return fastopt.quantize_per_channel(x, np.full(x.shape[-1], 0.05), [3] * x.shape[-1],
                                        axis=-1, dtype="uint8", out=out)


# name: (call(x, out), out templates (shape -> [(shape, dtype)...]) or None)
NONFINITE_FUNCS = {
    "per_tensor": (lambda x, out: fastopt.quantize_per_tensor(x, 0.05, 3, out=out),
                   lambda s: [(s, np.int8)]),
    "per_tensor_uint8": (lambda x, out: fastopt.quantize_per_tensor(x, 0.05, 3, "uint8",
                                                                    out=out),
                         lambda s: [(s, np.uint8)]),
    "per_channel": (_nf_per_channel, lambda s: [(s, np.int8)]),
    "per_channel_last": (_nf_per_channel_last, lambda s: [(s, np.uint8)]),
    "choose_qparams": (lambda x, out: fastopt.choose_qparams(x, symmetric=False), None),
    "choose_qparams_axis": (lambda x, out: fastopt.choose_qparams(x, axis=x.ndim - 1), None),
    "blockwise": (lambda x, out: fastopt.quantize_blockwise(x, 256, out=out),
                  lambda s: [(s, np.int8), ((-(-int(np.prod(s)) // 256),), np.float32)]),
    "blockwise_stochastic": (lambda x, out: fastopt.quantize_blockwise(
        x, 7, rounding="stochastic", seed=1, out=out),
        lambda s: [(s, np.int8), ((-(-int(np.prod(s)) // 7),), np.float32)]),
    "blockwise_large_blocks": (lambda x, out: fastopt.quantize_blockwise(x, LARGE_BLOCK, out=out),
                               lambda s: [(s, np.int8), ((-(-int(np.prod(s)) // LARGE_BLOCK),),
                                                         np.float32)]),
}

def unchecked_input(rng, in_dtype, with_nonfinite: bool = True):
    """(x (5, 4099) in in_dtype, per-channel uint8 scales and zero points along the last axis,
    and which outputs must be exact: per element, per block of 64, per element by block)
    with NaN/Inf at a few places (the first and last element, both sides of a block edge)."""
    x32 = fresh(rng, (5, 4099), F32)
    flat = x32.reshape(-1)
    bad = np.array([0, 63, 64, 4097, 9000, flat.size - 1] if with_nonfinite else [], int)
    flat[bad] = np.resize([np.nan, np.inf, -np.inf], bad.size)
    scales, zps = channel_params(rng, "uint8", x32.shape[-1])
    keep = np.ones(flat.size, bool)
    keep[bad] = False
    keep_blocks = np.ones(-(-flat.size // 64), bool)
    keep_blocks[bad // 64] = False
    return x32.astype(in_dtype), scales, zps, keep, keep_blocks, \
        np.repeat(keep_blocks, 64)[:flat.size]


def bad_input_arrays(backend, rng) -> types.SimpleNamespace:
    """The arrays of the bad-input tables (test_quant_checks, test_cuda_quant): contiguous
    allocations of ``backend`` (the cases take views of them), outputs filled with a
    sentinel, and on a GPU backend host arrays of the library's CPU kind."""
    x = fresh(rng, (4, 6), F32)
    q8 = rng.integers(-128, 128, (4, 6)).astype(np.int8)
    am = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    put = backend.asarray
    arrays = types.SimpleNamespace(
        x=put(x), x_wide=put(fresh(rng, (4, 12), F32)), x_i32=put(x.astype(np.int32)),
        x_f64=put(x.astype(np.float64)),
        q8=put(q8), qu8=put(q8.view(np.uint8)), q_wide=put(np.repeat(q8, 2, axis=1)),
        am=put(am), am_f64=put(am.astype(np.float64)), am_wide=put(np.repeat(am, 2)),
        q_out=put(poisoned((4, 6), np.int8, 0)), qu_out=put(poisoned((4, 6), np.uint8, 0)),
        d_out=put(poisoned((4, 6), F32, 0)), d16_out=put(poisoned((4, 6), F16, 0)),
        am_out=put(poisoned((4,), F32, 0)), am16_out=put(poisoned((4,), F16, 0)),
        q_wide_out=put(poisoned((4, 12), np.int8, 0)), d_wide_out=put(poisoned((4, 12), F32, 0)),
        am_wide_out=put(poisoned((8,), F32, 0)),
        pair=put(poisoned((10,), F32, 0)),  # out[0] and out[1] carved from one buffer
        shared=put(rng.uniform(0.5, 2.0, 28).astype(np.float32)),  # an output and an input
    )
    if backend.is_cuda:
        host = backend.lib.host_array
        arrays.am_host = host(am)
        arrays.q_host_out = host(poisoned((4, 6), np.int8, 0))
        arrays.am_host_out = host(poisoned((4,), F32, 0))
        arrays.d_host_out = host(poisoned((4, 6), F32, 0))
    return arrays


def int8_rows(backend, a):
    """The first 24 bytes of float32 array ``a`` as an int8 (4, 6) array."""
    return backend.view(a.reshape(-1), "int8")[:24].reshape(4, 6)
