"""``master_params=`` on every functional step (float16/bfloat16 params with float32
masters): one fused pass equals the float32 step on the masters with the grads converted,
then the params set to the masters rounded to nearest -- bit for bit, on every backend
(the CPU's paths and thread counts, CuPy, PyTorch CUDA), with masks and with 8-bit state;
bad master params are refused before anything is written."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import CPU, assert_bits
from conftest import normal_nonzero, opt_cases, using_threads

SHAPES = [(1,), (7,), (33, 3), (4097,), (5000,)]
HALF = [np.float16, ml_dtypes.bfloat16]


def _call(opt, opts, t, params, grads, state, **extra):
    args = [params, grads] + [None if n is None else state[n] for n in opt.state_args(opts)]
    kwargs = dict(opt.hyper(opts), **extra)
    if opt.takes_step:
        kwargs["step"] = t
    opt.fn(*args, **kwargs)


@pytest.mark.parametrize("variant", ["plain", "masked", "int8 state"])
@pytest.mark.parametrize("half", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_master_params_step_is_the_float32_step_then_rounding(backend, opt, opts, half, variant):
    if not backend.holds(half):
        pytest.skip(f"{backend.name} has no {np.dtype(half).name}")
    eight = variant == "int8 state"
    if eight and (opt.name == "sophia" or not opt.states(opts)):
        pytest.skip("no 8-bit state for this optimizer")
    rng = np.random.default_rng(7)
    masters = [normal_nonzero(rng, s).astype(np.float32) for s in SHAPES]
    params = [m.astype(half) for m in masters]
    state = {n: [opt.init[n](s, rng).astype(np.float32) for s in SHAPES] for n in opt.states(opts)}
    absmax = None
    if eight:
        signed = {a.name: not a.nonnegative for a in opt.spec.states}
        pairs = {n: [reference.quantize_state8(a, signed[n]) for a in v] for n, v in state.items()}
        state = {n: [c for c, _ in v] for n, v in pairs.items()}
        absmax = {n: [a for _, a in v] for n, v in pairs.items()}
    masks = [rng.random(s) < 0.7 for s in SHAPES] if variant == "masked" else None
    on = backend.asarray
    dev = dict(params=[on(p) for p in params], masters=[on(m) for m in masters],
               state={n: [on(a) for a in v] for n, v in state.items()})
    dev_absmax = None if absmax is None else {n: [on(a) for a in v] for n, v in absmax.items()}
    for t in range(1, 4):
        grads = [normal_nonzero(rng, s).astype(half) for s in SHAPES]
        extra = {} if masks is None else {"masks": masks}
        with CPU.activate():  # the unfused twin: float32 step on the masters, then rounding
            _call(opt, opts, t, masters, [g.astype(np.float32) for g in grads], state,
                  **extra, **({} if absmax is None else {"absmax": absmax}))
        params = [m.astype(half) for m in masters]
        dev_extra = {} if masks is None else {"masks": [on(m) for m in masks]}
        if dev_absmax is not None:
            dev_extra["absmax"] = dev_absmax
        _call(opt, opts, t, dev["params"], [on(g) for g in grads], dev["state"],
              master_params=dev["masters"], **dev_extra)
        for i in range(len(SHAPES)):
            assert_bits(backend.to_numpy(dev["masters"][i]), masters[i], f"step {t} master[{i}]",
                        any_nan=True)
            assert_bits(backend.to_numpy(dev["params"][i]), params[i], f"step {t} params[{i}]",
                        any_nan=True)
            for n in state:
                assert_bits(backend.to_numpy(dev["state"][n][i]), state[n][i], f"step {t} {n}[{i}]",
                            any_nan=True)


def test_master_params_are_the_same_on_every_thread_count():
    rng = np.random.default_rng(3)
    n = 1 << 18
    masters = rng.standard_normal(n).astype(np.float32)
    grads = rng.standard_normal(n).astype(ml_dtypes.bfloat16)
    runs = []
    for threads in (1, 2, 3):
        with using_threads(threads):
            m, p = masters.copy(), masters.astype(ml_dtypes.bfloat16)
            s = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
            fastopt.adamw_(p, grads, *s, step=1, lr=1e-2, master_params=m)
            runs.append((m, p))
    for m, p in runs[1:]:
        assert_bits(m, runs[0][0], "masters")
        assert_bits(p, runs[0][1], "params")


@pytest.mark.parametrize("case", ["float32 params", "float64 masters", "bfloat16 masters",
                                  "shape", "length", "aliases state", "aliases params",
                                  "stochastic"])
def test_bad_master_params_are_refused_before_anything_is_written(case, array_backend):
    b = array_backend
    if not b.holds(ml_dtypes.bfloat16):
        pytest.skip(f"{b.name} has no bfloat16")
    rng = np.random.default_rng(1)
    n = 300
    masters_h = normal_nonzero(rng, (n,)).astype(np.float32)
    p, g = b.asarray(masters_h.astype(ml_dtypes.bfloat16)), b.asarray(
        normal_nonzero(rng, (n,)).astype(ml_dtypes.bfloat16))
    m, v = b.asarray(np.zeros(n, np.float32)), b.asarray(np.zeros(n, np.float32))
    masters = b.asarray(masters_h)
    kw: dict = {}
    err, match = ValueError, "master_params"
    params, grads = [p], [g]
    given = [masters]
    if case == "float32 params":
        params, grads = [b.asarray(masters_h.copy())], [b.asarray(masters_h.copy())]
        match = "master params are for float16 or bfloat16 params"
    elif case == "float64 masters":
        given = [b.asarray(masters_h.astype(np.float64))]
        err, match = TypeError, r"master_params\[0\]: dtype float64 is not float32"
    elif case == "bfloat16 masters":
        given = [b.asarray(masters_h.astype(ml_dtypes.bfloat16))]
        err, match = TypeError, "is not float32"
    elif case == "shape":
        given = [b.asarray(masters_h[:-1].copy())]
        match = r"master_params\[0\]: shape"
    elif case == "length":
        given = [masters, masters]
        match = "master_params: expected 1 arrays"
    elif case == "aliases state":
        given = [m]
        match = "overlaps"
    elif case == "aliases params":
        params = [b.view(masters, "bfloat16")[:n]]  # the masters' first bytes
        match = "overlaps"
    elif case == "stochastic":
        kw = dict(rounding="stochastic", seed=3)
        match = "excludes stochastic rounding"
    arrays = [*params, *grads, m, v, *given]
    before = [b.to_numpy(a) for a in arrays]
    with pytest.raises(err, match=match):
        fastopt.adamw_(params, grads, [m], [v], step=1, master_params=given, **kw)
    for a, was in zip(arrays, before):
        assert_bits(b.to_numpy(a), was, "an argument was modified")
