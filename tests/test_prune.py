"""Tests of magnitude pruning (``fastopt.prune_magnitude``), on every backend.

* Exactness: masks equal ``fastopt.reference.prune_magnitude`` / ``prune_n_m`` (a stable
  argsort of |x|) element for element, so exactly round(sparsity * n) elements are pruned,
  over dtypes x odd sizes x scope x sparsity; ties (many equal magnitudes, across chunks and
  threads) are pruned earlier-first; NaN ranks above +Inf.
* torch: the masks equal ``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` and
  ``l1_unstructured`` where |x| has no ties (NaN and Inf included).
* out=: poisoned masks written in full; bad input raises naming the argument and writes
  nothing (private bindings included); zero-size arrays; the same bits for any thread count
  and CPU path.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import _cpu, reference

from conftest import using_cpu_path, using_threads

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]
SPARSITIES = [0, 0.5, 0.7, 0.9, 1]
SCOPES = ["global", "per_tensor"]
# Odd sizes, one array each, and a list mixing shapes (the radix passes and chunks span
# arrays); 70_001 elements are several CPU chunks and GPU chunks.
LAYOUTS = [[(1,)], [(7,)], [(33,)], [(4097,)], [(70_001,)], [(1,), (7, 3), (0,), (33,), (4097,), (5, 9, 11)]]


def values(rng, shape, dtype) -> np.ndarray:
    """Normal draws in ``dtype`` (16-bit types: ties happen, as they do in real weights)."""
    return (rng.standard_normal(shape) * 2.0).astype(dtype)


def distinct(rng, shapes, dtype) -> list:
    """Arrays of ``shapes`` whose magnitudes are all distinct (no ties, across arrays too),
    random signs, in random order."""
    sizes = [int(np.prod(s)) for s in shapes]
    n = sum(sizes)
    if dtype.itemsize == 2:  # distinct 16-bit patterns of normal numbers (up to 12288)
        bits = rng.choice(np.arange(0x2000, 0x5000, dtype=np.uint16), size=n, replace=False)
        x = bits.view(dtype).copy()
    else:
        x = rng.permutation(np.linspace(0.01, 50.0, n)).astype(dtype)
    assert np.unique(np.abs(x.astype(np.float64))).size == n
    x = x * np.where(rng.random(n) < 0.5, -1, 1).astype(dtype)
    return [part.reshape(s) for part, s in zip(np.split(x, np.cumsum(sizes)[:-1]), shapes)]


def run(backend, arrays, sparsity=None, **kwargs):
    """fastopt's masks for NumPy ``arrays`` on ``backend``, as NumPy bool arrays."""
    got = fastopt.prune_magnitude([backend.asarray(a) for a in arrays], sparsity, **kwargs)
    assert isinstance(got, list) and len(got) == len(arrays)
    masks = [backend.to_numpy(m) for m in got]
    for m, a in zip(masks, arrays):
        assert m.dtype == np.bool_ and m.shape == a.shape
    return masks


def assert_masks(got, want, what=""):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what} [{i}]: shape {g.shape} != {w.shape}"
        bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1))
        assert bad.size == 0, f"{what} [{i}]: {bad.size} of {w.size} differ, first {bad[:8]}"


def expected_pruned(shapes, sparsity, scope):
    sizes = [int(np.prod(s)) for s in shapes]
    if scope == "global":
        return [round(sparsity * sum(sizes))]
    return [round(sparsity * n) for n in sizes]


# ---- exactness ----------------------------------------------------------------------------

@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_masks_match_reference_and_counts_exact(backend, dtype, scope, rng):
    for shapes in LAYOUTS:
        arrays = [values(rng, s, dtype) for s in shapes]
        for sparsity in SPARSITIES:
            what = f"{shapes} sparsity={sparsity}"
            got = run(backend, arrays, sparsity, scope=scope)
            assert_masks(got, reference.prune_magnitude(arrays, sparsity, scope), what)
            pruned = [int((~m).sum()) for m in got]
            if scope == "global":
                pruned = [sum(pruned)]
            assert pruned == expected_pruned(shapes, sparsity, scope), what


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_pruned_earlier_first(backend, dtype, rng):
    """Few distinct magnitudes (+-0 and +-1 tie), spread over chunks and arrays: the
    threshold falls inside a tie and only its first elements, in list then index order,
    are pruned."""
    shapes = [(150_001,), (3, 7), (70_003,)]
    arrays = [rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 2.0]), size=s).astype(dtype)
              for s in shapes]
    for scope in SCOPES:
        for sparsity in [0.1, 0.3, 0.5, 0.55, 0.9]:
            got = run(backend, arrays, sparsity, scope=scope)
            assert_masks(got, reference.prune_magnitude(arrays, sparsity, scope),
                         f"{scope} {sparsity}")
    # Many distinct magnitudes, each repeated (over 2^18 elements: the CPU's 16-bit first
    # digit, whose bin is gathered and settled apart, ties included)
    levels = [(np.round(rng.standard_normal(s) * 300) / 300).astype(dtype)
              for s in [(300_001,), (5, 11)]]
    for scope in SCOPES:
        for sparsity in [0.3, 0.7]:
            got = run(backend, levels, sparsity, scope=scope)
            assert_masks(got, reference.prune_magnitude(levels, sparsity, scope),
                         f"levels {scope} {sparsity}")
    # all equal: exactly the first k are pruned
    same = [np.full(100_003, -3.0, dtype)]
    got = run(backend, same, 0.7)[0]
    k = round(0.7 * 100_003)
    assert not got[:k].any() and got[k:].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_ranks_above_inf(backend, dtype, rng):
    x = values(rng, (4097,), dtype)
    x[[5, 100, 4000]] = np.nan
    x[[7, 3000]] = np.inf
    x[[8]] = -np.inf
    for scope in SCOPES:
        for sparsity in [0.5, 0.999, 1]:
            got = run(backend, [x], sparsity, scope=scope)
            assert_masks(got, reference.prune_magnitude([x], sparsity, scope), f"{sparsity}")
    got = run(backend, [x], 4094 / 4097)[0]  # everything but the three NaNs
    assert np.flatnonzero(got).tolist() == [5, 100, 4000]


# ---- torch.nn.utils.prune -----------------------------------------------------------------

def torch_of(torch, a: np.ndarray):
    if a.dtype == BF16:  # no NumPy bfloat16 in torch: through the bits
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_masks_equal_torch_prune(backend, dtype, scope, rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    shapes = [(33, 5), (7,), (1,), (64, 31)]
    arrays = distinct(rng, shapes, dtype)
    arrays[3].reshape(-1)[[3, 900]] = np.nan  # torch.topk ranks NaN above everything
    arrays[3].reshape(-1)[[10]] = np.inf
    for sparsity in [0.0, 0.3, 0.5, 0.7, 0.9, 1.0]:
        modules = []
        for a in arrays:
            module = torch.nn.Module()
            module.weight = torch.nn.Parameter(torch_of(torch, a))
            modules.append(module)
        if scope == "global":
            prune.global_unstructured([(m, "weight") for m in modules],
                                      pruning_method=prune.L1Unstructured, amount=sparsity)
        else:
            for m in modules:
                prune.l1_unstructured(m, "weight", amount=sparsity)
        want = [m.weight_mask.float().numpy().astype(bool) for m in modules]
        assert_masks(run(backend, arrays, sparsity, scope=scope), want, f"{sparsity}")


# ---- N:M ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_n_m_matches_reference(backend, dtype, rng):
    cases = [("2:4", [(1, 4), (7, 36), (4097, 8)]), ("1:4", [(33, 4)]), ("4:8", [(3, 5, 16)]),
             ("0:3", [(9,)]), ("3:3", [(9,)]), ("16:32", [(70, 64)]), ("5:64", [(3, 64)]),
             ("1:1", [(5,)])]
    for pattern, shapes in cases:
        n, m = (int(v) for v in pattern.split(":"))
        arrays = [values(rng, s, dtype) for s in shapes]
        arrays.append(rng.choice(np.array([0.0, -1.0, 1.0]), size=shapes[0]).astype(dtype))
        got = run(backend, arrays, pattern=pattern)
        assert_masks(got, [reference.prune_n_m(a, n, m) for a in arrays], pattern)
        for g in got:
            assert (g.reshape(-1, m).sum(axis=1) == n).all(), pattern
    # sparsity may be given when it is the pattern's
    x = values(rng, (8, 16), dtype)
    assert_masks(run(backend, [x], 0.5, pattern="2:4"), [reference.prune_n_m(x, 2, 4)])


# ---- out=, single arrays, torch CPU tensors -------------------------------------------------

@pytest.mark.parametrize("mask_dtype", ["bool", "uint8"])
def test_out_written_in_full(backend, mask_dtype, rng):
    shapes = [(4097,), (7, 3), (70_001,)]
    arrays = [values(rng, s, np.float32) for s in shapes]
    for kwargs in [dict(sparsity=0.7), dict(sparsity=0.3, scope="per_tensor"),
                   dict(pattern="1:1")]:
        outs = []
        for s in shapes:
            poison = np.full(s, 0x55, np.uint8)  # neither 0 nor 1
            outs.append(backend.asarray(poison if mask_dtype == "uint8" else poison.view(bool)))
        got = fastopt.prune_magnitude([backend.asarray(a) for a in arrays], out=outs, **kwargs)
        assert got is outs
        if "pattern" in kwargs:
            want = [np.ones(s, bool) for s in shapes]
        else:
            want = reference.prune_magnitude(arrays, kwargs["sparsity"],
                                             kwargs.get("scope", "global"))
        for o, w in zip(outs, want):
            raw = backend.to_numpy(o).view(np.uint8)
            assert set(np.unique(raw).tolist()) <= {0, 1}, "an element was not written"
            assert_masks([raw.astype(bool)], [w])


def test_single_array_gives_single_mask(backend, rng):
    x = values(rng, (5, 7), np.float32)
    mask = fastopt.prune_magnitude(backend.asarray(x), 0.4)
    assert backend.is_array(mask)
    assert_masks([backend.to_numpy(mask)], reference.prune_magnitude([x], 0.4))
    out = backend.asarray(np.zeros((5, 7), bool))
    assert fastopt.prune_magnitude(backend.asarray(x), 0.4, out=out) is out
    assert_masks([backend.to_numpy(out)], reference.prune_magnitude([x], 0.4))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_torch_cpu_tensors(dtype, rng):
    torch = pytest.importorskip("torch")
    t = [torch.randn(33, 7).to(getattr(torch, dtype)), torch.randn(100).to(getattr(torch, dtype))]
    masks = fastopt.prune_magnitude(t, 0.6, scope="per_tensor")
    assert all(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks)
    want = reference.prune_magnitude([a.float().numpy() for a in t], 0.6, "per_tensor")
    assert_masks([m.numpy() for m in masks], want)


# ---- zero size, threads and paths ----------------------------------------------------------

def test_zero_size(backend, rng):
    empty = [np.zeros((0,), np.float32), np.zeros((3, 0), np.float32)]
    for sparsity in [0, 0.5, 1]:
        assert_masks(run(backend, empty, sparsity), [np.ones(e.shape, bool) for e in empty])
        assert_masks(run(backend, empty, sparsity, scope="per_tensor"),
                     [np.ones(e.shape, bool) for e in empty])
    assert_masks(run(backend, empty, pattern="2:4"), [np.ones(e.shape, bool) for e in empty])
    assert fastopt.prune_magnitude([], 0.5) == []
    assert fastopt.prune_magnitude([], pattern="2:4", out=[]) == []


def test_same_bits_any_threads_and_path(rng):
    """Exact selection: scalar/AVX2 paths and 1..3 threads give the same masks."""
    shapes = [(1_000_003,), (300, 301), (5,)]
    arrays = [values(rng, s, np.float32) for s in shapes]
    ties = [rng.choice(np.array([0.0, 1.0, 2.0]), size=(400_001,)).astype(np.float16)]
    calls = {
        "global": lambda: fastopt.prune_magnitude(arrays, 0.7),
        "per_tensor": lambda: fastopt.prune_magnitude(arrays, 0.7, scope="per_tensor"),
        "ties": lambda: fastopt.prune_magnitude(ties, 0.5),
        "2:4": lambda: fastopt.prune_magnitude([arrays[0][:1_000_000]], pattern="2:4"),
    }
    results = {}
    for path in ["scalar", "avx2"]:
        with using_cpu_path(path):
            for threads in [1, 2, 3]:
                with using_threads(threads):
                    results[path, threads] = {k: fn() for k, fn in calls.items()}
    first = results["scalar", 1]
    assert_masks(first["global"], reference.prune_magnitude(arrays, 0.7))
    assert_masks(first["ties"], reference.prune_magnitude(ties, 0.5))
    for where, got in results.items():
        for k in calls:
            assert_masks(got[k], first[k], f"{where} {k}")


# ---- bad input ---------------------------------------------------------------------------

def _bad_cases(x, x64, out):
    return [
        (lambda: fastopt.prune_magnitude([x]), TypeError, "sparsity: required"),
        (lambda: fastopt.prune_magnitude([x], 1.5, out=out), ValueError, "sparsity"),
        (lambda: fastopt.prune_magnitude([x], -0.1, out=out), ValueError, "sparsity"),
        (lambda: fastopt.prune_magnitude([x], "0.5", out=out), TypeError, "sparsity"),
        (lambda: fastopt.prune_magnitude([x], True, out=out), TypeError, "sparsity"),
        (lambda: fastopt.prune_magnitude([x], float("nan"), out=out), ValueError, "sparsity"),
        (lambda: fastopt.prune_magnitude([x], 0.5, scope="local", out=out), ValueError, "scope"),
        (lambda: fastopt.prune_magnitude([x], pattern=24, out=out), TypeError, "pattern"),
        (lambda: fastopt.prune_magnitude([x], pattern="2-4", out=out), ValueError, "pattern"),
        (lambda: fastopt.prune_magnitude([x], pattern="5:4", out=out), ValueError, "pattern"),
        (lambda: fastopt.prune_magnitude([x], pattern="0:0", out=out), ValueError, "pattern"),
        (lambda: fastopt.prune_magnitude([x], pattern="1:65", out=out), ValueError, "pattern"),
        (lambda: fastopt.prune_magnitude([x], 0.3, pattern="2:4", out=out), ValueError,
         "sparsity"),
        (lambda: fastopt.prune_magnitude([x], pattern="3:5", out=out), ValueError,
         r"arrays\[0\]: the last dimension"),
        (lambda: fastopt.prune_magnitude([x, x64], 0.5, out=out + out), TypeError,
         r"arrays\[1\]: dtype float64 differs"),
        (lambda: fastopt.prune_magnitude([x], 0.5, out=out[0]), TypeError, "out"),
        (lambda: fastopt.prune_magnitude(x, 0.5, out=out), TypeError, "out: arrays is one array"),
        (lambda: fastopt.prune_magnitude([x], 0.5, out=out + out), ValueError, "out"),
    ]


def test_bad_arguments_name_them_and_write_nothing(array_backend, rng):
    b = array_backend
    x = b.asarray(values(rng, (6, 8), np.float32))
    x64 = b.asarray(values(rng, (6, 8), np.float64))
    poison = np.full((6, 8), 0x55, np.uint8)
    out = [b.asarray(poison)]
    for call, exc, match in _bad_cases(x, x64, out):
        with pytest.raises(exc, match=match):
            call()
        assert (b.to_numpy(out[0]) == poison).all(), f"out written despite {match!r}"
    bad_outs = [
        (b.asarray(np.zeros((6, 7), np.uint8)), ValueError, r"out\[0\]: shape"),
        (b.asarray(np.zeros((6, 8), np.float32)), TypeError, r"out\[0\]: dtype float32"),
        (b.asarray(np.zeros((6, 16), np.uint8))[:, ::2], ValueError, r"out\[0\]"),
    ]
    for o, exc, match in bad_outs:
        before = b.to_numpy(o)
        with pytest.raises(exc, match=match):
            fastopt.prune_magnitude([x], 0.5, out=[o])
        assert (b.to_numpy(o) == before).all()
    with pytest.raises(TypeError, match=r"arrays\[0\]: dtype .*int32|arrays\[0\]: dtype <i4"):
        fastopt.prune_magnitude([b.asarray(np.ones(4, np.int32))], 0.5)
    with pytest.raises(ValueError, match=r"arrays\[0\]"):
        fastopt.prune_magnitude([b.asarray(values(rng, (6, 16), np.float32))[:, ::2]], 0.5)


def test_bad_host_layouts(rng):
    x = values(rng, (8,), np.float32)
    aliased = x.view(np.uint8)[:8]
    with pytest.raises(ValueError, match=r"out\[0\] overlaps arrays\[0\]"):
        fastopt.prune_magnitude([x], 0.5, out=[aliased])
    assert (x == x).all()
    read_only = np.zeros(8, bool)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[0\]: is read-only"):
        fastopt.prune_magnitude([x], 0.5, out=[read_only])
    with pytest.raises(ValueError, match=r"overlaps"):
        shared = np.zeros(8, bool)
        fastopt.prune_magnitude([x, x], 0.5, out=[shared, shared])


def test_private_bindings_check_sizes(rng):
    """fastopt._cpu called directly with inconsistent sizes raises, never reads or writes
    out of bounds."""
    x, y = values(rng, (10,), np.float32), values(rng, (4, 8), np.float32)
    mx, my = np.zeros(10, bool), np.zeros((4, 8), bool)
    cases = [
        (lambda: _cpu.prune_magnitude([x], [np.zeros(9, bool)], [1]), ValueError, r"out\[0\]: shape"),
        (lambda: _cpu.prune_magnitude([x, y], [mx], [1]), ValueError, "out: expected 2"),
        (lambda: _cpu.prune_magnitude([x, y], [mx, my], [1, 2, 3]), ValueError, "prune_counts"),
        (lambda: _cpu.prune_magnitude([x, y], [mx, my], [43]), ValueError, r"prune_counts\[0\]"),
        (lambda: _cpu.prune_magnitude([x, y], [mx, my], [11, 1]), ValueError, r"prune_counts\[0\]"),
        (lambda: _cpu.prune_magnitude([x, y], [mx, my], [1, -1]), ValueError, r"prune_counts\[1\]"),
        (lambda: _cpu.prune_magnitude([x], [mx], [True]), TypeError, r"prune_counts\[0\]"),
        (lambda: _cpu.prune_magnitude([x], [mx], [2**70]), ValueError, r"prune_counts\[0\]"),
        (lambda: _cpu.prune_magnitude([x], [mx], 1), TypeError, "prune_counts"),
        (lambda: _cpu.prune_magnitude(x, [mx], [1]), TypeError, "arrays"),
        (lambda: _cpu.prune_magnitude([x], [mx], [1], stream=1), ValueError, "stream"),
        (lambda: _cpu.prune_n_m([y], [my], 2, 0), ValueError, "m:"),
        (lambda: _cpu.prune_n_m([y], [my], 2, 65), ValueError, "m:"),
        (lambda: _cpu.prune_n_m([y], [my], 5, 4), ValueError, "n:"),
        (lambda: _cpu.prune_n_m([y], [my], -1, 4), ValueError, "n:"),
        (lambda: _cpu.prune_n_m([y], [my], 2, 3), ValueError, r"arrays\[0\]: the last"),
        (lambda: _cpu.prune_n_m([y], [my], 2.0, 4), TypeError, "n:"),
        (lambda: _cpu.prune_n_m([y], [mx], 2, 4), ValueError, r"out\[0\]: shape"),
    ]
    for call, exc, match in cases:
        mx[...] = True
        my[...] = True
        with pytest.raises(exc, match=match):
            call()
        assert mx.all() and my.all(), f"written despite {match!r}"


# ---- sizes past 2**31 -----------------------------------------------------------------------

def _enough_memory(nbytes: int) -> bool:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 0) > nbytes * 1.3
    except OSError:
        return False


BIG = 2**31 + 37  # past int32


@pytest.mark.slow
@pytest.mark.skipif(not _enough_memory(BIG * 3), reason="needs ~9 GB of free memory")
def test_large_array_past_2_pow_31_elements():
    """A float16 array of BIG elements after a small one, one global threshold: the exact
    count, no pruned |x| above a kept one, and the threshold's ties pruned earlier-first,
    checked in windows of the concatenation (each value repeats ~32768 times)."""
    rng = np.random.default_rng(2031)
    pattern = (rng.standard_normal(65_537) * 3).astype(np.float16)
    x = np.empty(BIG, np.float16)
    for lo in range(0, BIG, 1 << 28):
        hi = min(BIG, lo + (1 << 28))
        x[lo:hi] = np.resize(pattern[lo % pattern.size:], hi - lo)  # np.resize repeats
    small = pattern[:1000].copy()
    sparsity = 0.6
    masks = fastopt.prune_magnitude([small, x], sparsity)

    def windows():
        yield 0, np.abs(small.astype(np.float32)), masks[0]
        for lo in range(0, BIG, 1 << 26):
            hi = min(BIG, lo + (1 << 26))
            yield small.size + lo, np.abs(x[lo:hi].astype(np.float32)), masks[1][lo:hi]

    pruned, cut, kept_min = 0, 0.0, np.inf
    for _, a, m in windows():
        pruned += int(np.count_nonzero(~m))
        cut = max(cut, float(a[~m].max(initial=0)))
        kept_min = min(kept_min, float(a[m].min(initial=np.inf)))
    assert pruned == round(sparsity * (BIG + small.size))
    assert cut <= kept_min
    last_pruned_tie, first_kept_tie = -1, None
    for start, a, m in windows():
        tie = a == cut
        if (tie & ~m).any():
            last_pruned_tie = start + int(np.flatnonzero(tie & ~m)[-1])
        if first_kept_tie is None and (tie & m).any():
            first_kept_tie = start + int(np.flatnonzero(tie & m)[0])
    # the threshold splits a run of ties (the ordinal rule ran), ordered by position
    assert last_pruned_tie >= 0 and first_kept_tie is not None
    assert last_pruned_tie < first_kept_tie
