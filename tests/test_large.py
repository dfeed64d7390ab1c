"""Sizes past 2**31 elements: 64-bit indexing end to end (binding sizes, thread shares,
tensor offsets, kernel loops), for an optimizer, int8 quantization and Newton. Each test
skips unless it has the memory it needs (9-11 GB); in the SGD test the gradient is an
untouched zero array, whose pages all map the kernel's shared zero page.
"""
import numpy as np
import pytest

import fastopt

N = 2**31 + 37  # past int32, and not a multiple of any vector width


def _enough_memory(nbytes: int) -> bool:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 0) > nbytes * 1.3
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _enough_memory(N * 4), reason="needs ~9 GB of free memory")
def test_sgd_weight_decay_past_2_pow_31_elements():
    params = np.full(N, 1.0, dtype=np.float32)
    grads = np.zeros(N, dtype=np.float32)  # never written: costs no memory
    small = np.full(5, 2.0, dtype=np.float32)
    # g = 0 + wd*p, p <- p - lr*g: every element becomes 1 - lr*wd, whatever its index
    fastopt.sgd_([small, params], [np.zeros(5, np.float32), grads], lr=0.5, weight_decay=0.5)
    expect = np.float32(1.0) - np.float32(0.5) * (np.float32(0.5) * np.float32(1.0))
    for lo, hi in [(0, 64), (2**31 - 64, 2**31 + 64), (N - 64, N)]:
        np.testing.assert_array_equal(params[lo:hi], expect)
    np.testing.assert_array_equal(small, np.float32(2.0) - np.float32(0.5) * np.float32(1.0))
    # every element was written: all of them now hold the same value
    assert int(np.count_nonzero(params != expect)) == 0


@pytest.mark.slow
@pytest.mark.skipif(not _enough_memory(N * 5), reason="needs ~11 GB of free memory")
def test_int8_quantization_past_2_pow_31_elements():
    """Blockwise and per-tensor quantization of a float16 array of N elements, then blockwise
    dequantization (after freeing the input) to float32, and blockwise and per-tensor to
    bfloat16 and float16, checked against the reference in windows at the start, across
    2**31 and at the end (block-aligned, the last block partial)."""
    from fastopt import reference

    rng = np.random.default_rng(2031)
    pattern = (rng.standard_normal(65_537) * 3).astype(np.float16)  # no period of 256
    x = np.empty(N, np.float16)
    for lo in range(0, N, 1 << 28):
        hi = min(N, lo + (1 << 28))
        x[lo:hi] = np.resize(pattern[lo % pattern.size:], hi - lo)  # np.resize repeats
    windows = [(0, 64 * 256), (2**31 - 16 * 256, 2**31 + 16 * 256), ((N // 256 - 8) * 256, N)]

    q, absmax = fastopt.quantize_blockwise(x, 256)
    assert q.shape == (N,) and absmax.shape == (-(-N // 256),)
    for lo, hi in windows:
        want_q, want_a = reference.quantize_blockwise(x[lo:hi].astype(np.float32), 256)
        np.testing.assert_array_equal(q[lo:hi], want_q)
        np.testing.assert_array_equal(absmax[lo // 256:-(-hi // 256)], want_a)

    qt = fastopt.quantize_per_tensor(x, 0.0371, -3)
    for lo, hi in windows:
        want = reference.quantize_affine(x[lo:hi].astype(np.float32), 0.0371, -3, -128, 127)
        np.testing.assert_array_equal(qt[lo:hi], want.astype(np.int8))
    del qt, x

    d = fastopt.dequantize_blockwise(q, absmax, 256)
    for lo, hi in windows:
        np.testing.assert_array_equal(
            d[lo:hi], reference.dequantize_blockwise(q[lo:hi], absmax[lo // 256:-(-hi // 256)]))
    del d
    for out_dtype in ("bfloat16", "float16"):  # 16-bit outputs, blockwise and per tensor
        d = fastopt.dequantize_blockwise(q, absmax, 256, out_dtype=out_dtype)
        for lo, hi in windows:
            want = reference.dequantize_blockwise(q[lo:hi], absmax[lo // 256:-(-hi // 256)],
                                                  out_dtype=d.dtype)
            assert (d[lo:hi].view(np.uint16) == want.view(np.uint16)).all(), out_dtype
        d = fastopt.dequantize(q, 0.0371, -3, out_dtype=out_dtype)
        for lo, hi in windows:
            want = reference.dequantize_affine(q[lo:hi], 0.0371, -3, out_dtype=d.dtype)
            assert (d[lo:hi].view(np.uint16) == want.view(np.uint16)).all(), out_dtype
        del d


@pytest.mark.slow
@pytest.mark.skipif(not _enough_memory(N * 4), reason="needs ~9 GB of free memory")
def test_newton_past_2_pow_31_hessian_elements():
    """n = 64 systems whose Hessians hold more than 2**31 float32 elements in all: the
    systems around element 2**31 and at the end get the same bits as the same systems
    solved in a small batch (each system's arithmetic is independent of its index)."""
    n = 64
    batch = N // (n * n) + 1  # batch * n * n > N > 2**31
    rng = np.random.default_rng(64)
    a = rng.standard_normal((37, n, n)).astype(np.float32)
    tiles = a @ a.transpose(0, 2, 1) / np.float32(n) + np.eye(n, dtype=np.float32)  # SPD
    H = np.empty((batch, n, n), np.float32)
    for lo in range(0, batch, 1 << 16):
        hi = min(batch, lo + (1 << 16))
        H[lo:hi] = tiles[np.arange(lo, hi) % tiles.shape[0]]
    g = rng.standard_normal((batch, n)).astype(np.float32)
    p = rng.standard_normal((batch, n)).astype(np.float32)
    p0 = p.copy()
    fastopt.newton_(p, g, H, lr=0.5, damping=0.01)
    crossing = 2**31 // (n * n)  # the system holding element 2**31
    for lo, hi in [(0, 8), (crossing - 4, crossing + 4), (batch - 8, batch)]:
        want = p0[lo:hi].copy()
        fastopt.newton_(want, g[lo:hi], H[lo:hi].copy(), lr=0.5, damping=0.01)
        np.testing.assert_array_equal(p[lo:hi], want)
        assert not np.array_equal(want, p0[lo:hi])
