"""Shared fixtures and helpers of the fastopt test suite.

The centre of it is ``OPTIMIZERS``: one ``Opt`` row per optimizer saying which functional
step, reference step and class it has, which state arrays a given set of options uses, the
option grid the parity tests sweep, and how state starts. ``Problem`` holds one problem
on a backend (tests/backends.py: the CPU's scalar or AVX2 path, CuPy, PyTorch CUDA) -- the
arrays fastopt updates (float32 or float64), on a GPU backend a CPU twin that must match
them bit for bit, and float64 copies the NumPy reference updates -- and steps and compares
them. The ``backend`` fixture runs a test body once per backend.
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
from fastopt import _specs, optim, reference

from backends import (ARRAY_BACKENDS, BACKENDS, CPU, HAS_AVX2, assert_bits,  # noqa: F401
                      backend_params, open_backend, using_cpu_path)

CPU_PATHS = ["scalar", "avx2"]
DTYPES = [np.float32, np.float64]

# Tolerances against the float64 reference, as (rtol, atol / scale) where scale is the
# largest magnitude of the compared role (params, exp_avgs, ...) or 1 (the magnitude of the
# inputs) if larger, see ``assert_close``.
#
# float64: fastopt evaluates the same formulas as the reference in double precision, with a
# few operations associated differently (e.g. RAdam's lr*r_t*sqrt(1-b2^t)/(1-b1^t), one
# coefficient for the kernel, three factors in the reference); each step
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
    config.addinivalue_line(
        "markers", "device_wide: fills the GPU's memory; bench/gpu_check.sh runs these alone")


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


@pytest.fixture(params=backend_params(BACKENDS))
def backend(request):
    """Runs the test on each backend: cpu-scalar, cpu-avx2 (skipped without AVX2), cupy and
    torch-cuda (marked ``cuda``, skipped without a usable GPU or the library)."""
    b = open_backend(request.param)
    with b.activate():
        yield b


@pytest.fixture(params=backend_params(ARRAY_BACKENDS))
def array_backend(request):
    """Like ``backend`` with one CPU entry ("cpu", the automatic path): for behaviour
    decided before any kernel runs (argument checks), the same on both CPU paths."""
    return open_backend(request.param)


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
    """One optimizer: what fastopt's table (``fastopt._specs``) says about it -- arrays,
    step-taking, reference, fixed options -- and what the tests choose: the
    hyper-parameters passed on every call, the option grid of the parity tests, a few
    combos for the expensive tests, how each state starts in the functional tests."""
    spec: _specs.OptimizerSpec
    base: Dict[str, Any]             # hyper-parameters passed on every call
    grid: List[Dict[str, Any]]       # the option grid of the parity tests
    representative: List[Dict[str, Any]]  # a few combos for the expensive tests
    init: Dict[str, Callable]        # how each state starts in the functional tests
    least_moved: float = 0.9         # the fraction of params a first step moves, at least

    def __repr__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fn(self) -> Callable[..., None]:
        """fastopt's functional step."""
        return getattr(fastopt, f"{self.name}_")

    @property
    def ref(self) -> Callable[..., None]:
        """The float64 reference step (one array)."""
        return self.spec.reference

    @property
    def cls(self) -> type:
        """fastopt's stateful class."""
        return optim.CLASSES[self.name]

    @property
    def takes_step(self) -> bool:
        return self.spec.takes_step

    @property
    def ref_extra(self) -> Dict[str, Any]:
        """Options fixed for the kernel (AdamW: decoupled weight decay), for the reference."""
        return dict(self.spec.fixed)

    @property
    def read_only(self) -> Tuple[str, ...]:
        """State arrays the step reads but never writes."""
        return tuple(a.name for a in self.spec.states if not a.written)

    def hyper(self, opts: Dict[str, Any]) -> Dict[str, Any]:
        return {**self.base, **opts}

    def state_args(self, opts: Dict[str, Any]) -> List[Optional[str]]:
        """The positional state arguments under ``opts``: a name, or None where unused."""
        hyper = {**self.spec.defaults(), **self.hyper(opts)}
        return [a.name if a.used(hyper) else None for a in self.spec.states]

    def states(self, opts: Dict[str, Any]) -> List[str]:
        return [n for n in self.state_args(opts) if n is not None]

    def written(self, opts: Dict[str, Any]) -> List[str]:
        """The roles the step writes: params and the state it does not only read."""
        return ["params"] + [n for n in self.states(opts) if n not in self.read_only]

    def read(self, opts: Dict[str, Any]) -> List[str]:
        """The roles the step only reads: grads and read-only state."""
        return ["grads"] + [n for n in self.states(opts) if n in self.read_only]


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
    _specs.OPTIMIZERS["sgd"], base=dict(lr=0.05), grid=_sgd_grid(),
    representative=[dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                         maximize=False, l1=0.0),
                    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01,
                         maximize=True, l1=1e-3),
                    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01,
                         maximize=False, l1=0.0)],
    # The buffer's contents must be ignored at step 1: start it with garbage.
    init={"momentum_buffers": _normal})

ADAGRAD = Opt(
    _specs.OPTIMIZERS["adagrad"], base=dict(lr=0.05),
    grid=_grid(lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.01], eps=[1e-10, 1e-3],
               maximize=[False, True], l1=[0.0, 1e-3]),
    representative=[dict(lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False, l1=0.0),
                    dict(lr_decay=0.01, weight_decay=0.01, eps=1e-3, maximize=True, l1=1e-3)],
    init={"state_sums": _positive})

RMSPROP = Opt(
    _specs.OPTIMIZERS["rmsprop"], base=dict(lr=0.01),
    grid=_grid(centered=[False, True], momentum=[0.0, 0.9], weight_decay=[0.0, 0.01],
               maximize=[False, True], l1=[0.0, 1e-3]),
    representative=[dict(centered=False, momentum=0.0, weight_decay=0.0, maximize=False, l1=0.0),
                    dict(centered=True, momentum=0.9, weight_decay=0.01, maximize=True, l1=1e-3)],
    init={"square_avgs": _zeros, "momentum_buffers": _zeros, "grad_avgs": _zeros})

ADAM = Opt(
    _specs.OPTIMIZERS["adam"], base=dict(lr=0.01), grid=_adam_grid(),
    representative=[dict(amsgrad=False, maximize=False, weight_decay=0.0,
                         decoupled_weight_decay=False, l1=0.0),
                    dict(amsgrad=True, maximize=True, weight_decay=0.01,
                         decoupled_weight_decay=False, l1=1e-3)],
    init={"exp_avgs": _zeros, "exp_avg_sqs": _zeros, "max_exp_avg_sqs": _zeros})

ADAMW = Opt(
    _specs.OPTIMIZERS["adamw"], base=dict(lr=0.01),
    grid=_grid(amsgrad=[False, True], maximize=[False, True], weight_decay=[0.01, 0.1],
               l1=[0.0, 1e-3]),
    representative=[dict(amsgrad=False, maximize=False, weight_decay=0.01, l1=0.0),
                    dict(amsgrad=True, maximize=True, weight_decay=0.1, l1=1e-3)],
    init=ADAM.init)

# Sophia's Hessian EMA is read only and held positive here, so sign(m) * min(|m| / (rho*h), 1)
# stays continuous where m crosses zero and the float32 trajectory stays within TOL of the
# reference; test_sophia.py feeds it estimates with negative entries through ema_ and
# update_hessian.
SOPHIA = Opt(
    _specs.OPTIMIZERS["sophia"], base=dict(lr=0.05),
    grid=[dict(), dict(weight_decay=0.0, rho=0.5), dict(maximize=True, l1=1e-3),
          dict(eps=1e-3, beta1=0.5)],
    representative=[dict(), dict(maximize=True, l1=1e-3)],
    init={"exp_avgs": _zeros, "hessian_diags": _positive})

# Lion's step is lr*sign(c): the float32 gradients are kept where c is not near 0 (see
# Problem._well_conditioned). Its momentum starts from random values, so the first step
# already mixes both.
LION = Opt(
    _specs.OPTIMIZERS["lion"], base=dict(lr=0.01),
    grid=_grid(weight_decay=[0.0, 0.1], maximize=[False, True], l1=[0.0, 1e-3])
    + [dict(beta1=0.5, beta2=0.9), dict(beta1=0.0, beta2=0.0)],
    representative=[dict(), dict(beta1=0.5, beta2=0.9, weight_decay=0.1, maximize=True,
                             l1=1e-3)],
    init={"exp_avgs": _normal})

# Adamax's infinity norm starts positive, so the max reads it from the first step.
ADAMAX = Opt(
    _specs.OPTIMIZERS["adamax"], base=dict(lr=0.01),
    grid=_grid(weight_decay=[0.0, 0.01], maximize=[False, True], l1=[0.0, 1e-3])
    + [dict(beta1=0.5, beta2=0.9, eps=1e-3)],
    representative=[dict(weight_decay=0.0, maximize=False, l1=0.0),
                    dict(weight_decay=0.01, maximize=True, l1=1e-3)],
    init={"exp_avgs": _zeros, "exp_infs": _positive})

# RAdam's rectified step starts at step 6 (rho_t > 5) whatever the betas: STEPS covers both.
RADAM = Opt(
    _specs.OPTIMIZERS["radam"], base=dict(lr=0.01),
    grid=[o for o in _grid(weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True],
                           maximize=[False, True], l1=[0.0, 1e-3])
          if o["weight_decay"] or not o["decoupled_weight_decay"]]
    + [dict(beta1=0.5, beta2=0.9, eps=1e-3)],
    representative=[dict(weight_decay=0.0, decoupled_weight_decay=False, maximize=False,
                         l1=0.0),
                    dict(weight_decay=0.01, decoupled_weight_decay=True, maximize=True,
                         l1=1e-3)],
    init={"exp_avgs": _zeros, "exp_avg_sqs": _zeros})

ADADELTA = Opt(
    _specs.OPTIMIZERS["adadelta"], base=dict(lr=0.05),
    grid=_grid(weight_decay=[0.0, 0.01], maximize=[False, True], l1=[0.0, 1e-3])
    + [dict(rho=0.5, eps=1e-3)],
    representative=[dict(weight_decay=0.0, maximize=False, l1=0.0),
                    dict(weight_decay=0.01, maximize=True, l1=1e-3)],
    init={"square_avgs": _positive, "acc_deltas": _positive})

# Rprop's step is sign(g)*size: g and prev are standard normal, so the sign of their
# product is the same in float32 and float64. step_size_max is held at 1 here (default 50):
# sizes from [0.05, 1) growing 1.2x per step would otherwise reach ~40, and the float32
# trajectory's error with them.
RPROP = Opt(
    _specs.OPTIMIZERS["rprop"], base=dict(lr=0.01, step_size_max=1.0),
    grid=_grid(maximize=[False, True], etaminus=[0.5, 0.3])
    + [dict(etaplus=1.5, step_size_min=0.1, step_size_max=0.2)],
    representative=[dict(maximize=False),
                    dict(maximize=True, etaminus=0.3, etaplus=1.5, step_size_min=0.1,
                         step_size_max=0.2)],
    init={"prevs": _normal, "step_sizes": _positive},
    least_moved=0.0)  # p stays where g and prev differ in sign: half the elements, all of
                      # a small array at times (its state moves: the check stays meaningful)

# NAdam's mu_product is not passed: each step computes it from the step count (the product
# of mu_1..mu_t, as torch.optim.NAdam's state holds it after step t), on every path.
NADAM = Opt(
    _specs.OPTIMIZERS["nadam"], base=dict(lr=0.01),
    grid=[o for o in _grid(weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True],
                           maximize=[False, True], l1=[0.0, 1e-3])
          if o["weight_decay"] or not o["decoupled_weight_decay"]]
    + [dict(beta1=0.5, beta2=0.9, eps=1e-3, momentum_decay=0.1)],
    representative=[dict(weight_decay=0.0, decoupled_weight_decay=False, maximize=False,
                         l1=0.0),
                    dict(weight_decay=0.01, decoupled_weight_decay=True, maximize=True,
                         l1=1e-3)],
    init={"exp_avgs": _zeros, "exp_avg_sqs": _zeros})

# ASGD's eta and mu are not passed either: each step computes them from the step count.
# t0=5 starts the running average within STEPS (from step 7); before, ax follows the params.
ASGD = Opt(
    _specs.OPTIMIZERS["asgd"], base=dict(lr=0.05),
    grid=_grid(weight_decay=[0.0, 0.01], maximize=[False, True], t0=[1e6, 5.0])
    + [dict(lambd=0.1, alpha=0.5, t0=0.0)],
    representative=[dict(weight_decay=0.0, maximize=False, t0=1e6),
                    dict(weight_decay=0.01, maximize=True, t0=5.0)],
    init={"axs": _normal})

OPTIMIZERS: Dict[str, Opt] = {o.name: o for o in [SGD, ADAGRAD, RMSPROP, ADAM, ADAMW, SOPHIA,
                                                   LION, ADAMAX, RADAM, ADADELTA, RPROP,
                                                   NADAM, ASGD]}
assert list(OPTIMIZERS) == list(_specs.OPTIMIZERS), "every optimizer of fastopt's table"


try:  # torch and fastopt.torch, for the test files that have a torch part
    import torch

    import fastopt.torch as ft
except ImportError:  # the NumPy tests run without torch
    torch = ft = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def train_small_mlp(device: str, dtype: Any, make_opt: Callable[[List[Any]], Any],
                    steps: int = 400) -> Tuple[float, Any]:
    """A small MLP whose params are stored in ``dtype`` and used in float32 (the forward and
    backward are float32 for every storage type, so only the params' rounding differs
    between runs), trained ``steps`` steps by ``make_opt(params)``: (final loss, optimizer)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 64), (64,), (64, 1), (1,)]
    params = [(torch.randn(s, generator=g) / (s[0] ** 0.5 if len(s) == 2 else 4.0))
              .to(dtype).to(device).requires_grad_() for s in shapes]
    opt = make_opt(params)
    x = torch.randn(256, 32, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2]
    x, y = x.to(device), y.to(device)
    for _ in range(steps):
        opt.zero_grad()
        w1, b1, w2, b2 = (p.float() for p in params)
        loss = (torch.tanh(x @ w1 + b1) @ w2 + b2 - y).square().mean()
        loss.backward()
        opt.step()
    return loss.item(), opt


def torch_roundtrip(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a
    checkpoint file takes it."""
    import io

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


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

def misaligned(offset: int) -> Callable[[np.ndarray, int, int], np.ndarray]:
    """An allocator ``make(values, role, i)`` of NumPy arrays that start an odd number
    (>= ``offset`` + 2*role) of elements into a larger buffer, at an address that is not
    32-byte aligned (but aligned to the dtype): each role at its own offset."""
    def make(values, role, i):
        n, dtype = values.size, values.dtype
        buf = np.empty(n + offset + 2 * role + 16, dtype)
        start = next(k for k in range((offset + 2 * role) | 1, offset + 2 * role + 16, 2)
                     if (buf.ctypes.data + k * dtype.itemsize) % 32 != 0)
        a = buf[start:start + n].reshape(values.shape)
        a[...] = values
        assert a.flags.c_contiguous and a.flags.writeable
        assert n == 0 or a.ctypes.data % 32 != 0
        return a
    return make


def normal_nonzero(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normal draws with no exact zero (so every element moves)."""
    x = np.asarray(rng.standard_normal(shape))
    x[x == 0.0] = 0.5
    return x


def assert_moved(before, after, ref_after, what, least=0.9):
    """Every element the reference moved by more than 2 ulp changed in fastopt too (exact
    comparison, independent of the tolerances): catches elements a kernel skipped. A NaN
    in ``before`` (poison) must be overwritten. At least the fraction ``least`` of them
    must have moved, or the check says little."""
    must_total = count = 0
    for i, (b, a, r) in enumerate(zip(before, after, ref_after)):
        b, a = np.asarray(b).ravel(), np.asarray(a).ravel()
        ulp = np.spacing(np.abs(b)).astype(np.float64)
        with np.errstate(invalid="ignore"):
            must = np.abs(np.asarray(r, dtype=np.float64).ravel() - b) > 2 * ulp
        must |= np.isnan(b)
        stuck = np.flatnonzero(must & ((a == b) | (np.isnan(a) & np.isnan(b))))
        assert stuck.size == 0, (f"{what}[{i}]: {stuck.size} elements left unchanged, e.g. "
                                 f"flat indices {stuck[:8].tolist()}")
        must_total += int(must.sum())
        count += b.size
    assert must_total >= least * count, f"{what}: the reference itself barely moved"


class Problem:
    """One optimization problem on ``backend``: ``params``/``state`` of ``dtype`` that
    fastopt updates there (each allocated by ``make(values, role, i)``, role 0 params, 1
    grads, 2... the state lists in order; default: a plain copy on the backend), float64
    copies ``ref_params``/``ref_state`` (of the same rounded values) for the reference, and
    on a GPU backend a CPU twin ``cpu_params``/``cpu_state`` stepped by the CPU kernels (on
    a CPU backend the twin is the arrays themselves). ``param_dtype`` (GPU only) stores the
    params in a 16-bit type: the twin is then the float32 CPU kernel with its params rounded
    to that type after every step, and there is no reference check. Gradients are drawn
    fresh for every step."""

    def __init__(self, opt: Opt, opts: Dict[str, Any], shapes: Sequence[Tuple[int, ...]],
                 dtype, rng: np.random.Generator, *, backend=CPU, make=None,
                 listed: bool = True, init: Optional[Dict[str, Callable]] = None,
                 param_dtype=None, masks: Optional[List[np.ndarray]] = None):
        self.opt, self.opts, self.dtype = opt, dict(opts), np.dtype(dtype)
        self.shapes = [tuple(s) for s in shapes]
        self.listed = listed
        if not listed:
            assert len(self.shapes) == 1
        self.backend = backend
        self.make = make or (lambda values, role, i: backend.asarray(values))
        self.param_dtype = None if param_dtype is None else np.dtype(param_dtype)
        init = init or opt.init
        self.hyper = opt.hyper(opts)
        self.args = opt.state_args(opts)
        self.t = 0
        params = [normal_nonzero(rng, s).astype(dtype) for s in self.shapes]
        if self.param_dtype is not None:
            params = [p.astype(self.param_dtype).astype(dtype) for p in params]
        state = {name: [init[name](s, rng).astype(dtype) for s in self.shapes]
                 for name in opt.states(opts)}
        self.params = [self.make(self._stored(p), 0, i) for i, p in enumerate(params)]
        self.state = {name: [self.make(a, role, i) for i, a in enumerate(arrays)]
                      for role, (name, arrays) in enumerate(state.items(), start=2)}
        self.twin = backend.is_cuda
        if self.twin:
            self.cpu_params, self.cpu_state = params, state
        else:
            assert self.param_dtype is None, "16-bit params are a GPU feature"
            self.cpu_params, self.cpu_state = self.params, self.state
        # masks: one NumPy bool/uint8 array per shape, passed on every step (masks=)
        self.masks = masks
        self.dmasks = None if masks is None else [backend.asarray(m) for m in masks]
        self.ref_params = [p.astype(np.float64) for p in params]
        self.ref_state = {k: [a.astype(np.float64) for a in v] for k, v in state.items()}

    def _stored(self, values: np.ndarray) -> np.ndarray:
        return values if self.param_dtype is None else values.astype(self.param_dtype)

    # -- stepping --
    def draw_grads(self, rng: np.random.Generator) -> List[np.ndarray]:
        """Fresh NumPy gradients of ``dtype`` (``param_dtype`` if set)."""
        grads = [normal_nonzero(rng, s) for s in self.shapes]
        if self.dtype == np.float32:
            grads = [self._well_conditioned(g, i) for i, g in enumerate(grads)]
        return [self._stored(g.astype(self.dtype)) for g in grads]

    def _well_conditioned(self, g: np.ndarray, i: int) -> np.ndarray:
        """Keeps float32 gradient ``g`` of tensor ``i`` off the sets where no float32
        result is within a tolerance of the float64 reference (any implementation, torch's
        too: fastopt equals a float32 NumPy emulation bit for bit):

        - where coupled weight decay cancels it: g' = g + wd*p with |g'| << |g|. There
          float32 evaluates g' with a large relative error, and RMSprop/Adam map the tiny
          g' to an O(1) step (g'/(c*|g'| + eps)). Such elements occur ~once per 10**6 per
          step; moving g by 0.01 where |g'| < 1e-3 removes them.
        - Lion: where c = beta1*m + (1-beta1)*g is near 0, float32 may round it to the
          other sign, and the step lr*sign(c) flips. Moving g by 0.01/(1-beta1) where
          |c| < 1e-3 moves c by 0.01.

        Otherwise the gradients stay standard normal."""
        maximize = self.hyper.get("maximize", False)
        g_eff = -g if maximize else g
        if self.opt.name == "lion":
            beta1 = self.hyper.get("beta1", self.opt.spec.defaults()["beta1"])
            m = self.cpu_state["exp_avgs"][i].astype(np.float64)
            c = beta1 * m + (1.0 - beta1) * g_eff
            return np.where(np.abs(c) < 1e-3, g + 0.01 / (1.0 - beta1), g)
        wd = self.hyper.get("weight_decay", 0.0)
        decoupled = self.hyper.get("decoupled_weight_decay",
                                   self.opt.ref_extra.get("decoupled_weight_decay", False))
        if not wd or decoupled or self.opt.name == "sophia":  # Sophia's decay is decoupled
            return g
        eff = g_eff + wd * self.cpu_params[i].astype(np.float64)
        return np.where(np.abs(eff) < 1e-3, g + 0.01, g)

    def _pack(self, arrays: List[Any]) -> Any:
        return arrays if self.listed else arrays[0]

    def fastopt_args(self, grads: List[Any], params=None, state=None,
                     masks=None) -> Tuple[list, dict]:
        """The functional call's arguments on ``params``/``state``/``masks`` (default: the
        backend's)."""
        masks = self.dmasks if masks is None else masks
        params = self.params if params is None else params
        state = self.state if state is None else state
        args = [self._pack(params), self._pack(grads)]
        args += [None if n is None else self._pack(state[n]) for n in self.args]
        kwargs = dict(self.hyper)
        if self.opt.takes_step:
            kwargs["step"] = self.t + 1
        if masks is not None:
            kwargs["masks"] = self._pack(masks)
        return args, kwargs

    def step_fastopt(self, grads: List[Any], lr: Optional[float] = None, **extra) -> None:
        """One fastopt step of the backend's arrays with ``grads`` (arrays of the backend)."""
        args, kwargs = self.fastopt_args(grads)
        if lr is not None:
            kwargs["lr"] = lr
        self.opt.fn(*args, **kwargs, **extra)

    def step_twin(self, grads: List[np.ndarray], lr: Optional[float] = None) -> None:
        if self.param_dtype is not None:
            grads = [g.astype(self.dtype) for g in grads]
        args, kwargs = self.fastopt_args(grads, self.cpu_params, self.cpu_state, self.masks)
        if lr is not None:
            kwargs["lr"] = lr
        with CPU.activate():
            self.opt.fn(*args, **kwargs)
        if self.param_dtype is not None:
            for p in self.cpu_params:
                p[...] = p.astype(self.param_dtype)

    def step_reference(self, grads: List[np.ndarray], lr: Optional[float] = None) -> None:
        kwargs = dict(self.hyper, **self.opt.ref_extra)
        if lr is not None:
            kwargs["lr"] = lr
        if self.opt.takes_step:
            kwargs["step"] = self.t + 1
        for i, g in enumerate(grads):
            states = [None if n is None else self.ref_state[n][i] for n in self.args]
            g = np.asarray(g, dtype=np.float64)
            if self.masks is None:
                self.opt.ref(self.ref_params[i], g, *states, **kwargs)
            else:
                reference.masked(self.opt.ref, self.masks[i], self.ref_params[i], g, *states,
                                 **kwargs)

    def step(self, grads: List[np.ndarray], lr: Optional[float] = None, **extra) -> List[Any]:
        """One step of the backend's arrays (``extra``: e.g. stream=), the twin and the
        reference with the NumPy ``grads``; returns the grads as passed to the backend."""
        dgrads = [self.make(g, 1, i) for i, g in enumerate(grads)]
        self.step_fastopt(dgrads, lr, **extra)
        self.follow(grads, lr)
        return dgrads

    def follow(self, grads: List[np.ndarray], lr: Optional[float] = None) -> None:
        """The twin and the reference take the step the backend took with ``grads``."""
        if self.twin:
            self.step_twin(grads, lr)
        if self.param_dtype is None:
            self.step_reference(grads, lr)
        self.t += 1

    # -- checking --
    def host(self) -> Dict[str, List[np.ndarray]]:
        """NumPy copies of the backend's params and state, by role."""
        to_numpy = self.backend.to_numpy
        out = {"params": [to_numpy(p) for p in self.params]}
        out.update({k: [to_numpy(a) for a in v] for k, v in self.state.items()})
        return out

    snapshot = host

    def check(self, what: str = "", reference: bool = True) -> None:
        """On a GPU backend: bit-identical to the CPU twin. Within TOL of the float64
        reference (unless ``reference=False`` or the params are 16-bit)."""
        where = f"{self.opt.name} {opts_id(self.opts)} {self.dtype} after step {self.t}{what}"
        got = self.host()
        if self.twin:
            want = {"params": [self._stored(p) for p in self.cpu_params], **self.cpu_state}
            for role, arrays in got.items():
                for i, (g, w) in enumerate(zip(arrays, want[role])):
                    assert_bits(g, w, f"{self.backend.name} {role}[{i}] against the CPU "
                                      f"({where})", any_nan=True)
        if reference and self.param_dtype is None:
            assert_close(got["params"], self.ref_params, self.dtype, f"params ({where})")
            for name in self.state:
                assert_close(got[name], self.ref_state[name], self.dtype, f"{name} ({where})")

    def assert_moved(self, before: Dict[str, List[np.ndarray]]) -> None:
        """Every element of params and written state that the reference moved since
        ``before`` changed on the backend too; read-only state did not change at all."""
        got = self.host()
        assert_moved(before["params"], got["params"], self.ref_params, "params",
                     self.opt.least_moved)
        for name in self.state:
            if name in self.opt.read_only:
                for i, (a, b) in enumerate(zip(got[name], before[name])):
                    assert_bits(a, b, f"{name}[{i}] (read only)")
            else:
                assert_moved(before[name], got[name], self.ref_state[name], name)


# ---- bad input ------------------------------------------------------------------------------

# Index 4 (the 5th array, where most corruptions go) has the shape of index 0, so the
# "same array twice" and overlap cases keep every shape consistent.
BAD_INPUT_SHAPES = [(5,), (3, 4), (7,), (1,), (5,), (2, 2)]
BAD = 4


class Call:
    """A valid functional call (params, grads, state lists, hyper-parameters) on
    ``backend``'s arrays, to corrupt."""

    def __init__(self, name: str, rng, *, backend=CPU, dtype=np.float32, listed: bool = True,
                 opts: Optional[Dict[str, Any]] = None, shapes=BAD_INPUT_SHAPES):
        self.opt = OPTIMIZERS[name]
        self.backend = backend
        # default: the options under which the optimizer uses every state role it has
        self.opts = dict(self.opt.representative[-1] if opts is None else opts)
        pr = Problem(self.opt, self.opts, shapes if listed else shapes[:1], dtype, rng,
                     backend=backend, listed=listed)
        grads = [backend.asarray(g) for g in pr.draw_grads(rng)]
        self.args, self.kwargs = pr.fastopt_args(grads)
        self.args = [list(a) if isinstance(a, list) else a for a in self.args]
        self.roles = ["params", "grads"] + list(pr.args)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, role: str) -> Any:
        return self.args[self.roles.index(role)]

    def __setitem__(self, role: str, value: Any) -> None:
        self.args[self.roles.index(role)] = value

    def new(self, values: np.ndarray) -> Any:
        """An array of the call's backend holding ``values``."""
        return self.backend.asarray(values)

    def values(self, role: str, i: int = BAD) -> np.ndarray:
        """A NumPy copy of array ``i`` of ``role``."""
        return self.backend.to_numpy(self[role][i])

    def run(self, **overrides) -> None:
        self.opt.fn(*self.args, **dict(self.kwargs, **overrides))

    def arrays(self) -> List[Any]:
        """Every array of the call, in order."""
        out: List[Any] = []
        for a in self.args:
            for x in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(x, np.ndarray) or self.backend.is_array(x):
                    out.append(x)
        return out

    def snapshot(self) -> List[np.ndarray]:
        return [self.backend.to_numpy(a) for a in self.arrays()]

    def assert_unchanged(self, before: List[np.ndarray]) -> None:
        now = self.snapshot()
        assert len(now) == len(before)
        for i, (a, b) in enumerate(zip(now, before)):
            assert_bits(a, b, f"array #{i} of the call was modified")

    def expect(self, exc, match: str, **overrides) -> pytest.ExceptionInfo:
        """The call raises ``exc`` matching ``match`` and leaves every array as it was."""
        before = self.snapshot()
        with pytest.raises(exc, match=match) as info:
            self.run(**overrides)
        self.assert_unchanged(before)
        return info


# ---- the optimizer classes ----------------------------------------------------------------

def class_step(o: Any, grads: Any, estimates: Any) -> None:
    """``o.step(grads)``; a Sophia first folds ``estimates`` into its Hessian EMA every 5th
    step (by step count, so optimizers compared or restored update at the same steps)."""
    if isinstance(o, fastopt.Sophia) and o.step_count % 5 == 0:
        o.update_hessian(estimates)
    o.step(grads)


def hessian_estimates(rng: np.random.Generator, shapes, dtype=np.float32) -> List[np.ndarray]:
    """Hessian-diagonal estimates, mostly positive with some negative entries."""
    return [(rng.standard_normal(s) + 1.0).astype(dtype) for s in shapes]


def assert_same_optimizer(backend, got: Any, want: Any, what: str = "",
                          param_dtype=None) -> None:
    """Optimizer ``got``'s params and state (on ``backend``) hold the same bits as
    ``want``'s (on ``backend`` or the CPU; its params rounded to ``param_dtype`` when
    ``got``'s are 16-bit)."""
    for i, (x, y) in enumerate(zip(got.params, want.params)):
        y = backend.to_numpy(y)
        if param_dtype is not None:
            y = y.astype(param_dtype)
        assert_bits(backend.to_numpy(x), y, f"params[{i}] {what}", any_nan=True)
    assert got.state.keys() == want.state.keys()
    for name in want.state:
        for i, (x, y) in enumerate(zip(got.state[name], want.state[name])):
            assert_bits(backend.to_numpy(x), backend.to_numpy(y), f"{name}[{i}] {what}",
                        any_nan=True)


# ---- comparing --------------------------------------------------------------------------

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
    """Every array holds the same bits as its copy in ``before``."""
    assert len(before) == len(now)
    for i, (b, a) in enumerate(zip(before, now)):
        assert_bits(a, b, f"array #{i} was modified")
