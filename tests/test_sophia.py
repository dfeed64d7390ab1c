"""What only Sophia has: its Hessian-diagonal EMA (``ema_`` and ``Sophia.update_hessian``)
interleaved with its steps, on every backend. Sophia's steps themselves are in conftest's
optimizer table, so every table-driven test (test_parity, test_bad_input, test_cuda...)
covers them."""
import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import CPU, assert_bits, using_cpu_path
from conftest import DTYPES, OPTIMIZERS, STEPS, Problem, assert_close, normal_nonzero

SOPHIA = OPTIMIZERS["sophia"]
SIZES = [1, 7, 33, 4097]
# One multi-tensor call, as in test_parity
SHAPES = [(7,), (33,), (1,), (0,), (4097,), (33, 3), (2, 0, 3), (5, 1, 7), (2, 8195)]


def estimates(rng, shapes, dtype):
    """Hessian-diagonal estimates: mostly positive, some negative entries."""
    return [(rng.standard_normal(s) + 1.0).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_ema_matches_cpu_and_reference(backend, dtype, rng):
    # average <- beta*average + (1-beta)*sample, betas including 0 and 1: within TOL of the
    # reference, and on a GPU bit-identical to the CPU. (16-bit averages: test_cuda.py.)
    avg = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
    dev = [backend.asarray(a) for a in avg]
    cpu = [a.copy() for a in avg]
    ref = [a.astype(np.float64) for a in avg]
    for t in range(STEPS):
        beta = [0.9, 0.99, 0.0, 1.0, 0.5][t % 5]
        samples = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
        fastopt.ema_(dev, [backend.asarray(x) for x in samples], beta=beta)
        for r, x in zip(ref, samples):
            reference.ema(r, x.astype(np.float64), beta=beta)
        got = [backend.to_numpy(d) for d in dev]
        if backend.is_cuda:
            with CPU.activate():
                fastopt.ema_(cpu, samples, beta=beta)
            for i, (g, c) in enumerate(zip(got, cpu)):
                assert_bits(g, c, f"averages[{i}] after step {t + 1}", any_nan=True)
        assert_close(got, ref, dtype, f"averages after step {t + 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(weight_decay=0.0, rho=0.5),
    dict(maximize=True, l1=1e-3),
    dict(eps=1e-3, beta1=0.5),
], ids=["plain", "rho0.5", "max_l1", "eps_beta1"])
def test_hessian_ema_between_steps_matches_reference(backend, dtype, options, rng):
    # exp_avgs and hessian_diags start at zero (the first steps are clipped sign steps);
    # every 5th step first folds estimates with negative entries into the Hessian EMA.
    # Within TOL of the reference after every step, on a GPU bit-identical to the CPU.
    zeros = {"exp_avgs": lambda shape, rng: np.zeros(shape),
             "hessian_diags": lambda shape, rng: np.zeros(shape)}
    pr = Problem(SOPHIA, options, [(n,) for n in SIZES], dtype, rng, backend=backend,
                 init=zeros)
    for t in range(STEPS):
        if t % 5 == 0:
            est = estimates(rng, pr.shapes, dtype)
            fastopt.ema_(pr.state["hessian_diags"], [backend.asarray(e) for e in est], beta=0.9)
            if pr.twin:
                with CPU.activate():
                    fastopt.ema_(pr.cpu_state["hessian_diags"], est, beta=0.9)
            for h, e in zip(pr.ref_state["hessian_diags"], est):
                reference.ema(h, e.astype(np.float64), beta=0.9)
        pr.step(pr.draw_grads(rng))
        pr.check()


def test_class_update_hessian_matches_functional(backend, rng):
    # Sophia.update_hessian(estimate, beta2) is ema_ on the class's hessian_diags: the class
    # equals ema_ + sophia_ on the same backend, and both equal the CPU's scalar path.
    n = 4099
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(6)]
    est = (rng.standard_normal(n) + 0.5).astype(np.float32)
    opt = fastopt.Sophia(backend.asarray(p0), lr=0.01)
    opt.update_hessian(backend.asarray(est), beta2=0.5)
    p, m, h = (backend.asarray(a) for a in (p0, np.zeros(n, np.float32),
                                            np.zeros(n, np.float32)))
    fastopt.ema_(h, backend.asarray(est), beta=0.5)
    for g in grads:
        opt.step(backend.asarray(g))
        fastopt.sophia_(p, backend.asarray(g), m, h, lr=0.01)
    with using_cpu_path("scalar"):
        cpu = [p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
        fastopt.ema_(cpu[2], est, beta=0.5)
        for g in grads:
            fastopt.sophia_(cpu[0], g, cpu[1], cpu[2], lr=0.01)
    for what, got, functional, scalar in [
            ("params", opt.params[0], p, cpu[0]),
            ("exp_avgs", opt.state["exp_avgs"][0], m, cpu[1]),
            ("hessian_diags", opt.state["hessian_diags"][0], h, cpu[2])]:
        got = backend.to_numpy(got)
        assert_bits(got, backend.to_numpy(functional), f"{what}: class vs functional",
                    any_nan=True)
        assert_bits(got, scalar, f"{what}: {backend.name} vs the CPU's scalar path",
                    any_nan=True)
