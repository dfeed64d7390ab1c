"""A few steps of every optimizer on small mixed lists of CUDA arrays, and every
quantization and Newton kernel on small odd sizes, run by bench/gpu_check.sh under
compute-sanitizer (memcheck, racecheck) and once without it.

What it covers: every optimizer of the table (fastopt._specs) with options that use every
state array, PyTorch tensors and CuPy arrays in one list (params of one library, grads of
the other), sizes around the vector width (4) and the per-block chunk (4096), a 2-D array,
a zero-size array, slices starting one element into their allocation (the scalar path) as
params, grads and -- through the functional API -- state, a list longer than one launch
(256 tensors), float16 / bfloat16 params, a step queued on a non-default stream, masked
steps, bfloat16 state, stochastic rounding of bfloat16 params, and 8-bit state (a
half-warp per 256-element block; one set of codes starting one byte into its allocation),
and master params (bfloat16 params stepped through float32 masters in one pass); Adafactor
(its three kernel families: a thread per small matrix, a block per unit, vectors).

Every float32 result (params and every state element) is compared with fastopt's CPU
kernels run from the same start (bit-identical by design); 16-bit params are compared with
the CPU kernels run in float32 and rounded to the 16-bit type after each step. Quantization
results and Newton for n <= 64 must equal the CPU's bits (Newton beyond: TOL32). Memory pools
are off so that memcheck sees each array's own bounds. Exits 1 if any check fails, 2 if
there is no library to make CUDA arrays with.
"""
import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import sys  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

import fastopt  # noqa: E402
from fastopt import reference  # noqa: E402
from fastopt._specs import OPTIMIZERS as SPECS  # noqa: E402
from fastopt.optim import CLASSES  # noqa: E402

STEPS = 3
TOL32 = 1e-6  # if not bit-identical: max |diff| / (1 + max |value|)
ADAFACTOR_TOL = 1e-5  # the same for Adafactor (its float64 sums run in another order)

# FASTOPT_SANITIZE_LIBS=torch,cupy (the default): the libraries to make arrays with.
WANTED = os.environ.get("FASTOPT_SANITIZE_LIBS", "torch,cupy").split(",")
torch = cupy = None
if "torch" in WANTED:
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except Exception:
        torch = None
if "cupy" in WANTED:
    try:
        import cupy
        cupy.cuda.set_allocator(None)  # no pool: every array its own cudaMalloc
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        cupy = None

LIBS = [lib for lib, mod in (("torch", torch), ("cupy", cupy)) if mod is not None]
rng = np.random.default_rng(0)
failures = []


# ---- arrays -----------------------------------------------------------------------------------

def device(lib, host, dtype="float32"):
    """A device copy of the float32 NumPy array `host` in `lib`, converted to `dtype`."""
    if lib == "torch":
        return torch.from_numpy(host).cuda().to(getattr(torch, dtype))
    return cupy.asarray(host.astype(dtype))


def odd_slice(lib, host, dtype="float32"):
    """Like device(), but 1-D and starting one element into its allocation, which it ends
    with (so that a read past either end leaves the allocation)."""
    flat = np.ascontiguousarray(host.reshape(-1))
    if lib == "torch":
        view = torch.empty(flat.size + 1, dtype=getattr(torch, dtype), device="cuda")[1:]
        view.copy_(torch.from_numpy(flat))
        return view
    view = cupy.empty(flat.size + 1, dtype=dtype)[1:]
    view.set(flat.astype(dtype))
    return view


def host(a):
    """A float32 NumPy copy of an array (any float dtype; never a view)."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float32)
    if type(a).__module__.startswith("torch"):
        return a.detach().float().cpu().numpy().copy()
    return cupy.asnumpy(a).astype(np.float32)


def raw(a):
    """A NumPy copy of an array, its dtype kept."""
    if isinstance(a, np.ndarray):
        return a.copy()
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy().copy()
    return cupy.asnumpy(a)


def synchronize():
    if torch is not None:
        torch.cuda.synchronize()
    if cupy is not None:
        cupy.cuda.Device().synchronize()


def other(lib):
    return LIBS[(LIBS.index(lib) + 1) % len(LIBS)]


def rounder(dtype):
    """float32 -> the nearest value of `dtype` (round half to even), as float32."""
    if dtype == "float32":
        return lambda x: x
    if dtype == "float16":
        return lambda x: x.astype(np.float16).astype(np.float32)

    def bf16(x):
        b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        r = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)
        return r.view(np.float32)
    return bf16


# ---- checks -----------------------------------------------------------------------------------

def compare(label, got, want, dtype="float32"):
    """Exact, else within TOL32 (float32) or one 16-bit ulp (16-bit params)."""
    if got.shape != want.shape:
        raise AssertionError(f"{label}: shape {got.shape} != {want.shape}")
    if np.array_equal(got, want):
        return True
    diff = np.abs(got.astype(np.float64) - want)
    if dtype == "float32":
        err = float(np.max(diff)) / (1.0 + float(np.max(np.abs(want))))
        ok = err <= TOL32
    else:
        ulp = 2.0 ** (-7 if dtype == "bfloat16" else -10)
        smallest_normal = 2.0 ** (-126 if dtype == "bfloat16" else -14)  # below: absolute ulps
        err = float(np.max(diff / (np.maximum(np.abs(want), smallest_normal) * ulp)))
        ok = err <= 1.0 + 1e-6
    if not ok or not np.isfinite(err):
        raise AssertionError(f"{label}: differs from the CPU kernels, max error {err:.3g}")
    return False


def same_bits(label, got, want):
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
        raise AssertionError(f"{label}: differs from the CPU kernels "
                             f"({got.dtype}{got.shape} vs {want.dtype}{want.shape})")


def check(name, fn):
    try:
        note = fn()
        print(f"ok    {name}" + (f"  ({note})" if note else ""), flush=True)
    except Exception:
        failures.append(name)
        print(f"FAIL  {name}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()


# (class, hyper) of every optimizer in the table, with options that use every state array.
OPTIMIZERS = [(CLASSES[name], dict(spec.example)) for name, spec in SPECS.items()]


def class_steps(cls, hyper, params, grads, dtype="float32", estimates=None):
    """STEPS steps of cls on the device arrays and on NumPy float32 copies (rounded to the
    params' type after each step); every param and state element compared."""
    round_ = rounder(dtype)
    opt = cls(params, **hyper)
    cpu = cls([host(p) for p in params], **hyper)
    cpu_grads = [host(g) for g in grads]
    for _ in range(STEPS):
        if estimates is not None:
            opt.update_hessian(estimates)
            cpu.update_hessian([host(e) for e in estimates])
        opt.step(grads)
        cpu.step(cpu_grads)
        for p in cpu.params:
            p[...] = round_(p)
    synchronize()
    same = True
    for i, (p, want) in enumerate(zip(opt.params, cpu.params)):
        same &= compare(f"params[{i}]", host(p), want, dtype)
    for name, arrays in opt.state.items():
        for i, (s, want) in enumerate(zip(arrays, cpu.state[name])):
            same &= compare(f"{name}[{i}]", host(s), want)  # state is float32
    for i, p in enumerate(opt.params):
        if not np.all(np.isfinite(host(p))):
            raise AssertionError(f"params[{i}]: non-finite values")
    return "bit-identical" if same else "within tolerance, not bit-identical"


def mixed_lists(dtype="float32", libs=None):
    """Params alternating between the libraries, grads from the other one, one odd slice
    as a param and one as a grad."""
    libs = libs or LIBS
    shapes = [(1,), (3,), (4,), (5,), (1023,), (4096,), (16384 + 5,), (40000,), (33, 7), (0,)]
    params, grads = [], []
    for i, shape in enumerate(shapes):
        lib = libs[i % len(libs)]
        glib = libs[(i + 1) % len(libs)]
        params.append(device(lib, rng.standard_normal(shape, dtype=np.float32), dtype))
        grads.append(device(glib, rng.standard_normal(shape, dtype=np.float32), dtype))
    for n, (plib, glib) in [(1001, (libs[0], libs[-1])), (16385, (libs[-1], libs[0]))]:
        params.append(odd_slice(plib, rng.standard_normal(n, dtype=np.float32), dtype))
        grads.append(odd_slice(glib, rng.standard_normal(n, dtype=np.float32), dtype))
    params.append(device(libs[0], rng.standard_normal(777, dtype=np.float32), dtype))
    grads.append(odd_slice(libs[-1], rng.standard_normal(777, dtype=np.float32), dtype))
    return params, grads


def estimates_like(params):
    """Positive Hessian-diagonal estimates, float32, in each param's library."""
    out = []
    for p in params:
        lib = "torch" if type(p).__module__.startswith("torch") else "cupy"
        out.append(device(lib, np.abs(rng.standard_normal(tuple(p.shape), dtype=np.float32))))
    return out


def run_class(cls, hyper, dtype, libs=None):
    params, grads = mixed_lists(dtype, libs)
    est = estimates_like(params) if cls is fastopt.Sophia else None
    return class_steps(cls, hyper, params, grads, dtype, est)


def long_list():
    """450 tensors (two launches), sizes 1..9, one library per tensor, alternating."""
    params = [device(LIBS[i % len(LIBS)], rng.standard_normal(1 + i % 9, dtype=np.float32))
              for i in range(450)]
    grads = [device(LIBS[(i + 1) % len(LIBS)], rng.standard_normal(1 + i % 9, dtype=np.float32))
             for i in range(450)]
    return class_steps(fastopt.AdamW, dict(lr=1e-3), params, grads)


def misaligned_state():
    """The functional Adam with amsgrad on odd-slice state (the classes' state is aligned)."""
    n = [5, 4097, 16389]
    lib = LIBS[0]
    params = [odd_slice(lib, rng.standard_normal(k, dtype=np.float32)) for k in n]
    grads = [device(other(lib), rng.standard_normal(k, dtype=np.float32)) for k in n]
    states = [[odd_slice(LIBS[j % len(LIBS)], np.zeros(k, np.float32)) for k in n] for j in range(3)]
    cpu_p = [host(p) for p in params]
    cpu_g = [host(g) for g in grads]
    cpu_s = [[np.zeros(k, np.float32) for k in n] for _ in range(3)]
    kw = dict(lr=1e-3, amsgrad=True, weight_decay=1e-2)
    for t in range(1, STEPS + 1):
        fastopt.adam_(params, grads, *states, step=t, **kw)
        fastopt.adam_(cpu_p, cpu_g, *cpu_s, step=t, **kw)
    synchronize()
    same = all(compare(f"params[{i}]", host(p), w) for i, (p, w) in enumerate(zip(params, cpu_p)))
    for j in range(3):
        same &= all(compare(f"state{j}[{i}]", host(s), w)
                    for i, (s, w) in enumerate(zip(states[j], cpu_s[j])))
    return "bit-identical" if same else "within tolerance"


def side_stream():
    """A step queued on a non-default stream (explicit stream=), then synchronised."""
    lib = LIBS[0]
    params = [device(lib, rng.standard_normal(k, dtype=np.float32)) for k in (7, 20000)]
    grads = [device(lib, rng.standard_normal(k, dtype=np.float32)) for k in (7, 20000)]
    bufs = [device(lib, np.zeros(k, np.float32)) for k in (7, 20000)]
    cpu_p, cpu_g = [host(p) for p in params], [host(g) for g in grads]
    cpu_b = [np.zeros(k, np.float32) for k in (7, 20000)]
    synchronize()
    stream = torch.cuda.Stream() if lib == "torch" else cupy.cuda.Stream(non_blocking=True)
    for t in range(1, STEPS + 1):
        fastopt.sgd_(params, grads, bufs, lr=1e-2, momentum=0.9, step=t, stream=stream)
        fastopt.sgd_(cpu_p, cpu_g, cpu_b, lr=1e-2, momentum=0.9, step=t)
    stream.synchronize()
    same = all(compare(f"params[{i}]", host(p), w) for i, (p, w) in enumerate(zip(params, cpu_p)))
    return "bit-identical" if same else "within tolerance"


def quantization():
    """Blockwise quantize (one warp per block up to 4096 elements, one thread block above;
    nearest and stochastic; partial last blocks) and dequantize; per tensor and per channel
    (int8, uint8) and dequantize; the min/max observer per tensor and per channel; a
    non-finite input (the error, and check_finite=False straight into out=)."""
    lib = LIBS[0]
    for n in (1, 33, 4097, 10001):
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        dx = device(lib, x)
        for block in (7, 64, 4097, 5000):
            for rounding in ("nearest", "stochastic"):
                q, a = fastopt.quantize_blockwise(dx, block, rounding=rounding, seed=3)
                wq, wa = fastopt.quantize_blockwise(x, block, rounding=rounding, seed=3)
                same_bits(f"blockwise q n={n} block={block} {rounding}", raw(q), wq)
                same_bits(f"blockwise absmax n={n} block={block} {rounding}", raw(a), wa)
            same_bits(f"dequantize_blockwise n={n} block={block}",
                      raw(fastopt.dequantize_blockwise(q, a, block)),
                      fastopt.dequantize_blockwise(wq, wa, block))
    x3 = (rng.standard_normal((5, 37, 41)) * 3).astype(np.float32)
    dx3 = device(lib, x3)
    scales = rng.uniform(0.01, 0.1, 37).astype(np.float32)
    zps = rng.integers(0, 256, 37)
    for qdtype, zp in (("int8", -3), ("uint8", 130)):
        q = fastopt.quantize_per_tensor(dx3, 0.0371, zp, qdtype)
        wq = fastopt.quantize_per_tensor(x3, 0.0371, zp, qdtype)
        same_bits(f"quantize_per_tensor {qdtype}", raw(q), wq)
        same_bits(f"dequantize {qdtype}", raw(fastopt.dequantize(q, 0.0371, zp)),
                  fastopt.dequantize(wq, 0.0371, zp))
    q = fastopt.quantize_per_channel(dx3, scales, zps, 1, "uint8")
    wq = fastopt.quantize_per_channel(x3, scales, zps, 1, "uint8")
    same_bits("quantize_per_channel", raw(q), wq)
    same_bits("dequantize per channel", raw(fastopt.dequantize(q, scales, zps, axis=1)),
              fastopt.dequantize(wq, scales, zps, axis=1))
    for axis in (None, 0, 1, 2):
        for symmetric in (True, False):
            got = fastopt.choose_qparams(dx3, symmetric=symmetric, axis=axis)
            want = fastopt.choose_qparams(x3, symmetric=symmetric, axis=axis)
            for g, w in zip(got, want):
                same_bits(f"choose_qparams axis={axis} symmetric={symmetric}", g, w)
    bad = x3.copy()
    bad.reshape(-1)[[100, 4000]] = [np.nan, np.inf]
    try:
        fastopt.quantize_blockwise(device(lib, bad), 64)
    except ValueError as exc:
        if "(flat 100)" not in str(exc):
            raise AssertionError(f"non-finite report: {exc}")
    else:
        raise AssertionError("non-finite input: no error")
    outs = fastopt.quantize_blockwise(dx3, 64)  # overwritten below
    fastopt.quantize_blockwise(device(lib, bad), 64, out=outs, check_finite=False)
    wq, wa = fastopt.quantize_blockwise(bad, 64, check_finite=False)
    same_bits("check_finite=False q", raw(outs[0]), wq)
    got_a = raw(outs[1])
    same_bits("check_finite=False absmax (finite blocks)", got_a[~np.isnan(wa)], wa[~np.isnan(wa)])
    if not np.isnan(got_a[np.isnan(wa)]).all():
        raise AssertionError("check_finite=False: a block holding NaN/Inf has absmax NaN")
    return "bit-identical"


def newton():
    """cholesky_solve and newton_ for n around the warp path's limit (64) and beyond (the
    thread-block path), with a non-positive-definite system: "raise" changes nothing,
    "skip" updates the others and returns the CPU's mask."""
    lib = LIBS[0]
    notes = []
    for n in (1, 7, 33, 64, 65, 100):
        batch = 5
        a = rng.standard_normal((batch, n, n)).astype(np.float32)
        H = (a @ a.transpose(0, 2, 1) / np.float32(n) + np.eye(n, dtype=np.float32))
        g = rng.standard_normal((batch, n)).astype(np.float32)
        p = rng.standard_normal((batch, n)).astype(np.float32)
        dH, dg = device(lib, H), device(lib, g)
        exact = n <= 64

        def agree(label, got, want):
            if exact:
                same_bits(label, got, want)
            else:
                compare(label, got, want)
        agree(f"cholesky_solve n={n}", raw(fastopt.cholesky_solve(dH, dg, damping=0.01)),
              fastopt.cholesky_solve(H, g, damping=0.01))
        H[2] = -np.eye(n, dtype=np.float32)
        dH, dp, cp = device(lib, H), device(lib, p), p.copy()
        try:
            fastopt.newton_(dp, dg, dH, lr=0.5)
        except fastopt.NotPositiveDefiniteError:
            pass
        else:
            raise AssertionError(f"n={n}: a non-positive-definite system raised nothing")
        same_bits(f"newton_ raise n={n}: params untouched", raw(dp), p)
        mask = fastopt.newton_(dp, dg, dH, lr=0.5, on_failure="skip")
        want_mask = fastopt.newton_(cp, g, H, lr=0.5, on_failure="skip")
        same_bits(f"newton_ skip n={n}: mask", raw(mask), want_mask)
        agree(f"newton_ skip n={n}: params", raw(dp), cp)
        notes.append(f"n={n} {'bit-identical' if exact else 'within tolerance'}")
    return ", ".join(notes)


def masked_lowbit():
    """Every optimizer (torch tensors: CuPy has no bfloat16) with masks, with bfloat16 state,
    and with bfloat16 params rounded stochastically, each against the CPU kernels run on
    the same start with the same options: bit for bit."""
    shapes = [(1,), (3,), (4,), (5,), (1023,), (4096,), (16389,), (33, 7), (0,)]
    variants = [
        ("masked", torch.float32, torch.float32, True, {}),
        ("bf16 state", torch.float32, torch.bfloat16, False, {}),
        ("bf16 params, bf16 state, stochastic, masked", torch.bfloat16, torch.bfloat16, True,
         {"rounding": "stochastic", "seed": 11}),
    ]
    for name, spec in SPECS.items():
        fn = getattr(fastopt, f"{name}_")
        states = spec.state_names(spec.kernel_hyper(spec.validate({**spec.defaults(), **spec.example})))
        for label, pdt, sdt, masked, extra in variants:
            runs = []
            for dev in ("cuda", "cpu"):
                g = torch.Generator().manual_seed(5)
                params = [torch.randn(s, generator=g).to(pdt).to(dev) for s in shapes]
                state = [[torch.zeros(s, dtype=sdt, device=dev) for s in shapes] for _ in states]
                masks = [(torch.rand(s, generator=g) < 0.5).to(dev) for s in shapes]
                for t in range(1, STEPS + 1):
                    grads = [torch.randn(s, generator=g).to(pdt).to(dev) for s in shapes]
                    kw = dict(spec.example, **extra)
                    if spec.takes_step:
                        kw["step"] = t
                    if masked:
                        kw["masks"] = masks
                    fn(params, grads, *state, **kw)
                runs.append([p.cpu() for p in params] + [a.cpu() for s in state for a in s])
            synchronize()
            for i, (got, want) in enumerate(zip(*runs)):
                same_bits(f"{name} {label} [{i}]", got.view(torch.int16 if got.element_size() == 2
                                                            else torch.int32).numpy(),
                          want.view(torch.int16 if want.element_size() == 2 else torch.int32).numpy())
    return "bit-identical"


def state8():
    """8-bit state (uint8 codes with absmax=, the functional API, torch tensors) for every
    optimizer with state but Sophia: float32 params, masked, and bfloat16 params rounded
    stochastically, against the CPU kernels run from the same start: codes, block maxima
    and params bit for bit. Sizes around the 256-element block and the 4096-element chunk;
    the codes of size 5 start one byte into their allocation (the scalar path)."""
    shapes = [(1,), (5,), (255,), (256,), (257,), (4096,), (4096 + 3 * 256 + 7,), (33, 7), (0,)]
    variants = [
        ("float32", torch.float32, False, {}),
        ("masked", torch.float32, True, {}),
        ("bf16 params, stochastic", torch.bfloat16, False, {"rounding": "stochastic", "seed": 11}),
    ]
    for name, spec in SPECS.items():
        hyper = spec.validate({**spec.defaults(), **spec.example})
        states = spec.state_names(spec.kernel_hyper(hyper))
        if name == "sophia" or not states:
            continue
        fn = getattr(fastopt, f"{name}_")
        signed = {a.name: not a.nonnegative for a in spec.states}
        for label, pdt, masked, extra in variants:
            runs = []
            for dev in ("cuda", "cpu"):
                g = torch.Generator().manual_seed(5)
                params = [torch.randn(s, generator=g).to(pdt).to(dev) for s in shapes]
                codes, maxima = [], {}
                for state in states:
                    arrays, tops = [], []
                    for k, shape in enumerate(shapes):
                        start = torch.randn(shape, generator=g)
                        c, top = reference.quantize_state8(
                            (start if signed[state] else start.abs()).numpy(), signed[state])
                        c = torch.from_numpy(c)
                        if dev == "cuda" and k == 1:  # one byte into its allocation
                            view = torch.empty(c.numel() + 1, dtype=torch.uint8, device=dev)[1:]
                            c = view.view(shape).copy_(c)
                        arrays.append(c.to(dev))
                        tops.append(torch.from_numpy(top).to(dev))
                    codes.append(arrays)
                    maxima[state] = tops
                masks = [(torch.rand(s, generator=g) < 0.5).to(dev) for s in shapes]
                for t in range(1, STEPS + 1):
                    grads = [torch.randn(s, generator=g).to(pdt).to(dev) for s in shapes]
                    kw = dict(spec.example, absmax=maxima, **extra)
                    if spec.takes_step:
                        kw["step"] = t
                    if masked:
                        kw["masks"] = masks
                    fn(params, grads, *codes, **kw)
                runs.append([p.cpu() for p in params] + [a.cpu() for s in codes for a in s]
                            + [a.cpu() for s in states for a in maxima[s]])
            synchronize()
            for i, (got, want) in enumerate(zip(*runs)):
                as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
                same_bits(f"{name} 8-bit state {label} [{i}]", got.contiguous().view(as_int).numpy(),
                          want.contiguous().view(as_int).numpy())
    return "bit-identical"


def master_params():
    """Master params (master_params=: bfloat16 params and grads, float32 masters) for every
    optimizer with float32 state, masked, and with 8-bit state: masters, params and state
    bit for bit against the CPU kernels run from the same start."""
    shapes = [(1,), (5,), (257,), (4096,), (4096 + 3 * 256 + 7,), (33, 7), (0,)]
    for name, spec in SPECS.items():
        hyper = spec.validate({**spec.defaults(), **spec.example})
        states = spec.state_names(spec.kernel_hyper(hyper))
        fn = getattr(fastopt, f"{name}_")
        signed = {a.name: not a.nonnegative for a in spec.states}
        for label in ("float32 state", "masked", "8-bit state"):
            if label == "8-bit state" and (name == "sophia" or not states):
                continue
            runs = []
            for dev in ("cuda", "cpu"):
                g = torch.Generator().manual_seed(9)
                masters = [torch.randn(s, generator=g).to(dev) for s in shapes]
                params = [m.to(torch.bfloat16) for m in masters]
                kw = dict(spec.example)
                state = []
                for st in states:
                    start = [torch.rand(s, generator=g) for s in shapes]
                    if label != "8-bit state":
                        state.append([a.to(dev) for a in start])
                        continue
                    pairs = [reference.quantize_state8(a.numpy(), signed[st]) for a in start]
                    state.append([torch.from_numpy(c).to(dev) for c, _ in pairs])
                    kw.setdefault("absmax", {})[st] = [torch.from_numpy(a).to(dev) for _, a in pairs]
                if label == "masked":
                    kw["masks"] = [(torch.rand(s, generator=g) < 0.5).to(dev) for s in shapes]
                for t in range(1, STEPS + 1):
                    grads = [torch.randn(s, generator=g).to(torch.bfloat16).to(dev) for s in shapes]
                    if spec.takes_step:
                        kw["step"] = t
                    fn(params, grads, *state, master_params=masters, **kw)
                runs.append([a.cpu() for a in masters + params] + [a.cpu() for s in state for a in s])
            synchronize()
            for i, (got, want) in enumerate(zip(*runs)):
                as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
                same_bits(
                    f"{name} master params {label} [{i}]",
                    got.contiguous().view(as_int).numpy(),
                    want.contiguous().view(as_int).numpy(),
                )
    return "bit-identical"


def adafactor():
    """Adafactor (fastopt.adafactor_) on one list mixing small matrices (a thread each: 1 x 1,
    3 x 3, 8 x 8), matrices of a block per unit (9 rows; a wide one), vectors, a 0-d and a
    zero-size param: float32 (defaults; weight decay and maximize), bfloat16 params rounded
    stochastically and float16 params with float32 masters, against the CPU kernel run from
    the same start. Its float64 sums run in another order, so within ADAFACTOR_TOL (and
    one ulp of a 16-bit param)."""
    shapes = [(300, 1, 1), (70, 3, 3), (3, 8, 8), (2, 9, 5), (3, 40, 1030), (33,), (), (0, 3),
              (4097,)]
    variants = [("float32", {}), ("float32", {"weight_decay": 0.1, "maximize": True}),
                ("bfloat16", {"rounding": "stochastic", "seed": 5}), ("float16", {"master": True})]
    worst = 0.0
    for dtype, opts in variants:
        opts = dict(opts)
        master = opts.pop("master", False)
        runs = []
        for dev in ("cuda", "cpu"):
            g = torch.Generator().manual_seed(13)
            start = [torch.randn(s, generator=g) for s in shapes]
            params = [a.to(getattr(torch, dtype)).to(dev) for a in start]
            masters = [a.to(dev) for a in start] if master else None
            states = {k: [] for k in ("row_vars", "col_vars", "variances")}
            for p in start:
                made = fastopt.adafactor.state_shapes(tuple(p.shape))
                for k, st in states.items():
                    st.append(torch.zeros(made[k]).to(dev) if k in made else None)
            for t in range(1, STEPS + 1):
                grads = [torch.randn(s, generator=g).to(getattr(torch, dtype)).to(dev) for s in shapes]
                fastopt.adafactor_(params, grads, states["row_vars"], states["col_vars"],
                                   states["variances"], step=t, master_params=masters, **opts)
            kept = params + (masters or []) + [a for st in states.values() for a in st if a is not None]
            runs.append([a.float().cpu().numpy() for a in kept])
        synchronize()
        for i, (got, want) in enumerate(zip(*runs)):
            if got.shape != want.shape:
                raise AssertionError(f"adafactor {dtype} [{i}]: shape {got.shape} != {want.shape}")
            scale = 1.0 + float(np.max(np.abs(want), initial=0.0))
            err = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0)) / scale
            is_param = i < len(shapes)
            tol = {"bfloat16": 2.0**-7, "float16": 2.0**-10}.get(dtype, 0.0) if is_param else 0.0
            if not err <= max(tol, ADAFACTOR_TOL):
                raise AssertionError(f"adafactor {dtype} {opts} [{i}]: differs from the CPU "
                                     f"kernel, max error {err:.3g}")
            worst = max(worst, err if not tol else 0.0)
    return f"within {ADAFACTOR_TOL:g} of the CPU kernel (float32 arrays: worst {worst:.2g})"


def device_scalars():
    """What the CUDA step reads from device memory, for every optimizer: a GradScaler's
    scale and found_inf (set: nothing written; clear: the bits of the CPU step with the
    host grad_scale) and a norm to clip by (grad_norm, max_grad_norm: the bits of the CPU
    step on grads multiplied by the same float32 coefficient first)."""
    shapes = [(1,), (5,), (257,), (4096 + 3 * 256 + 7,), (33, 7), (0,)]
    f32 = np.float32
    for name, spec in SPECS.items():
        hyper = spec.kernel_hyper(spec.validate({**spec.defaults(), **spec.example}))
        states = spec.state_names(hyper)
        step = {"step": 2} if spec.takes_step else {}
        g = torch.Generator().manual_seed(11)
        params = [torch.randn(s, generator=g) for s in shapes]
        grads = [torch.randn(s, generator=g) * 64.0 for s in shapes]
        start = {st: [torch.rand(s, generator=g) for s in shapes] for st in states}
        norm = f32(torch.cat([x.reshape(-1) for x in grads]).double().norm().item())
        c = f32(min(0.5 / (float(norm) + 1e-6), 1.0))  # as the kernel: float32(coefficient)

        cpu_kernel = getattr(fastopt._ext._cpu, spec.kernel)
        cuda_kernel = getattr(fastopt._ext._cuda, spec.kernel)
        def lists(dev, grad_list, spec=spec, params=params, start=start):
            """The binding's lists (params, grads, each state role or None), fresh copies."""
            out = [[p.clone().to(dev) for p in params], [x.to(dev) for x in grad_list]]
            for a in spec.arrays[2:]:
                out.append([t.clone().to(dev) for t in start[a.name]] if a.name in start else None)
            return out

        for label in ("found_inf set", "scaled", "clipped"):
            want = lists("cpu", grads)
            if label == "scaled":
                cpu_kernel(*want, True, **hyper, **step, grad_scale=64.0)
            elif label == "clipped":
                clipped = [x * torch.tensor(c) for x in grads]  # float32 products
                want = lists("cpu", clipped)
                cpu_kernel(*want, True, **hyper, **step)
            got = lists("cuda", grads)
            if label == "clipped":
                extra = dict(grad_norm=torch.tensor(norm, device="cuda"), max_grad_norm=0.5)
            else:
                flag = 1.0 if label == "found_inf set" else 0.0
                extra = dict(device_grad_scale=torch.tensor(64.0, device="cuda"),
                             found_inf=torch.tensor(flag, device="cuda"))
            cuda_kernel(*got, True, **hyper, **step, stream=0, plan=None, **extra)
            synchronize()
            for k, (got_list, want_list) in enumerate(zip(got, want)):
                if k == 1 or got_list is None:  # the grads are read only
                    continue
                for i, (a, b) in enumerate(zip(got_list, want_list)):
                    same_bits(f"{name} {label} [{k}][{i}]", a.cpu().numpy(), b.numpy())
    return "bit-identical"


def main():
    if not LIBS:
        print("sanitize_small: neither PyTorch with CUDA nor CuPy is usable", file=sys.stderr)
        return 2
    if not fastopt.cuda_available():
        print(f"sanitize_small: {fastopt.info()['cuda']}", file=sys.stderr)
        return 2
    print(f"sanitize_small: libraries {LIBS}, {fastopt.info()['cuda']['devices']}", flush=True)
    for cls, hyper in OPTIMIZERS:
        check(f"{cls.__name__} float32 mixed list", lambda: run_class(cls, hyper, "float32"))
    check("AdamW float32, 450 tensors (two launches)", long_list)
    check("Adam amsgrad functional, odd-slice state", misaligned_state)
    check("SGD momentum on a side stream", side_stream)
    check("int8 quantization kernels", quantization)
    check("Newton (Cholesky) kernels", newton)
    if torch is not None:
        check("masks, bfloat16 state, stochastic rounding (torch)", masked_lowbit)
        check("8-bit state (torch)", state8)
        check("master params (torch)", master_params)
        check("GradScaler scalars and clipping norm in device memory (torch)", device_scalars)
        check("Adafactor: small matrices, matrices, vectors; SR, masters (torch)", adafactor)
    for cls, hyper in OPTIMIZERS:
        check(f"{cls.__name__} float16 mixed list", lambda: run_class(cls, hyper, "float16"))
        if torch is not None:
            check(f"{cls.__name__} bfloat16 (torch)",
                  lambda: run_class(cls, hyper, "bfloat16", ["torch"]))
    synchronize()
    print(f"sanitize_small: {'FAILED: ' + ', '.join(failures) if failures else 'all checks ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
