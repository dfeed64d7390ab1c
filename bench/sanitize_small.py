"""A few steps of every optimizer on small mixed lists of CUDA arrays, run by
bench/gpu_check.sh under compute-sanitizer (memcheck, racecheck) and once without it.

What it covers: PyTorch tensors and CuPy arrays in one list (params of one library, grads of
the other), sizes around the vector width (4) and the per-block chunk (16384), a 2-D array,
a zero-size array, slices starting one element into their allocation (the scalar path) as
params, grads and -- through the functional API -- state, a list longer than one launch
(384 tensors), float16 / bfloat16 params, and a step queued on a non-default stream.

Every float32 result (params and every state element) is compared with fastopt's CPU
kernels run from the same start (bit-identical by design); 16-bit params are compared with
the CPU kernels run in float32 and rounded to the 16-bit type after each step. Memory pools
are off so that memcheck sees each array's own bounds. Exits 1 if any check fails, 2 if
there is no library to make CUDA arrays with.
"""
import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import sys  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

import fastopt  # noqa: E402

STEPS = 3
TOL32 = 1e-6  # if not bit-identical: max |diff| / (1 + max |value|)

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


def check(name, fn):
    try:
        note = fn()
        print(f"ok    {name}" + (f"  ({note})" if note else ""), flush=True)
    except Exception:
        failures.append(name)
        print(f"FAIL  {name}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()


OPTIMIZERS = [  # (class, hyper): options that use every state role
    (fastopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (fastopt.Adagrad, dict(lr=1e-2, lr_decay=1e-3, weight_decay=1e-2)),
    (fastopt.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2)),
    (fastopt.Adam, dict(lr=1e-3, amsgrad=True, weight_decay=1e-2)),
    (fastopt.AdamW, dict(lr=1e-3)),
    (fastopt.Sophia, dict(lr=1e-3)),
]


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
