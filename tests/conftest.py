"""Shared fixtures and helpers of the fastopt test suite.

The centre of it is ``OPTIMIZERS``: one ``Opt`` row per optimizer saying which functional
step, reference step and class it has, which state arrays a given set of options uses, the
option grid the parity tests sweep, and how state starts. ``Problem`` holds one problem
twice -- the arrays fastopt updates (float32 or float64) and float64 copies the NumPy
reference updates -- and steps and compares both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest

import fastopt
from fastopt import reference

HAS_AVX2 = bool(fastopt.info()["cpu_has_avx2_fma"])
CPU_PATHS = ["scalar", "avx2"]
DTYPES = [np.float32, np.float64]

# Tolerances against the float64 reference, as (rtol, atol / scale) where scale is the
# largest magnitude of the compared role (params, exp_avgs, ...) or 1 (the magnitude of the
# inputs) if larger, see ``assert_close``.
#
# float64: fastopt evaluates the same formulas as the reference in double precision, with a
# few operations associated differently (e.g. (1-b)*(g*g) against ((1-b)*g)*g); each step
# adds a few ulp (2.2e-16) of the values involved and no formula amplifies errors much over
# 20-25 steps, so the trajectories agree to ~1e-14. 1e-12 leaves two orders of margin and is
# still ten orders below any single update, so an element left untouched fails.
#
# float32: fastopt rounds every operation and every stored value to float32 (eps 6e-8)
# while the reference carries float64. One step of ~10 operations adds at most ~10 ulp
# relative to the magnitudes involved (cancellation, e.g. in p - lr*u or beta*m + (1-beta)*g,
# makes that absolute, relative to the role's scale: hence atol = tol * scale), and the
# errors carried from step to step are not amplified (every update is Lipschitz with constant
# ~1 in the state), as long as the gradients stay off the one ill-conditioned set (see
# Problem._well_conditioned). Measured maxima over the whole grid, 10**6-element arrays
# included, are ~4.5e-7; 1e-5 leaves a 20x margin. An untouched element still fails: one
# step moves params by lr*|update| ~ 1e-3..5e-2, against 1e-5 * scale (scale ~ 5).
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}

STEPS = 20


# ---- fixtures ---------------------------------------------------------------------------

def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so the suite runs from any directory.
    config.addinivalue_line("markers", "slow: long-running (large allocations)")
    config.addinivalue_line("markers", "cuda: needs a usable CUDA GPU (skipped otherwise)")


@contextlib.contextmanager
def using_cpu_path(path: str) -> Iterator[str]:
    if path == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2+FMA")
    fastopt.set_cpu_path(path)
    try:
        assert fastopt.get_cpu_path() == path
        yield path
    finally:
        fastopt.set_cpu_path("auto")


@contextlib.contextmanager
def using_threads(n: int) -> Iterator[int]:
    old = fastopt.get_num_threads()
    fastopt.set_num_threads(n)
    try:
        assert fastopt.get_num_threads() == n
        yield n
    finally:
        fastopt.set_num_threads(old)


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request) -> Iterator[str]:
    """Runs the test once on the scalar and once on the AVX2 code path."""
    with using_cpu_path(request.param) as path:
        yield path


def seed_of(text: str) -> int:
    """A stable seed (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode())


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's node id: reproducible, different per test."""
    return np.random.default_rng(seed_of(request.node.nodeid))


# ---- the optimizer table ----------------------------------------------------------------

def _grid(**axes: Sequence[Any]) -> List[Dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def _zeros(shape, rng):
    return np.zeros(shape)


def _normal(shape, rng):
    return rng.standard_normal(shape)


def _positive(shape, rng):
    return rng.uniform(0.05, 1.0, shape)


@dataclasses.dataclass(frozen=True)
class Opt:
    name: str
    fn: Callable[..., None]          # fastopt functional step
    ref: Callable[..., None]         # float64 reference step (one array)
    cls: type                        # fastopt stateful class
    state_args: Callable[[Dict[str, Any]], List[Optional[str]]]  # positional state args
    takes_step: bool                 # whether fn takes step=
    base: Dict[str, Any]             # hyper-parameters passed on every call
    grid: List[Dict[str, Any]]       # the option grid of the parity tests
    representative: List[Dict[str, Any]]  # a few combos for the expensive tests
    init: Dict[str, Callable]        # how each state starts in the functional tests
    ref_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name

    def hyper(self, opts: Dict[str, Any]) -> Dict[str, Any]:
        return {**self.base, **opts}

    def states(self, opts: Dict[str, Any]) -> List[str]:
        return [n for n in self.state_args(opts) if n is not None]


def _sgd_grid() -> List[Dict[str, Any]]:
    out = []
    for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.9, 0.0, False),
                                          (0.9, 0.0, True), (0.9, 0.1, False)]:
        for rest in _grid(weight_decay=[0.0, 0.01], maximize=[False, True], l1=[0.0, 1e-3]):
            out.append(dict(momentum=momentum, dampening=dampening, nesterov=nesterov, **rest))
    return out


def _adam_grid() -> List[Dict[str, Any]]:
    return [o for o in _grid(amsgrad=[False, True], maximize=[False, True],
                             weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True],
                             l1=[0.0, 1e-3])
            if o["weight_decay"] or not o["decoupled_weight_decay"]]


SGD = Opt(
    name="sgd", fn=fastopt.sgd_, ref=reference.sgd, cls=fastopt.SGD,
    state_args=lambda o: ["momentum_buffers" if o.get("momentum", 0.0) else None],
    takes_step=True, base=dict(lr=0.05), grid=_sgd_grid(),
    representative=[dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                         maximize=False, l1=0.0),
                    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01,
                         maximize=True, l1=1e-3),
                    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01,
                         maximize=False, l1=0.0)],
    # The buffer's contents must be ignored at step 1: start it with garbage.
    init={"momentum_buffers": _normal})

ADAGRAD = Opt(
    name="adagrad", fn=fastopt.adagrad_, ref=reference.adagrad, cls=fastopt.Adagrad,
    state_args=lambda o: ["state_sums"], takes_step=True, base=dict(lr=0.05),
    grid=_grid(lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.01], eps=[1e-10, 1e-3],
               maximize=[False, True], l1=[0.0, 1e-3]),
    representative=[dict(lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False, l1=0.0),
                    dict(lr_decay=0.01, weight_decay=0.01, eps=1e-3, maximize=True, l1=1e-3)],
    init={"state_sums": _positive})

RMSPROP = Opt(
    name="rmsprop", fn=fastopt.rmsprop_, ref=reference.rmsprop, cls=fastopt.RMSprop,
    state_args=lambda o: ["square_avgs",
                          "momentum_buffers" if o.get("momentum", 0.0) else None,
                          "grad_avgs" if o.get("centered", False) else None],
    takes_step=False, base=dict(lr=0.01),
    grid=_grid(centered=[False, True], momentum=[0.0, 0.9], weight_decay=[0.0, 0.01],
               maximize=[False, True], l1=[0.0, 1e-3]),
    representative=[dict(centered=False, momentum=0.0, weight_decay=0.0, maximize=False, l1=0.0),
                    dict(centered=True, momentum=0.9, weight_decay=0.01, maximize=True, l1=1e-3)],
    init={"square_avgs": _zeros, "momentum_buffers": _zeros, "grad_avgs": _zeros})

ADAM = Opt(
    name="adam", fn=fastopt.adam_, ref=reference.adam, cls=fastopt.Adam,
    state_args=lambda o: ["exp_avgs", "exp_avg_sqs",
                          "max_exp_avg_sqs" if o.get("amsgrad", False) else None],
    takes_step=True, base=dict(lr=0.01), grid=_adam_grid(),
    representative=[dict(amsgrad=False, maximize=False, weight_decay=0.0,
                         decoupled_weight_decay=False, l1=0.0),
                    dict(amsgrad=True, maximize=True, weight_decay=0.01,
                         decoupled_weight_decay=False, l1=1e-3)],
    init={"exp_avgs": _zeros, "exp_avg_sqs": _zeros, "max_exp_avg_sqs": _zeros})

ADAMW = Opt(
    name="adamw", fn=fastopt.adamw_, ref=reference.adam, cls=fastopt.AdamW,
    state_args=ADAM.state_args, takes_step=True, base=dict(lr=0.01),
    grid=_grid(amsgrad=[False, True], maximize=[False, True], weight_decay=[0.01, 0.1],
               l1=[0.0, 1e-3]),
    representative=[dict(amsgrad=False, maximize=False, weight_decay=0.01, l1=0.0),
                    dict(amsgrad=True, maximize=True, weight_decay=0.1, l1=1e-3)],
    init=ADAM.init, ref_extra=dict(decoupled_weight_decay=True))

OPTIMIZERS: Dict[str, Opt] = {o.name: o for o in [SGD, ADAGRAD, RMSPROP, ADAM, ADAMW]}


def opt_cases(which: str = "grid") -> List[Any]:
    """pytest.param(opt, opts) for every optimizer and option combo of ``grid`` or
    ``representative``, with readable ids."""
    cases = []
    for opt in OPTIMIZERS.values():
        for opts in getattr(opt, which):
            cases.append(pytest.param(opt, opts, id=f"{opt.name}-{opts_id(opts)}"))
    return cases


def opts_id(opts: Dict[str, Any]) -> str:
    short = {"momentum": "mom", "dampening": "damp", "nesterov": "nest", "weight_decay": "wd",
             "maximize": "max", "lr_decay": "lrd", "centered": "cent", "amsgrad": "ams",
             "decoupled_weight_decay": "dec"}
    parts = []
    for k, v in opts.items():
        if v is False or v == 0.0:
            continue
        k = short.get(k, k)
        parts.append(k if v is True else f"{k}{v:g}")
    return "_".join(parts) or "plain"


# ---- arrays -----------------------------------------------------------------------------

def fresh(shape: Tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def misaligned(offset: int) -> Callable[[Tuple[int, ...], Any], np.ndarray]:
    """An allocator of arrays that start an odd number (>= ``offset``) of elements into a
    larger buffer, at an address that is not 32-byte aligned (but aligned to the dtype)."""
    def make(shape, dtype):
        n = int(np.prod(shape, dtype=np.int64))
        itemsize = np.dtype(dtype).itemsize
        buf = np.empty(n + offset + 16, dtype)
        start = next(k for k in range(offset | 1, offset + 16, 2)
                     if (buf.ctypes.data + k * itemsize) % 32 != 0)
        a = buf[start:start + n].reshape(shape)
        assert a.flags.c_contiguous and a.flags.writeable
        assert n == 0 or a.ctypes.data % 32 != 0
        return a
    return make


def filled(make, values: np.ndarray, dtype) -> np.ndarray:
    a = make(values.shape, dtype)
    a[...] = values
    return a


def normal_nonzero(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normal draws with no exact zero (so every element moves)."""
    x = np.asarray(rng.standard_normal(shape))
    x[x == 0.0] = 0.5
    return x


class Problem:
    """One optimization problem twice: ``params``/``state`` of ``dtype`` for fastopt, and
    float64 copies ``ref_params``/``ref_state`` (of the same rounded values) for the
    reference. Gradients are drawn fresh for every step."""

    def __init__(self, opt: Opt, opts: Dict[str, Any], shapes: Sequence[Tuple[int, ...]],
                 dtype, rng: np.random.Generator, *, make=fresh, state_make=None,
                 listed: bool = True, init: Optional[Dict[str, Callable]] = None):
        self.opt, self.opts, self.dtype = opt, dict(opts), np.dtype(dtype)
        self.shapes = [tuple(s) for s in shapes]
        self.listed = listed
        if not listed:
            assert len(self.shapes) == 1
        self.make = make
        state_make = state_make or make
        init = init or opt.init
        self.hyper = opt.hyper(opts)
        self.args = opt.state_args(opts)
        self.t = 0
        self.params = [filled(make, normal_nonzero(rng, s), dtype) for s in self.shapes]
        self.state = {name: [filled(state_make, init[name](s, rng), dtype) for s in self.shapes]
                      for name in opt.states(opts)}
        self.ref_params = [p.astype(np.float64) for p in self.params]
        self.ref_state = {k: [a.astype(np.float64) for a in v] for k, v in self.state.items()}

    # -- stepping --
    def draw_grads(self, rng: np.random.Generator, make=None) -> List[np.ndarray]:
        make = make or fresh
        grads = [normal_nonzero(rng, s) for s in self.shapes]
        if self.dtype == np.float32:
            grads = [self._well_conditioned(g, p) for g, p in zip(grads, self.params)]
        return [filled(make, g, self.dtype) for g in grads]

    def _well_conditioned(self, g: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Keeps float32 gradients off the ill-conditioned set where coupled weight decay
        cancels them: g' = g + wd*p with |g'| << |g|. There float32 evaluates g' with a large
        relative error (any implementation, torch's too: fastopt equals a float32 NumPy
        emulation bit for bit), and RMSprop/Adam map the tiny g' to an O(1) step
        (g'/(c*|g'| + eps)), so no float32 result is within a tolerance of the float64
        reference. Such elements occur ~once per 10**6 per step; moving g by 0.01 where
        |g'| < 1e-3 removes them and leaves the gradients otherwise standard normal."""
        wd = self.hyper.get("weight_decay", 0.0)
        decoupled = self.hyper.get("decoupled_weight_decay",
                                   self.opt.ref_extra.get("decoupled_weight_decay", False))
        if not wd or decoupled:
            return g
        eff = (-g if self.hyper.get("maximize", False) else g) + wd * p.astype(np.float64)
        return np.where(np.abs(eff) < 1e-3, g + 0.01, g)

    def _pack(self, arrays: List[Any]) -> Any:
        return arrays if self.listed else arrays[0]

    def fastopt_args(self, grads: List[Any]) -> Tuple[list, dict]:
        args = [self._pack(self.params), self._pack(grads)]
        args += [None if n is None else self._pack(self.state[n]) for n in self.args]
        kwargs = dict(self.hyper)
        if self.opt.takes_step:
            kwargs["step"] = self.t + 1
        return args, kwargs

    def step_fastopt(self, grads: List[Any], lr: Optional[float] = None) -> None:
        args, kwargs = self.fastopt_args(grads)
        if lr is not None:
            kwargs["lr"] = lr
        self.opt.fn(*args, **kwargs)

    def step_reference(self, grads: List[np.ndarray], lr: Optional[float] = None) -> None:
        kwargs = dict(self.hyper, **self.opt.ref_extra)
        if lr is not None:
            kwargs["lr"] = lr
        if self.opt.takes_step:
            kwargs["step"] = self.t + 1
        for i, g in enumerate(grads):
            states = [None if n is None else self.ref_state[n][i] for n in self.args]
            self.opt.ref(self.ref_params[i], np.asarray(g, dtype=np.float64), *states, **kwargs)

    def step(self, grads: List[np.ndarray], lr: Optional[float] = None) -> None:
        self.step_fastopt(grads, lr)
        self.step_reference(grads, lr)
        self.t += 1

    # -- checking --
    def check(self, what: str = "") -> None:
        where = f"{self.opt.name} {opts_id(self.opts)} {self.dtype} after step {self.t}{what}"
        assert_close(self.params, self.ref_params, self.dtype, f"params ({where})")
        for name in self.state:
            assert_close(self.state[name], self.ref_state[name], self.dtype, f"{name} ({where})")

    def snapshot(self) -> Dict[str, List[np.ndarray]]:
        out = {"params": [np.array(p, copy=True) for p in self.params]}
        out.update({k: [np.array(a, copy=True) for a in v] for k, v in self.state.items()})
        return out


def _flat(arrays: Sequence[Any]) -> np.ndarray:
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0)


def assert_close(got: Sequence[Any], want: Sequence[np.ndarray], dtype, what: str,
                 tol: Optional[float] = None) -> None:
    """Elementwise |got - want| <= tol*|want| + tol*scale (scale = max(1, max |want| over the
    role)),
    no NaN in got unless want has NaN there. Every element is compared, so an element
    fastopt left untouched (or wrote twice, or wrote to the wrong place) fails."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.shape(g) == np.shape(w), f"{what}: shape {np.shape(g)} != {np.shape(w)}"
    g, w = _flat(got), _flat(want)
    if w.size == 0:
        return
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    if (nan_g != nan_w).any():
        idx = np.flatnonzero(nan_g != nan_w)[:5]
        raise AssertionError(f"{what}: NaN mismatch at flat indices {idx.tolist()}: "
                             f"got {g[idx].tolist()}, want {w[idx].tolist()}")
    tol = TOL[np.dtype(dtype)] if tol is None else tol
    inf_w = np.isinf(w)
    if (g[inf_w] != w[inf_w]).any() or np.isinf(g[~inf_w]).any():
        idx = np.flatnonzero((np.isinf(g) | inf_w) & (g != w))[:5]
        raise AssertionError(f"{what}: infinities differ at flat indices {idx.tolist()}: "
                             f"got {g[idx].tolist()}, want {w[idx].tolist()}")
    ok = ~nan_w & ~inf_w
    # The operands of every formula are O(1) (standard normal params and gradients), so
    # cancellation leaves absolute errors of tol * max(operands): at least tol * 1, and
    # tol * max |want| where a role holds larger values (momentum buffers of RMSprop ~10).
    scale = max(float(np.max(np.abs(w[ok]), initial=0.0)), 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(ok, np.abs(g - w), 0.0)
        bound = tol * (np.abs(w) + scale)
    bad = ok & ~(err <= bound)
    if bad.any():
        idx = np.flatnonzero(bad)
        worst = idx[np.argmax(err[idx] / np.maximum(bound[idx], 1e-300))]
        raise AssertionError(
            f"{what}: {idx.size} of {w.size} elements differ beyond tol {tol:g} "
            f"(scale {scale:.3g}); first flat indices {idx[:8].tolist()}; worst at {worst}: "
            f"got {g[worst]!r}, want {w[worst]!r}, err {err[worst]:.3g} > {bound[worst]:.3g}")



def assert_unchanged(before: Dict[str, List[np.ndarray]], after: Dict[str, List[Any]]) -> None:
    for name, arrays in before.items():
        for i, (b, a) in enumerate(zip(arrays, after[name])):
            assert np.array_equal(b, np.asarray(a), equal_nan=True), f"{name}[{i}] was modified"


def snapshot(*arrays: Any) -> List[np.ndarray]:
    """Copies of every array in (possibly nested lists of) arrays, in order."""
    out = []
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, (list, tuple)):
            out.extend(snapshot(*a))
        elif isinstance(a, np.ndarray):
            out.append(a.copy())
    return out


def flatten_arrays(*arrays: Any) -> List[np.ndarray]:
    out = []
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, (list, tuple)):
            out.extend(flatten_arrays(*a))
        elif isinstance(a, np.ndarray):
            out.append(a)
    return out


def assert_same_arrays(before: List[np.ndarray], now: List[np.ndarray]) -> None:
    assert len(before) == len(now)
    for i, (b, a) in enumerate(zip(before, now)):
        assert np.array_equal(b, a, equal_nan=True), f"array #{i} was modified"
