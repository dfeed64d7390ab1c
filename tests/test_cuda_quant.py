"""The CUDA quantization path (``fastopt.quant`` on CuPy arrays and PyTorch CUDA tensors).

* Exactness: the GPU gives the CPU's bits (and ``fastopt.reference``'s) for every mode --
  per tensor, per channel, blockwise nearest and stochastic (same seed, same bits) -- for
  float32/float16/bfloat16 input, odd sizes, partial blocks, blocks past the one-warp limit
  (4096 elements) that take the thread-block kernel, and blocks of subnormal values.
* Results come back as the input's library on its device; ``out=`` receives them whole.
* Non-finite input names the CPU's first bad index and leaves ``out=`` untouched; all-zero
  blocks; stochastic rounding unbiased; ``stream=`` and the library's current stream.
* The wait for the non-finite report (and the observer's results) lets other Python
  threads run (the GIL is released for the device-to-host copy and the wait).
* Bad input (dtypes, shapes, host or overlapping or strided outputs) raises naming the
  argument and writes nothing; ``choose_qparams`` is CPU-only.

Every GPU test takes the ``lib`` fixture: it marks the test ``cuda`` and skips it where
CUDA is not usable or the library is missing (CuPy has no bfloat16: those cases skip too),
so each behaviour has one test body, run once per array library. The tests at the end need
no GPU.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import types
from typing import Any, Callable, Sequence

import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import assert_bits, bits
from cuda_libs import FakeCudaArray, lib_fixture
from quant_cases import (BF16, CHANNEL_CASES, F32, IN_DTYPES, IN_IDS, NONFINITE_FUNCS,
                         OUT_DTYPES, OUT_IDS, QDTYPES, QRANGE, SHAPES, case_id, channel_params,
                         channel_shape, fresh, poisoned, ref_blockwise, ref_quantize, shape_id,
                         tensor_params, unchecked_input, with_ties)

F16 = np.dtype(np.float16)
# 1, 7, 64, 256 and 4096: one warp per block; 4097 and 10_000: one thread block per block
# (for inputs longer than 4096 elements: the kernel sees min(block_size, n)).
BLOCK_SIZES = [1, 7, 64, 256, 4096, 4097, 10_000]
LARGE_BLOCK = 5000  # a block for the thread-block kernel in the smaller tests

qpt, qpc, deq = fastopt.quantize_per_tensor, fastopt.quantize_per_channel, fastopt.dequantize
qbw, dqbw = fastopt.quantize_blockwise, fastopt.dequantize_blockwise

lib = lib_fixture(scope="session")  # the adapters are in cuda_libs.py


# ---- helpers ------------------------------------------------------------------------------

def assert_same(lib, got: Any, cpu: Any, ref: Any = None, what: str = "") -> None:
    """Device result ``got`` has the bits of the CPU's result (and of the reference's)."""
    host = lib.to_host(got)
    assert_bits(host, np.asarray(cpu), f"{what} (GPU vs CPU)")
    if ref is not None:
        assert_bits(host, np.asarray(ref), f"{what} (GPU vs reference)")


def run_with_out(lib, call: Callable[[Any], Any], want: Sequence[np.ndarray]) -> None:
    """call(out) with device outs poisoned by each sentinel in turn: it returns that very
    out, and every element equals the CPU's ``want`` (so every element was written)."""
    for k in (0, 1):
        outs = tuple(lib.to_device(poisoned(w.shape, w.dtype, k)) for w in want)
        arg = outs if len(outs) > 1 else outs[0]
        assert call(arg) is arg
        for i, (o, w) in enumerate(zip(outs, want)):
            assert_bits(lib.to_host(o), w, f"out[{i}] (sentinel {k})")


# ---- exactness against the CPU ------------------------------------------------------------

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_per_tensor_matches_cpu(lib, in_dtype, shape, qdtype, rng):
    dt, lo, hi = QRANGE[qdtype]
    for scale, zp in tensor_params(rng, qdtype):
        what = f"scale={scale} zero_point={zp}"
        x = with_ties(rng, fresh(rng, shape, F32), np.float32(scale)).astype(in_dtype)
        q = qpt(lib.to_device(x), scale, zp, qdtype)
        want = qpt(x, scale, zp, qdtype)
        assert_same(lib, q, want, ref_quantize(x, scale, zp, qdtype), f"quantize {what}")
        assert_same(lib, deq(q, scale, zp), deq(want, scale, zp),
                    reference.dequantize_affine(want, scale, zp), f"dequantize {what}")
        qr = rng.integers(lo, hi + 1, shape).astype(dt)  # every code, not only reachable ones
        assert_same(lib, deq(lib.to_device(qr), scale, zp), deq(qr, scale, zp),
                    reference.dequantize_affine(qr, scale, zp), f"dequantize random q {what}")


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=case_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_per_channel_matches_cpu(lib, in_dtype, case, qdtype, rng):
    shape, axis = case
    dt, lo, hi = QRANGE[qdtype]
    ax = axis % len(shape)
    scales, zps = channel_params(rng, qdtype, shape[ax])
    x = with_ties(rng, fresh(rng, shape, F32),
                  scales.reshape(channel_shape(len(shape), ax))).astype(in_dtype)
    q = qpc(lib.to_device(x), scales, zps, axis, qdtype)
    want = qpc(x, scales, zps, axis, qdtype)
    assert_same(lib, q, want, ref_quantize(x, scales, zps, qdtype, ax), "quantize_per_channel")
    assert_same(lib, deq(q, scales, zps, axis=axis), deq(want, scales, zps, axis=axis),
                reference.dequantize_affine(want, scales, zps, ax), "dequantize per channel")
    qr = rng.integers(lo, hi + 1, shape).astype(dt)
    assert_same(lib, deq(lib.to_device(qr), scales, zps, axis=axis),
                deq(qr, scales, zps, axis=axis),
                reference.dequantize_affine(qr, scales, zps, ax), "dequantize random q")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("block", BLOCK_SIZES)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_blockwise_matches_cpu(lib, in_dtype, block, shape, rng):
    x = fresh(rng, shape, in_dtype)
    xd = lib.to_device(x)
    seeds = [0, 2 ** 64 - 1, int(rng.integers(0, 2 ** 63))]
    for rounding, seed in [("nearest", None)] + [("stochastic", s) for s in seeds]:
        what = f"{rounding} seed={seed}"
        q, absmax = qbw(xd, block, rounding=rounding, seed=seed)
        want_q, want_absmax = qbw(x, block, rounding=rounding, seed=seed)
        ref_q, ref_absmax = ref_blockwise(x, block, rounding, seed or 0)
        assert_same(lib, absmax, want_absmax, ref_absmax, f"absmax {what}")
        assert_same(lib, q, want_q, ref_q, f"q {what}")
        assert_same(lib, dqbw(q, absmax, block), dqbw(want_q, want_absmax, block),
                    reference.dequantize_blockwise(want_q, want_absmax, block),
                    f"dequantize {what}")
    qr = rng.integers(-128, 128, shape).astype(np.int8)  # every code, -128 included
    assert_same(lib, dqbw(lib.to_device(qr), absmax, block), dqbw(qr, want_absmax, block),
                reference.dequantize_blockwise(qr, want_absmax, block), "dequantize random q")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
def test_dequantize_out_dtypes_match_cpu(lib, out_dtype, shape, rng):
    """float16/bfloat16 results of every dequantizer (per tensor, per channel, blockwise in
    both kernel layouts) have the CPU's and the reference's bits: ties, float16 overflow and
    subnormals, NaN absmax; written into every element of a poisoned out= too. CuPy refuses
    bfloat16 by name."""
    if out_dtype == BF16 and lib.name == "cupy":
        with pytest.raises(TypeError, match="^out_dtype: CuPy has no bfloat16"):
            deq(lib.to_device(np.zeros(3, np.int8)), 0.1, 0, out_dtype="bfloat16")
        return
    q = rng.integers(-128, 128, shape).astype(np.int8)
    qd = lib.to_device(q)
    with np.errstate(over="ignore", invalid="ignore"):
        for scale in (1 + 2.0 ** -9, 1 + 2.0 ** -11, 1000.0, 1e-7, 0.0371):
            want = deq(q, scale, 3, out_dtype=out_dtype)
            assert_same(lib, deq(qd, scale, 3, out_dtype=out_dtype), want,
                        reference.dequantize_affine(q, scale, 3, out_dtype=out_dtype),
                        f"dequantize scale={scale}")
            run_with_out(lib, lambda o, scale=scale: deq(qd, scale, 3, out_dtype=out_dtype,
                                                         out=o), [want])
        ax = len(shape) - 1
        scales, zps = channel_params(rng, "int8", shape[ax])
        scales[1::4] = 1000.0
        assert_same(lib, deq(qd, scales, zps, axis=ax, out_dtype=out_dtype),
                    deq(q, scales, zps, axis=ax, out_dtype=out_dtype),
                    reference.dequantize_affine(q, scales, zps, ax, out_dtype=out_dtype),
                    "dequantize per channel")
        for block in (7, 256, LARGE_BLOCK):
            blocks = -(-q.size // block)
            absmax = (rng.uniform(0.5, 20, blocks) * rng.choice([1, 1e6, 1e-6], blocks))
            absmax = absmax.astype(F32)
            absmax[::5] = 127 * (1 + 2.0 ** -9)
            absmax[blocks // 2] = np.nan
            want = dqbw(q, absmax, block, out_dtype=out_dtype)
            ad = lib.to_device(absmax)
            assert_same(lib, dqbw(qd, ad, block, out_dtype=out_dtype), want,
                        reference.dequantize_blockwise(q, absmax, block, out_dtype=out_dtype),
                        f"dequantize_blockwise {block}")
            run_with_out(lib, lambda o, a=ad, b=block: dqbw(qd, a, b, out_dtype=out_dtype, out=o),
                         [want])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("in_dtype", [F32, BF16], ids=["f32", "bf16"])
def test_blockwise_tiny_absmax_matches_cpu(lib, in_dtype, rounding):
    """Blocks of tiny values (absmax 127 * 2^-130, a float32 normal, and 127 * 2^-140, a
    subnormal; the kernels rescale such blocks by 2^64): the GPU does not flush subnormals
    to zero and gives the CPU's bits."""
    j = np.concatenate([np.arange(-127, 128), np.arange(127, -128, -1)])  # 510, absmax 127
    for e in (130, 140):
        x = (j * 2.0 ** -e).astype(np.float32).astype(in_dtype)
        xd = lib.to_device(x)
        for block in (x.size, 64):
            what = f"2^-{e} blocks of {block}"
            q, absmax = qbw(xd, block, rounding=rounding, seed=5)
            want_q, want_absmax = qbw(x, block, rounding=rounding, seed=5)
            ref_q, ref_absmax = ref_blockwise(x, block, rounding, seed=5)
            assert_same(lib, absmax, want_absmax, ref_absmax, f"absmax {what}")
            assert_same(lib, q, want_q, ref_q, f"q {what}")
            assert_same(lib, dqbw(q, absmax, block), dqbw(want_q, want_absmax, block),
                        what=f"dequantize {what}")


# ---- results and out= ---------------------------------------------------------------------

def test_results_are_the_inputs_library_on_its_device(lib, rng):
    shape = (5, 31, 67)
    blocks = -(-int(np.prod(shape)) // 64)
    scales, zps = channel_params(rng, "int8", 31)
    for in_dtype in IN_DTYPES:
        if in_dtype == BF16 and lib.name == "cupy":
            continue  # CuPy has no bfloat16
        x = lib.to_device(fresh(rng, shape, in_dtype))
        for qdtype, zp in (("int8", 3), ("uint8", 128)):
            q = qpt(x, 0.05, zp, qdtype)
            lib.assert_result(q, x, qdtype, shape)
            lib.assert_result(deq(q, 0.05, zp), x, "float32", shape)
            lib.assert_result(deq(q, 0.05, zp, out_dtype="float16"), x, "float16", shape)
        qc = qpc(x, scales, zps, 1)
        lib.assert_result(qc, x, "int8", shape)
        lib.assert_result(deq(qc, scales, zps, axis=1), x, "float32", shape)
        qb, ab = qbw(x, 64, rounding="stochastic", seed=9)
        lib.assert_result(qb, x, "int8", shape)
        lib.assert_result(ab, x, "float32", (blocks,))
        lib.assert_result(dqbw(qb, ab, 64), x, "float32", shape)


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=shape_id)
def test_zero_size(lib, shape):
    x = lib.to_device(np.empty(shape, np.float32))
    c = shape[0]
    for qdtype in QDTYPES:
        q = qpt(x, 0.1, 0, qdtype)
        lib.assert_result(q, x, qdtype, shape)
        lib.assert_result(deq(q, 0.1, 0), x, "float32", shape)
        qc = qpc(x, np.full(c, 0.1), np.zeros(c, int), 0, qdtype)
        lib.assert_result(qc, x, qdtype, shape)
        lib.assert_result(deq(qc, np.full(c, 0.1), np.zeros(c, int), axis=0), x, "float32", shape)
    for rounding in ("nearest", "stochastic"):
        q, a = qbw(x, 64, rounding=rounding)
        lib.assert_result(q, x, "int8", shape)
        lib.assert_result(a, x, "float32", (0,))
        lib.assert_result(dqbw(q, a, 64), x, "float32", shape)


@pytest.mark.parametrize("shape", [(4097,), (3, 37, 41)], ids=shape_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_out_receives_results(lib, in_dtype, shape, rng):
    x = fresh(rng, shape, in_dtype)
    xd = lib.to_device(x)
    scales, zps = channel_params(rng, "uint8", shape[-1])
    for qdtype, zp in (("int8", -3), ("uint8", 130)):
        q = qpt(x, 0.0371, zp, qdtype)
        run_with_out(lib, lambda o: qpt(xd, 0.0371, zp, qdtype, out=o), [q])
        qd = lib.to_device(q)
        run_with_out(lib, lambda o: deq(qd, 0.0371, zp, out=o), [deq(q, 0.0371, zp)])
    qc = qpc(x, scales, zps, -1, "uint8")
    run_with_out(lib, lambda o: qpc(xd, scales, zps, -1, "uint8", out=o), [qc])
    qcd = lib.to_device(qc)
    run_with_out(lib, lambda o: deq(qcd, scales, zps, axis=-1, out=o),
                 [deq(qc, scales, zps, axis=-1)])
    for block in (64, 7, LARGE_BLOCK):
        for rounding in ("nearest", "stochastic"):
            qb, ab = qbw(x, block, rounding=rounding, seed=77)
            run_with_out(lib, lambda o: qbw(xd, block, rounding=rounding, seed=77, out=o),
                         [qb, ab])
        qbd, abd = lib.to_device(qb), lib.to_device(ab)
        run_with_out(lib, lambda o: dqbw(qbd, abd, block, out=o), [dqbw(qb, ab, block)])


# ---- zero blocks, non-finite input, stochastic rounding -----------------------------------

@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("block", [64, LARGE_BLOCK])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_zero_blocks(lib, in_dtype, block, rounding, rng):
    x32 = fresh(rng, (block * 7 + 13,), F32)
    zero_blocks = [1, 4, 7]  # 7: the partial last block
    for b in zero_blocks:
        x32[b * block:(b + 1) * block] = 0.0
    x32[4 * block + 5] = -0.0  # a negative zero changes nothing
    x = x32.astype(in_dtype)
    q, absmax = qbw(lib.to_device(x), block, rounding=rounding, seed=3)
    want_q, want_absmax = qbw(x, block, rounding=rounding, seed=3)
    assert_same(lib, absmax, want_absmax, what="absmax")
    assert_same(lib, q, want_q, what="q")
    qh, ah, dq = lib.to_host(q), lib.to_host(absmax), lib.to_host(dqbw(q, absmax, block))
    for b in zero_blocks:
        sl = slice(b * block, (b + 1) * block)
        assert bits(ah[b]) == 0, f"block {b}: absmax {ah[b]!r} is not +0"
        assert np.all(qh[sl] == 0)
        assert np.all(bits(dq[sl]) == 0), f"block {b}: dequantized {dq[sl]}"
    assert np.all(np.delete(ah, zero_blocks) > 0)
    # a whole array of zeros
    q, absmax = qbw(lib.to_device(np.zeros((3, 50), in_dtype)), 7, rounding=rounding, seed=1)
    qh, ah = lib.to_host(q), lib.to_host(absmax)
    assert ah.shape == (22,) and np.all(bits(ah) == 0) and np.all(qh == 0)
    assert np.all(bits(lib.to_host(dqbw(q, absmax, 7))) == 0)


DEVICE_NONFINITE_SHAPE = (3, 7, 600)  # 12600 elements: partial last blocks of 256 and of 5000
# Device calls of test_quant's table (choose_qparams is CPU-only), plus the block kernel.
DEVICE_NONFINITE_FUNCS = {
    **{k: v for k, v in NONFINITE_FUNCS.items() if not k.startswith("choose_qparams")},
    "blockwise_large_blocks": (
        lambda x, out: qbw(x, LARGE_BLOCK, out=out),
        lambda s: [(s, np.int8), ((-(-int(np.prod(s)) // LARGE_BLOCK),), np.float32)]),
}
# (flat positions, negative from the end; values): the first element, one in the first warp,
# a block boundary, the very last (in both partial blocks), two bad values in different
# blocks (the first is named).
DEVICE_NONFINITE_CASES = [((0,), (np.nan,)), ((37,), (np.inf,)), ((5000,), (-np.inf,)),
                   ((-1,), (np.nan,)), ((9000, 517), (np.inf, np.nan)),
                   ((12, -1), (-np.inf, np.inf))]


@pytest.mark.parametrize("case", DEVICE_NONFINITE_CASES,
                         ids=lambda c: "+".join(f"{p}{v}" for p, v in zip(*c)))
@pytest.mark.parametrize("func", list(DEVICE_NONFINITE_FUNCS))
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_nonfinite_names_the_cpus_index(lib, in_dtype, func, case, rng):
    """ValueError with the CPU's message (the first bad index), device outs untouched."""
    call, templates = DEVICE_NONFINITE_FUNCS[func]
    x32 = fresh(rng, DEVICE_NONFINITE_SHAPE, F32)
    flat = x32.reshape(-1)
    positions = [p % flat.size for p in case[0]]
    for p, v in zip(positions, case[1]):
        # float16: an infinity from overflow in the cast (1e5 > 65504), like real data
        flat[p] = (1e5 if v > 0 else -1e5) if in_dtype == F16 and np.isinf(v) else v
    with np.errstate(over="ignore"):
        x = x32.astype(in_dtype)
    first = min(positions)
    idx = tuple(int(i) for i in np.unravel_index(first, x.shape))
    msg = re.escape(f"non-finite value at index {idx} (flat {first})")
    with pytest.raises(ValueError, match=msg) as on_cpu:
        call(x, None)
    outs = tuple(lib.to_device(poisoned(s, d, 0)) for s, d in templates(x.shape))
    with pytest.raises(ValueError, match=msg) as on_gpu:
        call(lib.to_device(x), outs if len(outs) > 1 else outs[0])
    assert str(on_gpu.value) == str(on_cpu.value)
    for o, (s, d) in zip(outs, templates(x.shape)):
        assert_bits(lib.to_host(o), poisoned(s, d, 0), "out was written despite the error")


@pytest.mark.parametrize("finite", [True, False], ids=["finite", "nonfinite"])
def test_unchecked_matches_cpu(lib, finite, rng):
    """check_finite=False on the GPU (no stream wait): without out= and straight into out=,
    the CPU's bits; with NaN/Inf in the input, no error and the CPU's bits for every element
    (per tensor/channel) without one, and for every block of 64 (blockwise: one holding
    NaN/Inf gets q 0 and absmax NaN)."""
    x, scales, zps, keep, keep_blocks, _ = unchecked_input(rng, F32, not finite)
    flat_size = x.size
    calls = [  # (call(x, out), the CPU's result, which elements of each output to compare)
        (lambda a, o: qpt(a, 0.0371, -3, out=o, check_finite=False),
         [qpt(x, 0.0371, -3, check_finite=False)], [keep]),
        (lambda a, o: qpc(a, scales, zps, -1, "uint8", out=o, check_finite=False),
         [qpc(x, scales, zps, -1, "uint8", check_finite=False)], [keep]),
        (lambda a, o: qbw(a, 64, rounding="stochastic", seed=9, out=o, check_finite=False),
         list(qbw(x, 64, rounding="stochastic", seed=9, check_finite=False)),
         [np.ones(flat_size, bool), keep_blocks]),
    ]
    dx = lib.to_device(x)
    for call, want, masks in calls:
        got = call(dx, None)
        outs = tuple(lib.to_device(poisoned(w.shape, w.dtype, 1)) for w in want)
        assert call(dx, outs if len(outs) > 1 else outs[0]) is (outs if len(outs) > 1 else outs[0])
        for results in (got if isinstance(got, tuple) else (got,), outs):
            for r, w, m in zip(results, want, masks):
                assert_bits(lib.to_host(r).reshape(-1)[m], w.reshape(-1)[m], "unchecked")
    absmax = lib.to_host(got[1])
    assert np.isnan(absmax[~keep_blocks]).all(), "the absmax of a block holding NaN/Inf"


def test_stochastic_rounding_matches_cpu_and_is_unbiased(lib, rng):
    """For each of 200 seeds the GPU gives the CPU's bits; over them the mean of the
    dequantized values converges to x: per element within 5 sigma, sigma = scale /
    (2 sqrt(200)), and no systematic bias over all elements (the bounds and their false
    alarm rate as in test_quant.test_stochastic_unbiased_and_floor_or_ceil)."""
    x = fresh(rng, (4097,), F32)
    xd = lib.to_device(x)
    block, seeds = 64, 200
    total = np.zeros(x.size)
    for seed in range(seeds):
        q, absmax = qbw(xd, block, rounding="stochastic", seed=seed)
        want_q, want_absmax = qbw(x, block, rounding="stochastic", seed=seed)
        assert_same(lib, absmax, want_absmax, what=f"absmax seed={seed}")
        assert_same(lib, q, want_q, what=f"q seed={seed}")
        total += lib.to_host(dqbw(q, absmax, block))
    scale = np.repeat(want_absmax.astype(np.float64) / 127, block)[:x.size]
    sigma = scale / (2 * math.sqrt(seeds))
    err = total / seeds - x.astype(np.float64)
    assert np.all(np.abs(err) < 5 * sigma + 1e-6 * scale * 127), \
        f"worst |mean - x| = {np.max(np.abs(err) / sigma):.2f} sigma"
    assert abs(np.mean(err / scale)) < 5 * 0.5 / math.sqrt(seeds * x.size)


# ---- streams ------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stream=", "current stream"])
def test_runs_on_the_given_stream(lib, how, rng):
    """The input is written on a side stream behind ~0.1 s of work, then quantized (and
    dequantized) on that stream, named by ``stream=`` or made the library's current
    stream. A kernel on any other stream would read the stale data written before."""
    n, block = 1 << 20, 64
    x = fresh(rng, (n,), F32)
    want_q, want_absmax = qbw(x, block)
    want_d = dqbw(want_q, want_absmax, block)
    xd, x_src = lib.to_device(fresh(rng, (n,), F32)), lib.to_device(x)
    qd, q_src = lib.to_device(np.zeros(n, np.int8)), lib.to_device(want_q)
    ad, a_src = lib.to_device(np.zeros_like(want_absmax)), lib.to_device(want_absmax)
    lib.synchronize()
    stream = lib.side_stream()
    kwargs = {"stream": stream} if how == "stream=" else {}
    scope = (lambda: lib.current(stream)) if how == "current stream" else contextlib.nullcontext

    lib.write_late(stream, [(xd, x_src)])
    with scope():
        q, absmax = qbw(xd, block, **kwargs)  # waits for its stream
    assert_same(lib, absmax, want_absmax, what="absmax")
    assert_same(lib, q, want_q, what="q")

    lib.write_late(stream, [(qd, q_src), (ad, a_src)])
    with scope():
        d = dqbw(qd, ad, block, **kwargs)  # does not wait
    stream.synchronize()
    assert_same(lib, d, want_d, what="dequantized")


# ---- bad input ----------------------------------------------------------------------------

_S6, _Z6 = np.full(6, 0.05, np.float32), np.zeros(6, np.int64)


def bad_input_arrays(lib, rng) -> types.SimpleNamespace:
    """The arrays of BAD_INPUTS: contiguous device allocations (the cases take views of
    them), outputs filled with a sentinel, and host arrays of the library's CPU kind."""
    x = fresh(rng, (4, 6), F32)
    q8 = rng.integers(-128, 128, (4, 6)).astype(np.int8)
    am = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    put = lib.to_device
    return types.SimpleNamespace(
        x=put(x), x_wide=put(fresh(rng, (4, 12), F32)), x_i32=put(x.astype(np.int32)),
        x_f64=put(x.astype(np.float64)),
        q8=put(q8), qu8=put(q8.view(np.uint8)), q_wide=put(np.repeat(q8, 2, axis=1)),
        am=put(am), am_f64=put(am.astype(np.float64)), am_wide=put(np.repeat(am, 2)),
        am_host=lib.host_array(am),
        q_out=put(poisoned((4, 6), np.int8, 0)), qu_out=put(poisoned((4, 6), np.uint8, 0)),
        d_out=put(poisoned((4, 6), F32, 0)), d16_out=put(poisoned((4, 6), F16, 0)),
        am_out=put(poisoned((4,), F32, 0)), am16_out=put(poisoned((4,), F16, 0)),
        q_wide_out=put(poisoned((4, 12), np.int8, 0)), d_wide_out=put(poisoned((4, 12), F32, 0)),
        am_wide_out=put(poisoned((8,), F32, 0)),
        q_host_out=lib.host_array(poisoned((4, 6), np.int8, 0)),
        am_host_out=lib.host_array(poisoned((4,), F32, 0)),
        d_host_out=lib.host_array(poisoned((4, 6), F32, 0)),
        pair=put(poisoned((10,), F32, 0)),  # out[0] and out[1] carved from one buffer
        shared=put(rng.uniform(0.5, 2.0, 28).astype(np.float32)),  # an output and an input
    )


def _int8_rows(lib, a):
    """The first 24 bytes of float32 array ``a`` as an int8 (4, 6) array."""
    return lib.view(a.reshape(-1), "int8")[:24].reshape(4, 6)


OVERLAP = r"(out\S* overlaps|overlaps out)"

# (id, call(arrays, lib), exception, regex the message must match)
BAD_INPUTS = [
    # input dtypes
    ("per_tensor int32 x", lambda a, lib: qpt(a.x_i32, 0.1, 0, out=a.q_out), TypeError, "^x: "),
    ("per_tensor float64 x", lambda a, lib: qpt(a.x_f64, 0.1, 0, out=a.q_out), TypeError,
     "^x: "),
    ("per_channel int32 x", lambda a, lib: qpc(a.x_i32, _S6, _Z6, 1, out=a.q_out), TypeError,
     "^x: "),
    ("blockwise int32 x", lambda a, lib: qbw(a.x_i32, 7, out=(a.q_out, a.am_out)), TypeError,
     "^x: "),
    ("blockwise float64 x", lambda a, lib: qbw(a.x_f64, 7, out=(a.q_out, a.am_out)),
     TypeError, "^x: "),
    ("dequantize float32 q", lambda a, lib: deq(a.x, 0.1, 0, out=a.d_out), TypeError, "^q: "),
    ("dequantize per channel int32 q",
     lambda a, lib: deq(a.x_i32, _S6, _Z6, axis=1, out=a.d_out), TypeError, "^q: "),
    ("dequantize_blockwise float32 q", lambda a, lib: dqbw(a.x, a.am, 7, out=a.d_out),
     TypeError, "^q: "),
    ("dequantize_blockwise uint8 q", lambda a, lib: dqbw(a.qu8, a.am, 7, out=a.d_out),
     TypeError, "^q: "),
    ("dequantize_blockwise float64 absmax",
     lambda a, lib: dqbw(a.q8, a.am_f64, 7, out=a.d_out), TypeError, "^absmax: "),
    # absmax and per-channel parameters
    ("absmax too short", lambda a, lib: dqbw(a.q8, a.am[:3], 7, out=a.d_out), ValueError,
     "^absmax: "),
    ("absmax for another block size", lambda a, lib: dqbw(a.q8, a.am, 8, out=a.d_out),
     ValueError, "^absmax: "),
    ("absmax 2-D", lambda a, lib: dqbw(a.q8, a.am.reshape(2, 2), 7, out=a.d_out), ValueError,
     "^absmax: "),
    ("absmax on the host", lambda a, lib: dqbw(a.q8, a.am_host, 7, out=a.d_out), TypeError,
     "^absmax: "),
    ("per_channel scales length", lambda a, lib: qpc(a.x, _S6[:4], _Z6[:4], 1, out=a.q_out),
     ValueError, "^scales: "),
    # out shape and dtype
    ("per_tensor out shape", lambda a, lib: qpt(a.x, 0.1, 0, out=a.q_out.reshape(-1)),
     ValueError, "^out: "),
    ("per_tensor out dtype", lambda a, lib: qpt(a.x, 0.1, 0, out=a.qu_out), ValueError,
     "^out: "),
    ("per_tensor uint8 out dtype", lambda a, lib: qpt(a.x, 0.1, 0, "uint8", out=a.q_out),
     ValueError, "^out: "),
    ("per_channel out shape", lambda a, lib: qpc(a.x, _S6, _Z6, 1, out=a.q_out.reshape(6, 4)),
     ValueError, "^out: "),
    ("dequantize out dtype", lambda a, lib: deq(a.q8, 0.1, 0, out=a.d16_out), ValueError,
     "^out: "),
    ("dequantize per channel out shape",
     lambda a, lib: deq(a.q8, _S6, _Z6, axis=1, out=a.d_out.reshape(-1)), ValueError, "^out: "),
    ("blockwise out[0] shape", lambda a, lib: qbw(a.x, 7, out=(a.q_out.reshape(-1), a.am_out)),
     ValueError, r"^out\[0\]: "),
    ("blockwise out[0] dtype", lambda a, lib: qbw(a.x, 7, out=(a.qu_out, a.am_out)),
     ValueError, r"^out\[0\]: "),
    ("blockwise out[1] length", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_out[:3])),
     ValueError, r"^out\[1\]: "),
    ("blockwise out[1] dtype", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am16_out)),
     ValueError, r"^out\[1\]: "),
    ("dequantize_blockwise out shape",
     lambda a, lib: dqbw(a.q8, a.am, 7, out=a.d_out.reshape(-1)), ValueError, "^out: "),
    ("dequantize_blockwise out dtype", lambda a, lib: dqbw(a.q8, a.am, 7, out=a.d16_out),
     ValueError, "^out: "),
    # out on the host
    ("per_tensor host out", lambda a, lib: qpt(a.x, 0.1, 0, out=a.q_host_out), TypeError,
     "^out: "),
    ("per_channel host out", lambda a, lib: qpc(a.x, _S6, _Z6, 1, out=a.q_host_out),
     TypeError, "^out: "),
    ("blockwise host out[0]", lambda a, lib: qbw(a.x, 7, out=(a.q_host_out, a.am_out)),
     TypeError, r"^out\[0\]: "),
    ("blockwise host out[1]", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_host_out)),
     TypeError, r"^out\[1\]: "),
    ("dequantize host out", lambda a, lib: deq(a.q8, 0.1, 0, out=a.d_host_out), TypeError,
     "^out: "),
    ("dequantize_blockwise host out", lambda a, lib: dqbw(a.q8, a.am, 7, out=a.d_host_out),
     TypeError, "^out: "),
    # out overlapping an input or the other output
    ("per_tensor out overlaps x", lambda a, lib: qpt(a.x, 0.1, 0, out=_int8_rows(lib, a.x)),
     ValueError, OVERLAP),
    ("blockwise out[0] overlaps x",
     lambda a, lib: qbw(a.x, 7, out=(_int8_rows(lib, a.x), a.am_out)), ValueError, OVERLAP),
    ("blockwise out[1] overlaps out[0]",
     lambda a, lib: qbw(a.x, 7, out=(_int8_rows(lib, a.pair), a.pair[2:6])), ValueError,
     OVERLAP),
    ("dequantize out overlaps q",
     lambda a, lib: deq(_int8_rows(lib, a.shared), 0.1, 0, out=a.shared[:24].reshape(4, 6)),
     ValueError, OVERLAP),
    ("dequantize_blockwise out overlaps absmax",
     lambda a, lib: dqbw(a.q8, a.shared[20:24], 7, out=a.shared[:24].reshape(4, 6)),
     ValueError, OVERLAP),
    # non-contiguous arrays
    ("per_tensor strided x", lambda a, lib: qpt(a.x_wide[:, ::2], 0.1, 0, out=a.q_out),
     ValueError, "^x: .*contiguous"),
    ("per_channel strided x", lambda a, lib: qpc(a.x_wide[:, ::2], _S6, _Z6, 1, out=a.q_out),
     ValueError, "^x: .*contiguous"),
    ("blockwise strided x", lambda a, lib: qbw(a.x_wide[:, ::2], 7, out=(a.q_out, a.am_out)),
     ValueError, "^x: .*contiguous"),
    ("dequantize strided q", lambda a, lib: deq(a.q_wide[:, ::2], 0.1, 0, out=a.d_out),
     ValueError, "^q: .*contiguous"),
    ("dequantize_blockwise strided absmax",
     lambda a, lib: dqbw(a.q8, a.am_wide[::2], 7, out=a.d_out), ValueError,
     "^absmax: .*contiguous"),
    ("per_tensor strided out", lambda a, lib: qpt(a.x, 0.1, 0, out=a.q_wide_out[:, ::2]),
     ValueError, "^out: .*contiguous"),
    ("blockwise strided out[1]",
     lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_wide_out[::2])), ValueError,
     r"^out\[1\]: .*contiguous"),
    ("dequantize strided out", lambda a, lib: deq(a.q8, 0.1, 0, out=a.d_wide_out[:, ::2]),
     ValueError, "^out: .*contiguous"),
    # streams
    ("stream str", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_out), stream="0"), TypeError,
     "^stream: "),
    ("stream negative", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_out), stream=-1),
     ValueError, "^stream: "),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_writes_nothing(lib, call, exc, match, rng):
    arrays = bad_input_arrays(lib, rng)
    before = {k: lib.to_host(v) for k, v in vars(arrays).items()}
    with pytest.raises(exc, match=match):
        call(arrays, lib)
    lib.synchronize()  # anything queued before the error has landed
    for k, v in vars(arrays).items():
        assert_bits(lib.to_host(v), before[k], f"{k} was modified")


@pytest.mark.parametrize("case", CHANNEL_CASES + [((4, 37), None), ((0, 5), None), ((0, 5), 1)],
                         ids=lambda c: f"{c[0]}-axis{c[1]}")
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_choose_qparams_matches_cpu(lib, in_dtype, case, rng):
    """The GPU min/max observer (one channel: running min/max; several: warp-reduced or
    per-element atomics) gives the CPU's scales and zero points exactly, for every mode;
    negative-only and positive-only channels included; non-finite input names the CPU's
    index."""
    shape, axis = case
    x = fresh(rng, shape, F32)
    if x.ndim > 1 and x.shape[0] > 1:
        x[0] = -np.abs(x[0])  # a channel or region with only negative values
        x[-1] = np.abs(x[-1]) + 1.0
    x = x.astype(in_dtype)
    dx = lib.to_device(x)
    for kwargs in ({}, {"symmetric": False}, {"symmetric": False, "dtype": "uint8"},
                   {"dtype": "uint8"}):
        got = fastopt.choose_qparams(dx, axis=axis, **kwargs)
        want = fastopt.choose_qparams(x, axis=axis, **kwargs)
        if axis is None:
            assert got == want, (kwargs, got, want)
        else:
            assert_bits(np.asarray(got[0]), np.asarray(want[0]), f"scales {kwargs}")
            assert_bits(np.asarray(got[1]), np.asarray(want[1]), f"zero points {kwargs}")
    if x.size:
        bad = x.copy()
        flat = bad.reshape(-1)
        flat[[flat.size // 3, flat.size // 2]] = np.array([np.nan, np.inf], dtype=F32).astype(in_dtype)
        with pytest.raises(ValueError) as cpu_error:
            fastopt.choose_qparams(bad, axis=axis)
        with pytest.raises(ValueError, match=re.escape(str(cpu_error.value))):
            fastopt.choose_qparams(lib.to_device(bad), axis=axis)


WAITING_CALLS = {
    "quantize_per_tensor": lambda x: qpt(x, 0.1, 0),
    "quantize_blockwise": lambda x: qbw(x, 64),
    "choose_qparams": lambda x: fastopt.choose_qparams(x, axis=0),
}


@pytest.mark.parametrize("func", list(WAITING_CALLS))
def test_waiting_for_the_stream_releases_the_gil(lib, func, rng):
    """The non-finite report (and the observer's min/max) come back by a copy into host
    memory, which waits for the work queued on the stream: other Python threads run
    meanwhile (the copy used to run with the GIL held, stalling them for the whole wait)."""
    x = lib.to_device(fresh(rng, (64, 64), F32))
    lib.synchronize()
    done = threading.Event()

    def call():
        try:
            lib.spin()  # ~0.1 s of GPU work queued ahead on this thread's current stream
            WAITING_CALLS[func](x)
        finally:
            done.set()

    worker = threading.Thread(target=call)
    ticks = [time.perf_counter()]
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    worker.join()
    assert ticks[-1] - ticks[0] > 0.05, "the call did not wait for the spin"
    assert max(np.diff(ticks)) < 0.04, "this thread stalled while the call waited"


# ---- without a GPU ------------------------------------------------------------------------

FAKE_CALLS = {
    "quantize_per_tensor": lambda f: qpt(f, 0.1, 0),
    "quantize_per_channel": lambda f: qpc(f, _S6, _Z6, 1),
    "dequantize": lambda f: deq(f, 0.1, 0),
    "quantize_blockwise": lambda f: qbw(f, 7),
    "dequantize_blockwise": lambda f: dqbw(f, FakeCudaArray(), 7),
}


@pytest.mark.skipif(fastopt.cuda_available(), reason="checks the refusal when CUDA is not usable")
@pytest.mark.parametrize("func", list(FAKE_CALLS))
def test_cuda_input_without_usable_cuda_raises_type_error(func):
    with pytest.raises(TypeError, match="CUDA is not usable"):
        FAKE_CALLS[func](FakeCudaArray())


_X = np.random.default_rng(7).standard_normal((4, 6)).astype(np.float32)
_Q, _A = qbw(_X, 7)

# name: (call(stream, out), out templates)
HOST_STREAM_CALLS = {
    "quantize_per_tensor": (lambda s, o: qpt(_X, 0.1, 0, out=o, stream=s), [((4, 6), np.int8)]),
    "quantize_per_channel": (lambda s, o: qpc(_X, _S6, _Z6, 1, out=o, stream=s),
                             [((4, 6), np.int8)]),
    "dequantize": (lambda s, o: deq(_Q, 0.1, 0, out=o, stream=s), [((4, 6), np.float32)]),
    "quantize_blockwise": (lambda s, o: qbw(_X, 7, out=o, stream=s),
                           [((4, 6), np.int8), ((4,), np.float32)]),
    "dequantize_blockwise": (lambda s, o: dqbw(_Q, _A, 7, out=o, stream=s),
                             [((4, 6), np.float32)]),
}


@pytest.mark.parametrize("stream", [0, types.SimpleNamespace(cuda_stream=0)],
                         ids=["int", "stream object"])
@pytest.mark.parametrize("func", list(HOST_STREAM_CALLS))
def test_stream_with_host_input_is_rejected(func, stream):
    call, templates = HOST_STREAM_CALLS[func]
    outs = tuple(poisoned(s, d, 0) for s, d in templates)
    with pytest.raises(ValueError, match="^stream: only applies to CUDA arrays"):
        call(stream, outs if len(outs) > 1 else outs[0])
    for o, (s, d) in zip(outs, templates):
        assert_bits(o, poisoned(s, d, 0), "out was written despite the error")
