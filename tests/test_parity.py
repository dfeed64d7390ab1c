"""fastopt against its float64 NumPy reference: trajectories of STEPS steps for every
optimizer, option combination, dtype and CPU path; bit-identity across CPU paths and thread
counts; misaligned arrays; the functional API with single arrays, lists and tuples; the
stateful classes (schedules, settable lr, zero_state, state_dict round trips); PyTorch CPU
tensors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import fastopt
from fastopt import schedules

from conftest import (ADAGRAD, DTYPES, HAS_AVX2, OPTIMIZERS, STEPS, Problem, assert_close, fresh,
                      misaligned, normal_nonzero, opt_cases, opts_id, seed_of,
                      using_cpu_path, using_threads)

DTYPE_IDS = ["f32", "f64"]

# Mixed shapes of one multi-tensor call: every size of the contract (0, 1, 7, 33, 4097) and
# a few multi-dimensional ones, including zero-size ones in the middle of the list.
MIXED = [(7,), (33,), (1,), (0,), (4097,), (33, 3), (2, 0, 3), (5, 1, 7)]
SINGLE_SIZES = [0, 1, 7, 33, 4097]
LARGE = 1_000_003


def assert_moved(before, after, ref_after, what):
    """Every element the reference moved by more than 2 ulp changed in fastopt too (exact
    comparison, independent of the tolerances): catches elements a kernel skipped."""
    must_total = count = 0
    for i, (b, a, r) in enumerate(zip(before, after, ref_after)):
        b, a = np.asarray(b).ravel(), np.asarray(a).ravel()
        ulp = np.spacing(np.abs(b)).astype(np.float64)
        must = np.abs(np.asarray(r, dtype=np.float64).ravel() - b) > 2 * ulp
        stuck = np.flatnonzero(must & (a == b))
        assert stuck.size == 0, (f"{what}[{i}]: {stuck.size} elements left unchanged, e.g. "
                                 f"flat indices {stuck[:8].tolist()}")
        must_total += int(must.sum())
        count += b.size
    assert must_total >= 0.9 * count, f"{what}: the reference itself barely moved"


def run_and_check(pr: Problem, rng, steps=STEPS, check_every=1, grad_make=None):
    """Step fastopt and the reference with the same fresh gradients; compare every element of
    params and state after each ``check_every`` steps and after the last. After the first
    step, every element of params and state that the reference moved must have changed."""
    for k in range(steps):
        before = pr.snapshot() if k == 0 else None
        pr.step(pr.draw_grads(rng, grad_make))
        if k == 0:
            assert_moved(before["params"], pr.params, pr.ref_params, "params")
            for name, arrays in pr.state.items():
                assert_moved(before[name], arrays, pr.ref_state[name], name)
        if k == 0 or (k + 1) % check_every == 0 or k == steps - 1:
            pr.check()


# ---- trajectories against the reference ---------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("grid"))
def test_list_trajectory_matches_reference(opt, opts, dtype, cpu_path, rng):
    pr = Problem(opt, opts, MIXED, dtype, rng)
    run_and_check(pr, rng)


@pytest.mark.parametrize("size", SINGLE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_single_array_trajectory_matches_reference(opt, opts, dtype, size, cpu_path, rng):
    pr = Problem(opt, opts, [(size,)], dtype, rng, listed=False)
    run_and_check(pr, rng)


def _large_cases():
    # Per optimizer: the plainest and the most featureful combo in float32, and the most
    # featureful in float64 (each on both CPU paths).
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
def test_large_array_trajectory_matches_reference(opt, opts, dtype, cpu_path, rng):
    # 1_000_003 elements: many vectors, the threaded split (>= 2**15) and an odd tail.
    pr = Problem(opt, opts, [(LARGE,)], dtype, rng, listed=False)
    run_and_check(pr, rng, check_every=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_misaligned_arrays_match_reference(opt, opts, dtype, cpu_path, rng):
    # Every array starts an odd number of elements into its buffer (so not 32-byte aligned),
    # and params, grads and state each at a different offset. 40_001 also crosses the
    # threading threshold (2**15 elements).
    shapes = [(33,), (1,), (7,), (4097,), (40_001,), (0,)]
    pr = Problem(opt, opts, shapes, dtype, rng, make=misaligned(1), state_make=misaligned(3))
    for a in pr.params:
        if a.size:
            assert a.ctypes.data % 32 != 0
    run_and_check(pr, rng, grad_make=misaligned(5))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_strong_l1_zeroes_like_reference(opt, dtype, cpu_path, rng):
    # A large L1 penalty drives many params to exactly 0 (the clamp branch of the
    # soft-threshold), and keeps them there: fastopt must zero the same elements.
    opts = {"l1": 2.0}
    if opt is OPTIMIZERS["adamw"]:
        opts["weight_decay"] = 0.01
    pr = Problem(opt, opts, [(4097,), (33,)], dtype, rng)
    for p in pr.params:
        p *= 0.1
    pr.ref_params = [p.astype(np.float64) for p in pr.params]
    for _ in range(STEPS):
        pr.step(pr.draw_grads(rng))
        pr.check()
    zero_ref = np.concatenate([p.ravel() == 0 for p in pr.ref_params])
    zero_got = np.concatenate([p.ravel() == 0 for p in pr.params])
    assert zero_ref.mean() > 0.1, "the test should exercise the clamp"
    # Elements at the threshold may land either way by rounding; all others agree.
    assert (zero_ref != zero_got).mean() < 1e-3


# ---- bit-identity across CPU paths and thread counts --------------------------------------

def _trajectory(opt, opts, shapes, dtype, seed, *, make=fresh, state_make=None, grad_make=None,
                steps=STEPS, grads=None):
    """Run fastopt only; return the final params and state (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    pr = Problem(opt, opts, shapes, dtype, rng, make=make, state_make=state_make)
    for k in range(steps):
        g = grads[k] if grads is not None else pr.draw_grads(rng, grad_make)
        pr.step_fastopt(g)
        pr.t += 1
    return pr.snapshot()


def _assert_bit_identical(a, b, what):
    assert a.keys() == b.keys()
    for name in a:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert x.dtype == y.dtype and x.shape == y.shape
            if not np.array_equal(x, y, equal_nan=True):
                diff = np.flatnonzero(x.ravel() != y.ravel())
                raise AssertionError(f"{what}: {name}[{i}] differs at {diff.size} elements, "
                                     f"first {diff[:8].tolist()}")


ODD_SHAPES = [(1,), (7,), (33,), (4099,), (13, 17), (3,)]


@pytest.mark.skipif(not HAS_AVX2, reason="needs AVX2+FMA")
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("grid"))
def test_scalar_and_avx2_paths_bit_identical(opt, opts, dtype, aligned, request):
    seed = seed_of(request.node.nodeid)
    kw = {} if aligned else dict(make=misaligned(1), state_make=misaligned(2),
                                 grad_make=misaligned(3))
    with using_cpu_path("scalar"):
        scalar = _trajectory(opt, opts, ODD_SHAPES, dtype, seed, **kw)
    with using_cpu_path("avx2"):
        avx2 = _trajectory(opt, opts, ODD_SHAPES, dtype, seed, **kw)
    _assert_bit_identical(scalar, avx2, "scalar vs avx2")


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
    _assert_bit_identical(results[1], results[2], "1 vs 2 threads")
    _assert_bit_identical(results[1], results[3], "1 vs 3 threads")


# ---- the functional API: single arrays, lists, tuples --------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_single_arrays_lists_and_tuples_agree(opt, opts, dtype, cpu_path, rng):
    # The same problem stepped as one list call, as one tuple call, and as one call per
    # array (single-array form): bit-identical results.
    shapes = [(7,), (33, 3), (1,), (0,), (4097,)]
    seed = int(rng.integers(2**31))
    runs = {}
    for mode in ("list", "tuple", "single"):
        r = np.random.default_rng(seed)
        pr = Problem(opt, opts, shapes, dtype, r)
        for _ in range(5):
            grads = pr.draw_grads(r)
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
    _assert_bit_identical(runs["list"], runs["tuple"], "list vs tuple")
    _assert_bit_identical(runs["list"], runs["single"], "list vs single arrays")


def test_zero_size_only_list_is_noop(cpu_path):
    for opt in OPTIMIZERS.values():
        opts = opt.representative[-1]
        pr = Problem(opt, opts, [(0,), (0, 3), (2, 0)], np.float32, np.random.default_rng(0))
        args, kwargs = pr.fastopt_args([np.zeros(s, np.float32) for s in pr.shapes])
        opt.fn(*args, **kwargs)
        empty = Problem(opt, opts, [], np.float64, np.random.default_rng(0))
        args, kwargs = empty.fastopt_args([])
        opt.fn(*args, **kwargs)


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
    init = {name: (lambda shape, rng: np.zeros(shape)) for name in opt.init}
    if opt is ADAGRAD:
        init["state_sums"] = lambda shape, rng: np.full(shape, INIT_ACC)
    return init


def _class_kwargs(opt, opts, **extra):
    kw = dict(opt.hyper(opts), **extra)
    if opt is ADAGRAD:
        kw["initial_accumulator_value"] = INIT_ACC
    return kw


def _state_copy(o):
    return {k: [a.copy() for a in v] for k, v in o.state.items()}


@pytest.mark.parametrize("kind", SCHEDULES, ids=[str(k) for k in SCHEDULES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_class_matches_functional_and_reference(opt, opts, dtype, kind, rng):
    # The class with lr = schedule(t, base_lr), t = 0-based index of the step about to be
    # taken: bit-identical to the functional calls with that lr, close to the reference.
    shapes = [(7,), (33, 3), (1,), (0,), (4097,)]
    pr = Problem(opt, opts, shapes, dtype, rng, init=_zero_init(opt))
    params = [p.copy() for p in pr.params]
    o = opt.cls(params, schedule=_make_schedule(kind), **_class_kwargs(opt, opts))
    assert o.params[0] is params[0], "the class must update the caller's arrays in place"
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
        o.step(grads)
        pr.step(grads, lr=lr)
        for name in pr.state:
            for a, b in zip(o.state[name], pr.state[name]):
                assert np.array_equal(a, b), f"class and functional differ in {name}"
        for a, b in zip(params, pr.params):
            assert np.array_equal(a, b), "class and functional differ in params"
        pr.check()
    assert o.step_count == STEPS


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_class_with_single_array(opt, opts, rng):
    pr = Problem(opt, opts, [(4097,)], np.float64, rng, listed=False, init=_zero_init(opt))
    param = pr.params[0].copy()
    o = opt.cls(param, **_class_kwargs(opt, opts))
    for _ in range(STEPS):
        (g,) = pr.draw_grads(rng)
        o.step(g)
        pr.step([g])
    assert np.array_equal(param, pr.params[0])
    for name in pr.state:
        assert np.array_equal(o.state[name][0], pr.state[name][0])
    pr.check()


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_zero_state_restarts_like_new(opt, opts, rng):
    shapes = [(33,), (7, 2)]
    p0 = [normal_nonzero(rng, s) for s in shapes]
    grads = [[normal_nonzero(rng, s) for s in shapes] for _ in range(10)]
    a = [p.copy() for p in p0]
    o = opt.cls(a, **_class_kwargs(opt, opts))
    for g in grads[:5]:
        o.step(g)
    o.zero_state()
    assert o.step_count == 0
    for name, arrays in o.state.items():
        want = INIT_ACC if opt is ADAGRAD else 0.0
        for arr in arrays:
            assert np.all(arr == want), name
    # From here it must behave exactly as a new optimizer on the current params.
    b = [x.copy() for x in a]
    fresh_opt = opt.cls(b, **_class_kwargs(opt, opts))
    for g in grads[5:]:
        o.step(g)
        fresh_opt.step(g)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for name in o.state:
        for x, y in zip(o.state[name], fresh_opt.state[name]):
            assert np.array_equal(x, y)


def _sd_equal(a, b):
    assert a.keys() == b.keys()
    assert a["optimizer"] == b["optimizer"] and a["step"] == b["step"] and a["lr"] == b["lr"]
    assert a["hyper"] == b["hyper"]
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert len(a["state"][name]) == len(b["state"][name])
        for x, y in zip(a["state"][name], b["state"][name]):
            assert np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_state_dict_round_trip_is_exact(opt, opts, dtype, rng):
    shapes = [(7,), (33, 3), (1,), (0,), (129,)]
    sched = schedules.InverseTime(1.0, 7)
    kw = _class_kwargs(opt, opts)
    params = [normal_nonzero(rng, s).astype(dtype) for s in shapes]
    grads = [[normal_nonzero(rng, s).astype(dtype) for s in shapes] for _ in range(20)]
    o = opt.cls(params, schedule=sched, **kw)
    for g in grads[:10]:
        o.step(g)
    sd = o.state_dict()
    saved = copy.deepcopy(sd)
    params_at_10 = [p.copy() for p in params]
    for g in grads[10:]:
        o.step(g)
    final_params = [p.copy() for p in params]
    final_state = _state_copy(o)

    # The saved dict is a deep copy: ten more steps and a new lr did not touch it.
    o.lr = kw["lr"] * 3
    _sd_equal(sd, saved)
    assert sd["step"] == 10

    # Restore into a fresh optimizer built with another lr: lr, step and state come back.
    params2 = [p.copy() for p in params_at_10]
    o2 = opt.cls(params2, schedule=sched, **dict(kw, lr=kw["lr"] * 7))
    o2.load_state_dict(sd)
    assert o2.step_count == 10 and o2.lr == kw["lr"]
    _sd_equal(o2.state_dict(), saved)
    # load_state_dict copied: mutating the dict afterwards does not reach the optimizer.
    for arrays in sd["state"].values():
        for a in arrays:
            a += 1.0
    _sd_equal(o2.state_dict(), saved)
    for g in grads[10:]:
        o2.step(g)
    for x, y in zip(params2, final_params):
        assert np.array_equal(x, y)
    for name in final_state:
        for x, y in zip(o2.state[name], final_state[name]):
            assert np.array_equal(x, y), name


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
    ]
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
    with pytest.raises(ValueError, match="state_dict|step|lr|weight_decay"):
        dst.load_state_dict(sd)
    _sd_equal(dst.state_dict(), before)
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
        _sd_equal(o.state_dict(), before)
    try:
        o.step(normal_nonzero(rng, (9,)))
    except ValueError as exc:
        pytest.fail(f"load_state_dict accepted hyper {key}={value!r} without the state it "
                    f"needs (state has {sorted(sd['state'])}), and now every step fails: {exc}")
    assert o.step_count == 2


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
