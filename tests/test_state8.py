"""8-bit blockwise optimizer state (uint8 state arrays + ``absmax=``; ``state_dtype="int8"``
of the classes): the kernels' maps are the reference's; the encoder picks the nearest map
value; every optimizer, float32 and 16-bit params, masked or not, on the CPU's paths and
thread counts, equals "decode the state, float32-state step, encode it again with the
reference" bit for bit at every step; the trajectory tracks the float64 reference to the
maps' precision; bad input is refused before anything is written."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import _ext, reference

from backends import CPU, assert_bits, backend_params, open_backend
from conftest import OPTIMIZERS, normal_nonzero, opt_cases, using_cpu_path, using_threads

SHAPES = [(7,), (1,), (256,), (257,), (33, 3), (4097,), (40_001,)]
PARAM_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
BLOCK = reference.STATE8_BLOCK


def _blocks(shape) -> int:
    return -(-int(np.prod(shape)) // BLOCK)


def _signed(opt, name: str) -> bool:
    return not next(a for a in opt.spec.states if a.name == name).nonnegative


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_maps_are_the_reference_maps(signed):
    kernel = _ext._cpu.state8_map(signed)
    want = reference.dynamic_map(signed)
    assert_bits(kernel, want, f"signed={signed} map")
    assert np.all(np.diff(want.astype(np.float64)) > 0), "a map is strictly increasing"
    assert want[255] == 1.0 and want[127 if signed else 0] == 0.0
    assert (want < 0).sum() == (127 if signed else 0)


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_the_exact_dynamic_maps_to_float32_rounding(signed):
    """Each value is within 1.5 float32 ulp of the exact midpoint (double precision) of
    Dettmers et al.'s dynamic map: decade d's B bins of [0.1, 1] * 10^(d-6)."""
    exact = []
    for d in range(7):
        bins = 1 << d if signed else 2 << d
        exact += [10.0 ** (d - 6) * (0.1 + 0.9 * (2 * k + 1) / (2 * bins)) for k in range(bins)]
    positive = np.array(exact)
    want = np.concatenate([-positive[::-1], [0.0], positive, [1.0]]) if signed else \
        np.concatenate([[0.0], positive, [1.0]])
    got = reference.dynamic_map(signed).astype(np.float64)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 1.5 * ulp), np.max(np.abs(got - want) / ulp)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_map_values(signed, rng):
    values = reference.dynamic_map(signed).astype(np.float64)
    x = rng.uniform(-1 if signed else 0, 1, 200_000).astype(np.float32)
    x[:1000] = rng.choice(values, 1000).astype(np.float32)  # exact map values stay exact
    x[1000:2000] *= np.float32(1e-5)  # the small decades
    absmax = np.ones((x.size + BLOCK - 1) // BLOCK, np.float32)
    codes = reference._encode_state8(x, np.repeat(absmax, BLOCK)[: x.size], signed)
    err = np.abs(values[codes] - x)
    nearest = np.searchsorted(values, x.astype(np.float64))
    lo = values[np.clip(nearest - 1, 0, 255)]
    hi = values[np.clip(nearest, 0, 255)]
    best = np.minimum(np.abs(x - lo), np.abs(hi - x))
    # nearest up to float32 rounding of x * scale at the bins' edges
    assert np.all(err <= best + 4e-7 * np.maximum(np.abs(x), 1e-6)), "not the nearest"
    assert np.array_equal(codes[:1000], np.searchsorted(values, x[:1000].astype(np.float64)))


def _state8(opt, opts, rng):
    """Initial 8-bit state for SHAPES: {name: (codes, absmax)} from the optimizer's init."""
    out = {}
    for name in opt.states(opts):
        codes, absmax = [], []
        for s in SHAPES:
            c, a = reference.quantize_state8(opt.init[name](s, rng).astype(np.float32),
                                             _signed(opt, name))
            codes.append(c)
            absmax.append(a)
        out[name] = (codes, absmax)
    return out


def _step(opt, opts, params, grads, state, t, masks=None):
    args = [params, grads] + [None if n is None else state[n] for n in opt.state_args(opts)]
    kwargs = dict(opt.hyper(opts))
    if opt.takes_step:
        kwargs["step"] = t
    if masks is not None:
        kwargs["masks"] = masks
    opt.fn(*args, **kwargs)


def _run8(opt, opts, param_dtype, seed, steps=3, masked=False, backend=CPU):
    """``steps`` int8-state steps on ``backend``'s arrays, each checked against decode ->
    float32 step (the CPU's) -> encode."""
    rng = np.random.default_rng(seed)
    params = [normal_nonzero(rng, s).astype(param_dtype) for s in SHAPES]
    state8 = _state8(opt, opts, rng)
    masks = [rng.random(s) < 0.8 for s in SHAPES] if masked else None
    on = backend.asarray
    dev_params = [on(p) for p in params]
    dev_state = {n: ([on(c) for c in v[0]], [on(a) for a in v[1]]) for n, v in state8.items()}
    dev_masks = None if masks is None else [on(m) for m in masks]
    history = []
    for t in range(1, steps + 1):
        grads = [normal_nonzero(rng, s).astype(param_dtype) for s in SHAPES]
        # the emulation, on copies
        p_emul = [p.copy() for p in params]
        decoded = {n: [reference.dequantize_state8(c, a, _signed(opt, n)) for c, a in zip(*v)]
                   for n, v in state8.items()}
        with CPU.activate():
            _step(opt, opts, p_emul, grads, decoded, t, masks)
        want = {}
        for n, arrays in decoded.items():
            if n in opt.read_only:
                want[n] = state8[n]
            else:
                pairs = [reference.quantize_state8(a, _signed(opt, n)) for a in arrays]
                want[n] = ([c for c, _ in pairs], [a for _, a in pairs])
        # the kernel
        args = [dev_params, [on(g) for g in grads]] + [
            None if n is None else dev_state[n][0] for n in opt.state_args(opts)]
        kwargs = dict(opt.hyper(opts), absmax={n: v[1] for n, v in dev_state.items()})
        if opt.takes_step:
            kwargs["step"] = t
        if masked:
            kwargs["masks"] = dev_masks
        opt.fn(*args, **kwargs)
        params = [backend.to_numpy(p) for p in dev_params]
        state8 = {n: ([backend.to_numpy(c) for c in v[0]], [backend.to_numpy(a) for a in v[1]])
                  for n, v in dev_state.items()}
        for i, (p, q) in enumerate(zip(params, p_emul)):
            assert_bits(p, q, f"step {t} params[{i}]", any_nan=True)
        for n in state8:
            for i in range(len(SHAPES)):
                assert_bits(state8[n][0][i], want[n][0][i], f"step {t} {n}[{i}] codes")
                assert_bits(state8[n][1][i], want[n][1][i], f"step {t} absmax[{n!r}][{i}]",
                            any_nan=True)
        history.append(([p.copy() for p in params],
                        {n: ([c.copy() for c in v[0]], [a.copy() for a in v[1]])
                         for n, v in state8.items()}))
    return history


def _same_history(a, b, what):
    for t, ((pa, sa), (pb, sb)) in enumerate(zip(a, b), 1):
        for i, (x, y) in enumerate(zip(pa, pb)):
            assert_bits(x, y, f"{what} step {t} params[{i}]", any_nan=True)
        for n in sa:
            for part in (0, 1):
                for i, (x, y) in enumerate(zip(sa[n][part], sb[n][part])):
                    assert_bits(x, y, f"{what} step {t} {n}[{i}][{part}]", any_nan=True)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opt,opts", [c for c in opt_cases("representative")
                                      if c.values[0].states(c.values[1])])
def test_int8_state_step_is_decode_step_encode(opt, opts, param_dtype, masked):
    want = None
    for path, threads in [("scalar", 1), ("avx2", 1), ("avx2", 2), ("scalar", 3)]:
        with using_cpu_path(path), using_threads(threads):
            got = _run8(opt, opts, param_dtype, 5, masked=masked)
        if want is not None:
            _same_history(got, want, f"{path}/{threads} threads against scalar")
        want = got


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("opt,opts", [c for c in opt_cases("representative")
                                      if c.values[0].states(c.values[1])])
@pytest.mark.parametrize("where", backend_params([("cupy", True), ("torch-cuda", True)]))
def test_int8_state_on_the_gpu_is_decode_step_encode_as_on_the_cpu(where, opt, opts, param_dtype,
                                                                   masked):
    """The GPU kernel (a half-warp per block) against the emulation at every step, and
    against the CPU kernels' whole history."""
    backend = open_backend(where)
    if not backend.holds(param_dtype):
        pytest.skip(f"{backend.name} has no {np.dtype(param_dtype).name}")
    got = _run8(opt, opts, param_dtype, 5, masked=masked, backend=backend)
    _same_history(got, _run8(opt, opts, param_dtype, 5, masked=masked), "GPU against the CPU")


@pytest.mark.parametrize("opt,opts", [c for c in opt_cases("representative")
                                      if c.values[0].states(c.values[1])])
def test_int8_state_tracks_the_float64_reference(opt, opts):
    """20 steps from the same start: the int8-state params stay within the quantization
    error's reach of the float64 reference (relative to how far the params moved)."""
    rng = np.random.default_rng(3)
    shape = (8192,)
    start = normal_nonzero(rng, shape).astype(np.float32)
    params = start.copy()
    ref_p = start.astype(np.float64)
    init = {n: opt.init[n](shape, rng).astype(np.float32) for n in opt.states(opts)}
    state8 = {n: reference.quantize_state8(v, _signed(opt, n)) for n, v in init.items()}
    ref_state = {n: reference.dequantize_state8(*state8[n], _signed(opt, n)).astype(np.float64)
                 for n in init}
    for t in range(1, 21):
        g = normal_nonzero(rng, shape).astype(np.float32)
        args = [params, g] + [None if n is None else state8[n][0] for n in opt.state_args(opts)]
        kwargs = dict(opt.hyper(opts), absmax={n: v[1] for n, v in state8.items()})
        ref_kw = dict(opt.hyper(opts), **opt.ref_extra)
        if opt.takes_step:
            kwargs["step"] = ref_kw["step"] = t
        opt.fn(*args, **kwargs)
        opt.ref(ref_p, g.astype(np.float64),
                *[None if n is None else ref_state[n] for n in opt.state_args(opts)], **ref_kw)
    moved = np.abs(ref_p - start).mean()
    err = np.abs(params - ref_p).mean()
    assert moved > 0
    assert err <= 0.1 * moved, f"mean error {err:.3g} vs mean move {moved:.3g}"


def _adamw_call(n=5000, dtype=np.float32):
    rng = np.random.default_rng(1)
    p = normal_nonzero(rng, (n,)).astype(dtype)
    g = normal_nonzero(rng, (n,)).astype(dtype)
    m, am = reference.quantize_state8(normal_nonzero(rng, (n,)).astype(np.float32), True)
    v, av = reference.quantize_state8(np.abs(normal_nonzero(rng, (n,))).astype(np.float32), False)
    return p, g, m, v, am, av


@pytest.mark.parametrize("case", [
    "no absmax", "absmax list", "missing entry", "extra entry", "wrong size", "float64 absmax",
    "read-only absmax", "absmax aliases absmax", "absmax aliases params", "float state",
    "float64 params", "int8 state", "mixed state",
])
def test_bad_8bit_state_is_refused_before_anything_is_written(case, array_backend):
    b = array_backend
    if case == "read-only absmax" and b.is_cuda:
        pytest.skip("CUDA arrays have no read-only flag")
    p, g, m, v, am, av = (b.asarray(a) for a in _adamw_call())
    absmax = {"exp_avgs": am, "exp_avg_sqs": av}
    state = [m, v]
    params = p
    err: type = ValueError
    match = "absmax"
    if case == "no absmax":
        absmax, err = None, TypeError
    elif case == "absmax list":
        absmax, err = [am, av], TypeError
    elif case == "missing entry":
        del absmax["exp_avg_sqs"]
        match = "exp_avg_sqs"
    elif case == "extra entry":
        absmax["max_exp_avg_sqs"] = b.asarray(b.to_numpy(av))
        match = "max_exp_avg_sqs"
    elif case == "wrong size":
        absmax["exp_avgs"] = b.asarray(b.to_numpy(am)[:-1])
        match = r"absmax\['exp_avgs'\].*need"
    elif case == "float64 absmax":
        absmax["exp_avgs"] = b.asarray(b.to_numpy(am).astype(np.float64))
        err, match = TypeError, r"absmax\['exp_avgs'\].*float32"
    elif case == "read-only absmax":
        absmax["exp_avgs"] = am.copy()
        absmax["exp_avgs"].setflags(write=False)
        match = "read-only"
    elif case == "absmax aliases absmax":
        absmax["exp_avg_sqs"] = am
        match = "overlaps"
    elif case == "absmax aliases params":
        absmax["exp_avgs"] = p[: am.size]
        match = "overlaps"
    elif case == "float state":
        state = [b.asarray(b.to_numpy(a).astype(np.float32)) for a in (m, v)]
        match = "only for 8-bit state"
    elif case == "float64 params":
        params, g = (b.asarray(b.to_numpy(a).astype(np.float64)) for a in (p, g))
        err, match = TypeError, "state type"
    elif case == "int8 state":
        state = [b.view(m, "int8"), v]
        err, match = TypeError, "exp_avgs"
    elif case == "mixed state":
        state = [m, b.asarray(b.to_numpy(v).astype(np.float32))]
        err, match = TypeError, "exp_avg_sqs"
    arrays = [params, g, *state, *(absmax.values() if isinstance(absmax, dict) else [])]
    before = [b.to_numpy(a) for a in arrays]
    with pytest.raises(err, match=match):
        fastopt.adamw_(params, g, *state, step=1, absmax=absmax)
    for a, was in zip(arrays, before):
        assert_bits(b.to_numpy(a), was, "an argument was modified")


def test_zero_size_and_empty_lists_are_no_ops():
    p = np.zeros(0, np.float32)
    fastopt.adamw_([p], [p.copy()], [np.zeros(0, np.uint8)], [np.zeros(0, np.uint8)], step=1,
                   absmax={"exp_avgs": [np.zeros(0, np.float32)],
                           "exp_avg_sqs": [np.zeros(0, np.float32)]})
    fastopt.adamw_([], [], [], [], step=1, absmax={"exp_avgs": [], "exp_avg_sqs": []})


def test_non_finite_state_makes_its_block_nan_and_only_its_block():
    p, g, m, v, am, av = _adamw_call(1024)
    g[300] = np.nan  # block 1
    fastopt.adamw_(p, g, m, v, step=1, absmax={"exp_avgs": am, "exp_avg_sqs": av})
    assert np.isnan(am[1]) and np.isnan(av[1])
    assert np.isfinite(np.delete(am, 1)).all() and np.isfinite(np.delete(av, 1)).all()
    decoded = reference.dequantize_state8(m, am, True)
    assert np.isnan(decoded[256:512]).all() and np.isfinite(np.delete(decoded, range(256, 512))).all()
    assert np.isfinite(p[:256]).all() and np.isfinite(p[512:]).all()


def test_state8_costs_a_quarter_of_float32():
    n = 1 << 20
    assert (n + 4 * _blocks((n,))) / (4 * n) <= 0.26


# -- the array classes: state_dtype="int8" --------------------------------------------------
CLASS_SHAPES = [(5000,), (100,), (64, 80), (4096,), (4095,)]


def _class_pair(rng, name="adamw", **kw):
    cls = fastopt.optim.CLASSES[name]
    params = [normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES]
    return params, cls([p.copy() for p in params], state_dtype="int8", **kw)


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("sgd", dict(lr=0.1, momentum=0.9)),
                                     ("adagrad", dict(initial_accumulator_value=0.5)),
                                     ("rmsprop", dict(centered=True, momentum=0.5)),
                                     ("lion", {})])
def test_class_keeps_8bit_state_for_large_params_and_steps_like_the_functional(name, kw, rng):
    params, opt = _class_pair(rng, name, **kw)
    big = [int(np.prod(s)) >= 4096 for s in CLASS_SHAPES]
    for n, arrays in opt.state.items():
        assert [a.dtype == np.uint8 for a in arrays] == big
        assert [m is not None for m in opt.absmax[n]] == big
    # the same steps through the functional API on copies, split as the class splits them
    spec = opt._spec
    state = {n: [a.copy() for a in v] for n, v in opt.state.items()}
    maxima = {n: [None if m is None else m.copy() for m in v] for n, v in opt.absmax.items()}
    hyper = dict(opt._kw, lr=opt.lr)
    fn = getattr(fastopt, f"{spec.name}_")
    for t in range(1, 4):
        grads = [normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES]
        opt.step(grads)
        for sel in (big, [not b for b in big]):
            idx = [i for i, b in enumerate(sel) if b]
            names = [a.name if a.name in state else None for a in spec.states]
            args = [[params[i] for i in idx], [grads[i] for i in idx]]
            args += [None if n is None else [state[n][i] for i in idx] for n in names]
            call = {k: v for k, v in hyper.items() if k in spec.hyper}
            if spec.takes_step:
                call["step"] = t
            if sel is big:
                call["absmax"] = {n: [maxima[n][i] for i in idx] for n in state}
            fn(*args, **call)
    for i, (a, b) in enumerate(zip(opt.params, params)):
        assert_bits(a, b, f"params[{i}]")
    for n in state:
        for i in range(len(CLASS_SHAPES)):
            assert_bits(opt.state[n][i], state[n][i], f"{n}[{i}]")


def test_class_state_dict_round_trips_and_converts(rng):
    params, opt = _class_pair(rng)
    for _ in range(3):
        opt.step([normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES])
    saved = opt.state_dict()
    grads = [normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES]
    twin = fastopt.AdamW([p.copy() for p in opt.params], state_dtype="int8")
    twin.load_state_dict(saved)
    opt.step(grads)
    twin.step([g.copy() for g in grads])
    for a, b in zip(opt.params, twin.params):
        assert_bits(a, b, "restored 8-bit optimizer")
    # 8-bit -> float32: the decoded state; float32 -> 8-bit: the reference's codes
    plain = fastopt.AdamW([p.copy() for p in opt.params])
    plain.load_state_dict(opt.state_dict())
    for n in opt.state:
        for i, (codes, top) in enumerate(zip(opt.state[n], opt.absmax[n])):
            if top is None:
                assert_bits(plain.state[n][i], codes, f"{n}[{i}] float state kept")
            else:
                want = reference.dequantize_state8(codes, top, n == "exp_avgs")
                assert_bits(plain.state[n][i], want, f"{n}[{i}] decoded")
    again = fastopt.AdamW([p.copy() for p in opt.params], state_dtype="int8")
    again.load_state_dict(plain.state_dict())
    for n in opt.state:
        for i, arr in enumerate(plain.state[n]):
            if again.absmax[n][i] is not None:
                codes, top = reference.quantize_state8(arr, n == "exp_avgs")
                assert_bits(again.state[n][i], codes, f"{n}[{i}] quantized")
                assert_bits(again.absmax[n][i], top, f"absmax {n}[{i}] quantized")


def test_class_zero_state_encodes_the_initial_value(rng):
    _, opt = _class_pair(rng, "adagrad", initial_accumulator_value=0.25)
    opt.step([normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES])
    opt.zero_state()
    for i, (codes, top) in enumerate(zip(opt.state["state_sums"], opt.absmax["state_sums"])):
        value = codes if top is None else reference.dequantize_state8(codes, top, False)
        assert np.all(value == np.float32(0.25)), i


GPU = backend_params([("cupy", True), ("torch-cuda", True)])


@pytest.mark.parametrize("where", GPU)
def test_class_int8_state_on_the_gpu_steps_and_checkpoints_as_on_the_cpu(where, rng):
    backend = open_backend(where)
    params = [normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES]
    cpu = fastopt.AdamW([p.copy() for p in params], lr=0.01, state_dtype="int8")
    gpu = fastopt.AdamW([backend.asarray(p) for p in params], lr=0.01, state_dtype="int8")
    for _ in range(3):
        grads = [normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES]
        cpu.step(grads)
        gpu.step([backend.asarray(g) for g in grads])

    def same(opt, what):
        for i, (a, b) in enumerate(zip(opt.params, cpu.params)):
            assert_bits(backend.to_numpy(a), b, f"{what} params[{i}]")
        for n in cpu.state:
            for i, (a, b) in enumerate(zip(opt.state[n], cpu.state[n])):
                assert_bits(backend.to_numpy(a), b, f"{what} {n}[{i}]")
            for i, (a, b) in enumerate(zip(opt.absmax[n], cpu.absmax[n])):
                assert (a is None) == (b is None)
                if b is not None:
                    assert_bits(backend.to_numpy(a), b, f"{what} absmax[{n!r}][{i}]")

    same(gpu, "GPU")
    resumed = fastopt.AdamW([backend.asarray(backend.to_numpy(p)) for p in gpu.params], lr=0.01,
                            state_dtype="int8")
    resumed.load_state_dict(gpu.state_dict())
    grads = [normal_nonzero(rng, s).astype(np.float32) for s in CLASS_SHAPES]
    cpu.step(grads)
    resumed.step([backend.asarray(g) for g in grads])
    same(resumed, "resumed on the GPU")


@pytest.mark.parametrize("case", ["float64", "sophia", "int4"])
def test_class_refuses_what_8bit_state_cannot_hold(case, rng):
    p = normal_nonzero(rng, (5000,)).astype(np.float64 if case == "float64" else np.float32)
    with pytest.raises(ValueError, match="state_dtype"):
        if case == "sophia":
            fastopt.Sophia([p], lr=0.01, state_dtype="int8")
        else:
            fastopt.AdamW([p], state_dtype="int8" if case == "float64" else "int4")


def _snapshot(opt):
    """Every array an optimizer holds (params, state, block maxima), copied, and its count."""
    arrays = [p.copy() for p in opt.params]
    arrays += [a.copy() for v in opt.state.values() for a in v]
    arrays += [m.copy() for v in opt.absmax.values() for m in v if m is not None]
    return arrays, opt.step_count


def _assert_unchanged(opt, before, what):
    arrays, count = _snapshot(opt)
    assert count == before[1], what
    assert len(arrays) == len(before[0]), what
    for k, (a, b) in enumerate(zip(arrays, before[0])):
        assert a.dtype == b.dtype, f"{what}: array {k}'s dtype"
        assert_bits(a, b, f"{what}: array {k}")


def _edit(saved, key, name, i, value):
    saved[key][name][i] = value(saved[key][name][i])


# A saved 8-bit state_dict edited wrong, loaded into a float32 ("float") or an 8-bit
# ("int8") optimizer: (edit, match).
BAD_8BIT_LOADS = {
    "no absmax, into int8": (lambda sd: sd.pop("absmax"), r"state_dict\['state'\]\['exp_avgs'\]\[0\].*uint8"),
    "absmax entry None, into int8": (lambda sd: sd["absmax"].__setitem__("exp_avgs", None),
                                     r"state_dict\['state'\]\['exp_avgs'\]\[0\].*absmax"),
    "absmax short, into float": (lambda sd: _edit(sd, "absmax", "exp_avgs", 0, lambda a: a[:-1]),
                                 r"state_dict\['absmax'\]\['exp_avgs'\]\[0\].*\(20,\)"),
    "absmax long, into float": (lambda sd: _edit(sd, "absmax", "exp_avgs", 0,
                                                 lambda a: np.ones(21, np.float32)),
                                r"state_dict\['absmax'\]\['exp_avgs'\]\[0\]"),
    "absmax float64, into float": (lambda sd: _edit(sd, "absmax", "exp_avgs", 0,
                                                    lambda a: a.astype(np.float64)),
                                   r"state_dict\['absmax'\]\['exp_avgs'\]\[0\].*float64"),
    **{f"absmax {what}, into {kind}": (
        lambda sd, value=value: _edit(sd, "absmax", "exp_avgs", 0,
                                      lambda a: np.where(np.arange(a.size) == 7, value, a)),
        r"^state_dict\['absmax'\]\['exp_avgs'\]\[0\]: block maxima must be finite and >= 0")
       for what, value in (("NaN", np.float32(np.nan)), ("inf", np.float32(np.inf)),
                           ("negative", np.float32(-0.5)))
       for kind in ("int8", "float")},
    "codes float32, into float": (lambda sd: _edit(sd, "state", "exp_avgs", 0,
                                                   lambda a: a * np.float32(0.37)),
                                  r"state_dict\['state'\]\['exp_avgs'\]\[0\].*uint8"),
    "codes int64, into float": (lambda sd: _edit(sd, "state", "exp_avgs", 0,
                                                 lambda a: a.astype(np.int64) + 300),
                                r"state_dict\['state'\]\['exp_avgs'\]\[0\].*int64"),
    "codes reshaped, into float": (lambda sd: _edit(sd, "state", "exp_avgs", 0,
                                                    lambda a: a.reshape(50, 100)),
                                   r"state_dict\['state'\]\['exp_avgs'\]\[0\].*\(50, 100\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_8BIT_LOADS))
def test_class_load_of_bad_8bit_state_is_refused_and_changes_nothing(case, rng):
    """Converting between 8-bit and float state checks the codes (uint8, the param's shape)
    and the block maxima (float32, one per 256) first; codes without their maxima are not
    taken for float state."""
    edit, match = BAD_8BIT_LOADS[case]
    make = lambda kind: fastopt.AdamW(  # noqa: E731
        [normal_nonzero(rng, (5000,)).astype(np.float32)], lr=0.01, state_dtype=kind)
    src = make("int8")
    src.step([normal_nonzero(rng, (5000,)).astype(np.float32)])
    dst = make("int8" if "into int8" in case else "float32")
    dst.step([normal_nonzero(rng, (5000,)).astype(np.float32)])
    saved = src.state_dict()
    edit(saved)
    before = _snapshot(dst)
    with pytest.raises((TypeError, ValueError), match=match):
        dst.load_state_dict(saved)
    _assert_unchanged(dst, before, case)


def _bad_second_call(kind, params, rng):
    """grads (and masks) for params [5000 elements: 8-bit state, 300: float32 state] whose
    entry 1 -- in the class's second kernel call -- is refused."""
    good = [normal_nonzero(rng, p.shape).astype(np.float32) for p in params]
    masks = None
    if kind == "strided grad":
        good[1] = np.repeat(good[1], 2)[::2]
    elif kind == "grad is its param":
        good[1] = params[1]
    elif kind == "unaligned grad":
        good[1] = np.zeros(1201, np.uint8)[1:].view(np.float32)
    elif kind == "mask shape":
        masks = [np.ones(5000, bool), np.ones(299, bool)]
    return good, masks


@pytest.mark.parametrize("kind", ["strided grad", "grad is its param", "unaligned grad",
                                  "mask shape"])
def test_class_int8_step_refused_by_its_second_call_writes_nothing(kind, rng):
    """A state_dtype="int8" step is two kernel calls (the params with 8-bit state, then the
    others): all are checked before the first runs, and the message names the entry of
    the whole list."""
    params = [normal_nonzero(rng, (5000,)).astype(np.float32),
              normal_nonzero(rng, (300,)).astype(np.float32)]
    grads, masks = _bad_second_call(kind, params, rng)
    opt = fastopt.AdamW(params, lr=0.01, state_dtype="int8", masks=masks)
    before = _snapshot(opt)
    name = "masks" if kind == "mask shape" else "grads"
    with pytest.raises(ValueError, match=rf"{name}\[1\]"):
        opt.step(grads)
    _assert_unchanged(opt, before, kind)


def test_class_int8_steps_the_state_arrays_it_holds_now(rng):
    """The calls of a state_dtype="int8" step are made from opt.state as it is at the step
    (as a float32 class's): an entry replaced since is stepped, or refused, as given."""
    params = [normal_nonzero(rng, (5000,)).astype(np.float32),
              normal_nonzero(rng, (33,)).astype(np.float32)]
    opt = fastopt.AdamW(params, lr=0.01, state_dtype="int8")
    grads = [normal_nonzero(rng, p.shape).astype(np.float32) for p in params]
    replaced = np.full(33, 0.5, np.float32)
    opt.state["exp_avgs"][1] = replaced
    opt.step(grads)
    assert not np.all(replaced == np.float32(0.5))  # stepped in place
    opt.state["exp_avg_sqs"][1] = opt.state["exp_avgs"][1]
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] overlaps exp_avgs\[1\]"):
        opt.step(grads)
    _assert_unchanged(opt, before, "aliased state")


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_class_steps_a_state_list_replaced_whole(kind, rng):
    """opt.state[name] replaced by another list: the steps use it (and state_dict says so)."""
    params = [normal_nonzero(rng, (5000,)).astype(np.float32),
              normal_nonzero(rng, (33,)).astype(np.float32)]
    opt = fastopt.AdamW(params, lr=0.01, state_dtype=kind)
    old = opt.state["exp_avgs"]
    opt.state["exp_avgs"] = [a.copy() for a in old]
    kept = [a.copy() for a in old]
    opt.step([normal_nonzero(rng, p.shape).astype(np.float32) for p in params])
    for a, b in zip(old, kept):
        assert_bits(a, b, "the list replaced is not written")
    assert not np.array_equal(opt.state["exp_avgs"][1], kept[1])
    assert_bits(opt.state_dict()["state"]["exp_avgs"][1], opt.state["exp_avgs"][1],
                "state_dict: the list stepped")


def test_class_int8_loads_torch_bfloat16_float_state(rng):
    """A float-state checkpoint holding torch bfloat16 tensors quantizes into 8-bit state."""
    params = [normal_nonzero(rng, (5000,)).astype(np.float32)]
    src = fastopt.AdamW([p.copy() for p in params], lr=0.01)
    src.step([normal_nonzero(rng, (5000,)).astype(np.float32)])
    saved = src.state_dict()
    saved["state"] = {n: [torch.from_numpy(a).to(torch.bfloat16) for a in v]
                      for n, v in saved["state"].items()}
    dst = fastopt.AdamW([p.copy() for p in params], lr=0.01, state_dtype="int8")
    dst.load_state_dict(saved)
    for n, arrays in saved["state"].items():
        codes, top = reference.quantize_state8(arrays[0].float().numpy(), n == "exp_avgs")
        assert_bits(dst.state[n][0], codes, n)
        assert_bits(dst.absmax[n][0], top, n)


# -- fastopt.torch: state_dtype="int8" and the bitsandbytes-style aliases -------------------
torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402


def _torch_params(rng, shapes=CLASS_SHAPES):
    return [torch.from_numpy(normal_nonzero(rng, s).astype(np.float32)) for s in shapes]


def _torch_steps(opt, params, grads):
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()


def test_torch_int8_state_steps_as_the_array_class(rng):
    params = _torch_params(rng)
    twin = [p.numpy().copy() for p in params]
    grads = [[torch.from_numpy(normal_nonzero(rng, tuple(p.shape)).astype(np.float32))
              for p in params] for _ in range(3)]
    opt = ft.AdamW([torch.nn.Parameter(p) for p in params], lr=0.01, state_dtype="int8")
    params = [p for g in opt.param_groups for p in g["params"]]
    _torch_steps(opt, params, grads)
    arr = fastopt.AdamW(twin, lr=0.01, state_dtype="int8")
    for g in grads:
        arr.step([x.numpy() for x in g])
    for i, (p, q) in enumerate(zip(params, twin)):
        assert_bits(p.detach().numpy(), q, f"params[{i}]")
        st = opt.state[p]
        for name, key in (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq")):
            assert_bits(st[key].numpy(), arr.state[name][i], f"{key}[{i}]")
            if arr.absmax[name][i] is not None:
                assert_bits(st[key + "_absmax"].numpy(), arr.absmax[name][i], f"{key}_absmax[{i}]")
            else:
                assert key + "_absmax" not in st


def test_torch_int8_checkpoints_round_trip_and_convert(rng, tmp_path):
    def fresh():
        return [torch.nn.Parameter(p.clone()) for p in base]

    base = _torch_params(rng)
    grads = [[torch.from_numpy(normal_nonzero(rng, tuple(p.shape)).astype(np.float32))
              for p in base] for _ in range(4)]
    a = fresh()
    opt = ft.AdamW(a, lr=0.01, state_dtype="int8")
    _torch_steps(opt, a, grads[:3])
    torch.save(opt.state_dict(), tmp_path / "sd.pt")
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = ft.AdamW(b, lr=0.01, state_dtype="int8")
    resumed.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    _torch_steps(opt, a, grads[3:])
    _torch_steps(resumed, b, grads[3:])
    for i, (x, y) in enumerate(zip(a, b)):
        assert_bits(x.detach().numpy(), y.detach().numpy(), f"resumed params[{i}]")
    # a torch.optim checkpoint into 8-bit state: quantized as the reference does
    c = fresh()
    reference_opt = torch.optim.AdamW(c, lr=0.01)
    _torch_steps(reference_opt, c, grads[:2])
    d = [torch.nn.Parameter(p.detach().clone()) for p in c]
    eight = ft.AdamW(d, lr=0.01, state_dtype="int8")
    eight.load_state_dict(reference_opt.state_dict())
    _torch_steps(eight, d, grads[2:3])
    for p, q, g in zip(c, d, grads[2]):
        saved, st = reference_opt.state[p], eight.state[q]
        if q.numel() < 4096:
            continue
        # the step after loading started from the torch state quantized by the reference
        m, am = reference.quantize_state8(saved["exp_avg"].numpy(), True)
        v, av = reference.quantize_state8(saved["exp_avg_sq"].numpy(), False)
        want = p.detach().numpy().copy()
        fastopt.adamw_(want, g.numpy(), m, v, step=int(saved["step"]) + 1, lr=0.01,
                       absmax={"exp_avgs": am, "exp_avg_sqs": av})
        assert_bits(q.detach().numpy(), want, "after loading torch.optim's state")
        assert_bits(st["exp_avg"].numpy(), m, "exp_avg")
        assert_bits(st["exp_avg_sq_absmax"].numpy(), av, "exp_avg_sq_absmax")
    # 8-bit state into float state: decoded
    e = [torch.nn.Parameter(p.detach().clone()) for p in a]
    plain = ft.AdamW(e, lr=0.01)
    plain.load_state_dict(opt.state_dict())
    assert plain.param_groups[0]["state_dtype"] == "int8"  # the saved group options, as torch
    plain.param_groups[0]["state_dtype"] = "float32"
    _torch_steps(plain, e, grads[:1])
    for p in e:
        assert plain.state[p]["exp_avg"].dtype == torch.float32
        assert "exp_avg_absmax" not in plain.state[p]


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastopt.cuda_available()),
                    reason="needs a CUDA GPU and fastopt._cuda")
@pytest.mark.parametrize("make", [lambda params: ft.AdamW(params, lr=0.01, state_dtype="int8"),
                                  lambda params: ft.Lion8bit(params, lr=1e-3),
                                  lambda params: ft.SGD8bit(params, lr=0.1, momentum=0.9)],
                         ids=["AdamW int8", "Lion8bit", "SGD8bit"])
def test_torch_int8_state_on_the_gpu_steps_as_on_the_cpu(make, rng):
    base = _torch_params(rng)
    grads = [[torch.from_numpy(normal_nonzero(rng, tuple(p.shape)).astype(np.float32))
              for p in base] for _ in range(3)]
    runs = []
    for device in ("cuda", "cpu"):
        params = [torch.nn.Parameter(p.clone().to(device)) for p in base]
        opt = make(params)
        _torch_steps(opt, params, [[g.to(device) for g in step] for step in grads])
        runs.append((params, opt))
    (gpu_params, gpu), (cpu_params, cpu) = runs
    for i, (p, q) in enumerate(zip(gpu_params, cpu_params)):
        assert_bits(p.detach().cpu().numpy(), q.detach().numpy(), f"params[{i}]")
        assert gpu.state[p].keys() == cpu.state[q].keys()
        for key, value in cpu.state[q].items():
            got = torch.as_tensor(gpu.state[p][key]).cpu().numpy()
            assert_bits(got, torch.as_tensor(value).numpy(), f"state[{i}][{key!r}]")


def test_torch_int8_channels_last_param_is_stepped_over_its_storage(rng):
    x = torch.from_numpy(normal_nonzero(rng, (2, 8, 16, 16)).astype(np.float32))
    p = torch.nn.Parameter(x.clone().to(memory_format=torch.channels_last))
    flat = x.permute(0, 2, 3, 1).contiguous().numpy()  # the same storage order, C-contiguous
    opt = ft.Adam([p], lr=0.01, state_dtype="int8")
    arr = fastopt.Adam([flat], lr=0.01, state_dtype="int8")
    for _ in range(3):
        g = torch.from_numpy(normal_nonzero(rng, (2, 8, 16, 16)).astype(np.float32))
        p.grad = g.to(memory_format=torch.channels_last)
        opt.step()
        arr.step([g.permute(0, 2, 3, 1).contiguous().numpy()])
    assert opt.state[p]["exp_avg"].stride() == p.stride()
    assert_bits(p.detach().permute(0, 2, 3, 1).contiguous().numpy(), flat, "channels_last")
    assert_bits(opt.state[p]["exp_avg_absmax"].numpy(), arr.absmax["exp_avgs"][0], "absmax")


@pytest.mark.parametrize("cls,kw", [
    ("Adam8bit", {}), ("AdamW8bit", {}), ("SGD8bit", dict(lr=0.1, momentum=0.9)),
    ("RMSprop8bit", {}), ("Lion8bit", {}), ("Adagrad8bit", {}),
])
def test_bitsandbytes_aliases_keep_8bit_state_for_large_params(cls, kw, rng):
    big = torch.nn.Parameter(torch.from_numpy(normal_nonzero(rng, (64, 80)).astype(np.float32)))
    small = torch.nn.Parameter(torch.from_numpy(normal_nonzero(rng, (100,)).astype(np.float32)))
    opt = getattr(ft, cls)([big, small], **kw)
    for _ in range(2):
        big.grad = torch.randn_like(big)
        small.grad = torch.randn_like(small)
        opt.step()
    states = [v for k, v in opt.state[big].items() if k != "step" and not k.endswith("_absmax")]
    assert states and all(v.dtype == torch.uint8 for v in states)
    assert all(v.dtype == torch.float32 for k, v in opt.state[small].items())
    assert opt.param_groups[0]["min_8bit_size"] == 4096
    tiny = getattr(ft, cls)([small], min_8bit_size=64, **kw)
    small.grad = torch.randn_like(small)
    tiny.step()
    assert any(v.dtype == torch.uint8 for v in tiny.state[small].values())


@pytest.mark.parametrize("bad,kind", [(dict(percentile_clipping=5), ValueError),
                                      (dict(block_wise=False), ValueError),
                                      (dict(is_paged=True), ValueError),
                                      (dict(args=object()), ValueError),
                                      (dict(min_8bit_size=0), ValueError),
                                      (dict(min_8bit_size=True), TypeError),
                                      (dict(min_8bit_size=4096.0), TypeError)])
def test_bitsandbytes_options_fastopt_lacks_are_refused(bad, kind):
    p = torch.nn.Parameter(torch.ones(3))
    name = next(iter(bad))
    with pytest.raises(kind, match=name):
        ft.AdamW8bit([p], **bad)


def test_numpy_integers_are_integers_for_the_group_options(rng):
    """A seed or a size read from a NumPy array or a config is taken as the int it holds,
    at construction and when a group is edited (the step checks the edit)."""
    big = torch.nn.Parameter(torch.randn(5000))
    opt = ft.AdamW8bit([big], min_8bit_size=np.int64(64))
    assert opt.param_groups[0]["min_8bit_size"] == 64
    big.grad = torch.randn_like(big)
    opt.param_groups[0]["min_8bit_size"] = np.uint32(4096)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    half = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
    sr = ft.AdamW([half], stochastic_rounding=True, seed=np.uint64(2**63 + 5))
    assert sr.param_groups[0]["rounding_seed"] == 2**63 + 5
    sr.param_groups[0]["rounding_seed"] = np.int64(7)
    half.grad = torch.randn_like(half)
    sr.step()
    assert int(sr.state[half]["step"]) == 1


@pytest.mark.parametrize("kind,match", [("int4", "state_dtype"), (3, "state_dtype")])
def test_torch_bad_state_dtype_is_refused_at_the_step(kind, match):
    p = torch.nn.Parameter(torch.ones(5000))
    opt = ft.AdamW([p])
    opt.param_groups[0]["state_dtype"] = kind
    p.grad = torch.ones(5000)
    before = p.detach().clone()
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_torch_int8_refuses_float64_and_sophia():
    p64 = torch.nn.Parameter(torch.ones(5000, dtype=torch.float64))
    p64.grad = torch.ones(5000, dtype=torch.float64)
    with pytest.raises(ValueError, match="int8"):
        ft.AdamW([p64], state_dtype="int8").step()
    p = torch.nn.Parameter(torch.ones(5000))
    p.grad = torch.ones(5000)
    with pytest.raises(ValueError, match="int8"):
        ft.Sophia([p], state_dtype="int8").step()
