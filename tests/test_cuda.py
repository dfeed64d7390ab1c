"""GPU-only behaviour of the CUDA optimizer kernels, with CuPy arrays and PyTorch CUDA
tensors: float16/bfloat16 params equal to a float32 CPU emulation, streams, one launch per
256 tensors, the classes' cached plans and stream ordering, ``p.data`` swaps, bad input only
device arrays can give (host/device mixes, a second GPU, stream=), sizes past 2**31.

What every backend shares (trajectories bit-identical to the CPU and close to the reference,
misaligned slices, the first step writing every element, zero-size arrays, the classes and
their state dicts) runs once per backend in test_parity.py, test_bad_input.py and
test_sophia.py. Every GPU test here takes the ``lib`` fixture (or ``half``, which pairs a
library with a 16-bit dtype, or ``torch_lib`` for tensor-only behaviour): it marks the test
``cuda`` and skips it where CUDA is not usable or the library is missing. The tests at the
end need no GPU.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict

import numpy as np
import pytest

import fastopt
from fastopt import _arrays, _ext

from backends import CudaBackend, assert_bits
from conftest import (OPTIMIZERS, STEPS, Call, Problem, assert_same_optimizer, class_step,
                      hessian_estimates, normal_nonzero, opt_cases)
from cuda_libs import BF16, FakeCudaArray, lib_fixture, open_lib

# One multi-tensor call: odd sizes, zero-size arrays in the middle, multi-dimensional shapes,
# and (2, 8195): 16390 elements, four of the kernel's 4096-element chunks and a ragged 6.
SHAPES = [(7,), (1,), (0,), (4097,), (33, 3), (2, 0, 3), (2, 8195)]
LAUNCH_TENSORS = 256  # tensors per kernel launch (csrc/cuda/launch_table.h)


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


# ---- 16-bit params --------------------------------------------------------------------------

@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_16bit_params_match_float32_cpu_emulation(half, opt, opts, rng):
    # 16-bit params and grads, float32 state: each step is the CPU float32 kernel applied to
    # the params' float32 values and the grads' float32 values, the params rounded back to
    # the 16-bit type (to nearest even) after it. Exact, params and state alike.
    lib, dtype = half
    pr = Problem(opt, opts, SHAPES, np.float32, rng, backend=CudaBackend(lib),
                 param_dtype=dtype)
    for _ in range(STEPS):
        pr.step(pr.draw_grads(rng))
        pr.check()


def test_16bit_ema_matches_float32_cpu_emulation(half, rng):
    # average <- beta*average + (1-beta)*sample on 16-bit averages, betas including 0 and 1:
    # the float32 CPU kernel, rounded to the 16-bit type after each step, bit for bit.
    # (float32/float64: test_sophia.py, on every backend.)
    lib, dtype = half
    avg = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
    dev = [lib.to_device(a) for a in avg]
    cpu = [a.astype(np.float32) for a in avg]
    for t in range(STEPS):
        beta = [0.9, 0.99, 0.0, 1.0, 0.5][t % 5]
        samples = [normal_nonzero(rng, s).astype(dtype) for s in SHAPES]
        fastopt.ema_(dev, [lib.to_device(x) for x in samples], beta=beta)
        fastopt.ema_(cpu, [x.astype(np.float32) for x in samples], beta=beta)
        for c in cpu:
            c[...] = c.astype(dtype)
        for i, (d, c) in enumerate(zip(dev, cpu)):
            assert_bits(lib.to_host(d, sync=True), c.astype(dtype),
                        f"averages[{i}] after step {t + 1}", any_nan=True)


# ---- streams -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stream-object", "int-handle", "current-stream", "class"])
def test_runs_on_the_requested_stream(lib, how, rng):
    # Each step's grads are written on a side stream behind ~0.1 s of spinning, then the step
    # is queued on that stream: passed as stream= (a stream object, its int handle, or to
    # opt.step) or made current with `with stream:`. Side streams are non-blocking, so a
    # kernel queued anywhere else would run at once and read the previous (stale) grads.
    opt = OPTIMIZERS["adam"]
    opts = opt.representative[-1]
    # Adam's state starts at zero, as a class's
    pr = Problem(opt, opts, SHAPES, np.float32, rng, backend=CudaBackend(lib))
    o = None
    if how == "class":
        o = opt.cls(pr.params, **opt.hyper(opts))
        pr.state = o.state  # the class's own (zeroed) state replaces the copies
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
                pr.step_fastopt(dgrads)
        if how == "stream-object":
            pr.step_fastopt(dgrads, stream=side)
        elif how == "int-handle":
            pr.step_fastopt(dgrads, stream=lib.handle(side))
        elif how == "class":
            o.step(dgrads, stream=side)
        pr.follow(grads)
        pr.check(f" ({how})")


# ---- many tensors ------------------------------------------------------------------------

def gpt2_like_shapes(d: int = 64, vocab: int = 512, ctx: int = 128, layers: int = 12):
    """The 148 parameter tensors of GPT-2 small, with small dimensions."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


@pytest.mark.parametrize("count,launches", [(LAUNCH_TENSORS, 1), (LAUNCH_TENSORS + 1, 2),
                                            (1000, 4), ("gpt2", 1)])
def test_one_launch_per_256_tensors(lib, count, launches, rng):
    # The class keeps one plan: a step over N non-empty tensors makes ceil(N/256) launches,
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
    assert_same_optimizer(CudaBackend(lib), gpu, cpu)


# ---- the optimizer classes ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reused-grads", "single-array"])
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_class_matches_cpu_class(lib, opt, opts, mode, rng):
    # The class on device arrays (state allocated by the same library), stepped with the
    # same grad arrays refilled in place (the cached plan must read their new contents), or
    # with one array instead of a list; the lr changes midway; a Sophia's Hessian EMA is
    # updated every 5th step. Bit-identical to the same class on NumPy arrays. (New grad
    # arrays every step: test_parity's class test, on every backend.)
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
        assert_same_optimizer(CudaBackend(lib), gpu, cpu, f"after step {t + 1}")


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
            assert_bits(lib.to_host(a, sync=True), c, f"state_dict()['state'][{name!r}][{i}]",
                        any_nan=True)
    step(3, late=True)
    lib.spin()
    gpu.zero_state()  # (1) and (2): its fill
    cpu.zero_state()
    step(4, late=False)
    assert_same_optimizer(CudaBackend(lib), gpu, cpu, "after zero_state between side-stream steps")
    step(5, late=True)
    lib.spin()
    gpu.load_state_dict(saved)  # (1) and (2): its copies
    cpu.load_state_dict(cpu_saved)
    step(6, late=False)
    assert_same_optimizer(CudaBackend(lib), gpu, cpu,
                          "after load_state_dict between side-stream steps")


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
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
        assert_same_optimizer(CudaBackend(lib), gpu, cpu, f"after step {t + 1}", param_dtype=dtype)


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
        assert_same_optimizer(CudaBackend(lib), gpu, cpu, f"after step {t + 1}")
    assert_bits(lib.to_host(old, sync=True), old_values, "the params' old memory", any_nan=True)


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
        assert_same_optimizer(CudaBackend(lib), gpu, cpu, f"after step {t}")

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
            assert_bits(lib.to_host(a, sync=True), b, f"array #{k} after the refused step",
                        any_nan=True)
        assert gpu.step_count == steps
        params[i].data = params[i].data.t()
        assert params[i].data_ptr() == ptr and params[i].is_contiguous()
        step(steps + 1)


# ---- bad input ---------------------------------------------------------------------------

BAD_SHAPES = [(5,), (3, 4), (7,)]


def _all_on_host(c: Call) -> None:
    c.args = [a if a is None else [c.backend.to_numpy(x) for x in a] for a in c.args]


def _on_second_device(c: Call, lib) -> None:
    if lib.device_count() < 2:
        pytest.skip("needs two GPUs")
    c["grads"][1] = lib.to_device(c.values("grads", 1), device=1)


def _cuda_grad_host_rest(c: Call, lib) -> None:
    grad = c["grads"][1]
    _all_on_host(c)
    c["grads"][1] = grad


def _stream_with_host_arrays(c: Call, lib) -> Dict[str, Any]:
    _all_on_host(c)
    return dict(stream=lib.side_stream())


# (id, corrupt(call, lib) -> keyword overrides or None, exception, message pattern). Bad
# input every backend shares (dtypes, shapes, lengths, layouts, aliasing): test_bad_input.py.
BAD_CASES = [
    ("grad-on-host", lambda c, lib: c["grads"].__setitem__(1, c.values("grads", 1)),
     TypeError, r"grads\[1\]: is a host array .*but this call runs on CUDA arrays"),
    ("state-on-host", lambda c, lib: c["exp_avg_sqs"].__setitem__(2, c.values("exp_avg_sqs", 2)),
     TypeError, r"exp_avg_sqs\[2\]: is a host array .*but this call runs on CUDA arrays"),
    ("cuda-grad-host-params", _cuda_grad_host_rest, TypeError, r"grads\[1\]: is a CUDA array"),
    ("grad-int32", lambda c, lib: c["grads"].__setitem__(
        1, lib.to_device(np.zeros((3, 4), np.int32))), TypeError, r"grads\[1\]: dtype"),
    ("grad-int8", lambda c, lib: c["grads"].__setitem__(  # a device dtype of quantization
        1, lib.to_device(np.zeros((3, 4), np.int8))), TypeError, r"grads\[1\]: dtype"),
    ("second-device", _on_second_device, ValueError, r"grads\[1\]: is on CUDA device 1"),
    ("stream-str", lambda c, lib: dict(stream="side"), TypeError, r"stream"),
    ("stream-bool", lambda c, lib: dict(stream=True), TypeError, r"stream"),
    ("stream-negative", lambda c, lib: dict(stream=-1), ValueError, r"stream"),
    ("stream-with-host-arrays", _stream_with_host_arrays, ValueError,
     r"stream: only applies to CUDA arrays"),
]


@pytest.mark.parametrize("corrupt,exc,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CASES])
def test_bad_input_raises_and_changes_nothing(lib, corrupt, exc, match, rng):
    # A valid Adam call with every state list (amsgrad) on device arrays, corrupted.
    c = Call("adam", rng, backend=CudaBackend(lib), shapes=BAD_SHAPES)
    assert c.roles == ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    overrides = corrupt(c, lib) or {}
    c.expect(exc, match, **overrides)


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
        assert_bits(lib.to_host(p[lo:hi], sync=True), want, f"params[{lo}:{hi}]", any_nan=True)
        lib.copy(p[lo:hi], lib.to_device(np.full(hi - lo, 0.875, np.float16)))
    assert float(p.min()) == float(p.max()) == 0.875, "elements outside the probes"
    assert_bits(lib.to_host(small_p, sync=True), np.full(5, 1.75, np.float16),
                "the small params", any_nan=True)


@pytest.mark.device_wide
def test_scratch_comes_from_memory_the_array_library_holds_idle(lib, rng):
    # Clipping's partial sums (and the quantizers', Newton's, pruning's and Adafactor's
    # scratch) come from the CUDA runtime's stream-ordered pool, which torch's and CuPy's
    # caching allocators do not draw from. With the whole device held idle in the library's
    # cache, the calls must still run: fastopt has the caches emptied and tries again.
    # Beside other GPU tests it would make them run out of memory: it runs on one worker
    # only (bench/gpu_check.sh runs the device_wide tests alone, after the others).
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.skip("fills the GPU's memory: run it alone (-m device_wide, no -n)")
    host = [normal_nonzero(rng, s).astype(np.float32) for s in [(4097,), (33,)]]
    grads = [lib.to_device(g) for g in host]
    x = normal_nonzero(rng, (1000,)).astype(np.float32)
    x_device = lib.to_device(x)
    lib.synchronize()
    lib.hold_device_in_cache()
    try:
        assert lib.free_memory() < 4 << 20, "the device is not full: the test would prove nothing"
        norm = fastopt.clip_grad_norm_(grads, 0.5)
        q, absmax = fastopt.quantize_blockwise(x_device, 256)
        lib.synchronize()
    finally:
        lib.release_cache()
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in host))
    np.testing.assert_allclose(float(norm), total, rtol=1e-6)
    for got, g in zip(grads, host):
        np.testing.assert_allclose(lib.to_host(got, sync=True), g * (0.5 / (total + 1e-6)),
                                   rtol=1e-5)
    want_q, want_absmax = fastopt.quantize_blockwise(x, 256)
    np.testing.assert_array_equal(lib.to_host(q, sync=True), want_q)
    np.testing.assert_array_equal(lib.to_host(absmax, sync=True), want_absmax)


def test_written_torch_tensors_have_their_versions_bumped(torch_lib, rng):
    # As torch.optim: a backward through a param saved before the step raises instead of
    # using the new values. The functional step, a class step and clipping each bump what
    # they write (on the GPU in Python, after the launch).
    torch = torch_lib.torch
    p = torch.nn.Parameter(torch_lib.to_device(normal_nonzero(rng, (33,)).astype(np.float32)))
    g = torch_lib.to_device(normal_nonzero(rng, (33,)).astype(np.float32))
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    before = [t._version for t in (p, m, v)]
    with torch.no_grad():
        fastopt.adamw_([p], [g], [m], [v], step=1, lr=0.01)
    after = [t._version for t in (p, m, v)]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    opt = fastopt.AdamW([p], lr=0.01)
    loss = (p * p).sum()  # saves p for the backward
    version = p._version
    opt.step([g])
    assert p._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    version = g._version
    fastopt.clip_grad_norm_([g], 1e-3)
    assert g._version > version


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
                                      for o in OPTIMIZERS.values()]
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


def test_release_device_caches_empties_what_is_loaded_and_starts_nothing(monkeypatch):
    # The CUDA module's out-of-memory hook: CuPy's pool emptied where CuPy is loaded,
    # torch's cache where torch has started CUDA; it neither imports a library nor
    # starts CUDA in one (which would take a context's memory on a full device).
    freed = []

    class Pool:
        def free_all_blocks(self):
            freed.append("cupy")

    class FakeCupy:
        @staticmethod
        def get_default_memory_pool():
            return Pool()

    monkeypatch.setitem(sys.modules, "cupy", FakeCupy)
    _arrays.release_device_caches()
    assert freed == ["cupy"]
    monkeypatch.delitem(sys.modules, "cupy")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is started in this process")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append("torch"))
    _arrays.release_device_caches()
    assert freed == ["cupy"] and not torch.cuda.is_initialized()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    _arrays.release_device_caches()
    assert freed == ["cupy", "torch"]
