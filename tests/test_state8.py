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

from backends import assert_bits
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


def _run8(opt, opts, param_dtype, seed, steps=3, masked=False):
    """``steps`` int8-state steps, each checked against decode -> float32 step -> encode."""
    rng = np.random.default_rng(seed)
    params = [normal_nonzero(rng, s).astype(param_dtype) for s in SHAPES]
    state8 = _state8(opt, opts, rng)
    masks = [rng.random(s) < 0.8 for s in SHAPES] if masked else None
    history = []
    for t in range(1, steps + 1):
        grads = [normal_nonzero(rng, s).astype(param_dtype) for s in SHAPES]
        # the emulation, on copies
        p_emul = [p.copy() for p in params]
        decoded = {n: [reference.dequantize_state8(c, a, _signed(opt, n)) for c, a in zip(*v)]
                   for n, v in state8.items()}
        _step(opt, opts, p_emul, grads, decoded, t, masks)
        want = {}
        for n, arrays in decoded.items():
            if n in opt.read_only:
                want[n] = state8[n]
            else:
                pairs = [reference.quantize_state8(a, _signed(opt, n)) for a in arrays]
                want[n] = ([c for c, _ in pairs], [a for _, a in pairs])
        # the kernel
        args = [params, grads] + [None if n is None else state8[n][0]
                                  for n in opt.state_args(opts)]
        kwargs = dict(opt.hyper(opts), absmax={n: v[1] for n, v in state8.items()})
        if opt.takes_step:
            kwargs["step"] = t
        if masked:
            kwargs["masks"] = masks
        opt.fn(*args, **kwargs)
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
def test_bad_8bit_state_is_refused_before_anything_is_written(case):
    p, g, m, v, am, av = _adamw_call()
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
        absmax["max_exp_avg_sqs"] = av.copy()
        match = "max_exp_avg_sqs"
    elif case == "wrong size":
        absmax["exp_avgs"] = am[:-1].copy()
        match = r"absmax\['exp_avgs'\].*need"
    elif case == "float64 absmax":
        absmax["exp_avgs"] = am.astype(np.float64)
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
        state = [m.astype(np.float32), v.astype(np.float32)]
        match = "only for 8-bit state"
    elif case == "float64 params":
        params, g = p.astype(np.float64), g.astype(np.float64)
        err, match = TypeError, "state type"
    elif case == "int8 state":
        state = [m.view(np.int8), v]
        err, match = TypeError, "exp_avgs"
    elif case == "mixed state":
        state = [m, v.astype(np.float32)]
        err, match = TypeError, "exp_avg_sqs"
    arrays = [params, g, *state, *(absmax.values() if isinstance(absmax, dict) else [])]
    before = [a.copy() for a in arrays]
    with pytest.raises(err, match=match):
        fastopt.adamw_(params, g, *state, step=1, absmax=absmax)
    for a, b in zip(arrays, before):
        assert_bits(a, b, "an argument was modified")


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
