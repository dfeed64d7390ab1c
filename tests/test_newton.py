"""Batched damped Newton / Cholesky against numpy.linalg.solve and the float64 reference."""
import numpy as np
import pytest

import fastopt
from fastopt import reference

from conftest import using_cpu_path
from newton_cases import assert_close, solve64, spd

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,batch", [(1, 1), (2, 10_000), (7, 33), (8, 1000), (31, 7),
                                     (32, 300), (33, 5), (64, 40), (65, 3), (200, 2)])
def test_cholesky_solve_matches_numpy(n, batch, dtype, cpu_path):
    rng = np.random.default_rng(n * 1000 + batch)
    H = spd(rng, (batch,), n, dtype)
    g = rng.standard_normal((batch, n)).astype(dtype)
    H0, g0 = H.copy(), g.copy()
    d = fastopt.cholesky_solve(H, g)
    assert d.dtype == dtype and d.shape == g.shape
    assert_close(d, solve64(H, g), dtype)
    np.testing.assert_array_equal(H, H0)  # inputs untouched
    np.testing.assert_array_equal(g, g0)


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


def test_only_lower_triangle_is_read(cpu_path):
    rng = np.random.default_rng(1)
    H = spd(rng, (20,), 70, np.float64)
    g = rng.standard_normal((20, 70))
    poisoned = H.copy()
    poisoned[..., np.triu_indices(70, 1)[0], np.triu_indices(70, 1)[1]] = np.nan
    np.testing.assert_array_equal(fastopt.cholesky_solve(poisoned, g),
                                  fastopt.cholesky_solve(H, g))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_newton_step_with_leading_batch_dims_matches_reference(dtype, cpu_path):
    rng = np.random.default_rng(2)
    H = spd(rng, (3, 4), 9, dtype)
    g = rng.standard_normal((3, 4, 9)).astype(dtype)
    p = rng.standard_normal((3, 4, 9)).astype(dtype)
    ref = p.astype(np.float64)
    assert fastopt.newton_(p, g, H, lr=0.7, damping=0.1) is None
    ok = reference.damped_newton_step(ref, g.astype(np.float64), H.astype(np.float64), lr=0.7,
                                      damping=0.1)
    assert ok.all()
    assert_close(p, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_damping_solves_singular_psd_systems(dtype):
    rng = np.random.default_rng(3)
    n, rank = 12, 5
    A = rng.standard_normal((30, n, rank))
    H = (A @ np.swapaxes(A, -1, -2)).astype(dtype)  # PSD, rank 5: singular
    g = rng.standard_normal((30, n)).astype(dtype)
    with pytest.raises(fastopt.NotPositiveDefiniteError):
        fastopt.cholesky_solve(H.astype(np.float64) - 1e-3 * np.eye(n), g.astype(np.float64))
    d = fastopt.cholesky_solve(H, g, damping=0.5)
    assert_close(d, solve64(H, g, damping=0.5), dtype)


def _indefinite_batch(rng, dtype):
    H = spd(rng, (6,), 10, dtype)
    H[1] -= 5 * np.eye(10, dtype=dtype)   # indefinite
    H[4, 3, 3] = -1.0                     # negative diagonal entry
    return H


def test_on_failure_raise_names_systems_and_changes_nothing():
    rng = np.random.default_rng(4)
    H = _indefinite_batch(rng, np.float64)
    g, p = rng.standard_normal((6, 10)), rng.standard_normal((6, 10))
    p0 = p.copy()
    with pytest.raises(fastopt.NotPositiveDefiniteError, match="2 of 6") as info:
        fastopt.newton_(p, g, H)
    assert info.value.indices == [(1,), (4,)]
    assert isinstance(info.value, ValueError)
    np.testing.assert_array_equal(p, p0)


def test_on_failure_skip_updates_only_solved_systems():
    rng = np.random.default_rng(5)
    H = _indefinite_batch(rng, np.float64)
    g, p = rng.standard_normal((6, 10)), rng.standard_normal((6, 10))
    p0, ref = p.copy(), p.copy()
    mask = fastopt.newton_(p, g, H, lr=0.5, on_failure="skip")
    np.testing.assert_array_equal(mask, [True, False, True, True, False, True])
    want = reference.damped_newton_step(ref, g, H, lr=0.5)
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(p[~mask], p0[~mask])
    assert_close(p, ref, np.float64)


def test_nan_hessian_is_a_failure_not_a_crash():
    H = np.stack([np.eye(3), np.full((3, 3), np.nan)])
    p = np.ones((2, 3))
    mask = fastopt.newton_(p, np.ones((2, 3)), H, on_failure="skip")
    np.testing.assert_array_equal(mask, [True, False])
    np.testing.assert_array_equal(p, [[0, 0, 0], [1, 1, 1]])


def test_zero_batch_is_a_noop():
    p = np.empty((0, 4))
    assert fastopt.newton_(p, np.empty((0, 4)), np.empty((0, 4, 4))) is None
    assert fastopt.newton_(p, np.empty((0, 4)), np.empty((0, 4, 4)), on_failure="skip").shape == (0,)
    assert fastopt.cholesky_solve(np.empty((0, 4, 4)), np.empty((0, 4))).shape == (0, 4)


def _call(p, g, H, **kw):
    return fastopt.newton_(p, g, H, **kw)


@pytest.mark.parametrize("make,exc,match", [
    (lambda p, g, H: _call(p, g, H[:, :3]), ValueError, "hessians"),
    (lambda p, g, H: _call(p[:, :3], g, H), ValueError, "params"),
    (lambda p, g, H: _call(p, g[:, :0], H[:, :0, :0]), ValueError, "n ="),
    (lambda p, g, H: _call(p, g, H, damping=-1.0), ValueError, "damping"),
    (lambda p, g, H: _call(p, g, H, damping=np.nan), ValueError, "damping"),
    (lambda p, g, H: _call(p, g, H, lr=-0.1), ValueError, "lr"),
    (lambda p, g, H: _call(p, g, H, on_failure="ignore"), ValueError, "on_failure"),
    (lambda p, g, H: _call(p, g.astype(np.float32), H), TypeError, "grads"),
    (lambda p, g, H: _call(p.astype(np.int64), g, H), TypeError, "params"),
    (lambda p, g, H: _call(p, g, np.asfortranarray(H)), ValueError, "hessians"),
    (lambda p, g, H: _call(p, p, H), ValueError, "params: overlaps grads"),
    (lambda p, g, H: _call(np.broadcast_to(p[0], p.shape), g, H), ValueError, "params"),
])
def test_bad_input_raises_and_changes_nothing(make, exc, match):
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


def test_newton_solves_logistic_regression_in_under_10_iterations():
    """The seeds' second-order example: per-group logistic regressions (a batch of 16
    independent problems) solved by Newton with the exact Hessian."""
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
    for _ in range(10):
        g, H = grad_hess(w)
        fastopt.newton_(w, g, H)
    np.testing.assert_allclose(w, w_opt, rtol=1e-9, atol=1e-9)
    assert np.abs(grad_hess(w)[0]).max() < 1e-10
