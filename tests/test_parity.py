"""fastopt against its float64 NumPy reference, one test body per behaviour run on every
backend (the ``backend`` fixture: the CPU's scalar and AVX2 paths, CuPy, PyTorch CUDA; on a
GPU also bit for bit against the CPU kernels): trajectories of STEPS steps for every
optimizer, option combination and dtype; odd sizes; misaligned arrays; the first step
writing every element; zero-size arrays; the functional API with single arrays, lists and
tuples; the stateful classes (schedules, settable lr, zero_state, state_dict round trips).
CPU only: bit-identity across CPU paths and thread counts, PyTorch CPU tensors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import fastopt
from fastopt import _arrays, schedules

from backends import CPU, assert_bits, misaligned_maker
from conftest import (ADAGRAD, DTYPES, HAS_AVX2, OPTIMIZERS, STEPS, Problem, assert_close,
                      assert_same_optimizer, class_step, hessian_estimates, misaligned,
                      normal_nonzero, opt_cases, opts_id, seed_of, using_cpu_path,
                      using_threads)

DTYPE_IDS = ["f32", "f64"]

# Mixed shapes of one multi-tensor call: every size of the contract (0, 1, 7, 33, 4097), a
# few multi-dimensional ones, zero-size ones in the middle of the list, and (2, 8195): 16390
# elements, four of the GPU kernel's 4096-element chunks and a ragged 6.
SHAPES = [(7,), (33,), (1,), (0,), (4097,), (33, 3), (2, 0, 3), (5, 1, 7), (2, 8195)]
SINGLE_SIZES = [0, 1, 7, 33, 4097]
LARGE = 1_000_003


def assert_same_results(a, b, what):
    """Two runs' params and state (dicts of NumPy copies by role) are bit-identical."""
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name])
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert_bits(x, y, f"{what}: {name}[{i}]", any_nan=True)


def run_and_check(pr: Problem, rng, steps=STEPS, check_every=1):
    """Step fastopt (and on a GPU the CPU twin) and the reference with the same fresh
    gradients; compare every element of params and state after each ``check_every`` steps
    and after the last. After the first step, every element of params and state that the
    reference moved must have changed. The grads are never written."""
    for k in range(steps):
        before = pr.snapshot() if k == 0 else None
        grads = pr.draw_grads(rng)
        dgrads = pr.step(grads)
        for i, (d, g) in enumerate(zip(dgrads, grads)):
            assert_bits(pr.backend.to_numpy(d), g, f"grads[{i}] (read only)")
        if k == 0:
            pr.assert_moved(before)
        if k == 0 or (k + 1) % check_every == 0 or k == steps - 1:
            pr.check()


# ---- trajectories against the CPU and the reference ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("grid"))
def test_list_trajectory_matches_cpu_and_reference(backend, opt, opts, dtype, rng):
    pr = Problem(opt, opts, SHAPES, dtype, rng, backend=backend)
    run_and_check(pr, rng)


@pytest.mark.parametrize("size", SINGLE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_single_array_trajectory_matches_reference(backend, opt, opts, dtype, size, rng):
    pr = Problem(opt, opts, [(size,)], dtype, rng, backend=backend, listed=False)
    run_and_check(pr, rng)


def _large_cases():
    # Per optimizer: the plainest and the most featureful combo in float32, and the most
    # featureful in float64 (each on every backend).
    cases = []
    for opt in OPTIMIZERS.values():
        plain, full = opt.representative[0], opt.representative[-1]
        for opts, dtype, dt_id in [(plain, np.float32, "f32"), (full, np.float32, "f32"),
                                   (full, np.float64, "f64")]:
            cases.append(pytest.param(opt, opts, dtype,
                                      id=f"{opt.name}-{opts_id(opts)}-{dt_id}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("opt,opts,dtype", _large_cases())
def test_large_array_trajectory_matches_reference(backend, opt, opts, dtype, rng):
    # 1_000_003 elements: many vectors, the threaded split (>= 2**15) and an odd tail.
    pr = Problem(opt, opts, [(LARGE,)], dtype, rng, backend=backend, listed=False)
    run_and_check(pr, rng, check_every=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_misaligned_arrays_match_cpu_and_reference(backend, opt, opts, dtype, rng):
    # Every array is a slice of a NaN-padded buffer, 32-byte aligned or starting an odd
    # number of elements in (so not 16-byte aligned): per tensor, every role misaligned
    # (each role at a different offset), every role aligned, or a mix (even roles aligned:
    # one misaligned role must send the tensor to the unaligned path). 40_001 also crosses
    # the CPU's threading threshold (2**15 elements). The padding is never written.
    shapes = SHAPES + [(40_001,), (4097,)]
    kinds = ["odd", "odd", "odd", "aligned", "odd", "aligned", "mixed", "mixed", "odd", "odd",
             "mixed"]
    assert len(kinds) == len(shapes)
    buffers = []
    make = misaligned_maker(backend, kinds, record=buffers)
    pr = Problem(opt, opts, shapes, dtype, rng, backend=backend, make=make)
    run_and_check(pr, rng)
    for buf, off, n in buffers:
        host = backend.to_numpy(buf)
        assert np.isnan(host[:off]).all() and np.isnan(host[off + n:]).all(), "padding written"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_first_step_writes_every_element(backend, opt, opts, dtype, rng):
    # Poison: state the first step overwrites without reading (SGD's momentum buffers) starts
    # as NaN, which must not survive anywhere; every element of params and state that the
    # reference moves by more than 2 ulp must change (so an element no thread wrote fails
    # even if the CPU kernel skipped it too), and the result equals the CPU's.
    init = dict(opt.init)
    if opt.name == "sgd":
        init["momentum_buffers"] = lambda shape, rng: np.full(shape, np.nan)
    pr = Problem(opt, opts, SHAPES, dtype, rng, backend=backend, init=init)
    before = pr.snapshot()
    pr.step(pr.draw_grads(rng))
    for role, arrays in pr.host().items():
        for i, a in enumerate(arrays):
            assert not np.isnan(a).any(), f"{role}[{i}]: NaN after the first step"
    pr.assert_moved(before)
    pr.check()


WITH_L1 = {name: opt for name, opt in OPTIMIZERS.items() if "l1" in opt.spec.hyper}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", list(WITH_L1.values()), ids=list(WITH_L1))
def test_strong_l1_zeroes_like_reference(backend, opt, dtype, rng):
    # A large L1 penalty drives many params to exactly 0 (the clamp branch of the
    # soft-threshold), and keeps them there: fastopt must zero the same elements.
    opts = {"l1": 2.0}
    if opt is OPTIMIZERS["adamw"]:
        opts["weight_decay"] = 0.01
    pr = Problem(opt, opts, [(4097,), (33,)], dtype, rng, backend=backend)
    for i, p in enumerate(pr.params):
        small = backend.to_numpy(p) * dtype(0.1)
        backend.upload(p, small)
        pr.cpu_params[i][...] = small
        pr.ref_params[i] = small.astype(np.float64)
    for _ in range(STEPS):
        pr.step(pr.draw_grads(rng))
        pr.check()
    zero_ref = np.concatenate([p.ravel() == 0 for p in pr.ref_params])
    zero_got = np.concatenate([p.ravel() == 0 for p in pr.host()["params"]])
    assert zero_ref.mean() > 0.1, "the test should exercise the clamp"
    # Elements at the threshold may land either way by rounding; all others agree.
    assert (zero_ref != zero_got).mean() < 1e-3


# ---- bit-identity across CPU paths and thread counts --------------------------------------

def _trajectory(opt, opts, shapes, dtype, seed, *, make=None, steps=STEPS, grads=None):
    """Run fastopt only, on the current CPU path; return the final params and state
    (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    pr = Problem(opt, opts, shapes, dtype, rng, make=make)
    for k in range(steps):
        g = grads[k] if grads is not None else pr.draw_grads(rng)
        pr.step_fastopt([pr.make(x, 1, i) for i, x in enumerate(g)])
        pr.t += 1
    return pr.snapshot()


ODD_SHAPES = [(1,), (7,), (33,), (4099,), (13, 17), (3,)]


@pytest.mark.skipif(not HAS_AVX2, reason="needs AVX2+FMA")
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("grid"))
def test_scalar_and_avx2_paths_bit_identical(opt, opts, dtype, aligned, request):
    seed = seed_of(request.node.nodeid)
    make = None if aligned else misaligned(1)  # each role at its own odd offset
    with using_cpu_path("scalar"):
        scalar = _trajectory(opt, opts, ODD_SHAPES, dtype, seed, make=make)
    with using_cpu_path("avx2"):
        avx2 = _trajectory(opt, opts, ODD_SHAPES, dtype, seed, make=make)
    assert_same_results(scalar, avx2, "scalar vs avx2")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_thread_counts_bit_identical(opt, opts, dtype, cpu_path, request):
    # Above the threading threshold (2**15 elements in one call) the elements are split
    # between threads, mid-tensor; a single tensor >= 2**17 and a list whose boundaries
    # do not fall on the split points.
    seed = seed_of(request.node.nodeid)
    shapes = [(2**17 + 3,), (5,), (70_001,), (0,), (33,)]
    rng = np.random.default_rng(seed + 1)
    grads = [[normal_nonzero(rng, s).astype(dtype) for s in shapes] for _ in range(STEPS)]
    results = {}
    for n in (1, 2, 3):
        with using_threads(n):
            results[n] = _trajectory(opt, opts, shapes, dtype, seed, grads=grads)
    assert_same_results(results[1], results[2], "1 vs 2 threads")
    assert_same_results(results[1], results[3], "1 vs 3 threads")


# ---- the functional API: single arrays, lists, tuples; zero-size arrays ---------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_single_arrays_lists_and_tuples_agree(backend, opt, opts, dtype, rng):
    # The same problem stepped as one list call, as one tuple call, and as one call per
    # array (single-array form): bit-identical results.
    shapes = [(7,), (33, 3), (1,), (0,), (4097,)]
    seed = int(rng.integers(2**31))
    runs = {}
    for mode in ("list", "tuple", "single"):
        r = np.random.default_rng(seed)
        pr = Problem(opt, opts, shapes, dtype, r, backend=backend)
        for _ in range(5):
            grads = [backend.asarray(g) for g in pr.draw_grads(r)]
            args, kwargs = pr.fastopt_args(grads)
            if mode == "single":
                for i in range(len(shapes)):
                    opt.fn(*[a if a is None else a[i] for a in args], **kwargs)
            else:
                if mode == "tuple":
                    args = [a if a is None else tuple(a) for a in args]
                opt.fn(*args, **kwargs)
            pr.t += 1
        runs[mode] = pr.snapshot()
    assert_same_results(runs["list"], runs["tuple"], "list vs tuple")
    assert_same_results(runs["list"], runs["single"], "list vs single arrays")


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_zero_size_arrays_are_a_no_op(backend, opt, opts, rng):
    # Lists of zero-size arrays (on a GPU also on a side stream), one zero-size array, and
    # empty lists of either dtype: accepted (no launch of zero blocks, no error), nothing
    # changes.
    shapes = [(0,), (0, 3), (2, 0, 3)]
    pr = Problem(opt, opts, shapes, np.float32, rng, backend=backend)
    grads = [backend.asarray(np.zeros(s, np.float32)) for s in shapes]
    pr.step_fastopt(grads)
    if backend.is_cuda:
        pr.step_fastopt(grads, stream=backend.lib.side_stream())
    states = [None if n is None else pr.state[n][0] for n in pr.args]
    kwargs = dict(pr.hyper, **({"step": 1} if opt.takes_step else {}))
    opt.fn(pr.params[0], grads[0], *states, **kwargs)
    for dtype in DTYPES:
        empty = Problem(opt, opts, [], dtype, rng, backend=backend)
        opt.fn(*empty.fastopt_args([])[0], **kwargs)
    fastopt.ema_(pr.params, grads, beta=0.9)
    for role, arrays in pr.host().items():
        assert [a.shape for a in arrays] == shapes, role


# ---- the stateful classes -------------------------------------------------------------------

def _expected_lr(kind, t, base):
    """The documented formulas, written independently of fastopt.schedules."""
    if kind is None or kind == "constant":
        return base
    if kind == "step":  # StepDecay(step_size=4, gamma=0.5)
        return base * 0.5 ** (t // 4)
    if kind == "inverse_time":  # InverseTime(alpha=2.0, T=10)
        return base / (1.0 + 2.0 * t / 10)
    if kind == "cosine":  # Cosine(total_steps=15, min_lr=1e-4)
        frac = min(t, 15) / 15
        return 1e-4 + (base - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "warmup":  # LinearWarmup(5)
        return base * (t + 1) / 5 if t < 5 else base
    if kind == "warmup_inverse_time":  # LinearWarmup(5, then=InverseTime(2.0, 10))
        return base * (t + 1) / 5 if t < 5 else base / (1.0 + 2.0 * (t - 5) / 10)
    raise AssertionError(kind)


def _make_schedule(kind):
    return {
        None: None,
        "constant": schedules.Constant(),
        "step": schedules.StepDecay(4, 0.5),
        "inverse_time": schedules.InverseTime(2.0, 10),
        "cosine": schedules.Cosine(15, min_lr=1e-4),
        "warmup": schedules.LinearWarmup(5),
        "warmup_inverse_time": schedules.LinearWarmup(5, then=schedules.InverseTime(2.0, 10)),
    }[kind]


SCHEDULES = [None, "constant", "step", "inverse_time", "cosine", "warmup", "warmup_inverse_time"]
INIT_ACC = 0.25  # Adagrad's initial_accumulator_value in the class tests


def _zero_init(opt):
    """The state as the classes start it (the table's ArrayRole.initial: 0, Rprop's step
    sizes at lr, Adagrad's sums at initial_accumulator_value)."""
    start = opt.spec.initial_values({"lr": opt.base["lr"], "initial_accumulator_value": INIT_ACC})
    return {name: (lambda shape, rng, v=start[name]: np.full(shape, v)) for name in opt.init}


def _class_kwargs(opt, opts, **extra):
    kw = dict(opt.hyper(opts), **extra)
    if opt is ADAGRAD:
        kw["initial_accumulator_value"] = INIT_ACC
    return kw


def assert_state_like_params(backend, o, dtype) -> None:
    """The class allocated its state in the params' library, dtype and shapes."""
    for name, arrays in o.state.items():
        assert len(arrays) == len(o.params), name
        for a, p in zip(arrays, o.params):
            assert backend.is_array(a) and _arrays.dtype_name(a) == np.dtype(dtype).name, name
            assert tuple(a.shape) == tuple(p.shape), name


@pytest.mark.parametrize("kind", SCHEDULES, ids=[str(k) for k in SCHEDULES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_class_matches_functional_and_reference(array_backend, opt, opts, dtype, kind, rng):
    # The class with lr = schedule(t, base_lr), t = 0-based index of the step about to be
    # taken: bit-identical to the functional calls with that lr (on a GPU: and to the CPU
    # kernels), close to the reference.
    backend = array_backend
    shapes = [(7,), (33, 3), (1,), (0,), (4097,)]
    pr = Problem(opt, opts, shapes, dtype, rng, backend=backend, init=_zero_init(opt))
    params = [backend.asarray(p) for p in pr.host()["params"]]
    o = opt.cls(params, schedule=_make_schedule(kind), **_class_kwargs(opt, opts))
    assert o.params[0] is params[0], "the class must update the caller's arrays in place"
    assert_state_like_params(backend, o, dtype)
    base = pr.hyper["lr"]
    for t in range(STEPS):
        if t == 12:  # settable lr: later steps use the new base rate
            base = base * 0.5
            o.lr = base
            assert o.lr == base
        lr = o.current_lr()  # the exact float the class will use for this step
        assert lr == pytest.approx(_expected_lr(kind, t, base), rel=1e-14), f"t={t}"
        assert o.step_count == t
        grads = pr.draw_grads(rng)
        o.step([backend.asarray(g) for g in grads])
        pr.step(grads, lr=lr)
        got = pr.host()
        for name in pr.state:
            for i, (a, b) in enumerate(zip(o.state[name], got[name])):
                assert_bits(backend.to_numpy(a), b, f"class and functional: {name}[{i}]",
                            any_nan=True)
        for i, (a, b) in enumerate(zip(params, got["params"])):
            assert_bits(backend.to_numpy(a), b, f"class and functional: params[{i}]",
                        any_nan=True)
        pr.check()
    assert o.step_count == STEPS


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_class_with_single_array(array_backend, opt, opts, rng):
    backend = array_backend
    pr = Problem(opt, opts, [(4097,)], np.float64, rng, backend=backend, listed=False,
                 init=_zero_init(opt))
    param = backend.asarray(pr.host()["params"][0])
    o = opt.cls(param, **_class_kwargs(opt, opts))
    assert o.params[0] is param, "the class must update the caller's array in place"
    for _ in range(STEPS):
        (g,) = pr.draw_grads(rng)
        o.step(backend.asarray(g))
        pr.step([g])
    got = pr.host()
    assert_bits(backend.to_numpy(param), got["params"][0], "params", any_nan=True)
    for name in pr.state:
        assert_bits(backend.to_numpy(o.state[name][0]), got[name][0], name, any_nan=True)
    pr.check()


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_zero_state_restarts_like_new(array_backend, opt, opts, rng):
    backend = array_backend
    shapes = [(33,), (7, 2)]
    p0 = [normal_nonzero(rng, s) for s in shapes]  # float64
    grads = [[normal_nonzero(rng, s) for s in shapes] for _ in range(10)]
    est = [hessian_estimates(rng, shapes, np.float64) for _ in range(10)]
    a = [backend.asarray(p) for p in p0]
    o = opt.cls(a, **_class_kwargs(opt, opts))
    for t in range(5):
        class_step(o, [backend.asarray(g) for g in grads[t]],
                   [backend.asarray(e) for e in est[t]])
    o.zero_state()
    assert o.step_count == 0
    for name, arrays in o.state.items():
        want = _zero_init(opt)[name]((1,), rng)[0]  # what the class started the state at
        for arr in arrays:
            assert np.all(backend.to_numpy(arr) == want), name
    # From here it must behave exactly as a new optimizer on the current params.
    b = [backend.asarray(backend.to_numpy(x)) for x in a]
    fresh_opt = opt.cls(b, **_class_kwargs(opt, opts))
    for t in range(5, 10):
        for x in (o, fresh_opt):
            class_step(x, [backend.asarray(g) for g in grads[t]],
                       [backend.asarray(e) for e in est[t]])
    assert_same_optimizer(backend, o, fresh_opt, "after zero_state and 5 steps")


def _host_state_dict(backend, sd):
    """A copy of state dict ``sd`` with NumPy copies of its arrays."""
    out = copy.deepcopy({k: v for k, v in sd.items() if k != "state"})
    out["state"] = {name: [backend.to_numpy(a) for a in arrays]
                    for name, arrays in sd["state"].items()}
    return out


def _sd_equal(backend, a, b):
    assert a.keys() == b.keys()
    assert a["optimizer"] == b["optimizer"] and a["step"] == b["step"] and a["lr"] == b["lr"]
    assert a["hyper"] == b["hyper"]
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert len(a["state"][name]) == len(b["state"][name])
        for i, (x, y) in enumerate(zip(a["state"][name], b["state"][name])):
            assert_bits(backend.to_numpy(x), backend.to_numpy(y), f"state[{name!r}][{i}]",
                        any_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_state_dict_round_trip_is_exact(array_backend, opt, opts, dtype, rng):
    # 10 steps, state_dict() (copies, in the params' library), 10 more steps; a new
    # optimizer on the params as they were at step 10 loads the dict (its own arrays, then
    # NumPy copies of them) and takes the same 10 steps: bit-identical.
    backend = array_backend
    shapes = [(7,), (33, 3), (1,), (0,), (129,)]
    sched = schedules.InverseTime(1.0, 7)
    kw = _class_kwargs(opt, opts)
    params = [backend.asarray(normal_nonzero(rng, s).astype(dtype)) for s in shapes]
    grads = [[normal_nonzero(rng, s).astype(dtype) for s in shapes] for _ in range(20)]
    est = [hessian_estimates(rng, shapes, dtype) for _ in range(20)]

    def run(o, steps):
        for t in steps:
            class_step(o, [backend.asarray(g) for g in grads[t]],
                       [backend.asarray(e) for e in est[t]])

    o = opt.cls(params, schedule=sched, **kw)
    run(o, range(10))
    sd = o.state_dict()
    for name, arrays in sd["state"].items():
        for a, own in zip(arrays, o.state[name]):
            assert backend.is_array(a), f"state_dict()['state'][{name!r}]: not the params' kind"
            assert 0 in tuple(a.shape) or backend.ptr(a) != backend.ptr(own), "must copy"
    saved = _host_state_dict(backend, sd)
    params_at_10 = [backend.to_numpy(p) for p in params]
    run(o, range(10, 20))

    # The saved dict is a copy: ten more steps and a new lr did not touch it.
    o.lr = kw["lr"] * 3
    _sd_equal(backend, sd, saved)
    assert sd["step"] == 10

    # Restore into a fresh optimizer built with another lr: lr, step and state come back.
    for source in (sd, _host_state_dict(backend, saved)):
        params2 = [backend.asarray(p) for p in params_at_10]
        o2 = opt.cls(params2, schedule=sched, **dict(kw, lr=kw["lr"] * 7))
        o2.load_state_dict(source)
        assert o2.step_count == 10 and o2.lr == kw["lr"]
        _sd_equal(backend, o2.state_dict(), saved)
        # load_state_dict copied: mutating the dict afterwards does not reach the optimizer.
        for arrays in source["state"].values():
            for a in arrays:
                a += 1.0
        _sd_equal(backend, o2.state_dict(), saved)
        run(o2, range(10, 20))
        assert_same_optimizer(backend, o2, o, "after restoring and 10 more steps")


def _corruptions(opt, opts):
    """(id, mutate(sd)) pairs, each making a state dict that must be rejected."""
    names = opt.states(opts)
    first = names[0]
    other_dtype = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float32}

    out = [
        ("optimizer-name", lambda sd: sd.__setitem__("optimizer", "NotAnOptimizer")),
        ("shape", lambda sd: sd["state"][first].__setitem__(0, np.zeros(8))),
        ("shape-2d", lambda sd: sd["state"][first].__setitem__(
            1, sd["state"][first][1].reshape(-1, 1))),
        ("dtype", lambda sd: sd["state"][first].__setitem__(
            0, sd["state"][first][0].astype(other_dtype[sd["state"][first][0].dtype]))),
        ("missing-array", lambda sd: sd["state"][first].pop()),
        ("extra-array", lambda sd: sd["state"][first].append(np.zeros(3))),
        ("missing-key", lambda sd: sd["state"].pop(first)),
        ("extra-key", lambda sd: sd["state"].__setitem__("bogus", [np.zeros(7), np.zeros(2)])),
        ("hyper-extra-key", lambda sd: sd["hyper"].__setitem__("bogus", 1.0)),
        ("hyper-missing-key", lambda sd: sd["hyper"].pop(next(iter(sd["hyper"])))),
        ("hyper-bad-value", lambda sd: sd["hyper"].__setitem__("weight_decay", -1.0)),
        ("step-negative", lambda sd: sd.__setitem__("step", -1)),
        ("step-float", lambda sd: sd.__setitem__("step", 2.5)),
        ("lr-negative", lambda sd: sd.__setitem__("lr", -0.1)),
        ("lr-nan", lambda sd: sd.__setitem__("lr", float("nan"))),
        ("optimizer-array", lambda sd: sd.__setitem__("optimizer", np.array(["SGD", "Adam"]))),
    ]
    if opt.name == "adamw":
        out.append(("adamw-not-decoupled",
                    lambda sd: sd["hyper"].__setitem__("decoupled_weight_decay", False)))
    return out


def _corruption_cases():
    cases = []
    for opt in OPTIMIZERS.values():
        opts = opt.representative[-1]
        for cid, fn in _corruptions(opt, opts):
            cases.append(pytest.param(opt, opts, fn, id=f"{opt.name}-{cid}"))
    return cases


@pytest.mark.parametrize("opt,opts,corrupt", _corruption_cases())
def test_load_state_dict_rejects_mismatch_and_changes_nothing(opt, opts, corrupt, rng):
    shapes = [(7,), (2, 3)]
    kw = _class_kwargs(opt, opts)
    a = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    src = opt.cls(a, **kw)
    for _ in range(3):
        src.step([normal_nonzero(rng, s).astype(np.float32) for s in shapes])
    sd = src.state_dict()
    corrupt(sd)

    b = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    dst = opt.cls(b, **dict(kw, lr=kw["lr"] * 2))
    dst.step([normal_nonzero(rng, s).astype(np.float32) for s in shapes])
    before = dst.state_dict()
    params_before = [x.copy() for x in b]
    with pytest.raises(ValueError, match=r"^state_dict\b"):
        dst.load_state_dict(sd)
    _sd_equal(CPU, dst.state_dict(), before)
    assert dst.hyper == before["hyper"]
    for x, y in zip(b, params_before):
        assert np.array_equal(x, y)


_INCONSISTENT = [
    pytest.param(OPTIMIZERS["sgd"], dict(momentum=0.0), "momentum", 0.9, id="sgd-momentum"),
    pytest.param(OPTIMIZERS["rmsprop"], dict(momentum=0.0), "momentum", 0.9,
                 id="rmsprop-momentum"),
    pytest.param(OPTIMIZERS["rmsprop"], dict(centered=False), "centered", True,
                 id="rmsprop-centered"),
    pytest.param(OPTIMIZERS["adam"], dict(amsgrad=False), "amsgrad", True, id="adam-amsgrad"),
    pytest.param(OPTIMIZERS["adamw"], dict(amsgrad=False), "amsgrad", True, id="adamw-amsgrad"),
]


@pytest.mark.parametrize("opt,opts,key,value", _INCONSISTENT)
def test_load_state_dict_rejects_hyper_needing_missing_state(opt, opts, key, value, rng):
    # A state dict whose hyper-parameters need a state array it does not carry (e.g.
    # amsgrad=True without max_exp_avg_sqs) cannot be continued from. load_state_dict
    # "checks everything first": it must raise ValueError and leave the optimizer
    # working, not accept it and make every later step fail.
    p = normal_nonzero(rng, (9,))
    o = opt.cls(p, **_class_kwargs(opt, opts))
    o.step(normal_nonzero(rng, (9,)))
    sd = o.state_dict()
    sd["hyper"][key] = value
    before = o.state_dict()
    try:
        o.load_state_dict(sd)
    except ValueError:
        _sd_equal(CPU, o.state_dict(), before)
    try:
        o.step(normal_nonzero(rng, (9,)))
    except ValueError as exc:
        pytest.fail(f"load_state_dict accepted hyper {key}={value!r} without the state it "
                    f"needs (state has {sorted(sd['state'])}), and now every step fails: {exc}")
    assert o.step_count == 2


def test_a_state_list_deleted_is_named(rng):
    o = fastopt.AdamW([normal_nonzero(rng, (9,))])
    del o.state["exp_avgs"]
    with pytest.raises(ValueError, match=r"^state: has no 'exp_avgs'"):
        o.step([normal_nonzero(rng, (9,))])
    assert o.step_count == 0


def test_lr_setter_and_schedule_validation(rng):
    p = normal_nonzero(rng, (5,))
    o = fastopt.SGD(p, lr=0.1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            o.lr = bad
        assert o.lr == 0.1
    with pytest.raises(TypeError, match="lr"):
        o.lr = "0.1"
    assert o.lr == 0.1
    o.lr = 0.0  # zero is a valid rate: params stay
    before = p.copy()
    o.step(normal_nonzero(rng, (5,)))
    assert np.array_equal(p, before)
    # A schedule returning a negative rate is refused before anything is written.
    o2 = fastopt.SGD(p, lr=0.1, schedule=lambda t, lr: -lr)
    with pytest.raises(ValueError):
        o2.step(normal_nonzero(rng, (5,)))
    assert np.array_equal(p, before) and o2.step_count == 0
    with pytest.raises(TypeError, match="schedule"):
        fastopt.SGD(p, lr=0.1, schedule=3)


# ---- PyTorch CPU tensors ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_torch_cpu_tensors_updated_in_place(opt, opts, dtype, cpu_path, rng):
    torch = pytest.importorskip("torch")
    shapes = [(7,), (33, 3), (1,), (4097,)]
    pr = Problem(opt, opts, shapes, dtype, rng)
    t_params = [torch.tensor(p) for p in pr.params]
    t_state = {k: [torch.tensor(a) for a in v] for k, v in pr.state.items()}
    ptrs = [t.data_ptr() for t in t_params]
    for _ in range(STEPS):
        grads = pr.draw_grads(rng)
        t_grads = [torch.tensor(g) for g in grads]
        args = [t_params, t_grads] + [None if n is None else t_state[n] for n in pr.args]
        kwargs = dict(pr.hyper)
        if opt.takes_step:
            kwargs["step"] = pr.t + 1
        opt.fn(*args, **kwargs)
        pr.step(grads)
    assert [t.data_ptr() for t in t_params] == ptrs
    assert_close([t.numpy() for t in t_params], pr.ref_params, dtype, "torch params")
    for k in pr.state:
        assert_close([t.numpy() for t in t_state[k]], pr.ref_state[k], dtype, f"torch {k}")
        for x, y in zip(t_state[k], pr.state[k]):
            assert np.array_equal(x.numpy(), y)
    for x, y in zip(t_params, pr.params):
        assert np.array_equal(x.numpy(), y), "torch and numpy inputs give different results"


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_torch_cpu_tensors_with_classes(opt, opts, rng):
    torch = pytest.importorskip("torch")
    shapes = [(7,), (33, 3)]
    pr = Problem(opt, opts, shapes, np.float32, rng, init=_zero_init(opt))
    t_params = [torch.tensor(p) for p in pr.params]
    single = torch.tensor(pr.params[0])
    o = opt.cls(t_params, **_class_kwargs(opt, opts))
    o_single = opt.cls(single, **_class_kwargs(opt, opts))
    for _ in range(STEPS):
        grads = pr.draw_grads(rng)
        o.step([torch.tensor(g) for g in grads])
        o_single.step(torch.tensor(grads[0]))
        pr.step(grads)
    for x, y in zip(t_params, pr.params):
        assert np.array_equal(x.numpy(), y)
    assert np.array_equal(single.numpy(), pr.params[0])
    pr.check()
