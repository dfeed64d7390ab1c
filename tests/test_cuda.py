"""The CUDA kernels, with CuPy arrays and PyTorch CUDA tensors: float32/float64 trajectories
bit-identical to the CPU kernels (and close to the float64 reference), float16/bfloat16
params equal to a float32 CPU emulation, misaligned slices, streams, multi-tensor launches,
the optimizer classes and their state dicts, bad input, zero-size arrays, sizes past 2**31.

Every GPU test takes the ``lib`` fixture (or ``half`` / ``lib_dtype``, which pair a library
with a dtype, or ``torch_lib`` for tensor-only behaviour): it marks the test ``cuda`` and skips
it where CUDA is not usable or the library is missing, so each behaviour has one test body, run
once per array library. The tests at the end need no GPU.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest

import fastopt
from fastopt import _arrays, _ext, reference

from conftest import (DTYPES, OPTIMIZERS, STEPS, Opt, Problem, assert_close, normal_nonzero,
                      opts_id)
from cuda_libs import BF16, FakeCudaArray, lib_fixture, open_lib

DTYPE_IDS = ["f32", "f64"]
F16 = np.dtype(np.float16)
# One multi-tensor call: odd sizes, zero-size arrays in the middle, multi-dimensional shapes,
# and (2, 8195): two blocks of the kernel's 16384-element chunks, the second a ragged 6.
SHAPES = [(7,), (1,), (0,), (4097,), (33, 3), (2, 0, 3), (2, 8195)]
LAUNCH_TENSORS = 384  # tensors per kernel launch (csrc/cuda/launch_table.h)

# Sophia in the shape of conftest's table. Its Hessian EMA is read only and held positive
# here, so sign(m) * min(|m| / (rho*h), 1) stays continuous where m crosses zero and the
# float32 trajectory stays within TOL of the reference; the class tests feed it estimates
# with negative entries through update_hessian (compared with the CPU only).
SOPHIA = Opt(
    name="sophia", fn=fastopt.sophia_, ref=reference.sophia, cls=fastopt.Sophia,
    state_args=lambda o: ["exp_avgs", "hessian_diags"], takes_step=False, base=dict(lr=0.05),
    grid=[dict(), dict(weight_decay=0.0, rho=0.5), dict(maximize=True, l1=1e-3),
          dict(eps=1e-3, beta1=0.5)],
    representative=[dict(), dict(maximize=True, l1=1e-3)],
    init={"exp_avgs": lambda shape, rng: np.zeros(shape),
          "hessian_diags": lambda shape, rng: rng.uniform(0.05, 1.0, shape)})
GPU_OPTIMIZERS: Dict[str, Opt] = {**OPTIMIZERS, "sophia": SOPHIA}


def cases(which: str) -> List[Any]:
    """pytest.param(opt, opts) for every optimizer (Sophia included) and option combo of its
    ``grid`` or ``representative`` list."""
    return [pytest.param(opt, opts, id=f"{opt.name}-{opts_id(opts)}")
            for opt in GPU_OPTIMIZERS.values() for opts in getattr(opt, which)]


# ---- the array libraries (the adapters are in cuda_libs.py) -------------------------------

def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes is needed for bfloat16 host arrays")
        return BF16
    return np.dtype(name)


def _lib_fixture(*combos):
    """A fixture giving (library, dtype) for each ``(library name, dtype name)`` combo."""
    @pytest.fixture(params=[pytest.param(c, id="-".join(c), marks=pytest.mark.cuda)
                            for c in combos])
    def fixture(request):
        name, dtype = request.param
        return open_lib(name), _dtype(dtype)
    return fixture


lib = lib_fixture(doc="The array library of a GPU test (skips without CUDA or the library).")
torch_lib = lib_fixture(["torch"], doc="PyTorch alone, for behaviour only tensors have "
                                       "(``p.data = ...``).")


# 16-bit params: CuPy has float16, PyTorch float16 and bfloat16.
half = _lib_fixture(("cupy", "float16"), ("torch", "float16"), ("torch", "bfloat16"))
lib_dtype = _lib_fixture(*[(n, d) for n in ["cupy", "torch"]
                           for d in ["float32", "float64", "float16"]], ("torch", "bfloat16"))


# ---- comparing ---------------------------------------------------------------------------

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def assert_identical(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Same dtype, shape and bits in every element, except that NaN matches any NaN (the
    contract leaves the sign and payload of NaN results open)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g, w = np.ascontiguousarray(got).ravel(), np.ascontiguousarray(want).ravel()
    nan_g, nan_w = np.isnan(g.astype(np.float64)), np.isnan(w.astype(np.float64))
    bits = _BITS[g.dtype.itemsize]
    bad = (nan_g != nan_w) | (~nan_g & (g.view(bits) != w.view(bits)))
    if bad.any():
        idx = np.flatnonzero(bad)
        raise AssertionError(f"{what}: {idx.size} of {g.size} elements differ, first at flat "
                             f"indices {idx[:8].tolist()}: got {g[idx[:4]].tolist()}, want "
                             f"{w[idx[:4]].tolist()}")


def assert_same_optimizer(lib, gpu: fastopt.Optimizer, cpu: fastopt.Optimizer,
                          what: str = "", param_dtype: Optional[np.dtype] = None) -> None:
    """A GPU optimizer's params and state equal a CPU one's bit for bit (the CPU params
    rounded to ``param_dtype`` when the GPU's are 16-bit)."""
    for i, (d, c) in enumerate(zip(gpu.params, cpu.params)):
        want = c if param_dtype is None else c.astype(param_dtype)
        assert_identical(lib.to_host(d, sync=True), want, f"params[{i}] {what}")
    assert gpu.state.keys() == cpu.state.keys()
    for name in cpu.state:
        for i, (d, c) in enumerate(zip(gpu.state[name], cpu.state[name])):
            assert_identical(lib.to_host(d, sync=True), c, f"{name}[{i}] {what}")


class DeviceProblem:
    """Device copies of a ``Problem``'s params and state, stepped with the functional API and
    compared with the Problem's CPU arrays. ``make(values, role, i)`` allocates each copy
    (role 0: params, 1: grads, 2...: the state lists in order); ``param_dtype`` stores the
    params in a 16-bit type (the state stays float32)."""

    def __init__(self, lib, pr: Problem, make: Optional[Callable] = None,
                 param_dtype: Optional[np.dtype] = None):
        self.lib, self.pr, self.param_dtype = lib, pr, param_dtype
        make = make or (lambda values, role, i: lib.to_device(values))
        self.params = [make(p if param_dtype is None else p.astype(param_dtype), 0, i)
                       for i, p in enumerate(pr.params)]
        self.state = {name: [make(a, role, i) for i, a in enumerate(arrays)]
                      for role, (name, arrays) in enumerate(pr.state.items(), start=2)}

    def step(self, grads: List[Any], **extra) -> None:
        """One step with device ``grads``; call it before ``pr.step`` (it reads pr.t)."""
        pr = self.pr
        args = [self.params, grads] + [None if n is None else self.state[n] for n in pr.args]
        kwargs = dict(pr.hyper, **extra)
        if pr.opt.takes_step:
            kwargs["step"] = pr.t + 1
        pr.opt.fn(*args, **kwargs)

    def host(self) -> Dict[str, List[np.ndarray]]:
        out = {"params": [self.lib.to_host(p, sync=True) for p in self.params]}
        out.update({k: [self.lib.to_host(a, sync=True) for a in v] for k, v in self.state.items()})
        return out

    def assert_matches(self, what: str) -> None:
        """Bit-identical to the Problem's CPU params and state."""
        dt = self.param_dtype
        want = {"params": [p if dt is None else p.astype(dt) for p in self.pr.params],
                **self.pr.state}
        for role, arrays in self.host().items():
            for i, (g, w) in enumerate(zip(arrays, want[role])):
                assert_identical(g, w, f"{role}[{i}] {what}")

    def assert_close_to_reference(self) -> None:
        pr, got = self.pr, self.host()
        where = f"{pr.opt.name} {opts_id(pr.opts)} {pr.dtype} after step {pr.t}"
        assert_close(got["params"], pr.ref_params, pr.dtype, f"GPU params ({where})")
        for name in pr.state:
            assert_close(got[name], pr.ref_state[name], pr.dtype, f"GPU {name} ({where})")


def class_step(o: fastopt.Optimizer, grads: Any, estimates: Any) -> None:
    """``o.step(grads)``; a Sophia first folds ``estimates`` into its Hessian EMA every 5th
    step (by step count, so optimizers compared or restored update at the same steps)."""
    if isinstance(o, fastopt.Sophia) and o.step_count % 5 == 0:
        o.update_hessian(estimates)
    o.step(grads)


def hessian_estimates(rng, shapes) -> List[np.ndarray]:
    """Float32 Hessian-diagonal estimates, mostly positive with some negative entries."""
    return [(rng.standard_normal(s) + 1.0).astype(np.float32) for s in shapes]


# ---- trajectories ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", cases("grid"))
def test_trajectory_bit_identical_to_cpu(lib, opt, opts, dtype, rng):
    # STEPS steps with fresh gradients: after every step the GPU params and state equal the
    # CPU kernels' bit for bit (the grads untouched), and at the end they are within TOL of
    # the float64 reference.
    pr = Problem(opt, opts, SHAPES, dtype, rng)
    dev = DeviceProblem(lib, pr)
    for _ in range(STEPS):
        grads = pr.draw_grads(rng)
        dgrads = [lib.to_device(g) for g in grads]
        dev.step(dgrads)
        pr.step(grads)
        dev.assert_matches(f"after step {pr.t}")
        for i, (d, g) in enumerate(zip(dgrads, grads)):
            assert_identical(lib.to_host(d, sync=True), g, f"grads[{i}] (read only)")
    dev.assert_close_to_reference()


@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_16bit_params_match_float32_cpu_emulation(half, opt, opts, rng):
    # 16-bit params and grads, float32 state: each step is the CPU float32 kernel applied to
    # the params' float32 values and the grads' float32 values, the params rounded back to
    # the 16-bit type (to nearest even) after it. Exact, params and state alike.
    lib, dtype = half
    pr = Problem(opt, opts, SHAPES, np.float32, rng)

    def round_params():
        for p in pr.params:
            p[...] = p.astype(dtype)

    round_params()
    dev = DeviceProblem(lib, pr, param_dtype=dtype)
    for _ in range(STEPS):
        grads = [g.astype(dtype) for g in pr.draw_grads(rng)]
        dev.step([lib.to_device(g) for g in grads])
        pr.step([g.astype(np.float32) for g in grads])
        round_params()
        dev.assert_matches(f"after step {pr.t}")


def test_ema_matches_cpu_and_reference(lib_dtype, rng):
    # average <- beta*average + (1-beta)*sample, betas including 0 and 1: bit-identical to the
    # CPU (for 16-bit averages: the float32 CPU kernel, rounded after each step), and for
    # float32/float64 within TOL of the reference.
    lib, dtype = lib_dtype
    is16 = dtype.itemsize == 2
    avg = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
    dev = [lib.to_device(a) for a in avg]
    cpu = [a.astype(np.float32) if is16 else a.copy() for a in avg]
    ref = [a.astype(np.float64) for a in avg]
    for t in range(STEPS):
        beta = [0.9, 0.99, 0.0, 1.0, 0.5][t % 5]
        samples = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
        fastopt.ema_(dev, [lib.to_device(x) for x in samples], beta=beta)
        fastopt.ema_(cpu, [x.astype(c.dtype) for x, c in zip(samples, cpu)], beta=beta)
        for c, r, x in zip(cpu, ref, samples):
            if is16:
                c[...] = c.astype(dtype)
            reference.ema(r, x.astype(np.float64), beta=beta)
        for i, (d, c) in enumerate(zip(dev, cpu)):
            assert_identical(lib.to_host(d, sync=True), c.astype(dtype),
                             f"averages[{i}] after step {t + 1}")
    if not is16:
        assert_close([lib.to_host(d, sync=True) for d in dev], ref, dtype,
                     "GPU EMA against the reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_first_step_writes_every_element(lib, opt, opts, dtype, rng):
    # Poison: state the first step overwrites without reading (SGD's momentum buffers) starts
    # as NaN, which must not survive anywhere; every element of params and state that the
    # reference moves by more than 2 ulp must change on the GPU (so an element no thread
    # wrote fails even if the CPU kernel skipped it too), and the result equals the CPU's.
    init = dict(opt.init)
    if opt.name == "sgd":
        init["momentum_buffers"] = lambda shape, rng: np.full(shape, np.nan)
    pr = Problem(opt, opts, SHAPES, dtype, rng, init=init)
    dev = DeviceProblem(lib, pr)
    before = pr.snapshot()
    grads = pr.draw_grads(rng)
    dev.step([lib.to_device(g) for g in grads])
    pr.step(grads)
    want = {"params": pr.ref_params, **pr.ref_state}
    for role, arrays in dev.host().items():
        for i, (b, a, r) in enumerate(zip(before[role], arrays, want[role])):
            assert not np.isnan(a).any(), f"{role}[{i}]: NaN after the first step"
            with np.errstate(invalid="ignore"):
                must = np.abs(r - b) > 2 * np.spacing(np.abs(b)).astype(np.float64)
            stuck = np.flatnonzero(must & (a == b))
            assert stuck.size == 0, f"{role}[{i}]: elements left unwritten: {stuck[:8].tolist()}"
    dev.assert_matches("after step 1")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_misaligned_slices_match_cpu(lib, opt, opts, dtype, rng):
    # Every array is a slice of a NaN-padded buffer, 16-byte aligned (vector path) or starting
    # an odd number of elements in: per tensor of SHAPES, every role misaligned, every role
    # aligned, or a mix (even roles aligned: one misaligned role must send the tensor to the
    # scalar path). Bit-identical to the CPU, and the padding is never written.
    kinds = ["odd", "odd", "aligned", "mixed", "aligned", "mixed", "odd"]
    assert len(kinds) == len(SHAPES)
    buffers = []

    def make(values: np.ndarray, role: int, i: int):
        aligned = kinds[i] == "aligned" or (kinds[i] == "mixed" and role % 2 == 0)
        off = 4 if aligned else 2 * role + 1
        n = values.size
        buf = np.full(off + n + 5, np.nan, values.dtype)
        buf[off:off + n] = values.ravel()
        dbuf = lib.to_device(buf)
        view = dbuf[off:off + n].reshape(values.shape)
        if n:
            assert (lib.ptr(view) % 16 == 0) == aligned, "the test's alignment assumption"
        buffers.append((dbuf, off, n))
        return view

    pr = Problem(opt, opts, SHAPES, dtype, rng)
    dev = DeviceProblem(lib, pr, make)
    for _ in range(STEPS):
        grads = pr.draw_grads(rng)
        dev.step([make(g, 1, i) for i, g in enumerate(grads)])
        pr.step(grads)
        dev.assert_matches(f"after step {pr.t}")
    for dbuf, off, n in buffers:
        buf = lib.to_host(dbuf, sync=True)
        assert np.isnan(buf[:off]).all() and np.isnan(buf[off + n:]).all(), "padding written"


# ---- streams -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stream-object", "int-handle", "current-stream", "class"])
def test_runs_on_the_requested_stream(lib, how, rng):
    # Each step's grads are written on a side stream behind ~0.1 s of spinning, then the step
    # is queued on that stream: passed as stream= (a stream object, its int handle, or to
    # opt.step) or made current with `with stream:`. Side streams are non-blocking, so a
    # kernel queued anywhere else would run at once and read the previous (stale) grads.
    opt = OPTIMIZERS["adam"]
    opts = opt.representative[-1]
    pr = Problem(opt, opts, SHAPES, np.float32, rng)  # Adam's state starts at zero, as a class's
    dev = DeviceProblem(lib, pr)
    o = None
    if how == "class":
        o = opt.cls(dev.params, **opt.hyper(opts))
        dev.state = o.state  # the class's own (zeroed) state replaces the copies
    side = lib.side_stream()
    dgrads = [lib.to_device(np.zeros(s, np.float32)) for s in SHAPES]
    for _ in range(3):
        grads = pr.draw_grads(rng)
        src = [lib.to_device(g) for g in grads]
        lib.to_host(src[0], sync=True)  # synchronizes: src is ready before the side stream reads it
        with lib.current(side):
            lib.spin()
            for d, s in zip(dgrads, src):
                lib.copy(d, s)
            if how == "current-stream":
                dev.step(dgrads)
        if how == "stream-object":
            dev.step(dgrads, stream=side)
        elif how == "int-handle":
            dev.step(dgrads, stream=lib.handle(side))
        elif how == "class":
            o.step(dgrads, stream=side)
        pr.step(grads)
        dev.assert_matches(f"after step {pr.t} ({how})")


# ---- many tensors ------------------------------------------------------------------------

def gpt2_like_shapes(d: int = 64, vocab: int = 512, ctx: int = 128, layers: int = 12):
    """The 148 parameter tensors of GPT-2 small, with small dimensions."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


@pytest.mark.parametrize("count,launches", [(LAUNCH_TENSORS, 1), (LAUNCH_TENSORS + 1, 2),
                                            (1000, 3), ("gpt2", 1)])
def test_one_launch_per_384_tensors(lib, count, launches, rng):
    # The class keeps one plan: a step over N non-empty tensors makes ceil(N/384) launches,
    # and matches the CPU.
    if count == "gpt2":
        shapes = gpt2_like_shapes()
        assert len(shapes) == 148
    else:
        sizes = rng.integers(1, 300, count)
        shapes = [(int(n),) if k % 4 else (int(n), 3) for k, n in enumerate(sizes)]
    p0 = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    gpu = fastopt.AdamW([lib.to_device(p) for p in p0], lr=0.01, amsgrad=True)
    cpu = fastopt.AdamW([p.copy() for p in p0], lr=0.01, amsgrad=True)
    for _ in range(2):
        grads = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
        gpu.step([lib.to_device(g) for g in grads])
        cpu.step(grads)
    assert gpu._plan.num_tensors == len(shapes)
    assert gpu._plan.launches == launches
    assert_same_optimizer(lib, gpu, cpu)


# ---- the optimizer classes ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fresh-grads", "reused-grads", "single-array"])
@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_class_matches_cpu_class(lib, opt, opts, mode, rng):
    # The class on device arrays (state allocated by the same library), stepped with new grad
    # arrays every step, with the same grad arrays refilled in place (the cached plan must
    # read their new contents), or with one array instead of a list; the lr changes midway.
    # Bit-identical to the same class on NumPy arrays.
    shapes = [(4097,)] if mode == "single-array" else SHAPES
    listed = mode != "single-array"

    def pack(arrays):
        return arrays if listed else arrays[0]

    p0 = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    dparams = [lib.to_device(p) for p in p0]
    gpu = opt.cls(pack(dparams), **opt.hyper(opts))
    cpu = opt.cls(pack([p.copy() for p in p0]), **opt.hyper(opts))
    assert gpu.params[0] is dparams[0], "the class must update the caller's arrays"
    for name, arrays in gpu.state.items():
        for a, p in zip(arrays, dparams):
            assert lib.is_array(a) and _arrays.dtype_name(a) == "float32", name
            assert tuple(a.shape) == tuple(p.shape), name
    reused = [lib.to_device(np.zeros(s, np.float32)) for s in shapes]
    for t in range(STEPS):
        if t == STEPS // 2:
            gpu.lr = cpu.lr = cpu.lr * 0.5
        grads = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
        est = hessian_estimates(rng, shapes)
        if mode == "reused-grads":
            for d, g in zip(reused, grads):
                lib.copy(d, lib.to_device(g))
            dgrads = reused
        else:
            dgrads = [lib.to_device(g) for g in grads]
        class_step(gpu, pack(dgrads), pack([lib.to_device(e) for e in est]))
        class_step(cpu, pack(grads), pack(est))
        assert_same_optimizer(lib, gpu, cpu, f"after step {t + 1}")


def test_class_state_methods_are_ordered_with_side_stream_steps(lib, rng):
    # Steps on a side stream, the state methods on the current one, with no wait in the
    # test: (1) a step queued behind ~0.1 s of spinning on the side stream, then at once a
    # method that reads or writes the state (state_dict, zero_state, load_state_dict): the
    # method must wait for the step; (2) a method whose own state writes (construction's
    # zero fill, the copies) are queued behind ~0.1 s of spinning on the current stream,
    # then at once a step on the side stream: the method must have waited for its writes.
    # Bit-identical to the CPU class doing the same.
    opt = OPTIMIZERS["adam"]
    hyper = opt.hyper(opt.representative[-1])
    p0 = [normal_nonzero(rng, s).astype(np.float32) for s in SHAPES]
    grads = [[normal_nonzero(rng, s).astype(np.float32) for s in SHAPES] for _ in range(7)]
    side = lib.side_stream()
    dparams = [lib.to_device(p) for p in p0]
    dgrads = [[lib.to_device(g) for g in gs] for gs in grads]
    lib.synchronize()  # every input is on the device before the test queues anything

    def step(t: int, late: bool) -> None:
        """Step t of both optimizers; the GPU's on the side stream, behind spinning if late."""
        if late:
            with lib.current(side):
                lib.spin()
        gpu.step(dgrads[t], stream=side)
        cpu.step(grads[t])

    lib.spin()
    gpu = opt.cls(dparams, **hyper)  # (2): its zero fill
    cpu = opt.cls([p.copy() for p in p0], **hyper)
    step(0, late=False)
    step(1, late=True)
    lib.spin()
    saved, cpu_saved = gpu.state_dict(), cpu.state_dict()  # (1) and (2): its copies
    step(2, late=False)  # changes the state the copies were taken from
    for name, arrays in cpu_saved["state"].items():
        for i, (a, c) in enumerate(zip(saved["state"][name], arrays)):
            assert_identical(lib.to_host(a, sync=True), c, f"state_dict()['state'][{name!r}][{i}]")
    step(3, late=True)
    lib.spin()
    gpu.zero_state()  # (1) and (2): its fill
    cpu.zero_state()
    step(4, late=False)
    assert_same_optimizer(lib, gpu, cpu, "after zero_state between side-stream steps")
    step(5, late=True)
    lib.spin()
    gpu.load_state_dict(saved)  # (1) and (2): its copies
    cpu.load_state_dict(cpu_saved)
    step(6, late=False)
    assert_same_optimizer(lib, gpu, cpu, "after load_state_dict between side-stream steps")


@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_class_with_16bit_params_keeps_float32_state(half, opt, opts, rng):
    # 16-bit params: the class allocates float32 state on the device, and its trajectory is
    # the float32 CPU class's with the params rounded to the 16-bit type after every step.
    lib, dtype = half
    p16 = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
    gpu = opt.cls([lib.to_device(p) for p in p16], **opt.hyper(opts))
    cpu = opt.cls([p.astype(np.float32) for p in p16], **opt.hyper(opts))
    for name, arrays in gpu.state.items():
        for a, p in zip(arrays, p16):
            assert lib.is_array(a) and _arrays.dtype_name(a) == "float32", name
            assert tuple(a.shape) == p.shape, name
    for t in range(10):
        g16 = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
        est = hessian_estimates(rng, SHAPES)
        class_step(gpu, [lib.to_device(g) for g in g16], [lib.to_device(e) for e in est])
        class_step(cpu, [g.astype(np.float32) for g in g16], est)
        for p in cpu.params:
            p[...] = p.astype(dtype)
        assert_same_optimizer(lib, gpu, cpu, f"after step {t + 1}", param_dtype=dtype)


def test_torch_param_data_swap_is_picked_up(torch_lib, rng):
    # nn.Parameters; `p.data = new_tensor` between steps moves a param's memory. The cached
    # plan must step the new memory and leave the old untouched.
    lib, torch = torch_lib, torch_lib.torch
    shapes = [(33,), (4097,), (5, 7)]
    p0 = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    params = [torch.nn.Parameter(lib.to_device(p)) for p in p0]
    gpu = fastopt.Adam(params, lr=0.01, amsgrad=True)
    cpu = fastopt.Adam([p.copy() for p in p0], lr=0.01, amsgrad=True)
    old = None
    for t in range(6):
        if t == 3:
            old = params[1].data
            old_values = lib.to_host(old, sync=True)
            new = normal_nonzero(rng, shapes[1]).astype(np.float32)
            params[1].data = lib.to_device(new)
            cpu.params[1][...] = new
        grads = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
        gpu.step([lib.to_device(g) for g in grads])
        cpu.step(grads)
        assert_same_optimizer(lib, gpu, cpu, f"after step {t + 1}")
    assert_identical(lib.to_host(old, sync=True), old_values, "the params' old memory")


def test_torch_param_restrided_in_place_is_seen(torch_lib, rng):
    # `p.data = p.data.t()` keeps the data pointer and the size but changes the param's
    # strides: the cached plan must see it and refuse (the grads and state no longer share
    # the param's layout or shape; as for a fresh call, changing nothing) rather than step
    # the memory with the old layout; transposed back, the steps go on bit-identical to the
    # CPU's.
    lib, torch = torch_lib, torch_lib.torch
    shapes = [(33,), (6, 6), (5, 7)]  # square: the shape stays too
    p0 = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    params = [torch.nn.Parameter(lib.to_device(p)) for p in p0]
    gpu = fastopt.Adam(params, lr=0.01, amsgrad=True)
    cpu = fastopt.Adam([p.copy() for p in p0], lr=0.01, amsgrad=True)

    def step(t: int) -> None:
        grads = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
        gpu.step([lib.to_device(g) for g in grads])
        cpu.step(grads)
        assert_same_optimizer(lib, gpu, cpu, f"after step {t}")

    step(1)
    for i in (1, 2):
        steps = gpu.step_count
        ptr = params[i].data_ptr()
        params[i].data = params[i].data.t()
        assert params[i].data_ptr() == ptr and not params[i].is_contiguous()
        arrays = params + [a for v in gpu.state.values() for a in v]
        before = [lib.to_host(a, sync=True) for a in arrays]
        grads = [lib.to_device(normal_nonzero(rng, s).astype(np.float32)) for s in shapes]
        with pytest.raises(ValueError, match=rf"grads\[{i}\]: (its strides differ from "
                                              rf"params\[{i}\]'s|shape)"):
            gpu.step(grads)
        for k, (a, b) in enumerate(zip(arrays, before)):
            assert_identical(lib.to_host(a, sync=True), b, f"array #{k} after the refused step")
        assert gpu.step_count == steps
        params[i].data = params[i].data.t()
        assert params[i].data_ptr() == ptr and params[i].is_contiguous()
        step(steps + 1)


@pytest.mark.parametrize("source", ["device", "numpy"])
@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_state_dict_round_trip_on_device(lib, opt, opts, source, rng):
    # k steps, state_dict() (copies, in the params' library, on the device), n more steps;
    # a new optimizer on the params as they were at step k loads the dict (device arrays
    # or their NumPy copies) and takes the same n steps: bit-identical.
    k, n = 7, 8
    p0 = [normal_nonzero(rng, s).astype(np.float32) for s in SHAPES]
    grads = [[normal_nonzero(rng, s).astype(np.float32) for s in SHAPES] for _ in range(k + n)]
    est = [hessian_estimates(rng, SHAPES) for _ in range(k + n)]
    hyper = opt.hyper(opts)

    def run(o, steps):
        for t in steps:
            class_step(o, [lib.to_device(g) for g in grads[t]], [lib.to_device(e) for e in est[t]])

    o = opt.cls([lib.to_device(p) for p in p0], **hyper)
    run(o, range(k))
    sd = o.state_dict()
    params_k = [lib.to_host(p, sync=True) for p in o.params]
    for name, arrays in sd["state"].items():
        for a, own in zip(arrays, o.state[name]):
            assert lib.is_array(a), f"state_dict()['state'][{name!r}]: not a {lib.name} array"
            empty = 0 in tuple(a.shape)
            assert empty or lib.ptr(a) != lib.ptr(own), "state_dict() must copy"
    saved = {name: [lib.to_host(a, sync=True) for a in arrays]
             for name, arrays in sd["state"].items()}
    run(o, range(k, k + n))
    for name, arrays in sd["state"].items():  # untouched by the later steps
        for i, (a, s) in enumerate(zip(arrays, saved[name])):
            assert_identical(lib.to_host(a, sync=True), s, f"saved {name}[{i}]")
    if source == "numpy":
        sd = dict(sd, state=saved)

    o2 = opt.cls([lib.to_device(p) for p in params_k], **dict(hyper, lr=hyper["lr"] * 7))
    o2.load_state_dict(sd)
    assert o2.step_count == k and o2.lr == hyper["lr"]
    run(o2, range(k, k + n))
    for i, (a, b) in enumerate(zip(o2.params, o.params)):
        assert_identical(lib.to_host(a, sync=True), lib.to_host(b, sync=True), f"params[{i}]")
    for name in o.state:
        for i, (a, b) in enumerate(zip(o2.state[name], o.state[name])):
            assert_identical(lib.to_host(a, sync=True), lib.to_host(b, sync=True), f"{name}[{i}]")


# ---- bad input ---------------------------------------------------------------------------

BAD_SHAPES = [(5,), (3, 4), (7,)]


class DeviceCall:
    """A valid Adam call with every state list (amsgrad) on device arrays, to corrupt."""

    ROLES = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]

    def __init__(self, lib, rng):
        self.lib = lib
        opt = OPTIMIZERS["adam"]
        pr = Problem(opt, opt.representative[-1], BAD_SHAPES, np.float32, rng)
        assert pr.args == self.ROLES[2:]
        self.lists = {"params": [lib.to_device(p) for p in pr.params],
                      "grads": [lib.to_device(g) for g in pr.draw_grads(rng)],
                      **{k: [lib.to_device(a) for a in v] for k, v in pr.state.items()}}
        self.kwargs = dict(pr.hyper, step=1)

    def __getitem__(self, role: str) -> List[Any]:
        return self.lists[role]

    def values(self, role: str, i: int) -> np.ndarray:
        return self.lib.to_host(self.lists[role][i], sync=True)

    def all_on_host(self) -> None:
        for arrays in self.lists.values():
            arrays[:] = [self.lib.to_host(a, sync=True) for a in arrays]

    def snapshot(self) -> List[np.ndarray]:
        return [self.lib.to_host(a, sync=True) if self.lib.is_array(a) else np.array(a, copy=True)
                for arrays in self.lists.values() for a in arrays]

    def run(self, **overrides) -> None:
        fastopt.adam_(*[self.lists[r] for r in self.ROLES], **dict(self.kwargs, **overrides))


def _on_second_device(c: DeviceCall, lib) -> None:
    if lib.device_count() < 2:
        pytest.skip("needs two GPUs")
    c["grads"][1] = lib.to_device(c.values("grads", 1), device=1)


def _overlapping_params(c: DeviceCall, lib) -> None:
    # params[0] and params[2] are slices of one buffer sharing one element
    buf = lib.to_device(np.concatenate([c.values("params", 0), c.values("params", 2)[1:]]))
    c["params"][0], c["params"][2] = buf[0:5], buf[4:11]


def _transposed(c: DeviceCall, lib, role: str) -> None:
    c[role][1] = lib.to_device(np.ascontiguousarray(c.values(role, 1).T)).T


def _cuda_grad_host_rest(c: DeviceCall, lib) -> None:
    grad = c["grads"][1]
    c.all_on_host()
    c["grads"][1] = grad


def _stream_with_host_arrays(c: DeviceCall, lib) -> Dict[str, Any]:
    c.all_on_host()
    return dict(stream=lib.side_stream())


# (id, corrupt(call, lib) -> keyword overrides or None, exception, message pattern)
BAD_CASES = [
    ("grad-on-host", lambda c, lib: c["grads"].__setitem__(1, c.values("grads", 1)),
     TypeError, r"grads\[1\]: is a host array .*but this call runs on CUDA arrays"),
    ("state-on-host", lambda c, lib: c["exp_avg_sqs"].__setitem__(2, c.values("exp_avg_sqs", 2)),
     TypeError, r"exp_avg_sqs\[2\]: is a host array .*but this call runs on CUDA arrays"),
    ("cuda-grad-host-params", _cuda_grad_host_rest, TypeError, r"grads\[1\]: is a CUDA array"),
    ("params-dtype", lambda c, lib: c["params"].__setitem__(
        1, lib.to_device(c.values("params", 1).astype(np.float64))),
     TypeError, r"params\[1\]: dtype float64"),
    ("grad-dtype", lambda c, lib: c["grads"].__setitem__(
        1, lib.to_device(c.values("grads", 1).astype(np.float16))),
     TypeError, r"grads\[1\]: dtype float16"),
    ("state-dtype", lambda c, lib: c["exp_avgs"].__setitem__(
        1, lib.to_device(c.values("exp_avgs", 1).astype(np.float64))),
     TypeError, r"exp_avgs\[1\]: dtype float64"),
    ("grad-int32", lambda c, lib: c["grads"].__setitem__(
        1, lib.to_device(np.zeros((3, 4), np.int32))), TypeError, r"grads\[1\]: dtype"),
    ("grad-int8", lambda c, lib: c["grads"].__setitem__(  # a device dtype of quantization
        1, lib.to_device(np.zeros((3, 4), np.int8))), TypeError, r"grads\[1\]: dtype"),
    ("grad-shape", lambda c, lib: c["grads"].__setitem__(
        1, lib.to_device(c.values("grads", 1).reshape(4, 3))), ValueError, r"grads\[1\]: shape"),
    ("state-list-length", lambda c, lib: c["exp_avgs"].__delitem__(2),
     ValueError, r"exp_avgs: expected 3 arrays"),
    ("grad-transposed", lambda c, lib: _transposed(c, lib, "grads"),
     ValueError, r"grads\[1\]: its strides differ from params\[1\]'s"),
    ("params-transposed", lambda c, lib: _transposed(c, lib, "params"),
     ValueError, r"grads\[1\]: its strides differ from params\[1\]'s"),
    ("grad-is-param", lambda c, lib: c["grads"].__setitem__(0, c["params"][0]),
     ValueError, r"overlaps"),
    ("state-is-param", lambda c, lib: c["exp_avgs"].__setitem__(2, c["params"][2]),
     ValueError, r"overlaps"),
    ("params-overlap", _overlapping_params, ValueError, r"params\[[02]\] overlaps params\[[02]\]"),
    ("second-device", _on_second_device, ValueError, r"grads\[1\]: is on CUDA device 1"),
    ("stream-str", lambda c, lib: dict(stream="side"), TypeError, r"stream"),
    ("stream-bool", lambda c, lib: dict(stream=True), TypeError, r"stream"),
    ("stream-negative", lambda c, lib: dict(stream=-1), ValueError, r"stream"),
    ("stream-with-host-arrays", _stream_with_host_arrays, ValueError,
     r"stream: only applies to CUDA arrays"),
]


@pytest.mark.parametrize("corrupt,exc,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CASES])
def test_bad_input_raises_and_changes_nothing(lib, corrupt, exc, match, rng):
    c = DeviceCall(lib, rng)
    overrides = corrupt(c, lib) or {}
    before = c.snapshot()
    with pytest.raises(exc, match=match):
        c.run(**overrides)
    for i, (b, a) in enumerate(zip(before, c.snapshot())):
        assert_identical(a, b, f"array #{i} of the call")


@pytest.mark.parametrize("opt,opts", cases("representative"))
def test_zero_size_arrays_are_a_no_op(lib, opt, opts, rng):
    # Lists of zero-size device arrays (on the current and on a side stream), one zero-size
    # array, and empty lists: accepted (no launch of zero blocks, no error), nothing changes.
    shapes = [(0,), (2, 0, 3)]
    pr = Problem(opt, opts, shapes, np.float32, rng)
    dev = DeviceProblem(lib, pr)
    grads = [lib.to_device(np.zeros(s, np.float32)) for s in shapes]
    dev.step(grads)
    dev.step(grads, stream=lib.side_stream())
    states = [None if n is None else dev.state[n][0] for n in pr.args]
    kwargs = dict(pr.hyper, **({"step": 1} if opt.takes_step else {}))
    opt.fn(dev.params[0], grads[0], *states, **kwargs)
    opt.fn([], [], *[None if n is None else [] for n in pr.args], **kwargs)
    fastopt.ema_(dev.params, grads, beta=0.9)
    for role, arrays in dev.host().items():
        assert [a.shape for a in arrays] == shapes, role


@pytest.mark.slow
def test_float16_sgd_past_2_pow_31_elements(lib, rng):
    # 64-bit indexing: one float16 tensor of 2**31 + 33 elements after a small one. Probe
    # windows at the start, around 2**31 and at the end hold random values and are checked
    # against the formula in NumPy; everything else must become 1 - 0.25*0.5 = 0.875.
    n = 2**31 + 33
    if lib.free_memory() < 2 * 2 * n + (1 << 30):
        pytest.skip("needs ~9 GiB of free GPU memory")
    lr, f32 = 0.25, np.float32
    p, g = lib.full(n, 1.0, np.float16), lib.full(n, 0.5, np.float16)
    small_p = lib.to_device(np.full(5, 2.0, np.float16))
    small_g = lib.to_device(np.full(5, 1.0, np.float16))
    probes = []
    for lo, hi in [(0, 64), (2**31 - 64, 2**31 + 64), (n - 64, n)]:
        pv, gv = (rng.standard_normal(hi - lo).astype(np.float16) for _ in range(2))
        lib.copy(p[lo:hi], lib.to_device(pv))
        lib.copy(g[lo:hi], lib.to_device(gv))
        probes.append((lo, hi, pv, gv))
    fastopt.sgd_([small_p, p], [small_g, g], lr=lr)
    for lo, hi, pv, gv in probes:
        want = (pv.astype(f32) - f32(lr) * gv.astype(f32)).astype(np.float16)
        assert_identical(lib.to_host(p[lo:hi], sync=True), want, f"params[{lo}:{hi}]")
        lib.copy(p[lo:hi], lib.to_device(np.full(hi - lo, 0.875, np.float16)))
    assert float(p.min()) == float(p.max()) == 0.875, "elements outside the probes"
    assert_identical(lib.to_host(small_p, sync=True), np.full(5, 1.75, np.float16),
                     "the small params")


# ---- without a GPU ------------------------------------------------------------------------

class DLPackOnly:
    def __init__(self, device_type: int):
        self.device_type = device_type

    def __dlpack_device__(self):
        return (self.device_type, 0)


def _host_call_args(opt, opts, params, shapes):
    """Host grads and state for ``opt``'s functional call on ``params``."""
    grads = [np.ones(s, np.float32) for s in shapes]
    states = [None if n is None else [np.zeros(s, np.float32) for s in shapes]
              for n in opt.state_args(opts)]
    kwargs = dict(opt.hyper(opts), **({"step": 1} if opt.takes_step else {}))
    return [params, grads, *states], kwargs


@pytest.mark.skipif(fastopt.cuda_available(), reason="checks the refusal when CUDA is not usable")
@pytest.mark.parametrize("opt,opts", [pytest.param(o, o.representative[-1], id=o.name)
                                      for o in GPU_OPTIMIZERS.values()]
                         + [pytest.param("ema", None, id="ema")])
def test_cuda_params_without_usable_cuda_raise_type_error(opt, opts):
    fake = [FakeCudaArray((4,), on_instance=True)]
    with pytest.raises(TypeError, match=r"params: is a CUDA array, but CUDA is not usable"):
        if opt == "ema":
            fastopt.ema_(fake, [np.ones(4, np.float32)], beta=0.9)
        else:
            args, kwargs = _host_call_args(opt, opts, fake, [(4,)])
            opt.fn(*args, **kwargs)


def test_cuda_grad_with_host_params_raises_type_error_naming_it():
    # Runs everywhere: the CPU path refuses the CUDA array without touching it, with or
    # without a usable GPU ("... but the params are host arrays" / "... CUDA is not usable").
    opt = OPTIMIZERS["adam"]
    opts = opt.representative[-1]
    shapes = [(4,), (3,)]
    params = [np.full(s, 0.5, np.float32) for s in shapes]
    args, kwargs = _host_call_args(opt, opts, params, shapes)
    args[1][1] = FakeCudaArray((3,), on_instance=True)
    with pytest.raises(TypeError, match=r"grads\[1\]: is a CUDA array"):
        opt.fn(*args, **kwargs)
    for p in params:
        assert (p == 0.5).all()


@pytest.mark.parametrize("kind", ["numpy", "torch-cpu"])
@pytest.mark.parametrize("stream", [0, 7])
def test_stream_with_host_arrays_is_rejected(kind, stream):
    p, g = np.full(5, 0.5, np.float32), np.ones(5, np.float32)
    if kind == "torch-cpu":
        torch = pytest.importorskip("torch")
        p, g = torch.from_numpy(p), torch.from_numpy(g)
    with pytest.raises(ValueError, match=r"stream: only applies to CUDA arrays"):
        fastopt.sgd_(p, g, lr=0.1, stream=stream)
    assert (np.asarray(p) == 0.5).all()


def test_plan_starts_empty():
    if _ext._cuda is None:
        pytest.skip("fastopt._cuda is not built")
    plan = _ext._cuda.Plan()
    assert plan.launches == 0 and plan.num_tensors == 0


def test_on_device_tells_host_from_cuda_arrays():
    assert not _arrays.on_device(np.zeros(3, np.float32))
    assert _arrays.on_device(FakeCudaArray((3,), on_instance=True))
    assert _arrays.on_device(DLPackOnly(2))      # kDLCUDA
    assert not _arrays.on_device(DLPackOnly(1))  # kDLCPU
    torch = pytest.importorskip("torch")
    assert not _arrays.on_device(torch.zeros(3))
