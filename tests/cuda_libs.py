"""The array libraries of the GPU tests (test_cuda.py, test_cuda_quant.py, test_cuda_newton.py).

``TorchLib`` (PyTorch CUDA tensors) and ``CupyLib`` (CuPy arrays) have the same methods, so a
test body written against ``lib`` runs once per library: NumPy data in and out, views,
streams, delayed writes, device facts. ``lib_fixture`` makes the fixtures that hand a test
one of them; each param carries the ``cuda`` mark, and the test skips where CUDA is not
usable or the library is missing. ``FakeCudaArray`` is for the tests that need no GPU.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import pytest

import fastopt
from fastopt import _ext

try:
    import ml_dtypes
    BF16: Optional[np.dtype] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases skip
    BF16 = None

LIB_NAMES = ["cupy", "torch"]
SPIN_CYCLES = 200_000_000  # ~0.1 s of GPU clock: far longer than queuing a call takes
# CupyLib.write_late's delay: 256 device copies of 256 MiB (64 GiB), tens of ms
DELAY_BYTES, DELAY_COPIES = 256 << 20, 256


def _fill_until_full(allocate, out_of_memory) -> None:
    """Allocates blocks of 1 GiB, then halves, down to 512 KiB (the caches' smallest
    segments are 2 MiB), until none fits; the blocks are freed on return, into the
    library's cache."""
    held, size = [], 1 << 30
    while size >= 1 << 19:
        try:
            held.append(allocate(size))
        except out_of_memory:
            size //= 2
    del held


class TorchLib:
    """PyTorch CUDA tensors."""

    name = "torch"

    def __init__(self, torch):
        self.torch = torch
        self.dtypes = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                       np.dtype(np.float64): torch.float64}

    @staticmethod
    def open() -> "TorchLib":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip(f"torch {torch.__version__} has no usable CUDA")
        return TorchLib(torch)

    # ---- data in and out

    def to_device(self, a: np.ndarray, device: Optional[int] = None):
        """A CUDA copy of NumPy ``a`` on ``device`` (default: the current device);
        bfloat16 arrives as ml_dtypes.bfloat16 and travels as its int16 bits."""
        a = np.ascontiguousarray(a)
        where = "cuda" if device is None else f"cuda:{device}"
        if BF16 is not None and a.dtype == BF16:
            bits = self.torch.from_numpy(a.view(np.int16)).to(where)
            return bits.view(self.torch.bfloat16)
        return self.torch.from_numpy(a).to(where)

    def to_host(self, t, sync: bool = False) -> np.ndarray:
        """A NumPy copy of tensor ``t`` (CUDA or CPU). The copy is queued on the current
        stream, so it sees only what was queued there (and on blocking streams): enough to
        check that a call waited for its own stream. ``sync=True`` first waits for all work
        queued on the current device, on any stream."""
        if sync:
            self.torch.cuda.synchronize()
        t = t.detach().cpu()
        if t.dtype == self.torch.bfloat16:
            return t.view(self.torch.int16).numpy().view(BF16).copy()
        return t.numpy().copy()

    def host_array(self, a: np.ndarray):
        """A host array of this library holding a copy of ``a``: a CPU tensor."""
        return self.torch.from_numpy(np.array(a))

    def full(self, n: int, value: float, dtype):
        """A 1-D CUDA tensor of ``n`` elements set to ``value``."""
        return self.torch.full((n,), value, dtype=self.dtypes[np.dtype(dtype)], device="cuda")

    def copy(self, dst, src) -> None:
        """dst <- src, on the current stream."""
        dst.copy_(src)

    def view(self, t, dtype: str):
        """``t``'s bytes as ``dtype`` ("int8", ...)."""
        return t.view(getattr(self.torch, dtype))

    def ptr(self, t) -> int:
        return t.data_ptr()

    def is_array(self, x) -> bool:
        return isinstance(x, self.torch.Tensor) and x.is_cuda

    def assert_result(self, a, like, dtype: str, shape: Tuple[int, ...]) -> None:
        """``a`` is a contiguous tensor of ``dtype`` and ``shape`` on ``like``'s device."""
        torch = self.torch
        assert isinstance(a, torch.Tensor), type(a)
        assert a.device == like.device, (a.device, like.device)
        assert a.dtype == getattr(torch, dtype), a.dtype
        assert tuple(a.shape) == shape and a.is_contiguous()

    # ---- streams

    def side_stream(self):
        return self.torch.cuda.Stream()  # non-blocking: no implicit sync with stream 0

    def handle(self, stream) -> int:
        return stream.cuda_stream

    def current(self, stream):
        """A context manager making ``stream`` the current stream."""
        return self.torch.cuda.stream(stream)

    def spin(self) -> None:
        """Queue ~0.1 s of spinning on the current stream."""
        self.torch.cuda._sleep(SPIN_CYCLES)

    def write_late(self, stream, pairs: Sequence[Tuple[Any, Any]]) -> None:
        """Queue on ``stream`` ~0.1 s of spinning, then dst <- src for each pair."""
        with self.current(stream):
            self.spin()
            for dst, src in pairs:
                self.copy(dst, src)

    def synchronize(self) -> None:
        """Wait for all work queued on the current device."""
        self.torch.cuda.synchronize()

    # ---- the device

    def free_memory(self) -> int:
        return self.torch.cuda.mem_get_info()[0]

    def hold_device_in_cache(self) -> None:
        """Allocates until the device is full, then frees it all: torch's cache holds
        the device's memory, idle; ``release_cache`` gives it back."""
        _fill_until_full(lambda n: self.torch.empty(n, dtype=self.torch.uint8, device="cuda"),
                         self.torch.cuda.OutOfMemoryError)

    def release_cache(self) -> None:
        self.torch.cuda.empty_cache()

    def device_count(self) -> int:
        return self.torch.cuda.device_count()


class CupyLib:
    """CuPy arrays.

    Runtime compilation, on purpose: to_device, to_host (of C-contiguous arrays),
    host_array, view, assert_result, the stream methods, write_late and synchronize launch
    no CuPy kernel -- host/device copies only -- so the quantization and Newton tests, which
    use nothing else, need no NVRTC. ``spin`` (a RawKernel), ``full`` (a fill kernel) and
    ``copy`` (cupy.copyto: a kernel unless a memcpy does) compile kernels: test_cuda only."""

    name = "cupy"
    _SPIN = r"""
    extern "C" __global__ void fastopt_test_spin(long long cycles) {
        const long long start = clock64();
        while (clock64() - start < cycles) {}
    }"""

    def __init__(self, cupy):
        self.cupy = cupy
        self._spin = None  # the RawKernel of spin(), compiled on its first launch
        self._delay = None  # write_late's two device buffers, kept: queued copies may use them

    @staticmethod
    def open() -> "CupyLib":
        cupy = pytest.importorskip("cupy")
        if not cupy.cuda.is_available():
            pytest.skip("CuPy sees no usable CUDA device")
        return CupyLib(cupy)

    # ---- data in and out

    def to_device(self, a: np.ndarray, device: Optional[int] = None):
        """A CUDA copy of NumPy ``a`` on ``device`` (default: the current device). CuPy has
        no bfloat16: such a test skips (test_cuda's fixtures pair bfloat16 with torch only)."""
        if BF16 is not None and a.dtype == BF16:
            pytest.skip("CuPy has no bfloat16")
        a = np.ascontiguousarray(a)
        if device is None:
            return self.cupy.asarray(a)
        with self.cupy.cuda.Device(device):
            return self.cupy.asarray(a)

    def to_host(self, a, sync: bool = False) -> np.ndarray:
        """A NumPy copy of CuPy array ``a`` (or of NumPy ``a``, host_array's kind). The copy
        is queued on the current stream, so it sees only what was queued there (and on
        blocking streams): enough to check that a call waited for its own stream.
        ``sync=True`` first waits for all work queued on ``a``'s device, on any stream."""
        if isinstance(a, self.cupy.ndarray):
            if sync:
                a.device.synchronize()
            return self.cupy.asnumpy(a)
        return a.copy()

    def host_array(self, a: np.ndarray) -> np.ndarray:
        """A host array of this library holding a copy of ``a``: a NumPy array."""
        return np.array(a)

    def full(self, n: int, value: float, dtype):
        """A 1-D CUDA array of ``n`` elements set to ``value``."""
        return self.cupy.full(n, value, dtype=dtype)

    def copy(self, dst, src) -> None:
        """dst <- src, on the current stream."""
        self.cupy.copyto(dst, src)

    def view(self, a, dtype: str):
        """``a``'s bytes as ``dtype`` ("int8", ...)."""
        return a.view(np.dtype(dtype))

    def ptr(self, a) -> int:
        return a.data.ptr

    def is_array(self, x) -> bool:
        return isinstance(x, self.cupy.ndarray)

    def assert_result(self, a, like, dtype: str, shape: Tuple[int, ...]) -> None:
        """``a`` is a C-contiguous CuPy array of ``dtype`` and ``shape`` on ``like``'s device."""
        assert isinstance(a, self.cupy.ndarray), type(a)
        assert a.device.id == like.device.id, (a.device, like.device)
        assert a.dtype == np.dtype(dtype), a.dtype
        assert a.shape == shape and a.flags.c_contiguous

    # ---- streams

    def side_stream(self):
        return self.cupy.cuda.Stream(non_blocking=True)  # no implicit sync with stream 0

    def handle(self, stream) -> int:
        return stream.ptr

    def current(self, stream):
        """A context manager making ``stream`` the current stream."""
        return stream  # a CuPy stream is the context manager making it current

    def spin(self) -> None:
        """Queue ~0.1 s of spinning on the current stream (a RawKernel: compiled by NVRTC)."""
        if self._spin is None:
            self._spin = self.cupy.RawKernel(self._SPIN, "fastopt_test_spin")
        self._spin((1,), (1,), (np.int64(SPIN_CYCLES),))

    def write_late(self, stream, pairs: Sequence[Tuple[Any, Any]]) -> None:
        """Queue on ``stream`` tens of ms of device-to-device copies, then dst <- src for
        each pair (a byte copy). Copies only, no kernel, unlike ``spin``: the quantization
        and Newton tests need no runtime compilation."""
        if self._delay is None:
            self._delay = [self.cupy.empty(DELAY_BYTES, np.uint8) for _ in range(2)]
        a, b = self._delay
        for _ in range(DELAY_COPIES):
            b.data.copy_from_device_async(a.data, DELAY_BYTES, stream)
        for dst, src in pairs:
            assert dst.nbytes == src.nbytes
            dst.data.copy_from_device_async(src.data, src.nbytes, stream)

    def synchronize(self) -> None:
        """Wait for all work queued on the current device."""
        self.cupy.cuda.Device().synchronize()

    # ---- the device

    def free_memory(self) -> int:
        return self.cupy.cuda.runtime.memGetInfo()[0]

    def hold_device_in_cache(self) -> None:
        """Allocates until the device is full, then frees it all: CuPy's memory pool holds
        the device's memory, idle; ``release_cache`` gives it back."""
        _fill_until_full(lambda n: self.cupy.empty(n, dtype=np.uint8),
                         self.cupy.cuda.memory.OutOfMemoryError)

    def release_cache(self) -> None:
        self.cupy.get_default_memory_pool().free_all_blocks()

    def device_count(self) -> int:
        return self.cupy.cuda.runtime.getDeviceCount()


# ---- fixtures -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def open_lib(name: str):
    """The adapter of library ``name`` ("cupy" or "torch"), made once; skips the calling
    test where CUDA is not usable or the library is missing."""
    if not fastopt.cuda_available():
        pytest.skip(_ext.cuda_unavailable_reason())
    return {"torch": TorchLib, "cupy": CupyLib}[name].open()


def lib_fixture(names: Sequence[str] = tuple(LIB_NAMES), scope: str = "function",
                doc: str = "The array library of a GPU test (skips without usable CUDA or "
                           "the library)."):
    """A fixture giving each library of ``names`` in turn (test ids "cupy", "torch"), its
    params marked ``cuda``. Assign it to the fixture's name in the test module:
    ``lib = lib_fixture()``."""
    def fixture(request):
        return open_lib(request.param)

    fixture.__doc__ = doc
    return pytest.fixture(scope=scope, params=[pytest.param(n, marks=pytest.mark.cuda)
                                               for n in names])(fixture)


# ---- without a GPU ------------------------------------------------------------------------

class FakeCudaArray:
    """Claims to be a float32 CUDA array of ``shape`` through ``__cuda_array_interface__``
    (a bogus pointer): fastopt must refuse it -- without usable CUDA, or among host arrays
    -- before the pointer is used.

    ``fastopt._arrays.on_device`` looks for the interface in two places, and the tests keep
    both covered: by default it is a property of the class, as on CuPy arrays;
    ``on_instance=True`` makes it an entry of the instance's ``__dict__`` instead, the class
    having none (test_cuda's tests)."""

    def __new__(cls, shape: Tuple[int, ...] = (4, 6), on_instance: bool = False):
        return super().__new__(_FakeOnInstance if on_instance else _FakeOnClass)

    def __init__(self, shape: Tuple[int, ...] = (4, 6), on_instance: bool = False):
        self.shape = tuple(shape)
        if on_instance:
            self.__dict__["__cuda_array_interface__"] = self.interface()

    def interface(self) -> dict:
        return {"shape": self.shape, "typestr": "<f4", "data": (0xDEAD0000, False),
                "strides": None, "version": 3}


class _FakeOnClass(FakeCudaArray):
    @property
    def __cuda_array_interface__(self):
        return self.interface()


class _FakeOnInstance(FakeCudaArray):
    pass
