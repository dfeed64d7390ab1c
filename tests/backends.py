"""Where a test's arrays live, and the one bit-identity check of the suite.

A ``Backend`` is one place fastopt's kernels run: the CPU's scalar or AVX2 path on NumPy
arrays, or the GPU on CuPy arrays or PyTorch CUDA tensors (CuPy's ``xp`` pattern). Each has
the same few methods -- copy NumPy values onto it, bring arrays back, overwrite one in place,
tell its address -- so one test body runs on every backend: conftest's ``backend`` fixture
hands it each in turn, and on a GPU backend conftest's ``Problem`` also steps a CPU twin and
checks the GPU bit for bit against it (float32/float64 GPU results equal the CPU's by
design).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import numpy as np
import pytest

import fastopt

from cuda_libs import open_lib

HAS_AVX2 = bool(fastopt.info()["cpu_has_avx2_fma"])

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.uint64}


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a``, as unsigned integers (two per element for 16-byte types)."""
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 16:
        return a.view(np.uint64)
    return a.view(_BITS[a.dtype.itemsize])


def assert_bits(got: Any, want: Any, what: str = "", *, any_nan: bool = False) -> None:
    """Same dtype, shape and bit pattern of every element. ``any_nan=True``: a NaN matches
    any NaN (for kernel results, where the contract leaves NaN's sign and payload open)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g, w = np.ascontiguousarray(got).reshape(-1), np.ascontiguousarray(want).reshape(-1)
    if g.dtype.itemsize == 16:  # longdouble, complex128: compare both halves
        bad = (bits(g).reshape(-1, 2) != bits(w).reshape(-1, 2)).any(axis=1)
    else:
        bad = bits(g) != bits(w)
    if any_nan and (g.dtype.kind in "fc" or g.dtype.kind == "V"):  # "V": ml_dtypes' bfloat16
        nan_g, nan_w = np.isnan(g.astype(np.complex128)), np.isnan(w.astype(np.complex128))
        bad = (nan_g != nan_w) | (~nan_g & bad)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise AssertionError(f"{what}: {idx.size} of {w.size} elements differ; first flat "
                             f"indices {idx[:8].tolist()}: got {g[idx[:6]].tolist()}, want "
                             f"{w[idx[:6]].tolist()}")


_PATHS_SET: list = []  # the paths of the enclosing using_cpu_path blocks, innermost last


@contextlib.contextmanager
def using_cpu_path(path: str) -> Iterator[str]:
    """Runs the CPU kernels on ``path`` ("scalar", "avx2" -- skips without AVX2 -- or
    "auto"); on exit the enclosing block's path comes back ("auto" outside any)."""
    if path == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2+FMA")
    fastopt.set_cpu_path(path)
    _PATHS_SET.append(path)
    try:
        assert path == "auto" or fastopt.get_cpu_path() == path
        yield path
    finally:
        _PATHS_SET.pop()
        fastopt.set_cpu_path(_PATHS_SET[-1] if _PATHS_SET else "auto")


class CpuBackend:
    """NumPy arrays, stepped by the CPU kernels of ``path``."""

    is_cuda = False

    def __init__(self, path: str):
        self.path = path
        self.name = f"cpu-{path}"

    def activate(self):
        return using_cpu_path(self.path)

    def asarray(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, copy=True, order="C")

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def upload(self, dst: np.ndarray, values: np.ndarray) -> None:
        """dst <- values (same shape and dtype), in place."""
        dst[...] = values

    def ptr(self, a: np.ndarray) -> int:
        return a.ctypes.data

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def view(self, a: np.ndarray, dtype: str) -> np.ndarray:
        """``a``'s bytes as ``dtype`` ("int8", ...)."""
        return a.view(np.dtype(dtype))

    def holds(self, dtype) -> bool:
        """Whether arrays of ``dtype`` exist here (NumPy: every dtype of the tests)."""
        return True

    def assert_result(self, a: Any, like: Any, dtype: str, shape) -> None:
        """``a`` is a C-contiguous NumPy array of ``dtype`` and ``shape``."""
        assert isinstance(a, np.ndarray), type(a)
        assert a.dtype == np.dtype(dtype), a.dtype
        assert a.shape == tuple(shape) and a.flags.c_contiguous


class CudaBackend:
    """CUDA arrays of one library (cuda_libs' ``CupyLib`` or ``TorchLib``)."""

    is_cuda = True

    def __init__(self, lib):
        self.lib = lib
        self.name = {"cupy": "cupy", "torch": "torch-cuda"}[lib.name]

    def activate(self):
        return contextlib.nullcontext(self)

    def asarray(self, values: np.ndarray):
        return self.lib.to_device(values)

    def to_numpy(self, a: Any) -> np.ndarray:
        """A NumPy copy (of a CUDA array: after all work queued on the device, any stream)."""
        if isinstance(a, np.ndarray):
            return a.copy()
        return self.lib.to_host(a, sync=True)

    def upload(self, dst, values: np.ndarray) -> None:
        """dst <- values (same shape and dtype), in place: one host-to-device copy."""
        values = np.ascontiguousarray(values)
        if self.lib.name == "cupy":
            dst.set(values)
        else:
            dst.copy_(self.lib.torch.from_numpy(values))

    def ptr(self, a) -> int:
        return self.lib.ptr(a)

    def is_array(self, x: Any) -> bool:
        return self.lib.is_array(x)

    def view(self, a, dtype: str):
        """``a``'s bytes as ``dtype`` ("int8", ...)."""
        return self.lib.view(a, dtype)

    def holds(self, dtype) -> bool:
        """Whether arrays of ``dtype`` exist here (CuPy has no bfloat16)."""
        return not (self.lib.name == "cupy" and np.dtype(dtype).name == "bfloat16")

    def assert_result(self, a, like, dtype: str, shape) -> None:
        """``a`` is a contiguous array of this library, of ``dtype`` and ``shape``, on
        ``like``'s device."""
        self.lib.assert_result(a, like, dtype, tuple(shape))


CPU = CpuBackend("auto")  # the CPU twin of GPU runs, and the default of CPU-only tests

# The params of the ``backend`` fixture: (id, is CUDA). "cupy" and "torch-cuda" carry the
# ``cuda`` mark and skip where CUDA is not usable or the library is missing.
BACKENDS = [("cpu-scalar", False), ("cpu-avx2", False), ("cupy", True), ("torch-cuda", True)]
# The same places without the CPU path split: for behaviour decided before any kernel runs.
ARRAY_BACKENDS = [("cpu", False), ("cupy", True), ("torch-cuda", True)]


def open_backend(name: str):
    """The backend of id ``name``; skips the calling test where it is not usable."""
    if name == "cpu":
        return CPU
    if name.startswith("cpu-"):
        return CpuBackend(name[len("cpu-"):])
    return CudaBackend(open_lib({"torch-cuda": "torch"}.get(name, name)))


def host_matching_cpu(backend, got: Any, cpu_call=None, what: str = "") -> Any:
    """NumPy copies of ``got``, a result (an array or a tuple of arrays) of ``backend``. On
    a GPU backend each must have the bits of the same call on the CPU: ``cpu_call()``, run
    on NumPy arrays by the CPU kernels (the GPU's results equal the CPU's by design)."""
    many = isinstance(got, tuple)
    hosts = tuple(backend.to_numpy(g) for g in (got if many else (got,)))
    if backend.is_cuda and cpu_call is not None:
        with CPU.activate():
            want = cpu_call()
        for i, (h, w) in enumerate(zip(hosts, want if many else (want,))):
            assert_bits(h, np.asarray(w), f"{what}[{i}] ({backend.name} against the CPU)")
    return hosts if many else hosts[0]


def backend_params(names=BACKENDS):
    return [pytest.param(name, id=name, marks=[pytest.mark.cuda] if cuda else [])
            for name, cuda in names]


def misaligned_maker(backend, kinds, *, pad_value: float = np.nan, record: Optional[list] = None):
    """An allocator ``make(values, role, i)`` of slices of padded buffers on ``backend``:
    tensor i's arrays start 16-byte aligned (``kinds[i] == "aligned"``), at an odd element
    offset that is not 16-byte aligned (``"odd"``), or a mix (``"mixed"``: even roles
    aligned), each role at a different offset. The padding holds ``pad_value``; with
    ``record`` each (buffer, offset, size) is appended to it, to check the padding after."""
    def make(values: np.ndarray, role: int, i: int):
        aligned = kinds[i] == "aligned" or (kinds[i] == "mixed" and role % 2 == 0)
        n, itemsize = values.size, values.dtype.itemsize
        host = np.full(n + 48, pad_value, values.dtype)
        buf = backend.asarray(host)
        base = backend.ptr(buf)
        if aligned:  # the first offset >= 4 on a 32-byte boundary
            off = next(k for k in range(4, 48) if (base + k * itemsize) % 32 == 0)
        else:  # the first odd offset >= 2*role+1 off every 16-byte boundary
            off = next(k for k in range(2 * role + 1, 48, 2) if (base + k * itemsize) % 16)
        host[off:off + n] = values.ravel()
        backend.upload(buf, host)
        view = buf[off:off + n].reshape(values.shape)
        if n:
            assert (backend.ptr(view) % 16 == 0) == aligned, "the test's alignment assumption"
        if record is not None:
            record.append((buf, off, n))
        return view
    return make
