"""Tests of blockwise int8 quantization (``quantize_blockwise``, ``dequantize_blockwise``).

* Exactness: equal to ``fastopt.reference`` bit for bit, nearest and stochastic rounding, on
  every backend (the ``backend`` fixture: both CPU code paths, CuPy and PyTorch CUDA, there
  also bit for bit against the CPU), for float32/float16/bfloat16 inputs, odd sizes, partial
  blocks and blocks past the GPU's one-warp limit (4096 elements), 16-bit outputs; the
  scalar and AVX2 paths (and thread counts) agree with each other for every quantization mode.
* Properties: round-trip error bounds, stochastic rounding reproducible, seeded, unbiased
  (every backend) and exact on the grid, tiny (subnormal) absmax and all-zero blocks (every
  backend).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import assert_bits, bits, host_matching_cpu
from conftest import using_cpu_path, using_threads
from quant_cases import (BF16, BLOCKS, F32, IN_DTYPES, IN_IDS, LARGE_BLOCK, LARGER, OUT_DTYPES,
                         OUT_IDS, SHAPES, block_of, channel_params, fresh, kernel_v,
                         ref_blockwise, run_with_out, shape_id)

qbw, dqbw = fastopt.quantize_blockwise, fastopt.dequantize_blockwise

# ---- exactness against the reference (and the CPU) ----------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_blockwise_matches_reference(backend, in_dtype, block, shape, rng):
    x = fresh(rng, shape, in_dtype)
    block = block_of(block, x.size)
    blocks = -(-x.size // block)
    xd = backend.asarray(x)
    seeds = [0, 2 ** 64 - 1, int(rng.integers(0, 2 ** 63))]
    for rounding, seed in [("nearest", None)] + [("stochastic", s) for s in seeds]:
        what = f"{rounding} seed={seed}"
        got = qbw(xd, block, rounding=rounding, seed=seed)
        backend.assert_result(got[0], xd, "int8", x.shape)
        backend.assert_result(got[1], xd, "float32", (blocks,))
        q, absmax = host_matching_cpu(backend, got, lambda r=rounding, s=seed: qbw(
            x, block, rounding=r, seed=s), what)
        want_q, want_absmax = ref_blockwise(x, block, rounding, seed or 0)
        assert_bits(absmax, want_absmax, f"absmax {what}")
        assert_bits(q, want_q, f"q {what}")
        d = host_matching_cpu(backend, dqbw(*got, block),
                              lambda q=q, a=absmax: dqbw(q, a, block), f"dequantize {what}")
        assert_bits(d, reference.dequantize_blockwise(q, absmax, block), f"dequantize {what}")
    # the absmax really is max |x| per block
    x32 = x.astype(np.float32).reshape(-1)
    pad = np.zeros(blocks * block, np.float32)
    pad[:x32.size] = np.abs(x32)
    assert np.array_equal(absmax, pad.reshape(blocks, block).max(axis=1))
    qr = rng.integers(-128, 128, shape).astype(np.int8)  # every code, -128 included
    d = host_matching_cpu(backend, dqbw(backend.asarray(qr), got[1], block),
                          lambda: dqbw(qr, absmax, block), "dequantize random q")
    assert_bits(d, reference.dequantize_blockwise(qr, absmax, block), "dequantize random q")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
def test_dequantize_blockwise_out_dtype_matches_reference(backend, out_dtype, block, shape,
                                                          rng):
    """dequantize_blockwise(..., out_dtype=) rounds the float32 result to nearest even; absmax
    of every magnitude (float16 overflow at 1e6, subnormals and zero at 1e-6, ties of few
    mantissa bits at 127 * (1 + 2^-9)), and a NaN absmax (a block check_finite=False found
    bad) gives NaN; written into every element of a poisoned out= too. CuPy refuses
    bfloat16 by name."""
    if not backend.holds(out_dtype):
        with pytest.raises(TypeError, match="^out_dtype: CuPy has no bfloat16"):
            dqbw(backend.asarray(np.zeros(3, np.int8)), backend.asarray(np.ones(1, F32)), 7,
                 out_dtype="bfloat16")
        return
    q = rng.integers(-128, 128, shape).astype(np.int8)
    block = block_of(block, q.size)
    blocks = -(-q.size // block)
    absmax = (rng.uniform(0.5, 20, blocks) * rng.choice([1, 1e6, 1e-6], blocks)).astype(F32)
    absmax[::5] = 127 * (1 + 2.0 ** -9)
    absmax[3::7] = 0
    absmax[blocks // 2] = np.nan
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference.dequantize_blockwise(q, absmax, block, out_dtype=out_dtype)
    qd, ad = backend.asarray(q), backend.asarray(absmax)
    for spelled in (out_dtype.name, out_dtype):
        got = host_matching_cpu(backend, dqbw(qd, ad, block, out_dtype=spelled),
                                lambda o=spelled: dqbw(q, absmax, block, out_dtype=o),
                                f"out_dtype={spelled!r}")
        assert_bits(got, want, f"out_dtype={spelled!r}")
    run_with_out(lambda o: dqbw(qd, ad, block, out_dtype=out_dtype, out=o), [want], backend)


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
        for out_dtype in ("float16", "bfloat16"):
            q, a = out["blockwise 7 nearest"][:2]
            out[f"blockwise dequantize {out_dtype}"] = (
                fastopt.dequantize_blockwise(q, a * 1e3, 7, out_dtype=out_dtype),)
        q = fastopt.quantize_per_tensor(x, 0.0371, 5)
        out["per_tensor"] = (q, fastopt.dequantize(q, 0.0371, 5),
                             fastopt.dequantize(q, 1 + 2.0 ** -9, 5, out_dtype="float16"),
                             fastopt.dequantize(q, 1 + 2.0 ** -9, 5, out_dtype="bfloat16"))
        q = fastopt.quantize_per_channel(x2, scales, zps, 1)
        out["per_channel"] = (q, fastopt.dequantize(q, scales, zps, axis=1),
                              fastopt.dequantize(q, scales, zps, axis=1, out_dtype="float16"),
                              fastopt.dequantize(q, scales, zps, axis=1, out_dtype="bfloat16"))
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
def test_stochastic_unbiased_and_floor_or_ceil(backend, in_dtype, rng):
    """Over 200 seeds the mean of dequantize_blockwise(quantize_blockwise(x, stochastic))
    converges to x (on a GPU each seed gives the CPU's bits). Per element, q = floor(v) + B
    with B ~ Bernoulli(frac(v)), so the mean
    of the dequantized value has standard deviation scale*sqrt(p(1-p))/sqrt(200) <= sigma =
    scale/(2*sqrt(200)) (scale = absmax/127). The seeds are fixed, so the test is
    deterministic; 5 sigma per element bounds the chance of a false alarm over the 4097
    elements by 4097 * 5.7e-7 = 0.2% for a correct implementation (normal approximation of a
    binomial with 200 trials), while a bias of a tenth of a step (0.1 scale > 7 sigma) is
    caught. The mean over all elements of the normalised error has sigma <= 0.5/sqrt(200 *
    4097), which catches a systematic bias of 1% of a step."""
    x = fresh(rng, (4097,), in_dtype)
    xd = backend.asarray(x)
    x32 = x.astype(np.float32)
    block, seeds = 64, 200
    total = np.zeros(x.size)
    took_floor = np.zeros(x.size, bool)
    took_ceil = np.zeros(x.size, bool)
    absmax = None
    for seed in range(seeds):
        got = qbw(xd, block, rounding="stochastic", seed=seed)
        q, absmax = host_matching_cpu(backend, got, lambda s=seed: qbw(
            x, block, rounding="stochastic", seed=s), f"seed={seed}")
        v = kernel_v(x32, absmax, block)
        lo = np.clip(np.floor(v), -127, 127)
        hi = np.clip(np.ceil(v), -127, 127)
        assert np.all((q == lo) | (q == hi)), f"seed {seed}: q is not floor or ceil of v"
        took_floor |= (q == lo) & (lo != hi)
        took_ceil |= (q == hi) & (lo != hi)
        total += backend.to_numpy(dqbw(*got, block))
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
def test_blockwise_tiny_absmax(backend, in_dtype, rounding):
    """Blocks whose absmax is tiny but positive (float32 subnormals and small normals, which
    bfloat16 and float32 gradients do reach; the kernels rescale such blocks by 2^64)
    quantize like any other block, and the GPU does not flush subnormals to zero: x = j *
    2^-e with absmax = 127 * 2^-e has q = j exactly (v = j is on the grid)."""
    j = np.concatenate([np.arange(-127, 128), np.arange(127, -128, -1)])  # 510, absmax 127
    # absmax 1.5e-37 (normal) and 9.1e-41 (subnormal); bfloat16 keeps 7 mantissa bits, so
    # its subnormals (quantum 2^-133) cannot hold j * 2^-140 exactly: there only the
    # reference's (and the CPU's) bits
    for e in (130, 140):
        x = (j * 2.0 ** -e).astype(np.float32)
        x = x.astype(in_dtype)
        exact = np.array_equal(x.astype(np.float64), j * 2.0 ** -e)
        assert exact or (e == 140 and np.dtype(in_dtype).name == "bfloat16")
        xd = backend.asarray(x)
        # one block holding every j, so that its absmax is 127 * 2^-e
        got = qbw(xd, x.size, rounding=rounding, seed=5)
        q, absmax = host_matching_cpu(backend, got, lambda x=x: qbw(
            x, x.size, rounding=rounding, seed=5), f"2^-{e} one block")
        want_q, want_absmax = ref_blockwise(x, x.size, rounding, seed=5)
        assert_bits(absmax, want_absmax, "absmax")
        assert_bits(q, want_q, "q")
        dq = host_matching_cpu(backend, dqbw(*got, x.size),
                               lambda q=q, a=absmax, x=x: dqbw(q, a, x.size),
                               f"2^-{e} dequantize")
        if exact:
            bad = np.flatnonzero(q != j)
            assert bad.size == 0, (f"absmax 127*2^-{e}: {bad.size} of {q.size} wrong, e.g. x="
                                   f"{x[bad[:4]].astype(np.float32).tolist()} want q="
                                   f"{j[bad[:4]].tolist()} got q={q[bad[:4]].tolist()}")
            assert np.array_equal(dq, x.astype(np.float32))
        # blocks of 64 (each with its own absmax) still match the reference exactly
        got = qbw(xd, 64, rounding=rounding, seed=5)
        q64, a64 = host_matching_cpu(backend, got, lambda x=x: qbw(
            x, 64, rounding=rounding, seed=5), f"2^-{e} blocks of 64")
        want64 = ref_blockwise(x, 64, rounding, seed=5)
        assert_bits(q64, want64[0], "q (blocks of 64)")
        assert_bits(a64, want64[1], "absmax (blocks of 64)")
        host_matching_cpu(backend, dqbw(*got, 64), lambda q=q64, a=a64: dqbw(q, a, 64),
                          f"2^-{e} dequantize blocks of 64")


# ---- zero blocks --------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("block", [64, LARGE_BLOCK])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_zero_blocks(backend, in_dtype, block, rounding, rng):
    x32 = fresh(rng, (block * 7 + 13,), np.float32)
    zero_blocks = [1, 4, 7]  # 7: the partial last block
    for b in zero_blocks:
        x32[b * block:(b + 1) * block] = 0.0
    x32[4 * block + 5] = -0.0  # a negative zero changes nothing
    x = x32.astype(in_dtype)
    got = qbw(backend.asarray(x), block, rounding=rounding, seed=3)
    q, absmax = host_matching_cpu(backend, got, lambda: qbw(x, block, rounding=rounding, seed=3))
    want_q, want_absmax = ref_blockwise(x, block, rounding, 3)
    assert_bits(absmax, want_absmax, "absmax")
    assert_bits(q, want_q, "q")
    dq = host_matching_cpu(backend, dqbw(*got, block), lambda: dqbw(q, absmax, block))
    for b in zero_blocks:
        sl = slice(b * block, (b + 1) * block)
        assert bits(absmax[b]) == 0, f"block {b}: absmax {absmax[b]!r} is not +0"
        assert np.all(q[sl] == 0)
        assert np.all(bits(dq[sl]) == 0), f"block {b}: dequantized {dq[sl]}"
    others = [b for b in range(absmax.size) if b not in zero_blocks]
    assert np.all(absmax[others] > 0)
    # a whole array of zeros
    z = np.zeros((3, 50), in_dtype)
    got = qbw(backend.asarray(z), 7, rounding=rounding, seed=1)
    q, absmax = host_matching_cpu(backend, got, lambda: qbw(z, 7, rounding=rounding, seed=1))
    assert absmax.shape == (22,) and np.all(bits(absmax) == 0) and np.all(q == 0)
    assert np.all(bits(backend.to_numpy(dqbw(*got, 7))) == 0)
