"""Sophia and the EMA kernel against the float64 reference, on both CPU paths."""
import numpy as np
import pytest

import fastopt
from fastopt import reference

from conftest import using_cpu_path

SIZES = [1, 7, 33, 4097]


@pytest.mark.parametrize("path", ["scalar", "avx2"])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("options", [
    dict(),
    dict(weight_decay=0.0, rho=0.5),
    dict(maximize=True, l1=1e-3),
    dict(eps=1e-3, beta1=0.5),
])
def test_sophia_trajectory_matches_reference(path, dtype, tol, options):
    rng = np.random.default_rng(sum(map(ord, f"{path}{dtype}{options}")))
    with using_cpu_path(path):
        params = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        ref = [p.astype(np.float64) for p in params]
        m, h = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
        ref_m, ref_h = [np.zeros_like(p) for p in ref], [np.zeros_like(p) for p in ref]
        for t in range(20):
            grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
            if t % 5 == 0:  # Hessian estimates: mostly positive, some negative entries
                est = [(rng.standard_normal(p.shape) + 1.0).astype(dtype) for p in params]
                fastopt.ema_(h, est, beta=0.9)
                for x, e in zip(ref_h, est):
                    reference.ema(x, e.astype(np.float64), beta=0.9)
            fastopt.sophia_(params, grads, m, h, lr=0.05, **options)
            for i, g in enumerate(grads):
                reference.sophia(ref[i], g.astype(np.float64), ref_m[i], ref_h[i], lr=0.05,
                                 **options)
        for got, want in [(params, ref), (m, ref_m), (h, ref_h)]:
            for a, b in zip(got, want):
                scale = max(1.0, float(np.max(np.abs(b))))
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


def test_sophia_paths_bit_identical_and_class_matches_functional():
    rng = np.random.default_rng(7)
    n = 4099
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(6)]
    est = (rng.standard_normal(n) + 0.5).astype(np.float32)
    results = []
    for path in ["scalar", "avx2"]:
        with using_cpu_path(path):
            opt = fastopt.Sophia(p0.copy(), lr=0.01)
            opt.update_hessian(est, beta2=0.5)
            for g in grads:
                opt.step(g)
            results.append((opt.params[0].copy(), opt.state["exp_avgs"][0].copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    p, m, h = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    fastopt.ema_(h, est, beta=0.5)
    for g in grads:
        fastopt.sophia_(p, g, m, h, lr=0.01)
    np.testing.assert_array_equal(p, results[0][0])


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1.0), "lr"), (dict(rho=0.0), "rho"), (dict(eps=0.0), "eps"),
    (dict(beta1=1.0), "beta1"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_sophia_bad_hyper_parameters_change_nothing(bad, match):
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(9), rng.standard_normal(9)
    m, h = rng.standard_normal(9), rng.random(9)
    before = [x.copy() for x in (p, g, m, h)]
    kwargs = dict(dict(lr=0.1), **bad)
    with pytest.raises(ValueError, match=match):
        fastopt.sophia_(p, g, m, h, **kwargs)
    for x, y in zip((p, g, m, h), before):
        np.testing.assert_array_equal(x, y)


def test_sophia_hessian_aliasing_params_is_rejected():
    p = np.ones(8)
    with pytest.raises(ValueError, match="overlaps"):
        fastopt.sophia_(p, np.ones(8), np.zeros(8), p, lr=0.1)
