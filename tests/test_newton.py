"""Batched damped Newton / Cholesky (``fastopt.newton_``, ``fastopt.cholesky_solve``), one
test body per behaviour on every backend (the ``backend`` fixture: the CPU's scalar and
AVX2 paths, CuPy, PyTorch CUDA).

* Against numpy.linalg.solve and the float64 reference: cholesky_solve and newton_ (with
  and without lr/damping, "raise" and "skip"), float32 and float64, single systems to
  batches of 10_000, leading batch dimensions. On a GPU, for n <= 64 (one warp per system,
  the CPU's functions in the CPU's order) also the CPU's bits; for n > 64 (one thread block
  per system; the CPU blocks its factorisation there) the values agree.
* Systems that are not positive definite: "raise" names the batch indices (on a GPU: the
  CPU's message) and leaves params bit-unchanged, "skip" returns the mask (an array of the
  input's kind) and updates only the solved systems, damping rescues singular PSD
  matrices, cholesky_solve raises.
* H is never written and only its lower triangle is read; results of the input's kind;
  zero batches; bad input raises naming the argument and writes nothing; Newton on
  per-group logistic regressions.
* CPU only: scalar and AVX2 paths and thread counts agree bit for bit, one large system,
  NumPy-only layouts. test_cuda_newton.py has what only the GPU has (streams, host arrays
  among CUDA ones).
"""
import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import CPU, assert_bits, host_matching_cpu
from conftest import DTYPES, using_cpu_path
from newton_cases import (FAILING, assert_close, bad_input_arrays, failing_system, newton64,
                          solve64, spd, system)

DTYPE_IDS = ["f32", "f64"]
NPD = fastopt.NotPositiveDefiniteError
newton_, chol = fastopt.newton_, fastopt.cholesky_solve


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def cpu_newton(p, g, H, **kwargs):
    """The CPU's newton_ on a copy of p: (new params, return value)."""
    q = p.copy()
    out = newton_(q, g, H, **kwargs)
    return q, out


def bits_on_gpu(n: int, call):
    """``call`` for host_matching_cpu where the GPU must give the CPU's bits (n <= 64), else
    None (the values are compared instead)."""
    return call if n <= 64 else None


def check_unchanged(backend, pairs, what="") -> None:
    """Each array of (array of ``backend``, NumPy original) pairs still has its bits."""
    for k, (arr, host) in enumerate(pairs):
        assert_bits(backend.to_numpy(arr), host, f"{what} array #{k} was modified")


# ---- against numpy.linalg.solve (and the CPU) ---------------------------------------------

# (n, batch shape): single systems to 10_000 of them; 31/32/33 and 63/64 around the warp
# width and the GPU's one-warp limit (n <= 64); past it, one thread block per system, and
# (65, 300): more systems than the 264 blocks launched, so blocks loop over systems and
# reuse their scratch factor.
SYSTEM_CASES = sorted({(1, (1,)), (2, (10_000,)), (7, (33,)), (8, (1000,)), (31, (7,)),
                       (32, (300,)), (33, (5,)), (64, (40,)), (65, (3,)), (200, (2,))} |
                      {(n, b) for n in [1, 2, 7, 8, 31, 32, 33, 64]
                       for b in [(1,), (7,), (1000,), (3, 5)]} |
                      {(65, (1,)), (65, (5,)), (200, (1,)), (200, (3,)), (65, (300,))})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,batch_shape", SYSTEM_CASES,
                         ids=[f"n{n}-{shape_id(b)}" for n, b in SYSTEM_CASES])
def test_systems_match_numpy(backend, n, batch_shape, dtype, rng):
    H, g, p = system(rng, batch_shape, n, dtype)
    Hd, gd = backend.asarray(H), backend.asarray(g)
    name = np.dtype(dtype).name
    for damping in (0.0, 0.25, 0.3):
        what = f"cholesky_solve damping={damping}"
        d = chol(Hd, gd, damping=damping)
        backend.assert_result(d, gd, name, g.shape)
        got = host_matching_cpu(backend, d,
                                bits_on_gpu(n, lambda dp=damping: chol(H, g, damping=dp)), what)
        assert_close(got, solve64(H, g, damping), dtype)
    for lr, damping in ((1.0, 0.0), (0.7, 0.1)):
        what = f"newton_ lr={lr} damping={damping}"
        want = newton64(p, g, H, lr, damping)
        on_cpu = bits_on_gpu(n, lambda lr=lr, dp=damping: cpu_newton(p, g, H, lr=lr,
                                                                     damping=dp)[0])
        pd = backend.asarray(p)
        assert newton_(pd, gd, Hd, lr=lr, damping=damping) is None
        assert_close(host_matching_cpu(backend, pd, on_cpu, f"{what} raise"), want, dtype)
        pd = backend.asarray(p)
        mask = newton_(pd, gd, Hd, lr=lr, damping=damping, on_failure="skip")
        backend.assert_result(mask, pd, "bool", batch_shape)
        assert backend.to_numpy(mask).all()
        assert_close(host_matching_cpu(backend, pd, on_cpu, f"{what} skip"), want, dtype)
    check_unchanged(backend, [(Hd, H), (gd, g)], "input")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_newton_step_with_leading_batch_dims_matches_reference(backend, dtype, rng):
    H, g, p = system(rng, (3, 4), 9, dtype)
    ref = p.astype(np.float64)
    pd = backend.asarray(p)
    assert newton_(pd, backend.asarray(g), backend.asarray(H), lr=0.7, damping=0.1) is None
    ok = reference.damped_newton_step(ref, g.astype(np.float64), H.astype(np.float64), lr=0.7,
                                      damping=0.1)
    assert ok.all()
    got = host_matching_cpu(backend, pd,
                            lambda: cpu_newton(p, g, H, lr=0.7, damping=0.1)[0], "params")
    assert_close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 9, 64, 130, 300])
def test_scalar_and_avx2_paths_and_threads_agree_bit_for_bit(n, dtype):
    rng = np.random.default_rng(n)
    batch = 1 if n > 64 else 50  # one large system exercises the row-parallel path
    H = spd(rng, (batch,), n, dtype)
    g = rng.standard_normal((batch, n)).astype(dtype)
    results = []
    for path in ["scalar", "avx2"]:
        with using_cpu_path(path):
            for threads in [1, 2]:
                old = fastopt.get_num_threads()
                fastopt.set_num_threads(threads)
                try:
                    results.append(fastopt.cholesky_solve(H, g))
                finally:
                    fastopt.set_num_threads(old)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("n", [500, 1000])
def test_large_single_system(n):
    rng = np.random.default_rng(n)
    H = spd(rng, (), n, np.float64)
    g = rng.standard_normal(n)
    assert_close(fastopt.cholesky_solve(H, g), solve64(H, g), np.float64)


# ---- what is read and written -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,batch", [(7, 4), (33, 4), (64, 4), (65, 4), (70, 20), (200, 4)])
def test_only_the_lower_triangle_is_read_and_h_is_never_written(backend, n, batch, dtype, rng):
    H, g, p = system(rng, (batch,), n, dtype)
    gd, Hd = backend.asarray(g), backend.asarray(H)
    clean_d = host_matching_cpu(backend, chol(Hd, gd, damping=0.1),
                                bits_on_gpu(n, lambda: chol(H, g, damping=0.1)), "clean d")
    pd = backend.asarray(p)
    newton_(pd, gd, Hd, lr=0.5, damping=0.1)
    clean_p = host_matching_cpu(backend, pd, bits_on_gpu(n, lambda: cpu_newton(
        p, g, H, lr=0.5, damping=0.1)[0]), "clean params")
    upper = np.triu_indices(n, 1)
    for fill in ("nan", "garbage"):
        poisoned = H.copy()
        junk = (np.full((batch, upper[0].size), np.nan) if fill == "nan"
                else rng.standard_normal((batch, upper[0].size)) * 1e30)
        poisoned[..., upper[0], upper[1]] = junk.astype(dtype)
        Pd = backend.asarray(poisoned)
        assert_bits(backend.to_numpy(chol(Pd, gd, damping=0.1)), clean_d,
                    f"d with {fill} in the upper triangle")
        pd = backend.asarray(p)
        newton_(pd, gd, Pd, lr=0.5, damping=0.1)
        assert_bits(backend.to_numpy(pd), clean_p, f"params with {fill} in the upper triangle")
        pd = backend.asarray(p)
        mask = newton_(pd, gd, Pd, lr=0.5, damping=0.1, on_failure="skip")
        assert backend.to_numpy(mask).all()
        assert_bits(backend.to_numpy(pd), clean_p,
                    f"params (skip) with {fill} in the upper triangle")
        check_unchanged(backend, [(Pd, poisoned)], f"hessians with {fill}")
    check_unchanged(backend, [(Hd, H), (gd, g)], "input")


# ---- systems that are not positive definite -----------------------------------------------

FAILING_SHAPES = [(6,), (8,), (2, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch_shape", FAILING_SHAPES, ids=shape_id)
@pytest.mark.parametrize("n", [10, 70])
def test_on_failure_raise_names_systems_and_changes_nothing(backend, n, batch_shape, dtype,
                                                            rng):
    H, g, p, want = failing_system(rng, batch_shape, n, dtype)
    size = int(np.prod(batch_shape))
    Hd, gd, pd = backend.asarray(H), backend.asarray(g), backend.asarray(p)
    with pytest.raises(NPD, match=f"{len(want)} of {size}") as info:
        newton_(pd, gd, Hd, lr=0.5)
    assert isinstance(info.value, ValueError)
    assert info.value.indices == want
    if backend.is_cuda:
        with CPU.activate(), pytest.raises(NPD) as on_cpu:
            newton_(p.copy(), g, H, lr=0.5)
        assert on_cpu.value.indices == want
        assert str(info.value) == str(on_cpu.value)
    check_unchanged(backend, [(pd, p), (Hd, H), (gd, g)], "after the error:")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch_shape", FAILING_SHAPES, ids=shape_id)
@pytest.mark.parametrize("n", [10, 70])
def test_on_failure_skip_updates_only_solved_systems(backend, n, batch_shape, dtype, rng):
    H, g, p, _ = failing_system(rng, batch_shape, n, dtype)
    size = int(np.prod(batch_shape))
    want_mask = np.ones(size, bool)
    want_mask[[k for k in FAILING if k < size]] = False
    want_mask = want_mask.reshape(batch_shape)
    # the reference's step of the systems without NaN (numpy.linalg refuses NaN)
    flat_H = H.reshape(-1, n, n).astype(np.float64)
    finite = ~np.isnan(flat_H).any(axis=(1, 2))
    ref, ref_mask = p.astype(np.float64).reshape(-1, n), np.zeros(size, bool)
    ref_finite = ref[finite]
    ref_mask[finite] = reference.damped_newton_step(
        ref_finite, g.reshape(-1, n)[finite].astype(np.float64), flat_H[finite], lr=0.5)
    ref[finite] = ref_finite
    ref = ref.reshape(p.shape)
    assert_bits(ref_mask.reshape(batch_shape), want_mask, "the reference's mask")
    Hd, gd, pd = backend.asarray(H), backend.asarray(g), backend.asarray(p)
    mask = newton_(pd, gd, Hd, lr=0.5, on_failure="skip")
    backend.assert_result(mask, pd, "bool", batch_shape)
    got_mask = host_matching_cpu(backend, mask, lambda: cpu_newton(
        p, g, H, lr=0.5, damping=0.0, on_failure="skip")[1], "mask")
    assert_bits(got_mask, want_mask, "mask")
    got_p = host_matching_cpu(backend, pd, bits_on_gpu(n, lambda: cpu_newton(
        p, g, H, lr=0.5, damping=0.0, on_failure="skip")[0]), "params")
    if backend.is_cuda and n > 64:
        with CPU.activate():
            assert_close(got_p, cpu_newton(p, g, H, lr=0.5, on_failure="skip")[0], dtype)
    assert_bits(got_p[~want_mask], p[~want_mask], "params of the failed systems")
    assert_close(got_p, ref, dtype)
    assert_close(got_p[want_mask],
                 newton64(p[want_mask], g[want_mask], H[want_mask], 0.5), dtype)
    check_unchanged(backend, [(Hd, H), (gd, g)], "input")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [10, 70])
def test_cholesky_solve_raises_naming_failed_systems(backend, n, dtype, rng):
    H, g, _, want = failing_system(rng, (2, 4), n, dtype)
    Hd, gd = backend.asarray(H), backend.asarray(g)
    with pytest.raises(NPD, match="3 of 8") as info:
        chol(Hd, gd)
    assert info.value.indices == want
    if backend.is_cuda:
        with CPU.activate(), pytest.raises(NPD) as on_cpu:
            chol(H, g)
        assert on_cpu.value.indices == want
        assert str(info.value) == str(on_cpu.value)
    check_unchanged(backend, [(Hd, H), (gd, g)], "input")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_damping_solves_singular_psd_systems(backend, dtype, rng):
    n, rank = 12, 5
    A = rng.standard_normal((30, n, rank))
    H = (A @ np.swapaxes(A, -1, -2)).astype(dtype)  # PSD, rank 5: singular
    g = rng.standard_normal((30, n)).astype(dtype)
    p = rng.standard_normal((30, n)).astype(dtype)
    Hd, gd = backend.asarray(H), backend.asarray(g)
    shifted64 = H.astype(np.float64) - 1e-3 * np.eye(n)
    for shifted, grads in ((shifted64, g.astype(np.float64)), (shifted64.astype(dtype), g)):
        with pytest.raises(NPD) as info:
            chol(backend.asarray(shifted), backend.asarray(grads))
        if backend.is_cuda:
            with CPU.activate(), pytest.raises(NPD) as on_cpu:
                chol(shifted, grads)
            assert str(info.value) == str(on_cpu.value)
    d = host_matching_cpu(backend, chol(Hd, gd, damping=0.5),
                          lambda: chol(H, g, damping=0.5), "d")
    assert_close(d, solve64(H, g, damping=0.5), dtype)
    pd = backend.asarray(p)
    newton_(pd, gd, Hd, lr=0.8, damping=0.5)
    host_matching_cpu(backend, pd, lambda: cpu_newton(p, g, H, lr=0.8, damping=0.5)[0],
                      "params")
    check_unchanged(backend, [(Hd, H), (gd, g)], "input")


def test_nan_hessian_is_a_failure_not_a_crash(backend):
    H = backend.asarray(np.stack([np.eye(3), np.full((3, 3), np.nan)]))
    p = backend.asarray(np.ones((2, 3)))
    mask = newton_(p, backend.asarray(np.ones((2, 3))), H, on_failure="skip")
    np.testing.assert_array_equal(backend.to_numpy(mask), [True, False])
    np.testing.assert_array_equal(backend.to_numpy(p), [[0, 0, 0], [1, 1, 1]])


# ---- zero batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 100])
@pytest.mark.parametrize("batch_shape", [(0,), (3, 0)], ids=shape_id)
def test_zero_batch_is_a_noop(backend, batch_shape, n):
    g = np.empty(batch_shape + (n,))
    pd, gd = backend.asarray(g), backend.asarray(g)
    Hd = backend.asarray(np.empty(batch_shape + (n, n)))
    assert newton_(pd, gd, Hd) is None
    mask = newton_(pd, gd, Hd, on_failure="skip")
    backend.assert_result(mask, pd, "bool", batch_shape)
    d = chol(Hd, gd)
    backend.assert_result(d, gd, "float64", batch_shape + (n,))


# ---- bad input ----------------------------------------------------------------------------

# The CPU says "params: overlaps grads in memory"; a binding check may name either side.
OVERLAP = r"(params:? overlaps (grads|hessians)|(grads|hessians):? overlaps params)"

# Arrays of newton_cases.bad_input_arrays, all of the backend's kind (test_cuda_newton has the
# GPU's own cases: host arrays among CUDA ones, bad streams).
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
    ("params int64", lambda a: newton_(a.p_i64, a.g, a.H), TypeError, "^params: dtype"),
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
    ("cholesky_solve 0-d grads", lambda a: chol(a.H, a.g[0, 0, ...]), ValueError,
     "^grads: expected shape"),
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
    # hyper-parameters
    ("negative damping", lambda a: newton_(a.p, a.g, a.H, damping=-1.0), ValueError,
     "^damping"),
    ("NaN damping", lambda a: chol(a.H, a.g, damping=np.nan), ValueError, "^damping"),
    ("newton_ NaN damping", lambda a: newton_(a.p, a.g, a.H, damping=np.nan), ValueError,
     "^damping"),
    ("negative lr", lambda a: newton_(a.p, a.g, a.H, lr=-0.1), ValueError, "^lr"),
    ("on_failure", lambda a: newton_(a.p, a.g, a.H, on_failure="ignore"), ValueError,
     "^on_failure"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_changes_nothing(array_backend, call, exc, match, rng):
    b = array_backend
    arrays = bad_input_arrays(b, rng)
    before = {k: b.to_numpy(v) for k, v in vars(arrays).items()}
    with pytest.raises(exc, match=match):
        call(arrays)
    for k, v in vars(arrays).items():  # on a GPU: after all work queued before the error
        assert_bits(b.to_numpy(v), before[k], f"{k} was modified")


@pytest.mark.parametrize("make,exc,match", [
    (lambda p, g, H: newton_(p, g, np.asfortranarray(H)), ValueError, "hessians"),
    (lambda p, g, H: newton_(np.broadcast_to(p[0], p.shape), g, H), ValueError, "params"),
    (lambda p, g, H: newton_(p, p, H), ValueError, "params: overlaps grads"),
], ids=["hessians Fortran order", "params broadcast", "params is grads (the CPU's words)"])
def test_numpy_layouts_raise_and_change_nothing(make, exc, match):
    """NumPy-only layouts, and the CPU's exact overlap message."""
    rng = np.random.default_rng(6)
    H = spd(rng, (5,), 4, np.float64)
    g, p = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    before = [a.copy() for a in (p, g, H)]
    with pytest.raises(exc, match=match):
        make(p, g, H)
    for a, b in zip((p, g, H), before):
        np.testing.assert_array_equal(a, b)


def test_read_only_params_rejected():
    p = np.ones((2, 3))
    p.setflags(write=False)
    with pytest.raises(ValueError, match="params: is read-only"):
        fastopt.newton_(p, np.ones((2, 3)), np.stack([np.eye(3)] * 2))


def test_newton_solves_logistic_regression_in_under_10_iterations(backend):
    """The seeds' second-order example: per-group logistic regressions (a batch of 16
    independent problems) solved by Newton with the exact Hessian: 10 iterations reach the
    float64 reference optimum (on a GPU every iterate has the CPU's bits)."""
    rng = np.random.default_rng(7)
    groups, samples, n = 16, 400, 6
    X = rng.standard_normal((groups, samples, n))
    w_true = rng.standard_normal((groups, n))
    y = (rng.random((groups, samples)) < 1 / (1 + np.exp(-np.einsum("gsn,gn->gs", X, w_true))))
    lam = 1e-2  # ridge term keeps the optimum finite

    def grad_hess(w):
        s = 1 / (1 + np.exp(-np.einsum("gsn,gn->gs", X, w)))
        g = np.einsum("gsn,gs->gn", X, s - y) / samples + lam * w
        H = np.einsum("gsn,gs,gsm->gnm", X, s * (1 - s), X) / samples + lam * np.eye(n)
        return g, H

    w_opt = np.zeros((groups, n))  # float64 reference solver: 50 plain Newton iterations
    for _ in range(50):
        g, H = grad_hess(w_opt)
        w_opt -= np.linalg.solve(H, g[..., None])[..., 0]
    w = np.zeros((groups, n))
    wd = backend.asarray(w)
    for it in range(10):
        g, H = grad_hess(w)
        assert newton_(wd, backend.asarray(g), backend.asarray(H)) is None
        w = host_matching_cpu(backend, wd, lambda w=w, g=g, H=H: cpu_newton(w, g, H)[0],
                              f"iterate {it + 1}")
    np.testing.assert_allclose(w, w_opt, rtol=1e-9, atol=1e-9)
    assert np.abs(grad_hess(w)[0]).max() < 1e-10
