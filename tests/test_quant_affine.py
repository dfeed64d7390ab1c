"""Tests of affine int8 quantization (``quantize_per_tensor``, ``quantize_per_channel``,
``dequantize``) and of ``choose_qparams``.

* Exactness: equal to ``fastopt.reference`` (a float32 NumPy twin of the kernels) bit for bit,
  on every backend (the ``backend`` fixture: both CPU code paths, CuPy and PyTorch CUDA,
  there also bit for bit against the CPU), for float32/float16/bfloat16 inputs, odd sizes
  and multi-dimensional arrays, every channel axis, 16-bit outputs and ``out=``.
* PyTorch (when importable): ``torch.quantize_per_tensor/per_channel`` (up to rounding ties,
  see quant.py), ``torch.dequantize`` and the min/max observers.
* choose_qparams: the documented formulas (on every backend), all-zero input, round trip
  within half a step.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import CPU, assert_bits, host_matching_cpu
from quant_cases import (CHANNEL_CASES, EPS32, F32, IN_DTYPES, IN_IDS, OUT_DTYPES, OUT_IDS,
                         QDTYPES, QRANGE, SHAPES, TORCH_DEPRECATION, case_id, channel_params,
                         channel_shape, fresh, ref_quantize, run_with_out, shape_id,
                         tensor_params, with_ties)

qpt, qpc, deq = fastopt.quantize_per_tensor, fastopt.quantize_per_channel, fastopt.dequantize

# ---- exactness against the reference (and the CPU) ----------------------------------------

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_per_tensor_matches_reference(backend, in_dtype, shape, qdtype, rng):
    dt, lo, hi = QRANGE[qdtype]
    for scale, zp in tensor_params(rng, qdtype):
        what = f"scale={scale} zero_point={zp}"
        x = with_ties(rng, fresh(rng, shape, F32), np.float32(scale)).astype(in_dtype)
        qd = qpt(backend.asarray(x), scale, zp, qdtype)
        q = host_matching_cpu(backend, qd, lambda x=x, s=scale, z=zp: qpt(x, s, z, qdtype),
                              f"quantize {what}")
        assert_bits(q, ref_quantize(x, scale, zp, qdtype), f"quantize {what}")
        # the parameter sets all clamp at one end at least (sizes > 1000)
        if x.size > 1000:
            assert q.min() == lo or q.max() == hi
        d = host_matching_cpu(backend, deq(qd, scale, zp), lambda q=q, s=scale, z=zp: deq(q, s, z),
                              f"dequantize {what}")
        assert_bits(d, reference.dequantize_affine(q, scale, zp), f"dequantize {what}")
        qr = rng.integers(lo, hi + 1, shape).astype(dt)  # every code, not only reachable ones
        for z in (zp, np.int64(zp)):
            dr = host_matching_cpu(backend, deq(backend.asarray(qr), scale, z),
                                   lambda qr=qr, s=scale, z=z: deq(qr, s, z),
                                   f"dequantize random q {what}")
            assert_bits(dr, reference.dequantize_affine(qr, scale, zp),
                        f"dequantize random q {what} ({type(z).__name__} zero point)")


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=case_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_per_channel_matches_reference(backend, in_dtype, case, qdtype, rng):
    shape, axis = case
    dt, lo, hi = QRANGE[qdtype]
    ax = axis % len(shape)
    scales, zps = channel_params(rng, qdtype, shape[ax])
    scales_b = scales.reshape(channel_shape(len(shape), ax))
    x = with_ties(rng, fresh(rng, shape, F32), scales_b).astype(in_dtype)
    qd = qpc(backend.asarray(x), scales, zps, axis, qdtype)
    q = host_matching_cpu(backend, qd, lambda: qpc(x, scales, zps, axis, qdtype),
                          "quantize_per_channel")
    assert_bits(q, ref_quantize(x, scales, zps, qdtype, ax), "quantize_per_channel")
    d = host_matching_cpu(backend, deq(qd, scales, zps, axis=axis),
                          lambda: deq(q, scales, zps, axis=axis), "dequantize per channel")
    assert_bits(d, reference.dequantize_affine(q, scales, zps, ax), "dequantize per channel")
    qr = rng.integers(lo, hi + 1, shape).astype(dt)
    for z in (zps, zps.astype(np.int32)):
        dr = host_matching_cpu(backend, deq(backend.asarray(qr), scales, z, axis=axis),
                               lambda z=z: deq(qr, scales, z, axis=axis), "dequantize random q")
        assert_bits(dr, reference.dequantize_affine(qr, scales, zps, ax),
                    f"dequantize random q ({z.dtype} zero points)")


# Scales for 16-bit outputs: products of few mantissa bits that land on float16/bfloat16
# rounding ties (1 + 2^-9, 1 + 2^-11: q * scale is then q plus q's low bits shifted below the
# 16-bit mantissa), a float16 overflow (1000: |q| * 1000 > 65504 gives inf), results that are
# float16 subnormals or round to zero (1e-7), and a random float32 scale.
OUT_SCALES = [1 + 2.0 ** -9, 1 + 2.0 ** -11, 1000.0, 1e-7]


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
def test_dequantize_out_dtype_matches_reference(backend, out_dtype, shape, qdtype, rng):
    """dequantize(..., out_dtype=) stores the float32 result rounded to nearest even (the
    reference casts with NumPy / ml_dtypes), per tensor and per channel; out_dtype given by
    name or as the dtype; written into every element of a poisoned out= too. CuPy refuses
    bfloat16 by name."""
    if not backend.holds(out_dtype):
        with pytest.raises(TypeError, match="^out_dtype: CuPy has no bfloat16"):
            deq(backend.asarray(np.zeros(3, np.int8)), 0.1, 0, out_dtype="bfloat16")
        return
    dt, lo, hi = QRANGE[qdtype]
    q = rng.integers(lo, hi + 1, shape).astype(dt)
    qd = backend.asarray(q)
    for scale in OUT_SCALES + [0.0371, float(np.float32(rng.uniform(0.005, 0.2)))]:
        zp = int(rng.integers(lo, hi + 1))
        with np.errstate(over="ignore"):
            want = reference.dequantize_affine(q, scale, zp, out_dtype=out_dtype)
        for spelled in (out_dtype.name, out_dtype):
            what = f"scale={scale} zp={zp} out_dtype={spelled!r}"
            got = host_matching_cpu(backend, deq(qd, scale, zp, out_dtype=spelled),
                                    lambda s=scale, z=zp, o=spelled: deq(q, s, z, out_dtype=o),
                                    what)
            assert_bits(got, want, what)
        run_with_out(lambda o, s=scale, z=zp: deq(qd, s, z, out_dtype=out_dtype, out=o), [want],
                     backend)
    ax = len(shape) - 1
    scales, zps = channel_params(rng, qdtype, shape[ax])
    scales[1::4] = OUT_SCALES[0]
    scales[2::4] = 1000.0
    with np.errstate(over="ignore"):
        want = reference.dequantize_affine(q, scales, zps, ax, out_dtype=out_dtype)
    got = host_matching_cpu(backend, deq(qd, scales, zps, axis=ax, out_dtype=out_dtype),
                            lambda: deq(q, scales, zps, axis=ax, out_dtype=out_dtype),
                            "per channel")
    assert_bits(got, want, "per channel")


# ---- against PyTorch ----------------------------------------------------------------------

def assert_equal_but_ties(got: np.ndarray, want: np.ndarray, x32: np.ndarray, scale_b) -> None:
    """got == want except on rounding ties of x/scale (fastopt divides, torch's CPU path
    multiplies by the rounded reciprocal): there they may differ by exactly one."""
    diff = got.astype(np.int64) - want.astype(np.int64)
    bad = diff != 0
    if not bad.any():
        return
    r = x32.astype(np.float64) / np.broadcast_to(np.asarray(scale_b, np.float64), x32.shape)
    tie = np.abs(r - (np.floor(r) + 0.5)) <= 1e-6 * np.abs(r)
    idx = np.flatnonzero(bad & ~(tie & (np.abs(diff) == 1)))
    assert idx.size == 0, (f"{idx.size} elements differ from torch off a tie (or by more than "
                           f"one): x={x32.reshape(-1)[idx[:5]].tolist()} "
                           f"got={got.reshape(-1)[idx[:5]].tolist()} "
                           f"torch={want.reshape(-1)[idx[:5]].tolist()}")
    assert bad.sum() <= max(2, got.size // 200), f"{bad.sum()} of {got.size} differ from torch"


@TORCH_DEPRECATION
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("shape", [(4097,), (5, 31, 67)], ids=shape_id)
def test_per_tensor_against_torch(cpu_path, shape, qdtype, rng):
    torch = pytest.importorskip("torch")
    tdt = {"int8": torch.qint8, "uint8": torch.quint8}[qdtype]
    for scale, zp in tensor_params(rng, qdtype):
        scale = float(np.float32(scale))
        x = with_ties(rng, fresh(rng, shape, np.float32), scale, frac=0.005)
        tq = torch.quantize_per_tensor(torch.from_numpy(x), scale, zp, tdt)
        q = fastopt.quantize_per_tensor(x, scale, zp, qdtype)
        assert_equal_but_ties(q, tq.int_repr().numpy(), x, scale)
        # dequantize of torch's own codes equals torch.dequantize exactly
        tcodes = tq.int_repr().numpy()
        assert_bits(fastopt.dequantize(tcodes, scale, zp), torch.dequantize(tq).numpy(),
                    f"dequantize scale={scale} zp={zp}")


@TORCH_DEPRECATION
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("case", [((3, 4097), 0), ((5, 31, 67), 1), ((5, 31, 67), -1)],
                         ids=case_id)
def test_per_channel_against_torch(cpu_path, case, qdtype, rng):
    torch = pytest.importorskip("torch")
    tdt = {"int8": torch.qint8, "uint8": torch.quint8}[qdtype]
    shape, axis = case
    ax = axis % len(shape)
    scales, zps = channel_params(rng, qdtype, shape[ax])
    scales_b = scales.reshape(channel_shape(len(shape), ax))
    x = with_ties(rng, fresh(rng, shape, np.float32), scales_b, frac=0.005)
    tq = torch.quantize_per_channel(torch.from_numpy(x),
                                    torch.from_numpy(scales.astype(np.float64)),
                                    torch.from_numpy(zps.astype(np.int64)), ax, tdt)
    q = fastopt.quantize_per_channel(x, scales, zps, axis, qdtype)
    assert_equal_but_ties(q, tq.int_repr().numpy(), x, scales_b)
    assert_bits(fastopt.dequantize(tq.int_repr().numpy(), scales, zps, axis=axis),
                torch.dequantize(tq).numpy(), "dequantize per channel")


# ---- choose_qparams -----------------------------------------------------------------------

def expected_qparams(x: np.ndarray, symmetric: bool, qdtype: str, axis: Optional[int]):
    """The documented formulas, in float32: lo = min(min x, 0), hi = max(max x, 0);
    symmetric: scale = max(-lo, hi) / 127, zero_point 0 (int8) or 128 (uint8); affine:
    scale = (hi - lo) / (qmax - qmin), zero_point = clamp(qmin - rint(lo / scale)); scale
    at least float32 eps."""
    f32 = np.float32
    _, qmin, qmax = QRANGE[qdtype]
    a = x.astype(f32)
    a = a.reshape(1, -1) if axis is None else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    mn = a.min(axis=1, initial=np.inf)
    mx = a.max(axis=1, initial=-np.inf)
    lo, hi = np.minimum(mn, f32(0)), np.maximum(mx, f32(0))
    eps = np.finfo(f32).eps
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / f32(127), eps).astype(f32)
        zp = np.full(lo.shape, 0 if qdtype == "int8" else 128, np.int32)
    else:
        scale = np.maximum((hi - lo) / f32(qmax - qmin), eps).astype(f32)
        zp = np.clip(qmin - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    return scale, zp


def check_qparams(got, want, axis) -> None:
    scale, zp = got
    if axis is None:
        assert type(scale) is float and type(zp) is int
        assert scale == float(want[0][0]) and zp == int(want[1][0])
    else:
        assert_bits(scale, want[0], "scale")
        assert_bits(zp, want[1], "zero_point")


# Per tensor and per channel of every size; from the GPU observer's cases: one channel
# (running min/max), few or many channels (warp-reduced or per-element atomics), channels of
# one element, empty input.
QPARAM_CASES = [((1,), None), ((4097,), None), ((1_000_003,), None), ((6, 37, 41), None),
                ((6, 37, 41), 0), ((6, 37, 41), 1), ((6, 37, 41), -1), ((3, 333_334), 0),
                ((4, 37), None), ((0, 5), None), ((0, 5), 1)] + CHANNEL_CASES


@pytest.mark.parametrize("case", QPARAM_CASES, ids=case_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_choose_qparams_formula(backend, in_dtype, case, rng):
    """The documented formulas for every mode, on inputs of mixed signs, positive and
    negative only, channels of each kind at once; on a GPU the CPU's scales and zero points
    exactly. Non-finite input names the first bad index (on a GPU: the CPU's message)."""
    shape, axis = case
    base = fresh(rng, shape, np.float32).astype(np.float32)
    signs = {"mixed": base + np.float32(0.7),  # not symmetric about 0
             "positive": np.abs(base) + np.float32(0.25),  # lo clamps to 0
             "negative": -np.abs(base) - np.float32(0.25)}  # hi clamps to 0
    if axis is not None and shape[axis] >= 3:  # channels of all three kinds at once
        sel = np.arange(shape[axis]).reshape(channel_shape(len(shape), axis)) % 3
        signs["per-channel mix"] = np.where(sel == 0, signs["positive"],
                                            np.where(sel == 1, signs["negative"],
                                                     signs["mixed"]))
    if base.ndim > 1 and shape[0] > 1:  # a first channel or region only negative, a last
        ends = base.copy()                # one only positive
        ends[0] = -np.abs(ends[0])
        ends[-1] = np.abs(ends[-1]) + 1.0
        signs["negative first, positive last"] = ends
    for sign, x32 in signs.items():
        x = x32.astype(in_dtype)
        xd = backend.asarray(x)
        for symmetric in (True, False):
            for qdtype in QDTYPES:
                kwargs = dict(symmetric=symmetric, axis=axis, dtype=qdtype)
                got = fastopt.choose_qparams(xd, **kwargs)
                check_qparams(got, expected_qparams(x, symmetric, qdtype, axis), axis)
                if axis is None:
                    assert got[0] > 0
                if backend.is_cuda:
                    with CPU.activate():
                        want = fastopt.choose_qparams(x, **kwargs)
                    if axis is None:
                        assert got == want, (sign, kwargs, got, want)
                    else:
                        assert_bits(got[0], want[0], f"scales {sign} {kwargs} (against the CPU)")
                        assert_bits(got[1], want[1],
                                    f"zero points {sign} {kwargs} (against the CPU)")
    if base.size:
        bad = signs["mixed"].astype(in_dtype)
        flat = bad.reshape(-1)
        first = flat.size // 3
        flat[[first, flat.size // 2]] = np.array([np.nan, np.inf], dtype=F32).astype(in_dtype)
        idx = tuple(int(i) for i in np.unravel_index(first, bad.shape))
        msg = re.escape(f"non-finite value at index {idx} (flat {first})")
        with pytest.raises(ValueError, match=msg) as error:
            fastopt.choose_qparams(backend.asarray(bad), axis=axis)
        if backend.is_cuda:
            with CPU.activate(), pytest.raises(ValueError) as cpu_error:
                fastopt.choose_qparams(bad, axis=axis)
            assert str(error.value) == str(cpu_error.value)


@pytest.mark.parametrize("axis", [None, 0])
def test_choose_qparams_of_a_range_past_float32_is_finite(axis, rng):
    """max - min past float32's largest value (finite ends): the scale is its float64
    quotient, rounded (torch's observer, in float32, gives inf), and x round-trips."""
    x = fresh(rng, (2, 37), np.float32)
    x[0, 3], x[0, 9] = -3e38, 3e38
    for qdtype in QDTYPES:
        _, qmin, qmax = QRANGE[qdtype]
        scale, zp = fastopt.choose_qparams(x, symmetric=False, axis=axis, dtype=qdtype)
        first = np.float32(np.asarray(scale).reshape(-1)[0])
        assert first == np.float32((3e38 - np.float64(np.float32(-3e38))) / (qmax - qmin))
        q = (fastopt.quantize_per_tensor(x, scale, zp, qdtype) if axis is None
             else fastopt.quantize_per_channel(x, scale, zp, axis, qdtype))
        back = (fastopt.dequantize(q, scale, zp) if axis is None
                else fastopt.dequantize(q, scale, zp, axis))
        assert np.all(np.isfinite(back))
        assert np.abs(back[0].astype(np.float64) - x[0]).max() <= first


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_choose_qparams_zero_input_gives_eps(cpu_path, axis, rng):
    x = np.zeros((4, 37), np.float32)
    for symmetric in (True, False):
        for qdtype in QDTYPES:
            _, qmin, _ = QRANGE[qdtype]
            scale, zp = fastopt.choose_qparams(x, symmetric=symmetric, axis=axis, dtype=qdtype)
            zp_want = (0 if qdtype == "int8" else 128) if symmetric else qmin
            assert np.all(np.asarray(scale) == np.float32(EPS32))
            assert np.all(np.asarray(zp) == zp_want)
    # one all-zero channel among random ones: eps there, the formula elsewhere
    x = fresh(rng, (4, 37), np.float32)
    x[2] = 0
    for symmetric in (True, False):
        scale, zp = fastopt.choose_qparams(x, symmetric=symmetric, axis=0)
        assert scale[2] == np.float32(EPS32) and np.all(scale > 0)
        check_qparams((scale, zp), expected_qparams(x, symmetric, "int8", 0), 0)


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
@pytest.mark.parametrize("case", [((4097,), None), ((5, 31, 67), 1), ((5, 31, 67), -1)],
                         ids=case_id)
def test_round_trip_within_half_scale(cpu_path, case, symmetric, qdtype, rng):
    """With the observer's parameters every x lies in the representable range, so
    dequantize(quantize(x)) is within scale/2 of x (+ float32 slack: x/scale and
    (q - z)*scale each round once, relative 6e-8 of |x| <= 255 scale)."""
    shape, axis = case
    x = fresh(rng, shape, np.float32) + np.float32(0.4)
    scale, zp = fastopt.choose_qparams(x, symmetric=symmetric, axis=axis, dtype=qdtype)
    if axis is None:
        q = fastopt.quantize_per_tensor(x, scale, zp, qdtype)
        s_b = np.float32(scale)
    else:
        q = fastopt.quantize_per_channel(x, scale, zp, axis, qdtype)
        s_b = scale.reshape(channel_shape(len(shape), axis % len(shape)))
    dq = fastopt.dequantize(q, scale, zp, axis=axis)
    err = np.abs(dq.astype(np.float64) - x)
    bound = np.broadcast_to(s_b.astype(np.float64) * (0.5 + 1e-4), x.shape)
    assert np.all(err <= bound), f"worst err/scale {np.max(err / bound) * (0.5 + 1e-4)}"


@TORCH_DEPRECATION
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, 2])
def test_choose_qparams_against_torch_observers(axis, qdtype, rng):
    """Affine: equal to torch's MinMaxObserver / PerChannelMinMaxObserver (scale rtol 1e-6,
    zero point exact). Symmetric: torch divides max |x| by (qmax - qmin) / 2 = 127.5 where
    fastopt uses the restricted range [-127, 127] (divides by 127, so that -max|x| maps to
    -127 exactly and the code -128 is never used); so torch's scale is fastopt's * 127/127.5,
    and the zero points agree (0 for int8, 128 for uint8)."""
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
    tdt = {"int8": torch.qint8, "uint8": torch.quint8}[qdtype]
    x = fresh(rng, (6, 37, 41), np.float32) + np.float32(0.3)
    x[1] = np.abs(x[1]) + 0.1  # a channel (axis 0) with lo = 0 and one with hi = 0
    x[2] = -np.abs(x[2]) - 0.1
    for symmetric in (False, True):
        if axis is None:
            qs = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
            obs = MinMaxObserver(dtype=tdt, qscheme=qs, reduce_range=False)
        else:
            qs = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
            obs = PerChannelMinMaxObserver(ch_axis=axis, dtype=tdt, qscheme=qs,
                                           reduce_range=False)
        obs(torch.from_numpy(x))
        tscale, tzp = (t.numpy() for t in obs.calculate_qparams())
        scale, zp = fastopt.choose_qparams(x, symmetric=symmetric, axis=axis, dtype=qdtype)
        scale = np.atleast_1d(np.asarray(scale, np.float64))
        zp = np.atleast_1d(np.asarray(zp))
        tscale, tzp = np.atleast_1d(tscale).astype(np.float64), np.atleast_1d(tzp)
        if symmetric:
            np.testing.assert_allclose(tscale, scale * 127 / 127.5, rtol=1e-6)
        else:
            np.testing.assert_allclose(tscale, scale, rtol=1e-6)
        assert np.array_equal(tzp.astype(np.int64), zp.astype(np.int64)), (tzp, zp)
