"""The GPU benchmark: fastopt on device arrays against torch.optim (CUDA), CuPy, torch's
quantizers and solvers, and a device-to-device copy; each case's target met or NOT MET."""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import numbers
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import _arrays, quant
from ..adafactor import Adafactor
from ..newton import cholesky_solve, newton_
from .common import (
    QUANT_CASES,
    OptimizerCase,
    Row,
    _add_torch_peers,
    _as_tuple,
    _cases,
    _import_cupy,
    _import_torch,
    _median_times,
    _newton_failure,
    _newton_row,
    _print_rows,
    _quant_call,
    _quant_into_call,
    _run_cases,
    _solve64,
    _spd_systems,
    _torch_blockwise,
    _torch_per_tensor_peer,
    _torch_solvers,
    adafactor_layouts,
    gpt2_small_shapes,
)


@dataclass
class Target:
    """fastopt's target for a GPU case: at least `value`% of the ceiling ("pct"), at most
    `value` ms per step ("ms"), or at least `value` times as fast as the fastest of `peers`
    that ran ("speedup")."""

    kind: str
    value: float
    peers: Tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "speedup":
            named = (
                self.peers[0] if len(self.peers) == 1 else f"the fastest of {', '.join(self.peers)}"
            )
            return f">= {self.value:g}x as fast as {named}"
        return (
            f">= {self.value:g}% of the ceiling"
            if self.kind == "pct"
            else f"<= {self.value:g} ms per step"
        )

    def fastest_peer(self, row: Row) -> Optional[str]:
        ran = [k for k in self.peers if k in row.times_ms]
        return min(ran, key=row.times_ms.__getitem__) if ran else None

    def achieved(self, row: Row, ceiling_gbs: float) -> str:
        if self.kind == "pct":
            return f"{row.pct_of_ceiling('fastopt', ceiling_gbs):.0f}% of the ceiling"
        if self.kind == "speedup":
            peer = self.fastest_peer(row)
            if peer is None:
                return "no peer to compare with"
            return f"{row.times_ms[peer] / row.times_ms['fastopt']:.2f}x as fast as {peer}"
        return f"{row.times_ms['fastopt']:.3f} ms per step"

    def met(self, row: Row, ceiling_gbs: float) -> Optional[bool]:
        """Whether the row meets the target; None if it cannot tell (none of the peers ran)."""
        if self.kind == "pct":
            return row.pct_of_ceiling("fastopt", ceiling_gbs) >= self.value
        if self.kind == "speedup":
            peer = self.fastest_peer(row)
            if peer is None:
                return None
            return row.times_ms[peer] / row.times_ms["fastopt"] >= self.value
        return row.times_ms["fastopt"] <= self.value


@dataclass
class GpuRow(Row):
    """A row of the GPU bench: also whether fastopt's results equal its CPU kernels' bit
    for bit (None where that is not required) and the case's target, if it has one."""

    bit_identical: Optional[bool] = None
    target: Optional[Target] = None


# The GPU peers of the Newton cases (also the peers of their targets).
NEWTON_GPU_PEERS = ("torch.linalg.solve", "torch cholesky+solve", "cupy.linalg.solve")

# fastopt's GPU targets (stated for the full sizes). Optimizers by name and layout kind:
# "one" large tensor (2^28), "gpt2-small" (148 tensors), "many" (1000 x 4096, through the
# class); int8 by case (2^28 elements); Newton by n (NEWTON_CASES' systems).
GPU_TARGETS: Dict[Tuple[str, Any], Target] = {
    ("adamw", "one"): Target("pct", 95),
    ("adamw", "gpt2-small"): Target("pct", 90),
    ("adamw", "many"): Target("ms", 0.2),
    ("sgd", "one"): Target("pct", 95),
    ("sgd", "gpt2-small"): Target("pct", 95),
    ("rmsprop", "one"): Target("pct", 90),
    ("rmsprop", "gpt2-small"): Target("pct", 90),
    ("adagrad", "one"): Target("pct", 90),
    ("adagrad", "gpt2-small"): Target("pct", 90),
    ("int8", "blockwise-256 quantize"): Target("pct", 92),
    ("int8", "blockwise-256 dequantize"): Target("pct", 92),
    ("int8", "per-tensor quantize"): Target("speedup", 1, peers=("torch.quantize_per_tensor",)),
    ("int8", "dynamic per-tensor quantize"): Target("pct", 85),
    ("newton", 8): Target("speedup", 5, peers=NEWTON_GPU_PEERS),
    ("newton", 32): Target("speedup", 10, peers=NEWTON_GPU_PEERS),
    ("newton", 64): Target("speedup", 5, peers=NEWTON_GPU_PEERS),
}

# What a CuPy user writes: one ElementwiseKernel (float32 scalars), called once per tensor;
# (in_params, out_params, operation, name). SGD is the momentum step past the first.
CUPY_KERNELS = {
    "adamw": (
        "T g, float32 lr, float32 beta1, float32 beta2, float32 eps, float32 wd, "
        "float32 step_size, float32 bc2_sqrt",
        "T p, T m, T v",
        "p = p * (1.0f - lr * wd);"
        "m = beta1 * m + (1.0f - beta1) * g;"
        "v = beta2 * v + (1.0f - beta2) * g * g;"
        "p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps);",
        "fastopt_bench_adamw",
    ),
    "sgd": (
        "T g, float32 lr, float32 momentum",
        "T p, T buf",
        "buf = momentum * buf + g; p = p - lr * buf;",
        "fastopt_bench_sgd_momentum",
    ),
}


def _cupy_elementwise_step(
    cupy: Any, spec: OptimizerCase, params: List[Any], grads: List[Any]
) -> Callable[[], None]:
    """One optimizer step over CuPy arrays: the CUPY_KERNELS kernel once per tensor, with
    its own zeroed state and step count."""
    kernel = cupy.ElementwiseKernel(*CUPY_KERNELS[spec.name])
    states = [[cupy.zeros_like(p) for p in params] for _ in spec.states]
    hyper, f32, t = spec.hyper, np.float32, [0]
    if spec.name == "adamw":
        lr, wd = hyper["lr"], hyper["weight_decay"]
        b1, b2, eps = hyper.get("beta1", 0.9), hyper.get("beta2", 0.999), hyper.get("eps", 1e-8)

        def step() -> None:
            t[0] += 1
            args = (
                f32(lr),
                f32(b1),
                f32(b2),
                f32(eps),
                f32(wd),
                f32(lr / (1 - b1 ** t[0])),
                f32(math.sqrt(1 - b2 ** t[0])),
            )
            for p, g, m, v in zip(params, grads, *states):
                kernel(g, *args, p, m, v)
    else:
        args = (f32(hyper["lr"]), f32(hyper["momentum"]))

        def step() -> None:
            for p, g, buf in zip(params, grads, *states):
                kernel(g, *args, p, buf)

    return step


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:160]


def _try_peer(
    fns: Dict[str, Callable[[], Any]], row: Row, name: str, make: Callable[[], Callable[[], Any]]
) -> None:
    """fns[name] = make(), once it has been made and has run once; if either raises, the
    peer is "not available" (row.notes says why)."""
    try:
        fn = make()
        fn()
    except Exception as exc:  # a library build or device without it
        row.notes[name] = f"not available ({_why(exc)})"
        return
    fns[name] = fn


def _made(fn: Callable[[], Any]) -> Callable[[], Callable[[], Any]]:
    """The maker _try_peer takes, for a peer that is made already."""
    return lambda: fn


class _TimeLimit(BaseException):
    """Raised by SIGALRM into the code under _time_limit (a BaseException, so that library
    code catching Exception does not swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raises _TimeLimit in the main thread once `seconds` have passed, where SIGALRM exists
    and nothing else uses it (else no limit). The signal is handled between Python
    bytecodes, so a long C call is not cut short, only what follows it."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGALRM) is None
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0
    ):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TimeLimit()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _identical(got: Any, want: Any) -> bool:
    """Results (an array, number or tuple of them; host or device arrays) equal to `want`'s
    bit for bit: same dtypes, shapes and values, -0.0 apart from 0.0 (they hold no NaN)."""
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        a, b = (
            np.asarray(v if isinstance(v, (np.ndarray, numbers.Number)) else _host_copy(v))
            for v in (g, w)
        )
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            return False
        if a.dtype.kind == "f" and not np.array_equal(np.signbit(a), np.signbit(b)):
            return False
    return True


class EventClock:
    """Device timing: a block of n asynchronous calls between two events recorded on the
    arrays' stream, as one sample of (elapsed / n). Host-side launch cost is included
    wherever the GPU has to wait for it (small tensors), as a user would see it."""

    def __init__(self, arrays: DeviceArrays):
        self.arrays = arrays

    def warm(self, fn: Callable[[], Any]) -> float:
        fn()  # first call: lazy state, kernel compilation (CuPy), plan building
        self.arrays.synchronize()
        t0 = time.perf_counter()
        fn()
        self.arrays.synchronize()
        return time.perf_counter() - t0

    def block(self, fn: Callable[[], Any], n: int) -> List[float]:
        self.arrays.synchronize()
        start, end = self.arrays.event(), self.arrays.event()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return [self.arrays.elapsed_ms(start, end) * 1e-3 / n]


class _HostEvent:
    """Stands in for a CUDA event when the "device" is the host (the tests' stand-in GPU)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


class DeviceArrays:
    """The library the GPU bench allocates float32 arrays with, on one device: random and
    empty arrays, host <-> device copies, a device-to-device copy (the ceiling), events and
    free memory."""

    name = ""
    version = ""
    on_gpu = True

    def standard_normal(self, shape: Tuple[int, ...]) -> Any:
        raise NotImplementedError

    def empty(self, n: int) -> Any:
        raise NotImplementedError

    def from_numpy(self, a: np.ndarray) -> Any:
        raise NotImplementedError

    def copy(self, dst: Any, src: Any) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def event(self) -> Any:
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        raise NotImplementedError

    def free_bytes(self) -> int:
        raise NotImplementedError

    def release(self) -> None:
        """Return cached blocks to the device (between cases)."""


class TorchArrays(DeviceArrays):
    """PyTorch tensors on `device` ("cuda"; "cpu" only as the tests' stand-in GPU)."""

    name = "torch"

    def __init__(self, torch: Any, device: str = "cuda"):
        self.torch = torch
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.version = torch.__version__
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)

    def standard_normal(self, shape: Tuple[int, ...]) -> Any:
        return self.torch.randn(
            tuple(shape), generator=self.generator, dtype=self.torch.float32, device=self.device
        )

    def empty(self, n: int) -> Any:
        return self.torch.empty(n, dtype=self.torch.float32, device=self.device)

    def from_numpy(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(a).to(self.device, copy=True)

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def synchronize(self) -> None:
        if self.on_gpu:
            self.torch.cuda.synchronize(self.device)

    def event(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True) if self.on_gpu else _HostEvent()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def free_bytes(self) -> int:
        if self.on_gpu:
            return int(self.torch.cuda.mem_get_info(self.device)[0])
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def release(self) -> None:
        if self.on_gpu:
            self.torch.cuda.empty_cache()


class CupyArrays(DeviceArrays):
    """CuPy arrays on the current device (when torch has no CUDA)."""

    name = "cupy"

    def __init__(self, cupy: Any):
        self.cupy = cupy
        self.version = cupy.__version__
        self.random = cupy.random.RandomState(0)

    def standard_normal(self, shape: Tuple[int, ...]) -> Any:
        return self.random.standard_normal(tuple(shape), dtype=np.float32)

    def empty(self, n: int) -> Any:
        return self.cupy.empty(n, dtype=np.float32)

    def from_numpy(self, a: np.ndarray) -> Any:
        return self.cupy.asarray(a)

    def copy(self, dst: Any, src: Any) -> None:
        dst.data.copy_from_device_async(src.data, src.nbytes)  # cudaMemcpyAsync, as torch

    def synchronize(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def event(self) -> Any:
        return self.cupy.cuda.Event()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self.cupy.cuda.get_elapsed_time(start, end))

    def free_bytes(self) -> int:
        return int(self.cupy.cuda.runtime.memGetInfo()[0])

    def release(self) -> None:
        self.cupy.get_default_memory_pool().free_all_blocks()


def _device_arrays() -> Tuple[Optional[DeviceArrays], str]:
    """PyTorch if it has CUDA, else CuPy; or None and why neither can be used."""
    torch = _import_torch()
    if torch is not None and torch.cuda.is_available():
        return TorchArrays(torch), ""
    cupy = _import_cupy()
    if cupy is not None:
        try:
            cupy.cuda.runtime.getDeviceCount()
            return CupyArrays(cupy), ""
        except Exception as exc:
            return None, f"CuPy {cupy.__version__} cannot use the GPU ({type(exc).__name__}: {exc})"
    have = "PyTorch without CUDA" if torch is not None else "no PyTorch"
    return None, (
        f"no library to allocate GPU arrays with ({have}, no CuPy): install CuPy "
        "(pip install fastopt[cuda]) or a CUDA build of PyTorch"
    )


def _host_copy(a: Any) -> np.ndarray:
    """A NumPy copy of a NumPy array, PyTorch tensor or CuPy array."""
    if isinstance(a, np.ndarray):
        return a.copy()
    if _arrays._is_torch(a):
        t = a.detach()
        return t.numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()
    return a.get()


class GpuBench:
    """The cases of CpuBench on device arrays, in the same rows: each case is checked
    against fastopt's CPU kernels, then fastopt (optimizers through the classes, one C++
    call per step; int8 and Newton through the public functions, which wait for the stream
    once per call) and its peers are timed with device events. The ceiling is a
    device-to-device copy counted as read + write."""

    # Device arrays of a layout's size the heaviest case (AdamW) holds at once: fastopt's
    # params, grads and 2 states (4); torch fused and foreach, params and 2 states each
    # (6, grads shared) and a foreach temporary (1); CuPy's own params, grads and 2 states
    # (4); 1 to spare.
    ARRAYS_AT_ONCE = 16
    CHECK_STEPS = 2
    TOLERANCE = 1e-6  # if not bit-identical: max |diff| / (1 + max |value|) per array
    ADAFACTOR_TOLERANCE = 1e-5  # the same for Adafactor (its sums' order differs)
    # int8 cases: float32 arrays of the case's size at once: x, torch eager's temporaries
    # (x * 127, / absmax, round, clamp: two alive at a time), the outputs (twice: fastopt
    # and fastopt-into); 2 to spare.
    QUANT_ARRAYS_AT_ONCE = 7
    # Newton: copies of a case's H (+ g, p) at once: fastopt's (H, and params twice), torch's
    # LU and Cholesky factors, CuPy's H and its factor, cached blocks; 2 to spare.
    NEWTON_COPIES = 8
    NEWTON_LR = 1e-3
    COMPILE_BUDGET_S = 60.0  # torch.compile of a peer: longer, and it is "not available"

    def __init__(self, quick: bool, progress: Callable[[str], None], arrays: DeviceArrays):
        self.quick = quick
        self.progress = progress
        self.arrays = arrays
        self.clock = EventClock(arrays)
        self.torch = _import_torch()
        self.cupy, self.cupy_why = None, "not installed"
        cupy = _import_cupy() if arrays.on_gpu else None
        if cupy is not None:
            try:
                cupy.cuda.runtime.getDeviceCount()
                self.cupy = cupy
            except Exception as exc:
                self.cupy_why = f"unavailable ({type(exc).__name__}: {exc})"[:160]
        self.repeats, self.rounds = (30, 3) if quick else (100, 5)  # blocks of 10 / 20 calls
        self.sized_down: Dict[str, str] = {}  # layout -> why it is smaller than asked
        self.kinds: Dict[str, str] = {}  # layout -> its kind in GPU_TARGETS
        self.rng = np.random.default_rng(0)  # host data (Newton systems)
        self.compile_peers = arrays.on_gpu  # try torch.compile peers (not on a stand-in)

    def big_log2(self) -> int:
        return 24 if self.quick else 28

    def release(self) -> None:
        gc.collect()
        self.arrays.release()
        if self.cupy is not None:
            self.cupy.get_default_memory_pool().free_all_blocks()

    def fit(
        self, count: int, bytes_each: int, smallest: int, what: Callable[[int], str]
    ) -> Tuple[int, str]:
        """count halved until count * bytes_each fits in 90% of the free device memory (not
        below `smallest`), and why it is smaller than asked (or ""); what(count) names a size."""
        self.release()
        free = self.arrays.free_bytes()
        c = count
        while c > smallest and bytes_each * c > 0.9 * free:
            c //= 2
        if c == count:
            return c, ""
        return c, (
            f"sized down from {what(count)}: {free / 2**30:.1f} GiB free, {what(count)} "
            f"needs {bytes_each * count / 2**30:.1f} GiB"
        )

    def fit_log2(self, log2: int, arrays_at_once: int) -> Tuple[int, str]:
        """The largest k <= log2 such that arrays_at_once float32 arrays of 2^k elements fit
        in 90% of the free device memory, and why it is smaller than log2 (or "")."""
        c, why = self.fit(
            1 << log2, arrays_at_once * 4, 1 << 16, lambda c: f"2^{c.bit_length() - 1}"
        )
        return c.bit_length() - 1, why

    # -- the ceiling ------------------------------------------------------------------
    def ceiling(self) -> Dict[str, Any]:
        k, why = self.fit_log2(self.big_log2(), 3)
        n = 1 << k
        src, dst = self.arrays.standard_normal((n,)), self.arrays.empty(n)
        ms = _median_times(
            {"copy": lambda: self.arrays.copy(dst, src)},
            self.repeats * 2,
            self.rounds,
            clock=self.clock,
        )["copy"]
        out = {
            "elements": n,
            "bytes_per_element": 8,
            "ms": ms,
            "gbs": 8 * n / (ms * 1e-3) / 1e9,
            "what": f"device-to-device copy ({self.arrays.name})",
        }
        if why:
            out["sized_down"] = why
        return out

    # -- optimizer cases ----------------------------------------------------------------
    def layouts(self) -> List[Tuple[str, List[Tuple[int, ...]]]]:
        big = self.big_log2()
        k, why = self.fit_log2(big, self.ARRAYS_AT_ONCE)
        one = f"1x2^{k}" + (" (sized down)" if why else "")
        self.kinds = {one: "one", "gpt2-small": "gpt2-small", "1000x4096": "many"}
        self.sized_down = {one: why} if why else {}
        layouts: List[Tuple[str, List[Tuple[int, ...]]]] = [(one, [(1 << k,)])]
        if not self.quick:
            layouts.append(("gpt2-small", gpt2_small_shapes()))
        return layouts + [("1000x4096", [(4096,)] * 1000)]

    def optimizer_case(
        self, spec: OptimizerCase, layout: str, shapes: List[Tuple[int, ...]]
    ) -> Row:
        self.release()
        elements = sum(int(np.prod(s)) for s in shapes)
        row = GpuRow(f"{spec.name} {layout}", "cuda", spec.bytes_per_element, elements, len(shapes))
        if layout in self.sized_down:
            row.remarks.append(self.sized_down[layout])
        row.target = GPU_TARGETS.get((spec.name, self.kinds.get(layout, "")))
        params = [self.arrays.standard_normal(s) for s in shapes]
        grads = [self.arrays.standard_normal(s) for s in shapes]
        host_params = [_host_copy(p) for p in params]
        host_grads = [_host_copy(g) for g in grads]
        opt = spec.fastopt_class(params, **spec.hyper)
        failure, remark = self.check(spec, opt, grads, host_params, host_grads)
        row.bit_identical = not remark
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        if remark:
            row.remarks.append(remark)
        fns: Dict[str, Callable[[], None]] = {"fastopt": lambda: opt.step(grads)}
        self.add_torch_peers(spec, host_params, grads, fns, row)
        self.add_cupy_peer(spec, host_params, host_grads, fns, row)
        if self.kinds.get(layout) == "many":
            failure = self.add_fastopt_on_cupy(spec, host_params, host_grads, fns, row)
            if failure:
                row.check = f"FAIL: fastopt on CuPy arrays {failure}"
                return row
        del host_params, host_grads
        row.times_ms = _median_times(fns, self.repeats, self.rounds, clock=self.clock)
        return row

    def adafactor_layouts(self) -> List[Tuple[str, List[Tuple[int, ...]]]]:
        return adafactor_layouts(self.quick)

    def adafactor_case(self, layout: str, shapes: List[Tuple[int, ...]]) -> Row:
        """Adafactor on the device: ``fastopt.Adafactor`` (and ``fastopt.torch.Adafactor``)
        against ``torch.optim.Adafactor`` (foreach and single-tensor) on CUDA tensors,
        after CHECK_STEPS steps are checked against fastopt's CPU kernel, params and state
        (within ADAFACTOR_TOLERANCE: the float64 sums run in another order). Bytes per
        element as the CPU row's. torch's step launches several kernels per param (fastopt's
        about seven per 64 params), so its lists are launch-bound: a slow peer is timed over
        fewer calls (_median_times)."""
        self.release()
        elements = sum(int(np.prod(s)) for s in shapes)
        row = GpuRow(f"adafactor {layout}", "cuda", 24, elements, len(shapes))
        params = [self.arrays.standard_normal(s) for s in shapes]
        grads = [self.arrays.standard_normal(s) for s in shapes]
        host_params = [_host_copy(p) for p in params]
        host_grads = [_host_copy(g) for g in grads]
        opt = Adafactor(params)
        cpu = Adafactor([p.copy() for p in host_params])
        failure, remark = self.compare(opt, cpu, grads, host_grads, self.ADAFACTOR_TOLERANCE)
        row.bit_identical = not remark
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        if remark:
            row.remarks.append(remark)
        fns: Dict[str, Callable[[], None]] = {"fastopt": lambda: opt.step(grads)}
        torch = self.device_torch(row)
        if torch is not None:
            from .. import torch as fastopt_torch

            makers: Dict[str, Callable[[List[Any]], Any]] = {
                "fastopt.torch": fastopt_torch.Adafactor,
                "torch-foreach": functools.partial(torch.optim.Adafactor, foreach=True),
                "torch-single": functools.partial(torch.optim.Adafactor, foreach=False),
            }
            for name, make in makers.items():
                tparams = [self.arrays.from_numpy(p) for p in host_params]
                for tp, g in zip(tparams, grads):
                    tp.grad = g
                fns[name] = make(tparams).step
        del host_params, host_grads
        row.times_ms = _median_times(fns, self.repeats, self.rounds, clock=self.clock)
        return row

    def device_torch(self, row: Row) -> Any:
        """torch, if the device arrays are its tensors; else None, and why in row.notes."""
        if self.torch is None:
            row.notes["torch"] = "not installed"
        elif self.arrays.name != "torch":
            row.notes["torch"] = f"no CUDA in this build ({self.torch.__version__})"
        else:
            return self.torch
        return None

    def add_torch_peers(self, spec: OptimizerCase, host_params, grads, fns, row: Row) -> None:
        """torch.optim on torch tensors of the arrays' device (grads shared with fastopt)."""
        if not spec.cuda_torch_modes or self.device_torch(row) is None:
            return
        arrays = self.arrays
        _add_torch_peers(
            self.torch,
            spec,
            spec.cuda_torch_modes,
            lambda: [arrays.from_numpy(p) for p in host_params],
            lambda: grads,
            fns,
            row,
        )

    def add_cupy_peer(self, spec: OptimizerCase, host_params, host_grads, fns, row: Row) -> None:
        if spec.name not in CUPY_KERNELS:
            return
        cupy = self.cupy
        if cupy is None:
            row.notes["cupy"] = self.cupy_why
            return
        try:
            step = _cupy_elementwise_step(
                cupy,
                spec,
                [cupy.asarray(p) for p in host_params],
                [cupy.asarray(g) for g in host_grads],
            )
            step()
        except Exception as exc:  # e.g. no NVRTC to compile the kernel
            row.notes["cupy-elementwise"] = f"unavailable ({type(exc).__name__}: {exc})"[:160]
            return
        fns["cupy-elementwise"] = step

    def add_fastopt_on_cupy(
        self, spec: OptimizerCase, host_params, host_grads, fns, row: Row
    ) -> Optional[str]:
        """fastopt once more on CuPy arrays ("fastopt-cupy", not a peer) where the arrays are
        torch tensors: with many small tensors a step's host cost depends on the library
        (a torch tensor's data pointer is re-read every step). Checked like "fastopt";
        returns why the check failed, if it did."""
        cupy = self.cupy
        if cupy is None or self.arrays.name == "cupy":
            return None
        try:
            params = [cupy.asarray(p) for p in host_params]
            grads = [cupy.asarray(g) for g in host_grads]
        except Exception as exc:
            row.notes["fastopt-cupy"] = f"unavailable ({type(exc).__name__}: {exc})"[:160]
            return None
        opt = spec.fastopt_class(params, **spec.hyper)
        failure, remark = self.check(spec, opt, grads, host_params, host_grads)
        if failure:
            return failure
        if remark:
            row.remarks.append(f"fastopt-cupy: {remark}")
        fns["fastopt-cupy"] = lambda: opt.step(grads)
        return None

    # -- int8 cases ---------------------------------------------------------------------
    def quant_case(self, name: str) -> Row:
        """CpuBench.quant_case on a device array of 2^big_log2() elements (sized to free
        memory): fastopt's results must equal its CPU kernels' bit for bit (dequantize: of
        the whole quantize + dequantize). Peers: torch on the same tensors."""
        k, why = self.fit_log2(self.big_log2(), self.QUANT_ARRAYS_AT_ONCE)
        row = GpuRow(f"int8 {name}", "cuda", QUANT_CASES[name], 1 << k, 1)
        if why:
            row.remarks.append(why)
        row.target = GPU_TARGETS.get(("int8", name))
        x = self.arrays.standard_normal((1 << k,))
        fastopt_call = _quant_call(name, x)
        row.bit_identical = _identical(fastopt_call(), _quant_call(name, _host_copy(x))())
        if not row.bit_identical:
            row.check = "FAIL: differs from fastopt's CPU kernels"
            return row
        fns: Dict[str, Callable[[], Any]] = {"fastopt": fastopt_call}
        into = _quant_into_call(name, x)
        if into is not None:
            if not _identical(into(), fastopt_call()):
                row.check = "FAIL: fastopt-into (out=, check_finite=False) differs"
                return row
            fns["fastopt-into"] = into
        torch = self.device_torch(row)
        if torch is not None and name.startswith("blockwise"):
            quantize, dequantize = _torch_blockwise(torch)
            peer, args = (
                (quantize, (x,))
                if name == "blockwise-256 quantize"
                else (dequantize, quant.quantize_blockwise(x))
            )
            eager = lambda: peer(*args)  # noqa: E731
            _try_peer(fns, row, "torch eager", lambda: eager)
            self.add_compiled_peer(peer, args, fns, row)
        elif torch is not None:
            peer_name, call = _torch_per_tensor_peer(torch, name, x)
            _try_peer(fns, row, peer_name, lambda: call)
        row.times_ms = _median_times(fns, self.repeats, self.rounds, clock=self.clock)
        return row

    def add_compiled_peer(self, fn: Callable[..., Any], args: tuple, fns, row: Row) -> None:
        """fns["torch.compile"]: torch.compile(fn) called on args, if compiling it (its first
        call) takes at most COMPILE_BUDGET_S and works; else row.notes says why not."""
        if not self.compile_peers:
            row.notes["torch.compile"] = "not available (not tried on this device)"
            return
        t0 = time.perf_counter()
        try:
            with _time_limit(self.COMPILE_BUDGET_S):
                compiled = self.torch.compile(fn, dynamic=False)
                compiled(*args)
                self.arrays.synchronize()
        except _TimeLimit:
            row.notes["torch.compile"] = (
                f"not available (compiling took over {self.COMPILE_BUDGET_S:g} s)"
            )
            return
        except Exception as exc:  # no Triton, no C compiler, an unsupported op...
            row.notes["torch.compile"] = f"not available ({_why(exc)})"
            return
        row.remarks.append(f"torch.compile: compiled in {time.perf_counter() - t0:.1f} s")
        fns["torch.compile"] = lambda: compiled(*args)

    # -- Newton cases ---------------------------------------------------------------------
    def newton_case(self, n: int, systems: int) -> Row:
        """CpuBench.newton_case on device arrays (systems sized to free memory), checked by
        newton_check. "fastopt-skip" is fastopt with on_failure="skip", which does not wait
        for the stream (not a peer)."""
        if self.quick:
            systems //= 4
        systems, why = self.fit(
            systems, self.NEWTON_COPIES * 4 * (n * n + 3 * n), 64, lambda c: f"{c} systems"
        )
        row = _newton_row(n, systems, "cuda", GpuRow)
        if why:
            row.remarks.append(why)
        row.target = GPU_TARGETS.get(("newton", n))
        H, g, p = _spd_systems(self.rng, n, systems)
        Hd, gd = self.arrays.from_numpy(H), self.arrays.from_numpy(g)
        failure, row.bit_identical = self.newton_check(H, g, p, Hd, gd)
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        pd, pd_skip, lr = self.arrays.from_numpy(p), self.arrays.from_numpy(p), self.NEWTON_LR
        fns: Dict[str, Callable[[], Any]] = {
            "fastopt": lambda: newton_(pd, gd, Hd, lr=lr),
            "fastopt-skip": lambda: newton_(pd_skip, gd, Hd, lr=lr, on_failure="skip"),
        }
        torch = self.device_torch(row)
        if torch is not None:
            for peer, fn in _torch_solvers(torch, Hd, gd[..., None]).items():
                _try_peer(fns, row, peer, _made(fn))
        cupy = self.cupy
        if cupy is None:
            row.notes["cupy"] = self.cupy_why
        else:

            def cupy_solve() -> Callable[[], Any]:
                cH, cg = cupy.asarray(H), cupy.asarray(g)[..., None]
                return lambda: cupy.linalg.solve(cH, cg)

            _try_peer(fns, row, "cupy.linalg.solve", cupy_solve)
        row.times_ms = _median_times(fns, self.repeats, self.rounds, clock=self.clock)
        return row

    def newton_check(
        self, H: np.ndarray, g: np.ndarray, p: np.ndarray, Hd: Any, gd: Any
    ) -> Tuple[Optional[str], Optional[bool]]:
        """cholesky_solve and one newton_ step (lr 1; on_failure "raise", then "skip") on
        the device: within float32 accuracy of numpy.linalg.solve in float64, the two
        steps alike, and for n <= 64 bit-identical to fastopt's CPU kernels. Returns (why
        it fails, or None; bit-identical, or None where not required: n > 64)."""
        d = _host_copy(cholesky_solve(Hd, gd))
        stepped = []
        for how in ("raise", "skip"):
            pd = self.arrays.from_numpy(p)
            newton_(pd, gd, Hd, on_failure=how)
            stepped.append(_host_copy(pd))
        want = _solve64(H, g)
        failure = _newton_failure(d, want) or _newton_failure(
            p.astype(np.float64) - stepped[0], want
        )
        if failure:
            return failure, None
        if not _identical(stepped[1], stepped[0]):
            return 'newton_ with on_failure="skip" differs from "raise"', None
        if g.shape[-1] > 64:
            return None, None
        p_cpu = p.copy()
        newton_(p_cpu, g, H)
        if not (_identical(d, cholesky_solve(H, g)) and _identical(stepped[0], p_cpu)):
            return (
                "differs from fastopt's CPU kernels (meant to be bit-identical for n <= 64)"
            ), False
        return None, True

    def check(
        self, spec: OptimizerCase, opt: Any, grads, host_params, host_grads
    ) -> Tuple[Optional[str], str]:
        """compare() against fastopt's CPU kernels: the spec's class on copies of the host
        params, within TOLERANCE."""
        cpu = spec.fastopt_class([p.copy() for p in host_params], **spec.hyper)
        return self.compare(opt, cpu, grads, host_grads, self.TOLERANCE)

    def compare(
        self, opt: Any, cpu: Any, grads, host_grads, tolerance: float
    ) -> Tuple[Optional[str], str]:
        """CHECK_STEPS steps of `opt` (on the device) and of `cpu` (its twin on fastopt's CPU
        kernels, from the same start); every param and state element compared (state
        entries None on the CPU, Adafactor's, skipped). Returns (why it fails, or None; a
        remark if the results are not bit-identical, else "")."""
        for _ in range(self.CHECK_STEPS):
            opt.step(grads)
            cpu.step(host_grads)
        self.arrays.synchronize()
        worst, where = 0.0, ""
        roles = [("params", opt.params, cpu.params)] + [
            (name, opt.state[name], cpu.state[name]) for name in cpu.state
        ]
        for role, got_list, want_list in roles:
            for i, (device_array, want) in enumerate(zip(got_list, want_list)):
                if want is None:
                    continue
                got = _host_copy(device_array)
                if np.array_equal(got, want):
                    continue
                err = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0)) / (
                    1.0 + float(np.max(np.abs(want), initial=0.0))
                )
                if not math.isfinite(err):
                    return (
                        f"{role}[{i}] differs from fastopt's CPU kernels after "
                        f"{self.CHECK_STEPS} steps (non-finite values)"
                    ), "non-finite"
                if err > worst:
                    worst, where = err, f"{role}[{i}]"
        if not where:
            return None, ""
        remark = (
            f"not bit-identical to the CPU kernels: max |diff| {worst:.2g} x "
            f"(1 + max |value|) at {where}"
        )
        if worst > tolerance:
            return (
                f"differs from fastopt's CPU kernels after {self.CHECK_STEPS} steps: "
                f"{where} max |diff| {worst:.3g} x (1 + max |value|)"
            ), remark
        return None, f"{remark}, within {tolerance:g}"


def _cuda_version(v: Any) -> str:
    """13000 -> "13.0" (CUDA's encoding: 1000 * major + 10 * minor)."""
    if isinstance(v, int) and v > 0:
        return f"{v // 1000}.{(v % 1000) // 10}"
    return str(v)


def _gpu_facts(cuda: Dict[str, Any], bench: GpuBench) -> Dict[str, Any]:
    devices = list(cuda.get("devices") or []) or ["unknown"]
    torch, cupy = bench.torch, bench.cupy
    torch_version = "not installed"
    if torch is not None:
        torch_cuda = getattr(torch.version, "cuda", None)
        torch_version = torch.__version__ + (
            f" (CUDA {torch_cuda})" if torch_cuda else " (no CUDA)"
        )
    return {
        "device": devices[0],
        "devices": devices,
        "driver_version": _cuda_version(cuda.get("driver_version")),
        "runtime_version": _cuda_version(cuda.get("runtime_version")),
        "architectures": cuda.get("architectures"),
        "arrays": f"{bench.arrays.name} {bench.arrays.version}",
        "torch": torch_version,
        "cupy": cupy.__version__ if cupy is not None else "not installed",
    }


def _print_gpu_summary(rows: List[Row], ceiling_gbs: float, quick: bool) -> None:
    """Parity with the CPU kernels, and each target against what was measured."""
    # Read with defaults: ERROR rows are plain Rows, without parity or target.
    parity = [getattr(r, "bit_identical", None) for r in rows]
    checked = [identical for identical in parity if identical is not None]
    if checked:
        print(
            f"parity: {sum(checked)} of {len(checked)} checked cases bit-identical to "
            f"fastopt's CPU kernels (optimizers: {GpuBench.CHECK_STEPS} steps, every param "
            "and state element; int8: every output; Newton n <= 64: cholesky_solve and a step)"
        )
    hit: List[Tuple[Row, Target]] = [
        (r, t)
        for r in rows
        if (t := getattr(r, "target", None)) is not None
        and r.check == "ok"
        and "fastopt" in r.times_ms
    ]
    if not hit:
        return
    print(
        "targets (stated for the full sizes"
        + (": this --quick run is only indicative)" if quick else ")")
    )
    for r, t in hit:
        met = t.met(r, ceiling_gbs)
        verdict = (
            "not measured (none of its peers ran)" if met is None else ("met" if met else "NOT MET")
        )
        print(f"  {r.case}: fastopt {t.achieved(r, ceiling_gbs)}, target {t.describe()}: {verdict}")


def _run_gpu(
    arrays: DeviceArrays,
    names: List[str],
    only: Optional[set],
    quick: bool,
    progress: Callable[[str], None],
    end_line: bool,
    cuda: Dict[str, Any],
    result: Dict[str, Any],
) -> Tuple[List[Row], float]:
    bench = GpuBench(quick, progress, arrays)
    progress("cuda ceiling")
    ceiling = bench.ceiling()
    result["ceiling_cuda"] = ceiling
    gpu = result["gpu"] = _gpu_facts(cuda, bench)
    rows = _run_cases(_cases(bench, names, only), "cuda", progress, end_line, prefix="cuda ")
    print(
        f"GPU: {gpu['device']}, driver {gpu['driver_version']}, runtime "
        f"{gpu['runtime_version']}; arrays: {gpu['arrays']}; torch {gpu['torch']}, "
        f"cupy {gpu['cupy']}"
    )
    sized = f" ({ceiling['sized_down']})" if "sized_down" in ceiling else ""
    print(
        f"ceiling (device-to-device copy, {ceiling['elements']} float32, read + write): "
        f"{ceiling['gbs']:.1f} GB/s{sized}"
    )
    _print_rows(rows, ceiling["gbs"])
    _print_gpu_summary(rows, ceiling["gbs"], quick)
    return rows, ceiling["gbs"]
