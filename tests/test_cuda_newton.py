"""The CUDA batched damped Newton path (``fastopt.newton_`` and ``fastopt.cholesky_solve`` on
CuPy arrays and PyTorch CUDA tensors).

* n <= 64 (one warp per system, the CPU's functions in the CPU's order): the GPU gives the
  CPU's bits for cholesky_solve and newton_ (with and without lr/damping, "raise" and
  "skip"), float32 and float64, batches of 1, 7, 1000 systems and a (3, 5) batch.
* n > 64 (one thread block per system; the CPU blocks its factorisation there, so only the
  values agree): within test_newton's tolerances of numpy.linalg.solve.
* Systems that are not positive definite: "raise" names the CPU's batch indices and leaves
  params bit-unchanged, "skip" returns the CPU's mask as a device boolean array and updates
  only the solved systems, damping rescues singular PSD matrices, cholesky_solve raises.
* H is never written and only its lower triangle is read; results are the input's library
  on its device; ``stream=`` and the library's current stream; zero batches; bad input
  raises naming the argument and writes nothing; Newton on per-group logistic regressions.

Every GPU test takes the ``lib`` fixture: it marks the test ``cuda`` and skips it where
CUDA is not usable or the library is missing, so each behaviour has one test body, run
once per array library. The tests at the end need no GPU.
"""
from __future__ import annotations

import contextlib
import types
from typing import Tuple

import numpy as np
import pytest

import fastopt

from backends import assert_bits
from conftest import DTYPES
from cuda_libs import FakeCudaArray, lib_fixture
from newton_cases import assert_close, solve64, spd

DTYPE_IDS = ["f32", "f64"]
NPD = fastopt.NotPositiveDefiniteError
# 31/32/33 and 63/64: around the warp width and the one-warp limit (kNewtonWarpMaxN = 64).
SMALL_N = [1, 2, 7, 8, 31, 32, 33, 64]
SMALL_BATCHES = [(1,), (7,), (1000,), (3, 5)]
# One thread block per system; (65, 300): more systems than the 264 blocks launched, so
# blocks loop over systems and reuse their scratch factor.
LARGE_CASES = [(65, 1), (65, 5), (200, 1), (200, 3), (65, 300)]


def shape_id(shape: Tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


lib = lib_fixture(scope="session")  # the adapters are in cuda_libs.py


# ---- helpers ------------------------------------------------------------------------------

def system(rng, batch_shape, n, dtype):
    """A random SPD system (as test_newton builds them) and params: (H, g, p)."""
    H = spd(rng, tuple(batch_shape), n, dtype)
    g = rng.standard_normal(tuple(batch_shape) + (n,)).astype(dtype)
    p = rng.standard_normal(tuple(batch_shape) + (n,)).astype(dtype)
    return H, g, p


def cpu_newton(p, g, H, **kwargs):
    """The CPU's newton_ on a copy of p: (new params, return value)."""
    q = p.copy()
    out = fastopt.newton_(q, g, H, **kwargs)
    return q, out


def newton64(p, g, H, lr=1.0, damping=0.0):
    """The float64 reference step of every system."""
    return p.astype(np.float64) - lr * solve64(H, g, damping)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def check_unchanged(lib, pairs, what="") -> None:
    """Each device array of (device array, host original) pairs still has its bits."""
    for k, (dev, host) in enumerate(pairs):
        assert_bits(lib.to_host(dev), host, f"{what} array #{k} was modified")


# A batch of 8 systems of which the flat indices 1 (indefinite: H - 5I), 4 (a negative
# diagonal entry) and 6 (all NaN) are not positive definite.
FAILING = (1, 4, 6)


def failing_system(rng, batch_shape, n, dtype):
    H, g, p = system(rng, batch_shape, n, dtype)
    flat = H.reshape(-1, n, n)  # a view: H is contiguous
    flat[1] -= 5 * np.eye(n, dtype=dtype)
    flat[4, 3, 3] = -1.0
    flat[6] = np.nan
    want = [tuple(int(i) for i in np.unravel_index(k, batch_shape)) for k in FAILING]
    return H, g, p, want


# ---- n <= 64: the CPU's bits --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch_shape", SMALL_BATCHES, ids=shape_id)
@pytest.mark.parametrize("n", SMALL_N)
def test_small_systems_match_cpu_bit_for_bit(lib, n, batch_shape, dtype, rng):
    H, g, p = system(rng, batch_shape, n, dtype)
    Hd, gd = lib.to_device(H), lib.to_device(g)
    name = dtype_name(dtype)
    for damping in (0.0, 0.25):
        what = f"cholesky_solve damping={damping}"
        d = fastopt.cholesky_solve(Hd, gd, damping=damping)
        lib.assert_result(d, gd, name, g.shape)
        got = lib.to_host(d)
        assert_bits(got, fastopt.cholesky_solve(H, g, damping=damping), f"{what} (GPU vs CPU)")
        assert_close(got, solve64(H, g, damping), dtype)
    for lr, damping in ((1.0, 0.0), (0.7, 0.1)):
        what = f"newton_ lr={lr} damping={damping}"
        want, _ = cpu_newton(p, g, H, lr=lr, damping=damping)
        pd = lib.to_device(p)
        assert fastopt.newton_(pd, gd, Hd, lr=lr, damping=damping) is None
        assert_bits(lib.to_host(pd), want, f"{what} raise (GPU vs CPU)")
        pd = lib.to_device(p)
        mask = fastopt.newton_(pd, gd, Hd, lr=lr, damping=damping, on_failure="skip")
        lib.assert_result(mask, pd, "bool", batch_shape)
        assert lib.to_host(mask).all()
        assert_bits(lib.to_host(pd), want, f"{what} skip (GPU vs CPU)")
        assert_close(lib.to_host(pd), newton64(p, g, H, lr, damping), dtype)
    check_unchanged(lib, [(Hd, H), (gd, g)], "input")


# ---- n > 64: close to numpy.linalg.solve --------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,batch", LARGE_CASES)
def test_large_systems_match_numpy(lib, n, batch, dtype, rng):
    H, g, p = system(rng, (batch,), n, dtype)
    Hd, gd = lib.to_device(H), lib.to_device(g)
    for damping in (0.0, 0.3):
        d = fastopt.cholesky_solve(Hd, gd, damping=damping)
        lib.assert_result(d, gd, dtype_name(dtype), g.shape)
        assert_close(lib.to_host(d), solve64(H, g, damping), dtype)
    for lr, damping in ((1.0, 0.0), (0.7, 0.1)):
        want = newton64(p, g, H, lr, damping)
        pd = lib.to_device(p)
        assert fastopt.newton_(pd, gd, Hd, lr=lr, damping=damping) is None
        assert_close(lib.to_host(pd), want, dtype)
        pd = lib.to_device(p)
        mask = fastopt.newton_(pd, gd, Hd, lr=lr, damping=damping, on_failure="skip")
        lib.assert_result(mask, pd, "bool", (batch,))
        assert lib.to_host(mask).all()
        assert_close(lib.to_host(pd), want, dtype)
    check_unchanged(lib, [(Hd, H), (gd, g)], "input")


# ---- what is read and written -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [7, 33, 64, 65, 200])
def test_only_the_lower_triangle_is_read_and_h_is_never_written(lib, n, dtype, rng):
    H, g, p = system(rng, (4,), n, dtype)
    gd = lib.to_device(g)
    Hd = lib.to_device(H)
    clean_d = lib.to_host(fastopt.cholesky_solve(Hd, gd, damping=0.1))
    pd = lib.to_device(p)
    fastopt.newton_(pd, gd, Hd, lr=0.5, damping=0.1)
    clean_p = lib.to_host(pd)
    if n <= 64:
        assert_bits(clean_d, fastopt.cholesky_solve(H, g, damping=0.1), "clean d (GPU vs CPU)")
        assert_bits(clean_p, cpu_newton(p, g, H, lr=0.5, damping=0.1)[0],
                    "clean params (GPU vs CPU)")
    upper = np.triu_indices(n, 1)
    for fill in ("nan", "garbage"):
        poisoned = H.copy()
        junk = (np.full((4, upper[0].size), np.nan) if fill == "nan"
                else rng.standard_normal((4, upper[0].size)) * 1e30)
        poisoned[..., upper[0], upper[1]] = junk.astype(dtype)
        Pd = lib.to_device(poisoned)
        assert_bits(lib.to_host(fastopt.cholesky_solve(Pd, gd, damping=0.1)), clean_d,
                    f"d with {fill} in the upper triangle")
        pd = lib.to_device(p)
        fastopt.newton_(pd, gd, Pd, lr=0.5, damping=0.1)
        assert_bits(lib.to_host(pd), clean_p, f"params with {fill} in the upper triangle")
        pd = lib.to_device(p)
        mask = fastopt.newton_(pd, gd, Pd, lr=0.5, damping=0.1, on_failure="skip")
        assert lib.to_host(mask).all()
        assert_bits(lib.to_host(pd), clean_p, f"params (skip) with {fill} in the upper triangle")
        check_unchanged(lib, [(Pd, poisoned)], f"hessians with {fill}")
    check_unchanged(lib, [(Hd, H), (gd, g)], "input")


# ---- systems that are not positive definite -----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch_shape", [(8,), (2, 4)], ids=shape_id)
@pytest.mark.parametrize("n", [10, 70])
def test_on_failure_raise_names_the_cpus_systems_and_changes_nothing(lib, n, batch_shape,
                                                                     dtype, rng):
    H, g, p, want = failing_system(rng, batch_shape, n, dtype)
    with pytest.raises(NPD) as on_cpu:
        fastopt.newton_(p.copy(), g, H, lr=0.5)
    assert on_cpu.value.indices == want
    Hd, gd, pd = lib.to_device(H), lib.to_device(g), lib.to_device(p)
    with pytest.raises(NPD, match="3 of 8") as on_gpu:
        fastopt.newton_(pd, gd, Hd, lr=0.5)
    assert isinstance(on_gpu.value, ValueError)
    assert on_gpu.value.indices == want
    assert str(on_gpu.value) == str(on_cpu.value)
    lib.synchronize()  # anything queued before the error has landed
    check_unchanged(lib, [(pd, p), (Hd, H), (gd, g)], "after the error:")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch_shape", [(8,), (2, 4)], ids=shape_id)
@pytest.mark.parametrize("n", [10, 70])
def test_on_failure_skip_updates_only_solved_systems(lib, n, batch_shape, dtype, rng):
    H, g, p, _ = failing_system(rng, batch_shape, n, dtype)
    want_p, want_mask = cpu_newton(p, g, H, lr=0.5, damping=0.0, on_failure="skip")
    assert want_mask.shape == batch_shape and int((~want_mask).sum()) == len(FAILING)
    Hd, gd, pd = lib.to_device(H), lib.to_device(g), lib.to_device(p)
    mask = fastopt.newton_(pd, gd, Hd, lr=0.5, on_failure="skip")
    lib.assert_result(mask, pd, "bool", batch_shape)
    got_mask, got_p = lib.to_host(mask), lib.to_host(pd)
    assert_bits(got_mask, want_mask, "mask (GPU vs CPU)")
    assert_bits(got_p[~want_mask], p[~want_mask], "params of the failed systems")
    if n <= 64:
        assert_bits(got_p, want_p, "params (GPU vs CPU)")
    else:
        assert_close(got_p, want_p, dtype)
    assert_close(got_p[want_mask],
                 newton64(p[want_mask], g[want_mask], H[want_mask], 0.5), dtype)
    check_unchanged(lib, [(Hd, H), (gd, g)], "input")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [10, 70])
def test_cholesky_solve_raises_naming_failed_systems(lib, n, dtype, rng):
    H, g, _, want = failing_system(rng, (2, 4), n, dtype)
    with pytest.raises(NPD) as on_cpu:
        fastopt.cholesky_solve(H, g)
    Hd, gd = lib.to_device(H), lib.to_device(g)
    with pytest.raises(NPD, match="3 of 8") as on_gpu:
        fastopt.cholesky_solve(Hd, gd)
    assert on_gpu.value.indices == want == on_cpu.value.indices
    assert str(on_gpu.value) == str(on_cpu.value)
    check_unchanged(lib, [(Hd, H), (gd, g)], "input")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_damping_solves_singular_psd_systems(lib, dtype, rng):
    n, rank = 12, 5
    A = rng.standard_normal((30, n, rank))
    H = (A @ np.swapaxes(A, -1, -2)).astype(dtype)  # PSD, rank 5: singular
    g = rng.standard_normal((30, n)).astype(dtype)
    p = rng.standard_normal((30, n)).astype(dtype)
    Hd, gd = lib.to_device(H), lib.to_device(g)
    shifted = (H.astype(np.float64) - 1e-3 * np.eye(n)).astype(dtype)
    with pytest.raises(NPD) as on_cpu:
        fastopt.cholesky_solve(shifted, g)
    with pytest.raises(NPD) as on_gpu:
        fastopt.cholesky_solve(lib.to_device(shifted), gd)
    assert str(on_gpu.value) == str(on_cpu.value)
    d = lib.to_host(fastopt.cholesky_solve(Hd, gd, damping=0.5))
    assert_bits(d, fastopt.cholesky_solve(H, g, damping=0.5), "d (GPU vs CPU)")
    assert_close(d, solve64(H, g, damping=0.5), dtype)
    pd = lib.to_device(p)
    fastopt.newton_(pd, gd, Hd, lr=0.8, damping=0.5)
    assert_bits(lib.to_host(pd), cpu_newton(p, g, H, lr=0.8, damping=0.5)[0], "params (GPU vs CPU)")
    check_unchanged(lib, [(Hd, H), (gd, g)], "input")


# ---- zero batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 100])
@pytest.mark.parametrize("batch_shape", [(0,), (3, 0)], ids=shape_id)
def test_zero_batch_is_a_noop(lib, batch_shape, n):
    g = np.empty(batch_shape + (n,))
    pd, gd, Hd = lib.to_device(g), lib.to_device(g), lib.to_device(np.empty(batch_shape + (n, n)))
    assert fastopt.newton_(pd, gd, Hd) is None
    mask = fastopt.newton_(pd, gd, Hd, on_failure="skip")
    lib.assert_result(mask, pd, "bool", batch_shape)
    d = fastopt.cholesky_solve(Hd, gd)
    lib.assert_result(d, gd, "float64", batch_shape + (n,))


# ---- streams ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [16, 100])
@pytest.mark.parametrize("call", ["newton_ raise", "newton_ skip", "cholesky_solve"])
@pytest.mark.parametrize("how", ["stream=", "current stream"])
def test_runs_on_the_given_stream(lib, how, call, n, rng):
    """The inputs are written on a side stream behind ~0.1 s of work, then the call runs on
    that stream, named by ``stream=`` or made the library's current stream. A kernel -- or a
    wait for the solved flags, or the mask's conversion -- on any other stream would see the
    stale data written before. Every result is compared with the same call on synchronized
    inputs; systems that fail must be named exactly."""
    batch, dtype, bad = 64, np.float64, 3
    H, g, p = system(rng, (batch,), n, dtype)
    H_bad = H.copy()
    H_bad[bad] -= 5 * np.eye(n)
    stale = system(rng, (batch,), n, dtype)  # other valid systems

    # Expected results: the GPU on synchronized inputs (the CPU's bits for n <= 64).
    Hd0, gd0 = lib.to_device(H), lib.to_device(g)
    want_d = lib.to_host(fastopt.cholesky_solve(Hd0, gd0))
    pd0 = lib.to_device(p)
    fastopt.newton_(pd0, gd0, Hd0, lr=0.7)
    want_p = lib.to_host(pd0)
    pd0 = lib.to_device(p)
    want_mask = lib.to_host(fastopt.newton_(pd0, gd0, lib.to_device(H_bad), lr=0.7,
                                            on_failure="skip"))
    want_p_skip = lib.to_host(pd0)
    assert int((~want_mask).sum()) == 1 and not want_mask[bad]

    Hd, gd, pd = (lib.to_device(a) for a in stale)
    H_src, H_bad_src, g_src, p_src = (lib.to_device(a) for a in (H, H_bad, g, p))
    lib.synchronize()
    stream = lib.side_stream()
    kwargs = {"stream": stream} if how == "stream=" else {}
    scope = (lambda: lib.current(stream)) if how == "current stream" else contextlib.nullcontext

    def write_late(hessians_src):
        lib.write_late(stream, [(Hd, hessians_src), (gd, g_src), (pd, p_src)])

    if call == "newton_ raise":
        write_late(H_src)
        with scope():
            assert fastopt.newton_(pd, gd, Hd, lr=0.7, **kwargs) is None  # waits for its stream
        stream.synchronize()
        assert_bits(lib.to_host(pd), want_p, "params")
        write_late(H_bad_src)
        with scope():
            with pytest.raises(NPD, match="1 of 64") as info:
                fastopt.newton_(pd, gd, Hd, lr=0.7, **kwargs)
        assert info.value.indices == [(bad,)]
        stream.synchronize()
        assert_bits(lib.to_host(pd), p, "params after the error")
    elif call == "newton_ skip":
        write_late(H_bad_src)
        with scope():
            mask = fastopt.newton_(pd, gd, Hd, lr=0.7, on_failure="skip", **kwargs)  # no wait
        stream.synchronize()
        lib.assert_result(mask, pd, "bool", (batch,))
        assert_bits(lib.to_host(mask), want_mask, "mask")
        assert_bits(lib.to_host(pd), want_p_skip, "params")
    else:
        write_late(H_src)
        with scope():
            d = fastopt.cholesky_solve(Hd, gd, **kwargs)  # waits for its stream
        stream.synchronize()
        lib.assert_result(d, gd, "float64", (batch, n))
        assert_bits(lib.to_host(d), want_d, "d")
        write_late(H_bad_src)
        with scope():
            with pytest.raises(NPD, match="1 of 64") as info:
                fastopt.cholesky_solve(Hd, gd, **kwargs)
        assert info.value.indices == [(bad,)]
        stream.synchronize()
    assert_bits(lib.to_host(gd), g, "grads")


# ---- bad input ----------------------------------------------------------------------------

def bad_input_arrays(lib, rng) -> types.SimpleNamespace:
    """The arrays of BAD_INPUTS (5 systems of n = 4): contiguous device allocations (the
    cases take views of them) and host arrays of the library's CPU kind."""
    H, g, p = system(rng, (5,), 4, np.float64)
    put = lib.to_device
    return types.SimpleNamespace(
        H=put(H), g=put(g), p=put(p),
        H32=put(H.astype(np.float32)), g32=put(g.astype(np.float32)),
        p32=put(p.astype(np.float32)), p16=put(p.astype(np.float16)),
        p_i32=put(rng.integers(-5, 5, (5, 4)).astype(np.int32)),
        H_wide=put(np.repeat(H, 2, axis=-1)), g_wide=put(np.repeat(g, 2, axis=-1)),
        p_wide=put(np.repeat(p, 2, axis=-1)),
        H_host=lib.host_array(H), g_host=lib.host_array(g), p_host=lib.host_array(p),
    )


newton_, chol = fastopt.newton_, fastopt.cholesky_solve
# The CPU says "params: overlaps grads in memory"; a binding check may name either side.
OVERLAP = r"(params:? overlaps (grads|hessians)|(grads|hessians):? overlaps params)"

# (id, call(arrays), exception, regex the message must match)
BAD_INPUTS = [
    # dtypes
    ("grads float32", lambda a: newton_(a.p, a.g32, a.H), TypeError,
     "^grads: dtype float32 differs"),
    ("params float32", lambda a: newton_(a.p32, a.g, a.H), TypeError,
     "^params: dtype float32 differs"),
    ("hessians float32", lambda a: newton_(a.p, a.g, a.H32), TypeError,
     "differs from hessians' float32"),
    ("params float16", lambda a: newton_(a.p16, a.g, a.H), TypeError,
     "^params: dtype float16 is not supported"),
    ("params int32", lambda a: newton_(a.p_i32, a.g, a.H), TypeError, "^params: dtype"),
    ("cholesky_solve grads float32", lambda a: chol(a.H, a.g32), TypeError,
     "^grads: dtype float32 differs"),
    # shapes
    ("hessians shape", lambda a: newton_(a.p, a.g, a.H[:, :3]), ValueError,
     "^hessians: expected shape"),
    ("params shape", lambda a: newton_(a.p[:, :3], a.g, a.H), ValueError, "^params: shape"),
    ("n = 0", lambda a: newton_(a.p[:, :0], a.g[:, :0], a.H[:, :0, :0]), ValueError,
     "^grads: n ="),
    ("cholesky_solve hessians shape", lambda a: chol(a.H.reshape(5, 16), a.g), ValueError,
     "^hessians: expected shape"),
    ("cholesky_solve 0-d grads", lambda a: chol(a.H, a.g[0, 0]), ValueError,
     "^grads: expected shape"),
    # host arrays mixed in
    ("host grads", lambda a: newton_(a.p, a.g_host, a.H), TypeError, "^grads: "),
    ("host hessians", lambda a: newton_(a.p, a.g, a.H_host), TypeError, "^hessians: "),
    ("host params and grads", lambda a: newton_(a.p_host, a.g_host, a.H), TypeError,
     "^hessians: is a CUDA array"),
    ("host params and hessians", lambda a: newton_(a.p_host, a.g, a.H_host), TypeError,
     "^grads: is a CUDA array"),
    ("cholesky_solve host grads", lambda a: chol(a.H, a.g_host), TypeError, "^grads: "),
    ("cholesky_solve host hessians", lambda a: chol(a.H_host, a.g), TypeError,
     "^grads: is a CUDA array"),
    # params overlapping an input
    ("params is grads", lambda a: newton_(a.p, a.p, a.H), ValueError, OVERLAP),
    ("params inside hessians", lambda a: newton_(a.H.reshape(-1)[:20].reshape(5, 4), a.g, a.H),
     ValueError, OVERLAP),
    # non-contiguous arrays
    ("strided params", lambda a: newton_(a.p_wide[:, ::2], a.g, a.H), ValueError,
     "^params: must be C-contiguous"),
    ("strided params skip",
     lambda a: newton_(a.p_wide[:, ::2], a.g, a.H, on_failure="skip"), ValueError,
     "^params: must be C-contiguous"),
    ("strided grads", lambda a: newton_(a.p, a.g_wide[:, ::2], a.H), ValueError,
     "^grads: must be C-contiguous"),
    ("strided hessians", lambda a: newton_(a.p, a.g, a.H_wide[..., ::2]), ValueError,
     "^hessians: must be C-contiguous"),
    ("cholesky_solve strided hessians", lambda a: chol(a.H_wide[..., ::2], a.g), ValueError,
     "^hessians: must be C-contiguous"),
    ("cholesky_solve strided grads", lambda a: chol(a.H, a.g_wide[:, ::2]), ValueError,
     "^grads: must be C-contiguous"),
    # hyper-parameters and streams
    ("negative damping", lambda a: newton_(a.p, a.g, a.H, damping=-1.0), ValueError,
     "^damping"),
    ("NaN damping", lambda a: chol(a.H, a.g, damping=np.nan), ValueError, "^damping"),
    ("negative lr", lambda a: newton_(a.p, a.g, a.H, lr=-0.1), ValueError, "^lr"),
    ("on_failure", lambda a: newton_(a.p, a.g, a.H, on_failure="ignore"), ValueError,
     "^on_failure"),
    ("stream str", lambda a: newton_(a.p, a.g, a.H, stream="0"), TypeError, "^stream: "),
    ("stream negative", lambda a: newton_(a.p, a.g, a.H, stream=-1), ValueError, "^stream: "),
    ("cholesky_solve stream negative", lambda a: chol(a.H, a.g, stream=-1), ValueError,
     "^stream: "),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_changes_nothing(lib, call, exc, match, rng):
    arrays = bad_input_arrays(lib, rng)
    before = {k: lib.to_host(v) for k, v in vars(arrays).items()}
    with pytest.raises(exc, match=match):
        call(arrays)
    lib.synchronize()  # anything queued before the error has landed
    for k, v in vars(arrays).items():
        assert_bits(lib.to_host(v), before[k], f"{k} was modified")


# ---- an application -----------------------------------------------------------------------

def test_newton_solves_logistic_regression_in_under_10_iterations(lib):
    """test_newton's per-group logistic regressions (16 independent problems, n = 6) solved
    on the GPU: every iterate has the CPU's bits, and 10 iterations reach the float64
    reference optimum."""
    rng = np.random.default_rng(7)
    groups, samples, n = 16, 400, 6
    X = rng.standard_normal((groups, samples, n))
    w_true = rng.standard_normal((groups, n))
    y = (rng.random((groups, samples)) < 1 / (1 + np.exp(-np.einsum("gsn,gn->gs", X, w_true))))
    lam = 1e-2

    def grad_hess(w):
        s = 1 / (1 + np.exp(-np.einsum("gsn,gn->gs", X, w)))
        g = np.einsum("gsn,gs->gn", X, s - y) / samples + lam * w
        H = np.einsum("gsn,gs,gsm->gnm", X, s * (1 - s), X) / samples + lam * np.eye(n)
        return g, H

    w_opt = np.zeros((groups, n))
    for _ in range(50):
        g, H = grad_hess(w_opt)
        w_opt -= np.linalg.solve(H, g[..., None])[..., 0]
    w_cpu = np.zeros((groups, n))
    wd = lib.to_device(w_cpu)
    for it in range(10):
        g, H = grad_hess(w_cpu)
        fastopt.newton_(w_cpu, g, H)
        assert fastopt.newton_(wd, lib.to_device(g), lib.to_device(H)) is None
        assert_bits(lib.to_host(wd), w_cpu, f"iterate {it + 1} (GPU vs CPU)")
    w = lib.to_host(wd)
    np.testing.assert_allclose(w, w_opt, rtol=1e-9, atol=1e-9)
    assert np.abs(grad_hess(w)[0]).max() < 1e-10


# ---- without a GPU ------------------------------------------------------------------------

_H, _G, _P = system(np.random.default_rng(11), (4,), 6, np.float32)

# name: (call(fake CUDA array), the argument the error names)
FAKE_CALLS = {
    "newton_ params": (lambda f, p: fastopt.newton_(f, _G, _H), "params"),
    "newton_ grads": (lambda f, p: fastopt.newton_(p, f, _H), "grads"),
    "newton_ hessians": (lambda f, p: fastopt.newton_(p, _G, f), "hessians"),
    "cholesky_solve hessians": (lambda f, p: fastopt.cholesky_solve(f, _G), "hessians"),
    "cholesky_solve grads": (lambda f, p: fastopt.cholesky_solve(_H, f), "grads"),
}


@pytest.mark.skipif(fastopt.cuda_available(), reason="checks the refusal when CUDA is not usable")
@pytest.mark.parametrize("func", list(FAKE_CALLS))
def test_cuda_input_without_usable_cuda_raises_type_error(func):
    call, name = FAKE_CALLS[func]
    p = _P.copy()
    with pytest.raises(TypeError, match=f"^{name}: is a CUDA array, but CUDA is not usable"):
        call(FakeCudaArray(), p)
    assert_bits(p, _P, "params were modified")


# name: (call(stream, params), the argument the error names)
HOST_STREAM_CALLS = {
    "newton_": (lambda s, p: fastopt.newton_(p, _G, _H, stream=s), "params"),
    "newton_ skip": (lambda s, p: fastopt.newton_(p, _G, _H, on_failure="skip", stream=s),
                     "params"),
    "cholesky_solve": (lambda s, p: fastopt.cholesky_solve(_H, _G, stream=s), "hessians"),
}


@pytest.mark.parametrize("stream", [0, types.SimpleNamespace(cuda_stream=0)],
                         ids=["int", "stream object"])
@pytest.mark.parametrize("func", list(HOST_STREAM_CALLS))
def test_stream_with_host_input_is_rejected(func, stream):
    call, name = HOST_STREAM_CALLS[func]
    p = _P.copy()
    with pytest.raises(ValueError,
                       match=f"^stream: only applies to CUDA arrays; {name} is a host array"):
        call(stream, p)
    assert_bits(p, _P, "params were modified")
