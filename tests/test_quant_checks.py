"""Input checks of the int8 quantization API: non-finite input (first bad index named,
nothing written to ``out=``; every backend, on a GPU the CPU's message), bad scales/zero
points/block sizes/axes/dtypes/outputs (the error names the argument; the bad arrays on
every backend, nothing written), scales out of float32 range, empty inputs (every backend).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import fastopt

from backends import CPU, assert_bits
from quant_cases import (EPS32, IN_DTYPES, IN_IDS, NONFINITE_FUNCS, NONFINITE_SHAPE,
                         NONFINITE_SHAPE_LARGE, QDTYPES, QRANGE, bad_input_arrays, fresh,
                         int8_rows, poisoned, ref_quantize, shape_id)

# ---- non-finite input ---------------------------------------------------------------------

# (shape, flat positions (negative: from the end), values). NONFINITE_SHAPE: the first
# element, inside the first AVX2 group, the middle, in the partial last block, the very last
# element, two bad values (the first is named). NONFINITE_SHAPE_LARGE: the first element, one
# in the first warp, a block boundary, the very last (in both partial blocks), two bad values
# in different blocks.
NONFINITE_CASES = [(NONFINITE_SHAPE, p, v) for p, v in [
    ((0,), (np.nan,)), ((37,), (np.inf,)), ((517,), (-np.inf,)), ((1030,), (np.nan,)),
    ((1049,), (-np.inf,)), ((1030, 517), (np.inf, np.nan)), ((12, 1049), (-np.inf, np.inf))]] + \
    [(NONFINITE_SHAPE_LARGE, p, v) for p, v in [
        ((0,), (np.nan,)), ((37,), (np.inf,)), ((5000,), (-np.inf,)), ((-1,), (np.nan,)),
        ((9000, 517), (np.inf, np.nan)), ((12, -1), (-np.inf, np.inf))]]


def check_nonfinite(call, templates, x, first: int, backend=CPU) -> None:
    """call on ``backend`` raises ValueError naming the first bad index (multi-index and
    flat) -- on a GPU the CPU's very message -- and leaves the caller's out arrays
    untouched."""
    outs = None
    if templates is not None:
        outs = tuple(backend.asarray(poisoned(s, d, 0)) for s, d in templates(x.shape))
    idx = tuple(int(i) for i in np.unravel_index(first, x.shape))
    msg = re.escape(f"non-finite value at index {idx} (flat {first})")
    with pytest.raises(ValueError, match=msg) as error:
        call(backend.asarray(x), None if outs is None else (outs if len(outs) > 1 else outs[0]))
    if backend.is_cuda:
        with CPU.activate(), pytest.raises(ValueError, match=msg) as on_cpu:
            call(x, None)
        assert str(error.value) == str(on_cpu.value)
    if outs is not None:
        for o, (s, d) in zip(outs, templates(x.shape)):
            assert_bits(backend.to_numpy(o), poisoned(s, d, 0),
                        "out was written despite the error")


@pytest.mark.parametrize("case", NONFINITE_CASES, ids=lambda c: shape_id(c[0]) + "-" + "+".join(
    f"{p}{v}" for p, v in zip(*c[1:])))
@pytest.mark.parametrize("func", list(NONFINITE_FUNCS))
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_nonfinite_raises_naming_first_index(backend, in_dtype, func, case, rng):
    call, templates = NONFINITE_FUNCS[func]
    shape, positions, values = case
    x32 = fresh(rng, shape, np.float32)
    flat = x32.reshape(-1)
    positions = [p % flat.size for p in positions]
    for p, v in zip(positions, values):
        # float16: an infinity from overflow in the cast (1e5 > 65504), like real data
        flat[p] = (1e5 if v > 0 else -1e5) if in_dtype == np.float16 and np.isinf(v) else v
    with np.errstate(over="ignore"):
        x = x32.astype(in_dtype)
    assert not np.isfinite(x.astype(np.float32).reshape(-1)[positions]).any()
    check_nonfinite(call, templates, x, min(positions), backend)


@pytest.mark.parametrize("func", list(NONFINITE_FUNCS))
def test_nonfinite_first_across_threads(cpu_path, func, rng):
    """Large inputs split over threads and chunks: the smallest bad index is named, even when
    a later chunk (another thread) also has one, and also for a 1-D array."""
    x = fresh(rng, (4, 50_001), np.float32)
    x[3, 10] = np.nan
    x[1, 49_000] = np.inf
    x[2, 7] = -np.inf
    call, templates = NONFINITE_FUNCS[func]
    check_nonfinite(call, templates, x, 1 * 50_001 + 49_000)
    y = x.reshape(-1)
    check_nonfinite(call, templates, y, 1 * 50_001 + 49_000)


# ---- argument checks ----------------------------------------------------------------------

_X = np.random.default_rng(7).standard_normal((4, 6)).astype(np.float32) + np.float32(0.1)
_Q8 = np.random.default_rng(8).integers(-128, 128, (4, 6)).astype(np.int8)
_QU8 = _Q8.view(np.uint8)
_S6 = np.full(6, 0.05, np.float32)
_Z6 = np.zeros(6, np.int64)
_QB, _AB = fastopt.quantize_blockwise(_X, 7)  # 24 elements: 4 blocks


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


qpt, qpc, deq = fastopt.quantize_per_tensor, fastopt.quantize_per_channel, fastopt.dequantize
qbw, dqbw, cqp = fastopt.quantize_blockwise, fastopt.dequantize_blockwise, fastopt.choose_qparams

# (id, thunk, exception, regex the message must match)
BAD_ARGS = [
    # scales
    ("scale 0", lambda: qpt(_X, 0.0, 0), ValueError, "scale"),
    ("scale -1", lambda: qpt(_X, -1.0, 0), ValueError, "scale"),
    ("scale nan", lambda: qpt(_X, float("nan"), 0), ValueError, "scale"),
    ("scale inf", lambda: qpt(_X, float("inf"), 0), ValueError, "scale"),
    ("scale None", lambda: qpt(_X, None, 0), TypeError, "scale"),
    ("scale str", lambda: qpt(_X, "0.1", 0), TypeError, "scale"),
    ("channel scale 0", lambda: qpc(_X, [0.1, 0.1, 0, 0.1, 0.1, 0.1], _Z6, 1), ValueError,
     "scales"),
    ("channel scale -1", lambda: qpc(_X, -_S6, _Z6, 1), ValueError, "scales"),
    ("channel scale nan", lambda: qpc(_X, np.where(np.arange(6) == 5, np.nan, _S6), _Z6, 1),
     ValueError, "scales"),
    ("channel scale inf", lambda: qpc(_X, np.where(np.arange(6) == 0, np.inf, _S6), _Z6, 1),
     ValueError, "scales"),
    ("channel scales length", lambda: qpc(_X, _S6[:4], _Z6, 1), ValueError, "scales"),
    ("channel zps length", lambda: qpc(_X, _S6, _Z6[:5], 1), ValueError, "zero_points"),
    ("dequantize scale 0", lambda: deq(_Q8, 0.0, 0), ValueError, "scale"),
    ("dequantize scale nan", lambda: deq(_Q8, float("nan"), 0), ValueError, "scale"),
    ("dequantize scales -1", lambda: deq(_Q8, -_S6, _Z6, axis=1), ValueError, "scales"),
    ("dequantize scales length", lambda: deq(_Q8, _S6[:3], _Z6, axis=1), ValueError, "scales"),
    # zero points
    ("zp int8 128", lambda: qpt(_X, 0.1, 128), ValueError, "zero_point"),
    ("zp int8 -129", lambda: qpt(_X, 0.1, -129), ValueError, "zero_point"),
    ("zp uint8 -1", lambda: qpt(_X, 0.1, -1, "uint8"), ValueError, "zero_point"),
    ("zp uint8 256", lambda: qpt(_X, 0.1, 256, "uint8"), ValueError, "zero_point"),
    ("zp 1.5", lambda: qpt(_X, 0.1, 1.5), TypeError, "zero_point"),
    ("zp 1.0", lambda: qpt(_X, 0.1, 1.0), TypeError, "zero_point"),
    ("zp True", lambda: qpt(_X, 0.1, True), TypeError, "zero_point"),
    ("zp str", lambda: qpt(_X, 0.1, "3"), TypeError, "zero_point"),
    ("channel zps int8 128", lambda: qpc(_X, _S6, [0, 0, 0, 128, 0, 0], 1), ValueError,
     "zero_points"),
    ("channel zps uint8 -1", lambda: qpc(_X, _S6, [0, 0, 0, 0, 0, -1], 1, "uint8"), ValueError,
     "zero_points"),
    ("channel zps float", lambda: qpc(_X, _S6, np.zeros(6) + 0.5, 1), TypeError, "zero_points"),
    ("dequantize zp uint8 256", lambda: deq(_QU8, 0.1, 256), ValueError, "zero_point"),
    ("dequantize zp int8 -129", lambda: deq(_Q8, 0.1, -129), ValueError, "zero_point"),
    ("dequantize zp 0.5", lambda: deq(_Q8, 0.1, 0.5), TypeError, "zero_point"),
    ("dequantize zps float", lambda: deq(_Q8, _S6, _Z6 + 0.5, axis=1), TypeError,
     "zero_points"),
    # axes
    ("per_channel axis 2", lambda: qpc(_X, _S6, _Z6, 2), ValueError, "axis"),
    ("per_channel axis -3", lambda: qpc(_X, _S6, _Z6, -3), ValueError, "axis"),
    ("per_channel axis 1.0", lambda: qpc(_X, _S6, _Z6, 1.0), TypeError, "axis"),
    ("dequantize axis 2", lambda: deq(_Q8, _S6, _Z6, axis=2), ValueError, "axis"),
    ("choose_qparams axis 2", lambda: cqp(_X, axis=2), ValueError, "axis"),
    ("choose_qparams axis -3", lambda: cqp(_X, axis=-3), ValueError, "axis"),
    ("choose_qparams symmetric 1", lambda: cqp(_X, symmetric=1), TypeError, "symmetric"),
    # dtype names
    ("dtype int16", lambda: qpt(_X, 0.1, 0, "int16"), ValueError, "dtype"),
    ("dtype qint8", lambda: qpt(_X, 0.1, 0, "qint8"), ValueError, "dtype"),
    ("dtype float32", lambda: qpt(_X, 0.1, 0, "float32"), ValueError, "dtype"),
    ("dtype np.int16", lambda: qpt(_X, 0.1, 0, np.int16), ValueError, "dtype"),
    ("per_channel dtype", lambda: qpc(_X, _S6, _Z6, 1, "int4"), ValueError, "dtype"),
    ("choose_qparams dtype", lambda: cqp(_X, dtype="int32"), ValueError, "dtype"),
    ("dequantize out_dtype float64", lambda: deq(_Q8, 0.1, 0, out_dtype="float64"), ValueError,
     "out_dtype"),
    ("dequantize out_dtype np.int8", lambda: deq(_Q8, 0.1, 0, out_dtype=np.int8), ValueError,
     "out_dtype"),
    ("dequantize out_dtype None", lambda: deq(_Q8, 0.1, 0, out_dtype=None), ValueError,
     "out_dtype"),
    ("dequantize_blockwise out_dtype", lambda: dqbw(_QB, _AB, 7, out_dtype="half"),
     ValueError, "out_dtype"),
    ("dequantize_blockwise out_dtype 3", lambda: dqbw(_QB, _AB, 7, out_dtype=3),
     ValueError, "out_dtype"),
    # input dtypes and kinds
    ("per_tensor float64", lambda: qpt(_X.astype(np.float64), 0.1, 0), TypeError, "x"),
    ("per_tensor int32", lambda: qpt(_X.astype(np.int32), 0.1, 0), TypeError, "x"),
    ("per_tensor list", lambda: qpt(_X.tolist(), 0.1, 0), TypeError, "x"),
    ("per_channel float64", lambda: qpc(_X.astype(np.float64), _S6, _Z6, 1), TypeError, "x"),
    ("choose_qparams float64", lambda: cqp(_X.astype(np.float64)), TypeError, "x"),
    ("choose_qparams int32", lambda: cqp(_X.astype(np.int32)), TypeError, "x"),
    ("blockwise float64", lambda: qbw(_X.astype(np.float64)), TypeError, "x"),
    ("blockwise int32", lambda: qbw(_X.astype(np.int32)), TypeError, "x"),
    ("dequantize float32 q", lambda: deq(_X, 0.1, 0), TypeError, "q"),
    ("dequantize int16 q", lambda: deq(_Q8.astype(np.int16), 0.1, 0), TypeError, "q"),
    ("dequantize_blockwise float32 q", lambda: dqbw(_X, _AB, 7), TypeError, "q"),
    ("dequantize_blockwise uint8 q", lambda: dqbw(_QB.view(np.uint8), _AB, 7), TypeError, "q"),
    ("dequantize_blockwise float64 absmax", lambda: dqbw(_QB, _AB.astype(np.float64), 7),
     TypeError, "absmax"),
    # contiguity
    ("per_tensor strided", lambda: qpt(_X[:, ::2], 0.1, 0), ValueError, "contiguous"),
    ("per_tensor transposed", lambda: qpt(_X.T, 0.1, 0), ValueError, "contiguous"),
    ("per_channel strided", lambda: qpc(_X[::2], _S6, _Z6, 1), ValueError, "contiguous"),
    ("choose_qparams strided", lambda: cqp(_X[:, ::2]), ValueError, "contiguous"),
    ("blockwise strided", lambda: qbw(_X[:, 1::2]), ValueError, "contiguous"),
    ("dequantize strided", lambda: deq(_Q8[:, ::2], 0.1, 0), ValueError, "contiguous"),
    ("dequantize_blockwise strided absmax",
     lambda: dqbw(_QB[:, :4].copy(), np.repeat(_AB, 2)[::2][:3].copy()[::-1], 7),
     ValueError, "contiguous"),
    # block sizes, rounding, seeds
    ("block_size 0", lambda: qbw(_X, 0), ValueError, "block_size"),
    ("block_size -1", lambda: qbw(_X, -1), ValueError, "block_size"),
    ("block_size 2.5", lambda: qbw(_X, 2.5), TypeError, "block_size"),
    ("block_size True", lambda: qbw(_X, True), TypeError, "block_size"),
    ("block_size str", lambda: qbw(_X, "64"), TypeError, "block_size"),
    ("dequantize block_size 0", lambda: dqbw(_QB, _AB, 0), ValueError, "block_size"),
    ("dequantize block_size -1", lambda: dqbw(_QB, _AB, -1), ValueError, "block_size"),
    ("dequantize block_size 2.5", lambda: dqbw(_QB, _AB, 2.5), TypeError, "block_size"),
    ("dequantize block_size True", lambda: dqbw(_QB, _AB, True), TypeError, "block_size"),
    ("rounding up", lambda: qbw(_X, 7, rounding="up"), ValueError, "rounding"),
    ("rounding None", lambda: qbw(_X, 7, rounding=None), ValueError, "rounding"),
    ("seed -1", lambda: qbw(_X, 7, rounding="stochastic", seed=-1), ValueError, "seed"),
    ("seed 2**64", lambda: qbw(_X, 7, rounding="stochastic", seed=2 ** 64), ValueError, "seed"),
    ("seed 1.5", lambda: qbw(_X, 7, rounding="stochastic", seed=1.5), ValueError, "seed"),
    ("seed True", lambda: qbw(_X, 7, rounding="stochastic", seed=True), ValueError, "seed"),
    # absmax length
    ("absmax too short", lambda: dqbw(_QB, _AB[:3].copy(), 7), ValueError, "absmax"),
    ("absmax too long", lambda: dqbw(_QB, np.ones(5, np.float32), 7), ValueError, "absmax"),
    ("absmax for another block size", lambda: dqbw(_QB, _AB, 8), ValueError, "absmax"),
    ("absmax 2-D", lambda: dqbw(_QB, _AB.reshape(2, 2), 7), ValueError, "absmax"),
    # out=
    ("out shape", lambda: qpt(_X, 0.1, 0, out=np.empty((6, 4), np.int8)), ValueError, "out"),
    ("out dtype", lambda: qpt(_X, 0.1, 0, out=np.empty((4, 6), np.uint8)), ValueError, "out"),
    ("out uint8 dtype", lambda: qpt(_X, 0.1, 0, "uint8", out=np.empty((4, 6), np.int8)),
     ValueError, "out"),
    ("out list", lambda: qpt(_X, 0.1, 0, out=[0] * 24), TypeError, "out"),
    ("out strided", lambda: qpt(_X, 0.1, 0, out=np.empty((4, 12), np.int8)[:, ::2]), ValueError,
     "out"),
    ("out read-only", lambda: qpt(_X, 0.1, 0, out=_readonly(np.empty((4, 6), np.int8))),
     ValueError, "out"),
    ("out overlaps x", lambda: qpt(_X, 0.1, 0, out=_X.view(np.int8)[:, :6]), ValueError, "out"),
    ("per_channel out shape", lambda: qpc(_X, _S6, _Z6, 1, out=np.empty(24, np.int8)),
     ValueError, "out"),
    ("dequantize out dtype", lambda: deq(_Q8, 0.1, 0, out=np.empty((4, 6), np.float64)),
     ValueError, "out"),
    ("dequantize out shape", lambda: deq(_Q8, 0.1, 0, out=np.empty((4, 5), np.float32)),
     ValueError, "out"),
    ("dequantize out float32, out_dtype float16",
     lambda: deq(_Q8, 0.1, 0, out_dtype="float16", out=np.empty((4, 6), np.float32)),
     ValueError, "out"),
    ("dequantize out float16, out_dtype bfloat16",
     lambda: deq(_Q8, 0.1, 0, out_dtype="bfloat16", out=np.empty((4, 6), np.float16)),
     ValueError, "out"),
    ("blockwise out not tuple", lambda: qbw(_X, 7, out=np.empty((4, 6), np.int8)), TypeError,
     "out"),
    ("blockwise out 1-tuple", lambda: qbw(_X, 7, out=(np.empty((4, 6), np.int8),)), TypeError,
     "out"),
    ("blockwise out[0] shape", lambda: qbw(_X, 7, out=(np.empty(24, np.int8),
                                                       np.empty(4, np.float32))),
     ValueError, r"out\[0\]"),
    ("blockwise out[0] dtype", lambda: qbw(_X, 7, out=(np.empty((4, 6), np.uint8),
                                                       np.empty(4, np.float32))),
     ValueError, r"out\[0\]"),
    ("blockwise out[1] length", lambda: qbw(_X, 7, out=(np.empty((4, 6), np.int8),
                                                        np.empty(3, np.float32))),
     ValueError, r"out\[1\]"),
    ("blockwise out[1] dtype", lambda: qbw(_X, 7, out=(np.empty((4, 6), np.int8),
                                                       np.empty(4, np.float64))),
     ValueError, r"out\[1\]"),
    ("dequantize_blockwise out shape", lambda: dqbw(_QB, _AB, 7, out=np.empty(24, np.float32)),
     ValueError, "out"),
    ("dequantize_blockwise out dtype",
     lambda: dqbw(_QB, _AB, 7, out=np.empty((4, 6), np.float16)), ValueError, "out"),
]


@pytest.mark.parametrize("thunk, exc, match", [c[1:] for c in BAD_ARGS],
                         ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


# ---- bad arrays, on every backend ---------------------------------------------------------

OVERLAP = r"(out\S* overlaps|overlaps out)"

# Arrays of quant_cases.bad_input_arrays, all of the backend's kind (test_cuda_quant has the
# GPU's own cases: host arrays among CUDA ones, bad streams).
# (id, call(arrays, backend), exception, regex the message must match)
BAD_INPUTS = [
    # input dtypes
    ("per_tensor int32 x", lambda a, b: qpt(a.x_i32, 0.1, 0, out=a.q_out), TypeError, "^x: "),
    ("per_tensor float64 x", lambda a, b: qpt(a.x_f64, 0.1, 0, out=a.q_out), TypeError,
     "^x: "),
    ("per_channel int32 x", lambda a, b: qpc(a.x_i32, _S6, _Z6, 1, out=a.q_out), TypeError,
     "^x: "),
    ("blockwise int32 x", lambda a, b: qbw(a.x_i32, 7, out=(a.q_out, a.am_out)), TypeError,
     "^x: "),
    ("blockwise float64 x", lambda a, b: qbw(a.x_f64, 7, out=(a.q_out, a.am_out)),
     TypeError, "^x: "),
    ("dequantize float32 q", lambda a, b: deq(a.x, 0.1, 0, out=a.d_out), TypeError, "^q: "),
    ("dequantize per channel int32 q",
     lambda a, b: deq(a.x_i32, _S6, _Z6, axis=1, out=a.d_out), TypeError, "^q: "),
    ("dequantize_blockwise float32 q", lambda a, b: dqbw(a.x, a.am, 7, out=a.d_out),
     TypeError, "^q: "),
    ("dequantize_blockwise uint8 q", lambda a, b: dqbw(a.qu8, a.am, 7, out=a.d_out),
     TypeError, "^q: "),
    ("dequantize_blockwise float64 absmax",
     lambda a, b: dqbw(a.q8, a.am_f64, 7, out=a.d_out), TypeError, "^absmax: "),
    # absmax and per-channel parameters
    ("absmax too short", lambda a, b: dqbw(a.q8, a.am[:3], 7, out=a.d_out), ValueError,
     "^absmax: "),
    ("absmax for another block size", lambda a, b: dqbw(a.q8, a.am, 8, out=a.d_out),
     ValueError, "^absmax: "),
    ("absmax 2-D", lambda a, b: dqbw(a.q8, a.am.reshape(2, 2), 7, out=a.d_out), ValueError,
     "^absmax: "),
    ("per_channel scales length", lambda a, b: qpc(a.x, _S6[:4], _Z6[:4], 1, out=a.q_out),
     ValueError, "^scales: "),
    # out shape and dtype
    ("per_tensor out shape", lambda a, b: qpt(a.x, 0.1, 0, out=a.q_out.reshape(-1)),
     ValueError, "^out: "),
    ("per_tensor out dtype", lambda a, b: qpt(a.x, 0.1, 0, out=a.qu_out), ValueError,
     "^out: "),
    ("per_tensor uint8 out dtype", lambda a, b: qpt(a.x, 0.1, 0, "uint8", out=a.q_out),
     ValueError, "^out: "),
    ("per_channel out shape", lambda a, b: qpc(a.x, _S6, _Z6, 1, out=a.q_out.reshape(6, 4)),
     ValueError, "^out: "),
    ("dequantize out dtype", lambda a, b: deq(a.q8, 0.1, 0, out=a.d16_out), ValueError,
     "^out: "),
    ("dequantize per channel out shape",
     lambda a, b: deq(a.q8, _S6, _Z6, axis=1, out=a.d_out.reshape(-1)), ValueError, "^out: "),
    ("blockwise out[0] shape", lambda a, b: qbw(a.x, 7, out=(a.q_out.reshape(-1), a.am_out)),
     ValueError, r"^out\[0\]: "),
    ("blockwise out[0] dtype", lambda a, b: qbw(a.x, 7, out=(a.qu_out, a.am_out)),
     ValueError, r"^out\[0\]: "),
    ("blockwise out[1] length", lambda a, b: qbw(a.x, 7, out=(a.q_out, a.am_out[:3])),
     ValueError, r"^out\[1\]: "),
    ("blockwise out[1] dtype", lambda a, b: qbw(a.x, 7, out=(a.q_out, a.am16_out)),
     ValueError, r"^out\[1\]: "),
    ("dequantize_blockwise out shape",
     lambda a, b: dqbw(a.q8, a.am, 7, out=a.d_out.reshape(-1)), ValueError, "^out: "),
    ("dequantize_blockwise out dtype", lambda a, b: dqbw(a.q8, a.am, 7, out=a.d16_out),
     ValueError, "^out: "),
    # out overlapping an input or the other output
    ("per_tensor out overlaps x", lambda a, b: qpt(a.x, 0.1, 0, out=int8_rows(b, a.x)),
     ValueError, OVERLAP),
    ("blockwise out[0] overlaps x",
     lambda a, b: qbw(a.x, 7, out=(int8_rows(b, a.x), a.am_out)), ValueError, OVERLAP),
    ("blockwise out[1] overlaps out[0]",
     lambda a, b: qbw(a.x, 7, out=(int8_rows(b, a.pair), a.pair[2:6])), ValueError,
     OVERLAP),
    ("dequantize out overlaps q",
     lambda a, b: deq(int8_rows(b, a.shared), 0.1, 0, out=a.shared[:24].reshape(4, 6)),
     ValueError, OVERLAP),
    ("dequantize_blockwise out overlaps absmax",
     lambda a, b: dqbw(a.q8, a.shared[20:24], 7, out=a.shared[:24].reshape(4, 6)),
     ValueError, OVERLAP),
    # non-contiguous arrays
    ("per_tensor strided x", lambda a, b: qpt(a.x_wide[:, ::2], 0.1, 0, out=a.q_out),
     ValueError, "^x: .*contiguous"),
    ("per_channel strided x", lambda a, b: qpc(a.x_wide[:, ::2], _S6, _Z6, 1, out=a.q_out),
     ValueError, "^x: .*contiguous"),
    ("blockwise strided x", lambda a, b: qbw(a.x_wide[:, ::2], 7, out=(a.q_out, a.am_out)),
     ValueError, "^x: .*contiguous"),
    ("dequantize strided q", lambda a, b: deq(a.q_wide[:, ::2], 0.1, 0, out=a.d_out),
     ValueError, "^q: .*contiguous"),
    ("dequantize_blockwise strided absmax",
     lambda a, b: dqbw(a.q8, a.am_wide[::2], 7, out=a.d_out), ValueError,
     "^absmax: .*contiguous"),
    ("per_tensor strided out", lambda a, b: qpt(a.x, 0.1, 0, out=a.q_wide_out[:, ::2]),
     ValueError, "^out: .*contiguous"),
    ("blockwise strided out[1]",
     lambda a, b: qbw(a.x, 7, out=(a.q_out, a.am_wide_out[::2])), ValueError,
     r"^out\[1\]: .*contiguous"),
    ("dequantize strided out", lambda a, b: deq(a.q8, 0.1, 0, out=a.d_wide_out[:, ::2]),
     ValueError, "^out: .*contiguous"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_writes_nothing(array_backend, call, exc, match, rng):
    b = array_backend
    arrays = bad_input_arrays(b, rng)
    before = {k: b.to_numpy(v) for k, v in vars(arrays).items()}
    with pytest.raises(exc, match=match):
        call(arrays, b)
    for k, v in vars(arrays).items():  # on a GPU: after all work queued before the error
        assert_bits(b.to_numpy(v), before[k], f"{k} was modified")


# the float64 values that round to float32 0 or inf, at the rounding boundaries too
TIE_ZERO, TIE_INF = 2.0 ** -150, 2.0 ** 128 - 2.0 ** 103


@pytest.mark.parametrize("scale", [1e-50, 1e-46, TIE_ZERO, 1e300, 3.5e38, TIE_INF])
def test_scale_not_representable_in_float32(cpu_path, scale, rng):
    """The arithmetic is float32: a finite positive float64 scale that rounds to 0 or to
    infinity in float32 would divide by 0 (x/0 = +-inf, 0/0 = NaN cast to an integer) or
    quantize everything to the zero point, so it must be refused like scale 0 or inf."""
    x = fresh(rng, (4, 40), np.float32)
    with pytest.raises(ValueError, match="scale"):
        fastopt.quantize_per_tensor(x, scale, 0)
    with pytest.raises(ValueError, match="scales"):
        fastopt.quantize_per_channel(x, [0.1, scale, 0.1, 0.1], np.zeros(4, np.int64), 0)
    with pytest.raises(ValueError, match="scale"):
        fastopt.dequantize(np.ones((4, 40), np.int8), scale, 0)


@pytest.mark.parametrize("scale", [float(np.nextafter(TIE_ZERO, 1)),
                                   float(np.nextafter(TIE_INF, 0))])
def test_scale_just_representable_in_float32(scale, rng):
    """Just inside the float32 range the scale is accepted, and used as its float32."""
    x = fresh(rng, (4, 40), np.float32)
    with np.errstate(over="ignore"):  # x / 1e-45 overflows to +-inf, then clamps
        want = ref_quantize(x, np.float32(scale), 0, "int8")
    assert_bits(fastopt.quantize_per_tensor(x, scale, 0), want)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)], ids=shape_id)
def test_zero_size(backend, shape):
    """Empty inputs give empty results of the input's kind, shape and dtype (choose_qparams:
    eps and the zero point of 0); out= of size 0 too."""
    x = backend.asarray(np.empty(shape, np.float32))
    ok = backend.assert_result
    for qdtype in QDTYPES:
        _, qmin, _ = QRANGE[qdtype]
        q = qpt(x, 0.1, 0, qdtype)
        ok(q, x, qdtype, shape)
        ok(deq(q, 0.1, 0), x, "float32", shape)
        for axis in range(len(shape)):
            c = shape[axis]
            qc = qpc(x, np.full(c, 0.1), np.zeros(c, int), axis, qdtype)
            ok(qc, x, qdtype, shape)
            ok(deq(qc, np.full(c, 0.1), np.zeros(c, int), axis=axis), x, "float32", shape)
            s, z = cqp(x, symmetric=False, axis=axis, dtype=qdtype)
            assert s.shape == (c,) and np.all(s == np.float32(EPS32)) and np.all(z == qmin)
        s, z = cqp(x, symmetric=False, dtype=qdtype)
        assert s == np.float32(EPS32) and z == qmin
        s, z = cqp(x, symmetric=True, dtype=qdtype)
        assert s == np.float32(EPS32) and z == (0 if qdtype == "int8" else 128)
    for rounding in ("nearest", "stochastic"):
        q, a = qbw(x, 64, rounding=rounding)
        ok(q, x, "int8", shape)
        ok(a, x, "float32", (0,))
        ok(dqbw(q, a, 64), x, "float32", shape)
    # out= of size 0 is fine too
    out = backend.asarray(np.empty(shape, np.int8))
    assert qpt(x, 0.1, 0, out=out) is out
    outs = (backend.asarray(np.empty(shape, np.int8)), backend.asarray(np.empty(0, np.float32)))
    assert qbw(x, 64, out=outs) is outs
