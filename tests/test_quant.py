"""Tests of the int8 quantization API (``fastopt.quant``).

* Exactness: every mode equals ``fastopt.reference`` (a float32 NumPy twin of the kernels) bit
  for bit, on both CPU code paths, for float32/float16/bfloat16 inputs, odd sizes, partial
  blocks and multi-dimensional arrays; and the scalar and AVX2 paths agree with each other.
* PyTorch (when importable): ``torch.quantize_per_tensor/per_channel`` (up to rounding ties,
  see quant.py), ``torch.dequantize`` and the min/max observers.
* Properties: round-trip error bounds, stochastic rounding reproducible and unbiased.
* Edge cases and argument checks: all-zero blocks, non-finite input (first bad index named,
  nothing written to ``out=``), bad scales/zero points/block sizes/axes/dtypes/outputs, empty
  inputs, ``out=`` filled completely.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import assert_bits, bits
from conftest import using_cpu_path, using_threads
from quant_cases import (BF16, BLOCKS, CHANNEL_CASES, EPS32, F32, IN_DTYPES, IN_IDS, LARGER,
                         NONFINITE_FUNCS, NONFINITE_SHAPE, QDTYPES, QRANGE, SHAPES,
                         TORCH_DEPRECATION, block_of, case_id, channel_params, channel_shape, fresh,
                         kernel_v, poisoned, ref_blockwise, ref_quantize, run_with_out, shape_id,
                         tensor_params, unchecked_input, with_ties)

# ---- exactness against the reference ------------------------------------------------------

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_per_tensor_matches_reference(cpu_path, in_dtype, shape, qdtype, rng):
    dt, lo, hi = QRANGE[qdtype]
    for scale, zp in tensor_params(rng, qdtype):
        what = f"scale={scale} zero_point={zp}"
        x = with_ties(rng, fresh(rng, shape, np.float32), np.float32(scale)).astype(in_dtype)
        q = fastopt.quantize_per_tensor(x, scale, zp, qdtype)
        assert_bits(q, ref_quantize(x, scale, zp, qdtype), f"quantize {what}")
        # the parameter sets all clamp at one end at least (sizes > 1000)
        if x.size > 1000:
            assert q.min() == lo or q.max() == hi
        assert_bits(fastopt.dequantize(q, scale, zp),
                    reference.dequantize_affine(q, scale, zp), f"dequantize {what}")
        qr = rng.integers(lo, hi + 1, shape).astype(dt)  # every code, not only reachable ones
        assert_bits(fastopt.dequantize(qr, scale, np.int64(zp)),
                    reference.dequantize_affine(qr, scale, zp), f"dequantize random q {what}")


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=case_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_per_channel_matches_reference(cpu_path, in_dtype, case, qdtype, rng):
    shape, axis = case
    dt, lo, hi = QRANGE[qdtype]
    ax = axis % len(shape)
    scales, zps = channel_params(rng, qdtype, shape[ax])
    scales_b = scales.reshape(channel_shape(len(shape), ax))
    x = with_ties(rng, fresh(rng, shape, np.float32), scales_b).astype(in_dtype)
    q = fastopt.quantize_per_channel(x, scales, zps, axis, qdtype)
    assert_bits(q, ref_quantize(x, scales, zps, qdtype, ax), "quantize_per_channel")
    assert_bits(fastopt.dequantize(q, scales, zps, axis=axis),
                reference.dequantize_affine(q, scales, zps, ax), "dequantize per channel")
    qr = rng.integers(lo, hi + 1, shape).astype(dt)
    assert_bits(fastopt.dequantize(qr, scales, zps.astype(np.int32), axis=axis),
                reference.dequantize_affine(qr, scales, zps, ax), "dequantize random q")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_blockwise_matches_reference(cpu_path, in_dtype, block, shape, rng):
    x = fresh(rng, shape, in_dtype)
    block = block_of(block, x.size)
    blocks = -(-x.size // block)
    seeds = [0, 2 ** 64 - 1, int(rng.integers(0, 2 ** 63))]
    for rounding, seed in [("nearest", None)] + [("stochastic", s) for s in seeds]:
        what = f"{rounding} seed={seed}"
        q, absmax = fastopt.quantize_blockwise(x, block, rounding=rounding, seed=seed)
        want_q, want_absmax = ref_blockwise(x, block, rounding, seed or 0)
        assert q.shape == x.shape and absmax.shape == (blocks,)
        assert_bits(absmax, want_absmax, f"absmax {what}")
        assert_bits(q, want_q, f"q {what}")
        assert_bits(fastopt.dequantize_blockwise(q, absmax, block),
                    reference.dequantize_blockwise(q, absmax, block), f"dequantize {what}")
    # the absmax really is max |x| per block
    x32 = x.astype(np.float32).reshape(-1)
    pad = np.zeros(blocks * block, np.float32)
    pad[:x32.size] = np.abs(x32)
    assert np.array_equal(absmax, pad.reshape(blocks, block).max(axis=1))


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_cpu_paths_bit_identical(in_dtype, rng):
    """Scalar and AVX2 paths (and 1 or several threads) give the same bits for every mode,
    stochastic rounding included: what 'identical on CPU and GPU for the same seed' rests on."""
    shape = (1_000_003,)
    x = fresh(rng, shape, in_dtype)
    x2 = fresh(rng, (7, 31, 4099), in_dtype)
    scales, zps = channel_params(rng, "int8", 31)
    seed = int(rng.integers(0, 2 ** 64, dtype=np.uint64))

    def run_all():
        out = {}
        for block in (256, 64, 7):
            for rounding in ("nearest", "stochastic"):
                q, a = fastopt.quantize_blockwise(x, block, rounding=rounding, seed=seed)
                out[f"blockwise {block} {rounding}"] = (q, a,
                                                        fastopt.dequantize_blockwise(q, a, block))
        q = fastopt.quantize_per_tensor(x, 0.0371, 5)
        out["per_tensor"] = (q, fastopt.dequantize(q, 0.0371, 5))
        q = fastopt.quantize_per_channel(x2, scales, zps, 1)
        out["per_channel"] = (q, fastopt.dequantize(q, scales, zps, axis=1))
        out["qparams"] = tuple(np.asarray(v) for v in
                               fastopt.choose_qparams(x2, symmetric=False, axis=1) +
                               fastopt.choose_qparams(x, symmetric=False))
        return out

    results = {}
    for path in ("scalar", "avx2"):
        with using_cpu_path(path):
            results[path] = run_all()
            with using_threads(1):
                results[path + "/1 thread"] = run_all()
    base = results["scalar"]
    for name, res in results.items():
        for key, arrays in res.items():
            for i, (a, b) in enumerate(zip(arrays, base[key])):
                assert_bits(a, np.asarray(b), f"{name} vs scalar: {key}[{i}]")


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


@TORCH_DEPRECATION
@pytest.mark.parametrize("tdtype", ["float32", "float16", "bfloat16"])
def test_torch_in_torch_out(tdtype, rng):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(fresh(rng, (5, 31, 67), np.float32)).to(getattr(torch, tdtype))
    if tdtype == "bfloat16":
        x = t.view(torch.int16).numpy().view(BF16)
    else:
        x = t.numpy()
    scales, zps = channel_params(rng, "int8", 31)

    q = fastopt.quantize_per_tensor(t, 0.05, 3)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.int8 and q.shape == t.shape
    assert_bits(q.numpy(), fastopt.quantize_per_tensor(x, 0.05, 3))
    qu = fastopt.quantize_per_tensor(t, 0.05, 128, "uint8")
    assert isinstance(qu, torch.Tensor) and qu.dtype == torch.uint8
    assert_bits(qu.numpy(), fastopt.quantize_per_tensor(x, 0.05, 128, "uint8"))
    d = fastopt.dequantize(q, 0.05, 3)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.float32
    assert_bits(d.numpy(), fastopt.dequantize(q.numpy(), 0.05, 3))

    qc = fastopt.quantize_per_channel(t, scales, zps, 1)
    assert isinstance(qc, torch.Tensor) and qc.dtype == torch.int8
    assert_bits(qc.numpy(), fastopt.quantize_per_channel(x, scales, zps, 1))
    dc = fastopt.dequantize(qc, scales, zps, axis=1)
    assert isinstance(dc, torch.Tensor) and dc.dtype == torch.float32
    assert_bits(dc.numpy(), fastopt.dequantize(qc.numpy(), scales, zps, axis=1))

    qb, ab = fastopt.quantize_blockwise(t, 64, rounding="stochastic", seed=9)
    assert isinstance(qb, torch.Tensor) and qb.dtype == torch.int8 and qb.shape == t.shape
    assert isinstance(ab, torch.Tensor) and ab.dtype == torch.float32
    nq, na = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=9)
    assert_bits(qb.numpy(), nq)
    assert_bits(ab.numpy(), na)
    db = fastopt.dequantize_blockwise(qb, ab, 64)
    assert isinstance(db, torch.Tensor) and db.dtype == torch.float32
    assert_bits(db.numpy(), fastopt.dequantize_blockwise(nq, na, 64))

    s, z = fastopt.choose_qparams(t, symmetric=False)
    assert (s, z) == fastopt.choose_qparams(x, symmetric=False)
    assert type(s) is float and type(z) is int


@TORCH_DEPRECATION
@pytest.mark.parametrize("check_finite", [True, False])
def test_torch_cpu_tensors_as_out(check_finite, rng):
    """out= takes PyTorch CPU tensors too: the very tensors come back, holding the result."""
    torch = pytest.importorskip("torch")
    x = fresh(rng, (3, 4097), np.float32)
    t = torch.from_numpy(x)
    kw = dict(check_finite=check_finite)
    q = torch.full(x.shape, 0x5A, dtype=torch.int8)
    assert fastopt.quantize_per_tensor(t, 0.05, 3, out=q, **kw) is q
    assert_bits(q.numpy(), fastopt.quantize_per_tensor(x, 0.05, 3))
    outs = (torch.full(x.shape, 0x5A, dtype=torch.int8), torch.full((193,), np.nan))
    assert fastopt.quantize_blockwise(t, 64, seed=1, out=outs, **kw) is outs
    for got, want in zip(outs, fastopt.quantize_blockwise(x, 64, seed=1)):
        assert_bits(got.numpy(), want)
    d = torch.full(x.shape, np.nan)
    assert fastopt.dequantize_blockwise(outs[0], outs[1], 64, out=d) is d
    assert_bits(d.numpy(), fastopt.dequantize_blockwise(outs[0].numpy(), outs[1].numpy(), 64))
    assert fastopt.dequantize(q, 0.05, 3, out=d) is d
    assert_bits(d.numpy(), fastopt.dequantize(q.numpy(), 0.05, 3))


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


QPARAM_CASES = [((1,), None), ((4097,), None), ((1_000_003,), None), ((6, 37, 41), None),
                ((6, 37, 41), 0), ((6, 37, 41), 1), ((6, 37, 41), -1), ((3, 333_334), 0)]


@pytest.mark.parametrize("case", QPARAM_CASES, ids=case_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_choose_qparams_formula(cpu_path, in_dtype, case, rng):
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
    for sign, x32 in signs.items():
        x = x32.astype(in_dtype)
        for symmetric in (True, False):
            for qdtype in QDTYPES:
                got = fastopt.choose_qparams(x, symmetric=symmetric, axis=axis, dtype=qdtype)
                want = expected_qparams(x, symmetric, qdtype, axis)
                check_qparams(got, want, axis)
                if axis is None:
                    assert got[0] > 0


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


# ---- blockwise properties -----------------------------------------------------------------

@pytest.mark.parametrize("block", [256, 64, 7, 1, LARGER])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_blockwise_nearest_round_trip(cpu_path, in_dtype, block, rng):
    """|dequantize_blockwise(q) - x| <= absmax/127/2 elementwise (+ float32 slack of a few
    ulp of absmax: x*f and q*(absmax/127) each round once)."""
    x = fresh(rng, (9, 455), in_dtype)
    block = block_of(block, x.size)
    q, absmax = fastopt.quantize_blockwise(x, block)
    assert q.min() >= -127
    dq = fastopt.dequantize_blockwise(q, absmax, block)
    am = np.repeat(absmax.astype(np.float64), block)[:x.size].reshape(x.shape)
    err = np.abs(dq - x.astype(np.float64))
    assert np.all(err <= am / 127 / 2 + am * 1e-6)
    # each block's absmax element is represented exactly (q = +-127)
    assert np.all(np.abs(q).reshape(-1)[np.abs(x.astype(np.float32)).reshape(-1)
                                         == np.repeat(absmax, block)[:x.size]] == 127)


def test_stochastic_reproducible_and_seeded(cpu_path, rng):
    x = fresh(rng, (17, 241), np.float32)
    q1, a1 = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=12345)
    q2, a2 = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=12345)
    q3, a3 = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=12346)
    assert_bits(q2, q1, "same seed")
    assert_bits(a3, a1, "absmax does not depend on the rounding")
    # an element with fractional part p rounds differently under two independent seeds with
    # probability 2p(1-p): a third of the elements on average
    assert np.mean(q1 != q3) > 0.2
    # the seed covers all 64 bits: seeds differing only in the high half differ too
    q4, _ = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=12345 + 2 ** 40)
    assert np.mean(q1 != q4) > 0.2
    # stochastic differs from nearest, and no seed draws a fresh one each call
    qn, _ = fastopt.quantize_blockwise(x, 64)
    assert np.mean(q1 != qn) > 0.1
    qa, _ = fastopt.quantize_blockwise(x, 64, rounding="stochastic")
    qb, _ = fastopt.quantize_blockwise(x, 64, rounding="stochastic")
    assert np.mean(qa != qb) > 0.2
    # numpy integer seeds are accepted and equal the Python int
    q5, _ = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=np.uint64(12345))
    assert_bits(q5, q1, "np.uint64 seed")


@pytest.mark.parametrize("in_dtype", [F32, BF16], ids=["f32", "bf16"])
def test_stochastic_unbiased_and_floor_or_ceil(cpu_path, in_dtype, rng):
    """Over 200 seeds the mean of dequantize_blockwise(quantize_blockwise(x, stochastic))
    converges to x. Per element, q = floor(v) + B with B ~ Bernoulli(frac(v)), so the mean
    of the dequantized value has standard deviation scale*sqrt(p(1-p))/sqrt(200) <= sigma =
    scale/(2*sqrt(200)) (scale = absmax/127). The seeds are fixed, so the test is
    deterministic; 5 sigma per element bounds the chance of a false alarm over the 4097
    elements by 4097 * 5.7e-7 = 0.2% for a correct implementation (normal approximation of a
    binomial with 200 trials), while a bias of a tenth of a step (0.1 scale > 7 sigma) is
    caught. The mean over all elements of the normalised error has sigma <= 0.5/sqrt(200 *
    4097), which catches a systematic bias of 1% of a step."""
    x = fresh(rng, (4097,), in_dtype)
    x32 = x.astype(np.float32)
    block, seeds = 64, 200
    total = np.zeros(x.size)
    took_floor = np.zeros(x.size, bool)
    took_ceil = np.zeros(x.size, bool)
    absmax = None
    for seed in range(seeds):
        q, absmax = fastopt.quantize_blockwise(x, block, rounding="stochastic", seed=seed)
        v = kernel_v(x32, absmax, block)
        lo = np.clip(np.floor(v), -127, 127)
        hi = np.clip(np.ceil(v), -127, 127)
        assert np.all((q == lo) | (q == hi)), f"seed {seed}: q is not floor or ceil of v"
        took_floor |= (q == lo) & (lo != hi)
        took_ceil |= (q == hi) & (lo != hi)
        total += fastopt.dequantize_blockwise(q, absmax, block)
    mean = total / seeds
    scale = np.repeat(absmax.astype(np.float64) / 127, block)[:x.size]
    sigma = scale / (2 * math.sqrt(seeds))
    err = mean - x32.astype(np.float64)
    assert np.all(np.abs(err) < 5 * sigma + 1e-6 * scale * 127), \
        f"worst |mean - x| = {np.max(np.abs(err) / sigma):.2f} sigma"
    assert abs(np.mean(err / scale)) < 5 * 0.5 / math.sqrt(seeds * x.size)
    # fractional parts well inside (0, 1) took both directions at least once over 200 seeds
    # (probability of always the same side <= 0.9**200 = 7e-10)
    frac = v - np.floor(v)
    mid = (frac > 0.1) & (frac < 0.9)
    assert np.all(took_floor[mid] & took_ceil[mid])


@pytest.mark.parametrize("step", [1.0, 2.0 ** -3, 2.0 ** 20])
def test_stochastic_exact_on_grid(cpu_path, step, rng):
    """A value already on the quantization grid (x * 127/absmax an integer k, exactly in
    float32) has floor = ceil = k, so stochastic rounding must return k for every seed (and
    dequantize to x exactly). Here x = k * step with integers k in [-127, 127] and a +-127
    in every block of 64, so absmax = 127 * step and the factor 1/step is exact."""
    n, block = 1 << 20, 64
    k = rng.integers(-127, 128, n)
    k[::block] = np.where(rng.random(n // block) < 0.5, -127, 127)
    x = (k * step).astype(np.float32)
    want = k.astype(np.int8)
    for seed in (1, 2, 3, 4):
        q, absmax = fastopt.quantize_blockwise(x, block, rounding="stochastic", seed=seed)
        assert np.all(absmax == np.float32(127 * step))
        bad = np.flatnonzero(q != want)
        assert bad.size == 0, (
            f"seed {seed}: {bad.size} of {n} on-grid elements moved off their grid point, "
            f"e.g. index {bad[0]}: x={float(x[bad[0]])!r} absmax={float(absmax[bad[0] // block])!r}"
            f" v={float(kernel_v(x, absmax, block)[bad[0]])!r}: want q={want[bad[0]]}, got "
            f"q={q[bad[0]]} (u={float(reference.uniform24(seed, np.array([bad[0]]))[0])!r}: "
            f"v + u rounds up to v + 1 in float32)")
        assert np.array_equal(fastopt.dequantize_blockwise(q, absmax, block), x)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("in_dtype", [F32, BF16], ids=["f32", "bf16"])
def test_blockwise_tiny_absmax(cpu_path, in_dtype, rounding):
    """Blocks whose absmax is tiny but positive (float32 subnormals and small normals, which
    bfloat16 and float32 gradients do reach) quantize like any other block: x = j * 2^-e
    with absmax = 127 * 2^-e has q = j exactly (v = j is on the grid)."""
    j = np.concatenate([np.arange(-127, 128), np.arange(127, -128, -1)])  # 510, absmax 127
    # absmax 1.5e-37 (normal) and 9.1e-41 (subnormal); bfloat16 keeps 7 mantissa bits, so
    # its subnormals (quantum 2^-133) cannot hold j * 2^-140 exactly: float32/16 only there
    exponents = (130,) if np.dtype(in_dtype).name == "bfloat16" else (130, 140)
    for e in exponents:
        x = (j * 2.0 ** -e).astype(np.float32)
        x = x.astype(in_dtype)
        assert np.array_equal(x.astype(np.float64), j * 2.0 ** -e)  # exact inputs
        # one block holding every j, so that its absmax is 127 * 2^-e
        q, absmax = fastopt.quantize_blockwise(x, x.size, rounding=rounding, seed=5)
        want_q, want_absmax = ref_blockwise(x, x.size, rounding, seed=5)
        assert_bits(absmax, want_absmax, "absmax")
        assert_bits(q, want_q, "q")
        bad = np.flatnonzero(q != j)
        assert bad.size == 0, (f"absmax 127*2^-{e}: {bad.size} of {q.size} wrong, e.g. x="
                               f"{x[bad[:4]].astype(np.float32).tolist()} want q="
                               f"{j[bad[:4]].tolist()} got q={q[bad[:4]].tolist()}")
        dq = fastopt.dequantize_blockwise(q, absmax, x.size)
        assert np.array_equal(dq, x.astype(np.float32))
        # blocks of 64 (each with its own absmax) still match the reference exactly
        q64, a64 = fastopt.quantize_blockwise(x, 64, rounding=rounding, seed=5)
        want64 = ref_blockwise(x, 64, rounding, seed=5)
        assert_bits(q64, want64[0], "q (blocks of 64)")
        assert_bits(a64, want64[1], "absmax (blocks of 64)")


# ---- zero blocks, non-finite input --------------------------------------------------------

@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_zero_blocks(cpu_path, in_dtype, rounding, rng):
    block = 64
    x32 = fresh(rng, (64 * 7 + 13,), np.float32)
    zero_blocks = [1, 4, 7]  # 7: the partial last block
    for b in zero_blocks:
        x32[b * block:(b + 1) * block] = 0.0
    x32[4 * block + 5] = -0.0  # a negative zero changes nothing
    x = x32.astype(in_dtype)
    q, absmax = fastopt.quantize_blockwise(x, block, rounding=rounding, seed=3)
    want_q, want_absmax = ref_blockwise(x, block, rounding, 3)
    assert_bits(absmax, want_absmax, "absmax")
    assert_bits(q, want_q, "q")
    dq = fastopt.dequantize_blockwise(q, absmax, block)
    for b in zero_blocks:
        sl = slice(b * block, (b + 1) * block)
        assert bits(absmax[b]) == 0, f"block {b}: absmax {absmax[b]!r} is not +0"
        assert np.all(q[sl] == 0)
        assert np.all(bits(dq[sl]) == 0), f"block {b}: dequantized {dq[sl]}"
    others = [b for b in range(absmax.size) if b not in zero_blocks]
    assert np.all(absmax[others] > 0)
    # a whole array of zeros
    z = np.zeros((3, 50), in_dtype)
    q, absmax = fastopt.quantize_blockwise(z, 7, rounding=rounding, seed=1)
    assert absmax.shape == (22,) and np.all(bits(absmax) == 0) and np.all(q == 0)
    assert np.all(bits(fastopt.dequantize_blockwise(q, absmax, 7)) == 0)


# (flat positions, values): first element, inside the first AVX2 group, the middle, in the
# partial last block, the very last element, two bad values (the first is named).
NONFINITE_CASES = [((0,), (np.nan,)), ((37,), (np.inf,)), ((517,), (-np.inf,)),
                   ((1030,), (np.nan,)), ((1049,), (-np.inf,)),
                   ((1030, 517), (np.inf, np.nan)), ((12, 1049), (-np.inf, np.inf))]


def check_nonfinite(call, templates, x, first: int) -> None:
    """call raises ValueError naming the first bad index (multi-index and flat), and leaves
    the caller's out arrays untouched."""
    outs = None
    if templates is not None:
        outs = tuple(poisoned(s, d, 0) for s, d in templates(x.shape))
    idx = tuple(int(i) for i in np.unravel_index(first, x.shape))
    msg = re.escape(f"non-finite value at index {idx} (flat {first})")
    with pytest.raises(ValueError, match=msg):
        call(x, None if outs is None else (outs if len(outs) > 1 else outs[0]))
    if outs is not None:
        for o, (s, d) in zip(outs, templates(x.shape)):
            assert_bits(o, poisoned(s, d, 0), "out was written despite the error")


@pytest.mark.parametrize("case", NONFINITE_CASES,
                         ids=lambda c: "+".join(f"{p}{v}" for p, v in zip(*c)))
@pytest.mark.parametrize("func", list(NONFINITE_FUNCS))
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_nonfinite_raises_naming_first_index(cpu_path, in_dtype, func, case, rng):
    call, templates = NONFINITE_FUNCS[func]
    positions, values = case
    x32 = fresh(rng, NONFINITE_SHAPE, np.float32)
    flat = x32.reshape(-1)
    for p, v in zip(positions, values):
        # float16: an infinity from overflow in the cast (1e5 > 65504), like real data
        flat[p] = (1e5 if v > 0 else -1e5) if in_dtype == np.float16 and np.isinf(v) else v
    with np.errstate(over="ignore"):
        x = x32.astype(in_dtype)
    assert not np.isfinite(x.astype(np.float32).reshape(-1)[list(positions)]).any()
    check_nonfinite(call, templates, x, min(positions))


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
    ("dequantize out_dtype", lambda: deq(_Q8, 0.1, 0, out_dtype="float16"), ValueError,
     "out_dtype"),
    ("dequantize_blockwise out_dtype", lambda: dqbw(_QB, _AB, 7, out_dtype="bfloat16"),
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
def test_zero_size(cpu_path, shape):
    x = np.empty(shape, np.float32)
    for qdtype in QDTYPES:
        dt, qmin, _ = QRANGE[qdtype]
        q = fastopt.quantize_per_tensor(x, 0.1, 0, qdtype)
        assert q.shape == shape and q.dtype == dt
        assert fastopt.dequantize(q, 0.1, 0).shape == shape
        for axis in range(len(shape)):
            c = shape[axis]
            qc = fastopt.quantize_per_channel(x, np.full(c, 0.1), np.zeros(c, int), axis, qdtype)
            assert qc.shape == shape and qc.dtype == dt
            d = fastopt.dequantize(qc, np.full(c, 0.1), np.zeros(c, int), axis=axis)
            assert d.shape == shape and d.dtype == np.float32
            s, z = fastopt.choose_qparams(x, symmetric=False, axis=axis, dtype=qdtype)
            assert s.shape == (c,) and np.all(s == np.float32(EPS32)) and np.all(z == qmin)
        s, z = fastopt.choose_qparams(x, symmetric=False, dtype=qdtype)
        assert s == np.float32(EPS32) and z == qmin
        s, z = fastopt.choose_qparams(x, symmetric=True, dtype=qdtype)
        assert s == np.float32(EPS32) and z == (0 if qdtype == "int8" else 128)
    for rounding in ("nearest", "stochastic"):
        q, a = fastopt.quantize_blockwise(x, 64, rounding=rounding)
        assert q.shape == shape and q.dtype == np.int8 and a.shape == (0,) and a.dtype == F32
        d = fastopt.dequantize_blockwise(q, a, 64)
        assert d.shape == shape and d.dtype == np.float32
    # out= of size 0 is fine too
    out = np.empty(shape, np.int8)
    assert fastopt.quantize_per_tensor(x, 0.1, 0, out=out) is out
    outs = (np.empty(shape, np.int8), np.empty(0, np.float32))
    assert fastopt.quantize_blockwise(x, 64, out=outs) is outs


# ---- out= ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4097,), (3, 37, 41)], ids=shape_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_out_receives_results(cpu_path, in_dtype, shape, rng):
    x = fresh(rng, shape, in_dtype)
    c = shape[-1]
    scales, zps = channel_params(rng, "uint8", c)
    for qdtype, zp in (("int8", -3), ("uint8", 130)):
        q = fastopt.quantize_per_tensor(x, 0.0371, zp, qdtype)
        run_with_out(lambda o: fastopt.quantize_per_tensor(x, 0.0371, zp, qdtype, out=o), [q])
        d = fastopt.dequantize(q, 0.0371, zp)
        run_with_out(lambda o: fastopt.dequantize(q, 0.0371, zp, out=o), [d])
    qc = fastopt.quantize_per_channel(x, scales, zps, -1, "uint8")
    run_with_out(lambda o: fastopt.quantize_per_channel(x, scales, zps, -1, "uint8", out=o),
                 [qc])
    dc = fastopt.dequantize(qc, scales, zps, axis=-1)
    run_with_out(lambda o: fastopt.dequantize(qc, scales, zps, axis=-1, out=o), [dc])
    for block in (64, 7, x.size + 5):
        for rounding in ("nearest", "stochastic"):
            qb, ab = fastopt.quantize_blockwise(x, block, rounding=rounding, seed=77)
            run_with_out(lambda o: fastopt.quantize_blockwise(x, block, rounding=rounding,
                                                              seed=77, out=o), [qb, ab])
        db = fastopt.dequantize_blockwise(qb, ab, block)
        run_with_out(lambda o: fastopt.dequantize_blockwise(qb, ab, block, out=o), [db])


# ---- streaming stores ---------------------------------------------------------------------

# Calls whose arrays exceed 32 MiB write their outputs with streaming stores, 16 bytes at a
# time where the output is 16-byte aligned and plain stores elsewhere: check those sizes
# with outputs at every alignment (element offsets into a poisoned buffer).
STREAMING_N = 9_000_011  # 36 MB of float32 in, 9 MB out


@pytest.mark.parametrize("offset", [0, 1, 4], ids=lambda k: f"offset{k}")
def test_streaming_sizes_match_reference(cpu_path, offset, rng):
    x = fresh(rng, (STREAMING_N,), F32)
    qb, ab = fastopt.quantize_blockwise(x, 256)
    want_q, want_a = ref_blockwise(x, 256, "nearest")
    assert_bits(qb, want_q, "blockwise q")
    assert_bits(ab, want_a, "blockwise absmax")
    q = fastopt.quantize_per_tensor(x, 0.0371, -3)
    assert_bits(q, ref_quantize(x, 0.0371, -3, "int8"), "per-tensor q")
    for k in (0, 1):
        buf = poisoned((STREAMING_N + offset,), F32, k)
        out = buf[offset:]
        assert fastopt.dequantize_blockwise(qb, ab, 256, out=out) is out
        assert_bits(out, reference.dequantize_blockwise(qb, ab), f"blockwise dequantize ({k})")
        assert fastopt.dequantize(q, 0.0371, -3, out=out) is out
        assert_bits(out, reference.dequantize_affine(q, 0.0371, -3), f"dequantize ({k})")
        assert_bits(buf[:offset], poisoned((offset,), F32, k), "before out")


# ---- check_finite=False -------------------------------------------------------------------

def unchecked_calls(x, scales, zps, seed: int = 5):
    """(name, call(out) -> result, result templates) for each quantizing function with
    check_finite=False; per channel along the last axis."""
    n_blocks = -(-x.size // 64)
    return [
        ("per_tensor", lambda o: fastopt.quantize_per_tensor(x, 0.0371, -3, out=o,
                                                             check_finite=False),
         [(x.shape, np.int8)]),
        ("per_channel", lambda o: fastopt.quantize_per_channel(x, scales, zps, -1, "uint8",
                                                               out=o, check_finite=False),
         [(x.shape, np.uint8)]),
        ("blockwise", lambda o: fastopt.quantize_blockwise(x, 64, rounding="stochastic",
                                                           seed=seed, out=o,
                                                           check_finite=False),
         [(x.shape, np.int8), ((n_blocks,), np.float32)]),
    ]


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_unchecked_equals_checked_on_finite_input(cpu_path, in_dtype, rng):
    """check_finite=False gives the checked call's bits, returned or written straight into
    every element of out=."""
    x = fresh(rng, (5, 4099), in_dtype)
    scales, zps = channel_params(rng, "uint8", x.shape[-1])
    checked = {
        "per_tensor": [fastopt.quantize_per_tensor(x, 0.0371, -3)],
        "per_channel": [fastopt.quantize_per_channel(x, scales, zps, -1, "uint8")],
        "blockwise": list(fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=5)),
    }
    for name, call, _ in unchecked_calls(x, scales, zps):
        got = call(None)
        for g, w in zip(got if isinstance(got, tuple) else (got,), checked[name]):
            assert_bits(g, w, f"{name} without out=")
        run_with_out(call, checked[name])


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_unchecked_nonfinite_input_spares_the_rest(cpu_path, in_dtype, rng):
    """With NaN/Inf in the input: no error, and every element (per tensor/channel) or block
    (blockwise, of 64) without one is exact; out= is the result."""
    x, scales, zps, ok, ok_blocks, in_ok_blocks = unchecked_input(rng, in_dtype)
    with np.errstate(invalid="ignore"):
        want = {
            "per_tensor": [ref_quantize(x, 0.0371, -3, "int8")],
            "per_channel": [ref_quantize(x, scales, zps, "uint8", axis=1)],
            "blockwise": list(ref_blockwise(x, 64, "stochastic", seed=5)),
        }
    for name, call, templates in unchecked_calls(x, scales, zps):
        outs = tuple(poisoned(s, d, 1) for s, d in templates)
        got = call(outs if len(outs) > 1 else outs[0])
        assert got is (outs if len(outs) > 1 else outs[0])
        if name == "blockwise":
            assert_bits(outs[0].reshape(-1)[in_ok_blocks], want[name][0].reshape(-1)[in_ok_blocks],
                        f"{name} q of the finite blocks")
            assert_bits(outs[1][ok_blocks], want[name][1][ok_blocks],
                        f"{name} absmax of the finite blocks")
            assert (outs[0].reshape(-1)[~in_ok_blocks] == 0).all(), "q of the bad blocks"
            assert np.isnan(outs[1][~ok_blocks]).all(), "absmax of the bad blocks"
        else:
            assert_bits(outs[0].reshape(-1)[ok], want[name][0].reshape(-1)[ok],
                        f"{name} of the finite elements")


def test_check_finite_must_be_a_bool(rng):
    x = fresh(rng, (7,), F32)
    for call in (lambda: fastopt.quantize_per_tensor(x, 0.1, 0, check_finite=1),
                 lambda: fastopt.quantize_per_channel(x, [0.1] * 7, [0] * 7, 0,
                                                      check_finite="no"),
                 lambda: fastopt.quantize_blockwise(x, check_finite=None)):
        with pytest.raises(TypeError, match="check_finite"):
            call()


# ---- sizes taken once, from the buffers the kernels use (issue 16, items 1 and 4) --------

class _RetypingOut:
    """An ``out=`` that passes for a PyTorch CPU tensor. When fastopt takes its NumPy view
    (``detach().numpy()``), it retypes x to int8 -- four times the elements in the same
    buffer -- after x's shape was read for sizing the outputs: a kernel sized from x.size
    at call time would read past x and write past out."""

    __module__ = "torch.retyping"  # what fastopt takes for a torch tensor

    def __init__(self, x: np.ndarray, view: np.ndarray):
        self.x, self.view = x, view
        self.device = type("Device", (), {"type": "cpu"})()

    def detach(self) -> "_RetypingOut":
        self.x.dtype = np.int8
        return self

    def numpy(self) -> np.ndarray:
        return self.view


@pytest.mark.parametrize("check_finite", [False, True])
def test_input_retyped_while_out_is_converted_raises(check_finite):
    """Issue 16's reproducer: the kernel reads x's dtype and size itself, so the retyped x
    is refused (TypeError naming x) and neither x nor out is touched."""
    x = np.ones(4096, np.float32)
    out = np.full(4096, 77, np.int8)
    with pytest.raises(TypeError, match="^x: dtype int8"):
        fastopt.quantize_per_tensor(x, 0.1, 0, out=_RetypingOut(x, out),
                                    check_finite=check_finite)
    assert (out == 77).all()
    assert (x.view(np.float32) == 1).all()


@pytest.mark.parametrize("which", [0, 1])
def test_blockwise_out_with_none_raises_before_writing(which, rng):
    """out=(q, None) and out=(None, absmax): TypeError naming the missing one, and the
    other is not written (it used to be, before the error)."""
    x = fresh(rng, (4, 6), F32)
    outs = [poisoned((4, 6), np.int8, 0), poisoned((4,), F32, 0)]
    given = tuple(None if k == which else o for k, o in enumerate(outs))
    for check_finite in (True, False):
        with pytest.raises(TypeError, match=rf"^out\[{which}\]: "):
            fastopt.quantize_blockwise(x, 7, out=given, check_finite=check_finite)
        other = 1 - which
        assert_bits(outs[other], poisoned(outs[other].shape, outs[other].dtype, 0),
                    "the given out was written despite the error")


def test_blockwise_out_checked_whole_before_writing(rng):
    """A bad out[1] (read-only, or overlapping out[0]) raises before out[0] is written."""
    x = fresh(rng, (4, 6), F32)
    q = poisoned((4, 6), np.int8, 0)
    absmax = poisoned((4,), F32, 0)
    absmax.setflags(write=False)
    pair = poisoned((10,), F32, 0)
    for out, match in (((q, absmax), r"^out\[1\]: must be writeable"),
                       ((pair.view(np.int8)[:24].reshape(4, 6), pair[2:6]),
                        r"^out\[1\]: overlaps out\[0\]")):
        before = [o.copy() for o in out]
        with pytest.raises(ValueError, match=match):
            fastopt.quantize_blockwise(x, 7, out=out, check_finite=False)
        for o, b in zip(out, before):
            assert_bits(o, b, "out was written despite the error")
