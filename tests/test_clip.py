"""Gradient clipping: ``fastopt.clip_grad_norm_`` against the float64 reference over dtypes,
odd sizes, norm types and clipping on/off; ``fastopt.torch.clip_grad_norm_`` against
torch.nn.utils.clip_grad_norm_; bit identity of the CPU paths and thread counts;
non-finite grads; bad input; empty lists; and ``max_grad_norm=`` on the steps against
clip-then-step. The bodies take the ``backend`` fixture (GPU backends skip without a GPU)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

import fastopt
from fastopt import reference
from fastopt._ext import _cpu

from conftest import CPU_PATHS, assert_bits, using_cpu_path, using_threads

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]
SIZES = [1, 7, 33, 4097, 40001]  # 40001: past the threading threshold (2^15) and 4096-blocks
NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]
# Relative rounding of one stored result (half an ulp), per dtype.
EPS = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53,
       np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}
# Smallest positive subnormal (float16 results may be subnormal: absolute rounding).
TINY = {np.dtype(np.float32): 2.0**-149, np.dtype(np.float64): 0.0,
        np.dtype(np.float16): 2.0**-24, BF16: 2.0**-133}


def fresh_grads(rng, dtype, sizes=SIZES, scale=3.0):
    """Random grads of ``dtype`` (standard normal times ``scale``, no zeros)."""
    return [(rng.standard_normal(n) * scale + 0.01).astype(dtype) for n in sizes]


def on(backend, grads):
    if backend.is_cuda and any(g.dtype == BF16 for g in grads):
        pytest.skip("bfloat16 CUDA arrays: covered through torch tensors")
    return [backend.asarray(g) for g in grads]


def host_norm(backend, norm) -> float:
    """A norm fastopt returned (a float, or a 0-d CUDA array) as a float."""
    return norm if isinstance(norm, float) else float(backend.to_numpy(norm))


def expected_scaled(g: np.ndarray, c: float) -> np.ndarray:
    """g * c as the kernels compute it: in the math type (float32 for 16-bit grads), c
    rounded to it, the product stored rounded to g's dtype."""
    if g.dtype == np.float64:
        return g * c
    return (g.astype(np.float32) * np.float32(c)).astype(g.dtype)


# ---- the norm and the clipped grads against the float64 reference -----------------------

@pytest.mark.parametrize("active", [True, False], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clip_against_reference(backend, dtype, norm_type, active, rng):
    grads = fresh_grads(rng, dtype)
    want_norm = reference.grad_norm(grads, norm_type)
    max_norm = want_norm * (0.3 if active else 2.0)
    c = reference.clip_coefficient(max_norm, want_norm)
    assert (c < 1.0) == active
    arrays = on(backend, grads)
    norm = host_norm(backend, fastopt.clip_grad_norm_(arrays, max_norm, norm_type))
    # float64 accumulation: the norm is as good as the reference's (float32 on the GPU).
    rtol = 1e-6 if backend.is_cuda and dtype != np.float64 else 1e-12
    assert norm == pytest.approx(want_norm, rel=rtol)
    for i, (a, g) in enumerate(zip(arrays, grads)):
        got = backend.to_numpy(a)
        if not active:
            assert_bits(got, g, f"grads[{i}] (coefficient 1: untouched)")
            continue
        want = g.astype(np.float64) * c
        # rounding of c (to float32 but for float64 grads) and of the product, and the
        # norm's own error (summation order) carried into c
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=4 * EPS[dtype] + rtol,
                                   atol=TINY[dtype], err_msg=f"grads[{i}]")
        if not backend.is_cuda:  # the exact product, element by element
            assert_bits(got, expected_scaled(g, fastopt.clip.coefficient(max_norm, norm)),
                        f"grads[{i}]")


def test_single_array_and_tuple(backend, rng):
    g = fresh_grads(rng, np.float32, [1000])[0]
    a = backend.asarray(g)
    norm = host_norm(backend, fastopt.clip_grad_norm_(a, 1.0))
    assert norm == pytest.approx(reference.grad_norm([g]), rel=1e-6)
    np.testing.assert_allclose(np.linalg.norm(backend.to_numpy(a).astype(np.float64)), 1.0,
                               rtol=1e-5)
    b = backend.asarray(g)
    assert host_norm(backend, fastopt.clip_grad_norm_((b,), 1.0)) == norm


def test_host_norm_is_a_float_of_the_float64_total(rng):
    grads = fresh_grads(rng, np.float32, [4097, 33])
    norm = fastopt.clip_grad_norm_(grads, math.inf)  # inf: measure, never clip
    assert type(norm) is float
    assert norm == pytest.approx(reference.grad_norm(grads), rel=1e-14)


@pytest.mark.parametrize("inf", [math.inf, np.float64(np.inf), np.float32(np.inf),
                                 np.float16(np.inf)], ids=["python", "f64", "f32", "f16"])
def test_an_infinite_limit_of_any_float_type_never_clips(inf, rng):
    grads = fresh_grads(rng, np.float32, [4097, 33])
    kept = [g.copy() for g in grads]
    assert fastopt.clip_grad_norm_(grads, inf) == fastopt.clip_grad_norm_(kept, math.inf)
    assert all(np.array_equal(a, b) for a, b in zip(grads, kept))
    params = [g.copy() for g in grads]
    fastopt.AdamW(params, lr=1e-3).step(grads, max_grad_norm=inf)  # (the step's own limit)
    p = [rng.standard_normal((3, 4)).astype(np.float32)]
    fastopt.adafactor_(p, [np.ones((3, 4), np.float32)], [np.zeros((3, 1), np.float32)],
                       [np.zeros((1, 4), np.float32)], [None], step=1, d=inf)


# ---- bit identity across CPU paths, thread counts and alignments -------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bit_identical_across_paths_and_threads(dtype, norm_type, rng):
    grads = fresh_grads(rng, dtype, [1, 7, 33, 4097, 70001, 5000])
    # one grad starting at an odd element (not 32-byte aligned)
    buf = np.empty(grads[-1].size + 1, dtype)
    buf[1:] = grads[-1]
    results = []
    for path in CPU_PATHS:
        with using_cpu_path(path):
            for threads in (1, 2, 3):
                with using_threads(threads):
                    arrays = [g.copy() for g in grads[:-1]] + [buf.copy()[1:]]
                    norm = fastopt.clip_grad_norm_(arrays, 1.0, norm_type)
                    results.append((f"{path}, {threads} threads", norm, arrays))
    first_name, first_norm, first_arrays = results[0]
    for name, norm, arrays in results[1:]:
        assert norm == first_norm or (math.isnan(norm) and math.isnan(first_norm)), \
            f"{name}: norm {norm!r} != {first_name}'s {first_norm!r}"
        for i, (a, b) in enumerate(zip(arrays, first_arrays)):
            assert_bits(a, b, f"{name}: grads[{i}]")


# ---- fastopt.torch.clip_grad_norm_ against torch's ---------------------------------------

TORCH_TOL = {"float32": 1e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.mark.parametrize("active", [True, False], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, "inf", 3.0])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "mixed"])
def test_torch_parity(dtype, norm_type, active, rng):
    torch = pytest.importorskip("torch")
    import fastopt.torch as fastopt_torch

    dtypes = ([getattr(torch, dtype)] * 5 if dtype != "mixed" else
              [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float16])
    sizes = [1, 7, 33, 4097, 513]
    values = [rng.standard_normal(n) * 3.0 + 0.01 for n in sizes]
    ours, theirs = [], []
    for dt, v in zip(dtypes, values):
        for out in (ours, theirs):
            p = torch.nn.Parameter(torch.zeros(v.size, dtype=dt))
            p.grad = torch.from_numpy(v).to(dt).clone()
            out.append(p)
    for out in (ours, theirs):  # a param without a grad is skipped
        out.insert(2, torch.nn.Parameter(torch.ones(3)))
    measured = float(torch.nn.utils.clip_grad_norm_([p for p in theirs if p.grad is not None],
                                                    math.inf, norm_type))
    for p, v in zip([p for p in theirs if p.grad is not None], values):
        p.grad = torch.from_numpy(v).to(p.dtype).clone()
    max_norm = measured * (0.3 if active else 2.0)
    got = fastopt_torch.clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
    tol = max(TORCH_TOL[str(dt).replace("torch.", "")] for dt in dtypes)
    assert float(got) == pytest.approx(float(want), rel=tol)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.grad is None:
            assert b.grad is None
            continue
        np.testing.assert_allclose(a.grad.double().numpy(), b.grad.double().numpy(),
                                   rtol=tol, atol=tol * 1e-3 * max_norm, err_msg=f"params[{i}]")


def test_torch_single_tensor_and_empty():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fastopt_torch

    p = torch.nn.Parameter(torch.zeros(10))
    assert float(fastopt_torch.clip_grad_norm_(p, 1.0)) == 0.0  # no grad: torch.tensor(0.)
    p.grad = torch.full((10,), 2.0)
    norm = fastopt_torch.clip_grad_norm_(p, 1.0, foreach=True)
    assert float(norm) == pytest.approx(math.sqrt(40.0), rel=1e-7)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(fastopt_torch.clip_grad_norm_([], 1.0)) == 0.0


# ---- non-finite grads ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_nonfinite_grads(backend, bad, norm_type, rng):
    grads = fresh_grads(rng, np.float32, [33, 4097, 7])
    grads[1][100] = bad
    arrays = on(backend, grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_(arrays, 1.0, norm_type, error_if_nonfinite=True)
    for i, (a, g) in enumerate(zip(arrays, grads)):
        assert_bits(backend.to_numpy(a), g, f"grads[{i}] after the error")
    norm = host_norm(backend, fastopt.clip_grad_norm_(arrays, 1.0, norm_type))
    want = [g.astype(np.float64) for g in grads]
    want_norm = reference.clip_grad_norm(want, 1.0, norm_type)
    assert (math.isnan(norm) and math.isnan(want_norm)) or norm == want_norm
    for i, (a, w) in enumerate(zip(arrays, want)):
        assert_bits(backend.to_numpy(a), w.astype(np.float32), f"grads[{i}]", any_nan=True)


def test_nonfinite_like_torch(rng):
    torch = pytest.importorskip("torch")
    import fastopt.torch as fastopt_torch

    for bad in (math.nan, math.inf):
        v = rng.standard_normal(100)
        v[5] = bad
        ps = []
        for _ in range(2):
            p = torch.nn.Parameter(torch.zeros(100))
            p.grad = torch.from_numpy(v).float()
            ps.append(p)
        got = fastopt_torch.clip_grad_norm_([ps[0]], 1.0)
        want = torch.nn.utils.clip_grad_norm_([ps[1]], 1.0)
        assert_bits(got.numpy(), want.numpy(), "norm", any_nan=True)
        assert_bits(ps[0].grad.numpy(), ps[1].grad.numpy(), f"grads ({bad})", any_nan=True)
        with pytest.raises(RuntimeError, match=re.escape("set `error_if_nonfinite=False`")):
            fastopt_torch.clip_grad_norm_([ps[0]], 1.0, error_if_nonfinite=True)


# ---- bad input: TypeError/ValueError naming the argument, nothing modified -----------------

BAD_ARGS = [
    (dict(max_norm=-1.0), ValueError, "max_norm"),
    (dict(max_norm=math.nan), ValueError, "max_norm"),
    (dict(max_norm="1"), TypeError, "max_norm"),
    (dict(max_norm=True), TypeError, "max_norm"),
    (dict(norm_type=0.0), ValueError, "norm_type"),
    (dict(norm_type=-2.0), ValueError, "norm_type"),
    (dict(norm_type=-math.inf), ValueError, "norm_type"),
    (dict(norm_type=math.nan), ValueError, "norm_type"),
    (dict(norm_type="2"), TypeError, "norm_type"),
    (dict(norm_type=True), TypeError, "norm_type"),
    (dict(error_if_nonfinite=1), TypeError, "error_if_nonfinite"),
]


@pytest.mark.parametrize("kw,exc,name", BAD_ARGS,
                         ids=[f"{n}={list(k.values())[0]!r}" for k, _, n in BAD_ARGS])
def test_bad_arguments(array_backend, kw, exc, name, rng):
    grads = fresh_grads(rng, np.float32, [33, 7])
    arrays = [array_backend.asarray(g) for g in grads]
    args = dict(max_norm=0.1, norm_type=2.0, error_if_nonfinite=False)
    args.update(kw)
    with pytest.raises(exc, match=name):
        fastopt.clip_grad_norm_(arrays, **args)
    for i, (a, g) in enumerate(zip(arrays, grads)):
        assert_bits(array_backend.to_numpy(a), g, f"grads[{i}]")


def test_bad_arrays_modify_nothing(rng):
    torch = pytest.importorskip("torch")
    grads = fresh_grads(rng, np.float32, [33, 7, 4097])

    def check(arrays, exc, pattern):
        before = [np.array(a, copy=True) for a in arrays if isinstance(a, np.ndarray)]
        with pytest.raises(exc, match=pattern):
            fastopt.clip_grad_norm_(arrays, 0.1)
        after = [a for a in arrays if isinstance(a, np.ndarray)]
        for i, (a, b) in enumerate(zip(after, before)):
            assert_bits(a, b, f"array {i}")

    mixed = [g.copy() for g in grads]
    mixed[1] = mixed[1].astype(np.float64)
    check(mixed, TypeError, re.escape("grads[1]"))
    read_only = [g.copy() for g in grads]
    read_only[2].flags.writeable = False
    check(read_only, ValueError, re.escape("grads[2]"))
    ints = [g.copy() for g in grads]
    ints[0] = ints[0].astype(np.int32)
    check(ints, TypeError, re.escape("grads[0]"))
    strided = [g.copy() for g in grads]
    strided[2] = np.repeat(strided[2], 2)[::2]
    check(strided, ValueError, re.escape("grads[2]"))
    aliased = [g.copy() for g in grads]
    aliased[1] = aliased[0]
    check(aliased, ValueError, "overlaps")
    check([grads[0].copy(), "nope"], TypeError, re.escape("grads[1]"))
    check([grads[0].copy(), torch.zeros(3, dtype=torch.int64)], TypeError, re.escape("grads[1]"))
    with pytest.raises(ValueError, match="stream"):
        fastopt.clip_grad_norm_([g.copy() for g in grads], 0.1, stream=1)


def test_private_bindings_check_their_arguments(rng):
    grads = fresh_grads(rng, np.float32, [33, 7])
    before = [g.copy() for g in grads]
    with pytest.raises(TypeError, match="listed"):
        _cpu.grad_norm_total(grads, 1, 2.0, False)
    with pytest.raises(TypeError, match="norm_type"):
        _cpu.grad_norm_total(grads, True, "2", False)
    with pytest.raises(ValueError, match="norm_type"):
        _cpu.grad_norm_total(grads, True, -1.0, False)
    with pytest.raises(TypeError, match="writeable"):
        _cpu.grad_norm_total(grads, True, 2.0, None)
    with pytest.raises(TypeError, match="grads"):
        _cpu.grad_norm_total(grads[0], True, 2.0, False)
    with pytest.raises(TypeError, match="coefficient"):
        _cpu.scale_grads(grads, True, "0.5")
    read_only = [g.copy() for g in grads]
    read_only[1].flags.writeable = False
    with pytest.raises(ValueError, match=re.escape("grads[1]")):
        _cpu.scale_grads(read_only, True, 0.5)
    with pytest.raises(ValueError, match=re.escape("grads[1]")):
        _cpu.grad_norm_total(read_only, True, 2.0, True)
    assert_bits(read_only[0], before[0], "grads[0]")
    for g, b in zip(grads, before):
        assert_bits(g, b, "grads")


# ---- zero-size arrays and empty lists -----------------------------------------------------

def test_empty_and_zero_size(backend, rng):
    assert fastopt.clip_grad_norm_([], 1.0) == 0.0
    empty = backend.asarray(np.zeros(0, np.float32))
    assert host_norm(backend, fastopt.clip_grad_norm_([empty], 1.0)) == 0.0
    grads = fresh_grads(rng, np.float32, [33, 4097])
    with_empty = [backend.asarray(grads[0]), backend.asarray(np.zeros(0, np.float32)),
                  backend.asarray(grads[1]), backend.asarray(np.zeros((3, 0), np.float32))]
    without = [backend.asarray(g) for g in grads]
    a = host_norm(backend, fastopt.clip_grad_norm_(with_empty, 1.0))
    b = host_norm(backend, fastopt.clip_grad_norm_(without, 1.0))
    assert a == b
    assert_bits(backend.to_numpy(with_empty[2]), backend.to_numpy(without[1]), "grads")


# ---- max_grad_norm= on the steps: equal to clip_grad_norm_ then the step -----------------

STEP_CASES = {
    "sgd": (fastopt.sgd_, ["momentum_buffers"], dict(lr=0.1, momentum=0.9), False),
    "adagrad": (fastopt.adagrad_, ["state_sums"], dict(lr=0.1), True),
    "rmsprop": (fastopt.rmsprop_, ["square_avgs"], dict(lr=0.01), False),
    "adam": (fastopt.adam_, ["exp_avgs", "exp_avg_sqs"], dict(lr=0.01, weight_decay=0.01), True),
    "adamw": (fastopt.adamw_, ["exp_avgs", "exp_avg_sqs"], dict(lr=0.01), True),
    "lion": (fastopt.lion_, ["exp_avgs"], dict(lr=1e-3), False),
    "sophia": (fastopt.sophia_, ["exp_avgs", "hessian_diags"], dict(lr=1e-3), False),
}


@pytest.mark.parametrize("limit", ["clipping", "not-clipping", "zero"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_max_grad_norm_equals_clip_then_step(backend, name, dtype, limit, rng):
    fn, states, hyper, takes_step = STEP_CASES[name]
    sizes = [7, 4097, 33]
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    state = {s: [rng.uniform(0.1, 1.0, n).astype(dtype) for n in sizes] for s in states}
    fused = ([backend.asarray(p) for p in params],
             {s: [backend.asarray(a) for a in v] for s, v in state.items()})
    plain = ([backend.asarray(p) for p in params],
             {s: [backend.asarray(a) for a in v] for s, v in state.items()})
    for t in (1, 2):
        grads = fresh_grads(rng, dtype, sizes, scale=5.0)
        norm = reference.grad_norm(grads)
        max_grad_norm = {"clipping": 0.3 * norm, "not-clipping": 2.0 * norm, "zero": 0.0}[limit]
        step = dict(step=t) if takes_step else {}
        fused_grads = [backend.asarray(g) for g in grads]
        plain_grads = [backend.asarray(g) for g in grads]
        got = fn(fused[0], fused_grads, *fused[1].values(), max_grad_norm=max_grad_norm,
                 **hyper, **step)
        want = fastopt.clip_grad_norm_(plain_grads, max_grad_norm)
        assert fn(plain[0], plain_grads, *plain[1].values(), **hyper, **step) is None
        assert host_norm(backend, got) == host_norm(backend, want)
        for i, (a, g) in enumerate(zip(fused_grads, grads)):  # read twice, never written
            assert_bits(backend.to_numpy(a), g, f"grads[{i}]")
    # The kernel multiplies each grad by the coefficient as it loads it: the bits of
    # clip-then-step, whose clipped grads are the same products stored.
    for role, (a_list, b_list) in [("params", (fused[0], plain[0]))] + [
            (s, (fused[1][s], plain[1][s])) for s in states]:
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert_bits(backend.to_numpy(a), backend.to_numpy(b), f"{role}[{i}]")


def test_max_grad_norm_on_the_classes(backend, rng):
    if backend.is_cuda and backend.lib.name == "cupy":
        pytest.skip("the optimizer classes allocate CuPy state: covered by torch-cuda")
    sizes = [7, 4097]
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    a = [backend.asarray(p) for p in params]
    b = [backend.asarray(p) for p in params]
    opt = fastopt.AdamW(a, lr=0.01)
    states = [[backend.asarray(np.zeros(n, np.float32)) for n in sizes] for _ in range(2)]
    for t in (1, 2, 3):
        grads = fresh_grads(rng, np.float32, sizes, scale=5.0)
        got = opt.step([backend.asarray(g) for g in grads], max_grad_norm=1.0)
        want = fastopt.adamw_(b, [backend.asarray(g) for g in grads], *states, step=t, lr=0.01,
                              max_grad_norm=1.0)
        assert host_norm(backend, got) == host_norm(backend, want)
    for i in range(len(sizes)):
        assert_bits(backend.to_numpy(a[i]), backend.to_numpy(b[i]), f"params[{i}]")
    assert opt.step([backend.asarray(g) for g in fresh_grads(rng, np.float32, sizes)]) is None


@pytest.mark.parametrize("value,exc", [(-1.0, ValueError), (math.nan, ValueError),
                                       ("1", TypeError)])
def test_max_grad_norm_bad_value(value, exc, rng):
    params = [rng.standard_normal(33).astype(np.float32)]
    grads = fresh_grads(rng, np.float32, [33])
    before = params[0].copy()
    with pytest.raises(exc, match="max_grad_norm"):
        fastopt.sgd_(params, grads, lr=0.1, max_grad_norm=value)
    assert_bits(params[0], before, "params[0]")


@pytest.mark.parametrize("limit", ["clipping", "zero"])
@pytest.mark.parametrize("how", ["functional", "class", "class int8"])
def test_max_grad_norm_refused_step_clips_nothing(backend, how, limit, rng):
    """A clipped step the kernel refuses (here: a grad that is its param) writes nothing:
    the norm pass reads the grads, the step's checks refuse before its first write (and,
    for the two calls of 8-bit state, the second call's before the first runs)."""
    sizes = [5000, 33]
    params = [backend.asarray(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    grads = [backend.asarray(g) for g in fresh_grads(rng, np.float32, sizes, scale=5.0)]
    grads[1] = params[1]
    max_grad_norm = 0.0 if limit == "zero" else 1.0
    if how == "functional":
        state = [[backend.asarray(np.ones(n, np.float32)) for n in sizes] for _ in range(2)]
        call = lambda: fastopt.adamw_(params, grads, *state, step=1, lr=0.01,  # noqa: E731
                                      max_grad_norm=max_grad_norm)
    else:
        if backend.is_cuda and backend.lib.name == "cupy":
            pytest.skip("the optimizer classes allocate CuPy state: covered by torch-cuda")
        kind = "int8" if how == "class int8" else "float32"
        opt = fastopt.AdamW(params, lr=0.01, state_dtype=kind)
        call = lambda: opt.step(grads, max_grad_norm=max_grad_norm)  # noqa: E731
    before = [backend.to_numpy(a).copy() for a in params + grads]
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps params\[1\]"):
        call()
    for i, (a, b) in enumerate(zip(params + grads, before)):
        assert_bits(backend.to_numpy(a), b, f"array {i}")


def test_device_norm_keywords_of_the_cuda_step_binding(backend, rng):
    """The CUDA step binding's clipping from a norm in device memory (grad_norm with
    max_grad_norm): bad combinations and arrays are refused by name, writing nothing."""
    if not backend.is_cuda:
        pytest.skip("grad_norm= is the CUDA binding's")
    kernel = fastopt._ext._cuda.sgd
    hyper = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, l1=0.0,
                 nesterov=False, maximize=False, step=1)
    params = [backend.asarray(rng.standard_normal(33).astype(np.float32))]
    grads = [backend.asarray(rng.standard_normal(33).astype(np.float32))]
    norm = backend.asarray(np.array(2.0, np.float32))
    before = backend.to_numpy(params[0]).copy()
    bad = [
        (TypeError, "max_grad_norm: missing", dict(grad_norm=norm)),
        (TypeError, "grad_norm: missing", dict(max_grad_norm=1.0)),
        (TypeError, "grad_clip: excludes grad_norm",
         dict(grad_norm=norm, max_grad_norm=1.0, grad_clip=0.5)),
        (ValueError, "max_grad_norm: must be >= 0", dict(grad_norm=norm, max_grad_norm=-1.0)),
        (ValueError, "grad_norm: expected one element",
         dict(grad_norm=backend.asarray(np.ones(2, np.float32)), max_grad_norm=1.0)),
        (TypeError, "grad_norm: dtype int32",
         dict(grad_norm=backend.asarray(np.array(2, np.int32)), max_grad_norm=1.0)),
    ]
    for exc, match, kw in bad:
        with pytest.raises(exc, match=match):
            kernel(params, grads, None, True, **hyper, **kw)
        assert_bits(backend.to_numpy(params[0]), before, match)
    kernel(params, grads, None, True, **hyper, grad_norm=norm, max_grad_norm=1.0)
    host = [before.copy()]  # the CPU step with the grads clipped first: the same bits
    clipped = backend.to_numpy(grads[0]) * np.float32(1.0 / (2.0 + 1e-6))
    fastopt._ext._cpu.sgd(host, [clipped], None, True, **hyper)
    assert_bits(backend.to_numpy(params[0]), host[0], "step clipped by a device norm")


# ---- fastopt.torch: opt.max_grad_norm against clip_grad_norm_ then torch.optim ------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_torch_optimizer_max_grad_norm(name, scaler, device, rng):
    """opt.max_grad_norm: torch's clip-then-step, the grads read and never written (on the
    GPU the kernels read the norm from device memory)."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as fastopt_torch

    if device == "cuda" and not (torch.cuda.is_available() and fastopt.cuda_available()):
        pytest.skip("needs a CUDA GPU and fastopt._cuda")
    shapes = [(33,), (64, 65), (7,)]
    init = [torch.from_numpy(rng.standard_normal(s)).float().to(device) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = dict(lr=0.01) if name == "AdamW" else dict(lr=0.1, momentum=0.9)
    opt = getattr(fastopt_torch, name)([{"params": ours[:2]}, {"params": ours[2:]}], **hyper)
    ref = getattr(torch.optim, name)([{"params": theirs[:2]}, {"params": theirs[2:]}], **hyper)
    opt.max_grad_norm = 0.5
    scalers = ([torch.amp.GradScaler(device, init_scale=2.0**10) for _ in range(2)]
               if scaler else None)
    for t in range(3):
        x = torch.from_numpy(rng.standard_normal(65)).float().to(device)
        for params, o, k in ((ours, opt, 0), (theirs, ref, 1)):
            loss = ((params[1] @ x).sum() * params[0].sum() + params[2].square().sum()) * 10.0
            o.zero_grad()
            (scalers[k].scale(loss) if scaler else loss).backward()
            if o is ref:
                if scaler:
                    scalers[k].unscale_(ref)
                want = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
                grads_before = None
            else:
                grads_before = [p.grad.clone() for p in ours]
            if scaler:
                scalers[k].step(o)
                scalers[k].update()
            else:
                o.step()
            if grads_before is not None:  # read, never written
                for i, (p, g) in enumerate(zip(ours, grads_before)):
                    assert_bits(p.grad.cpu().numpy(), g.cpu().numpy(), f"params[{i}].grad")
        assert float(opt.last_grad_norm) == pytest.approx(float(want), rel=1e-5)
        assert float(want) > 0.5  # clipping was active
        for i, (a, b) in enumerate(zip(ours, theirs)):
            np.testing.assert_allclose(a.detach().cpu().numpy(), b.detach().cpu().numpy(),
                                       rtol=1e-5, atol=1e-6, err_msg=f"step {t}: params[{i}]")


def test_fuzz_findings_are_fixed(rng):
    # Found by tests/test_fuzz.py: a norm_type past the float range was an OverflowError,
    # a tiny one overflowed the root; a zero clip coefficient scaled the caller's grads
    # before the step refused its other arguments.
    g = [rng.standard_normal(7).astype(np.float32)]
    with pytest.raises(ValueError, match=r"norm_type: .* out of the float range"):
        fastopt.clip_grad_norm_(g, 1.0, norm_type=10**400)
    assert fastopt.clip_grad_norm_([np.full(3, 2.0, np.float32)], math.inf,
                                   norm_type=1e-300) == math.inf
    p = rng.standard_normal(9).astype(np.float32)
    grads = rng.standard_normal(9).astype(np.float32)
    before = grads.copy()
    with pytest.raises(ValueError, match=r"overlaps"):
        fastopt.adam_(p, grads, grads, np.zeros(9, np.float32), step=1, max_grad_norm=0.0)
    np.testing.assert_array_equal(grads, before)
    # and a successful step with a zero coefficient leaves the caller's grads as they were
    m, v = np.zeros(9, np.float32), np.zeros(9, np.float32)
    fastopt.adam_(p, grads, m, v, step=1, max_grad_norm=0.0)
    np.testing.assert_array_equal(grads, before)
