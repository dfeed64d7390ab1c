"""Where a quantization or Newton call runs, and the few steps around its kernels that
differ between host and CUDA arrays.

``fastopt._cpu`` and ``fastopt._cuda`` take the same arguments for these kernels (the CPU's
``stream`` must be None) and check every size against the arrays they run on, so
``quant.py`` and ``newton.py`` call each kernel once, through ``Call.kernels``. What differs
is here: reading an input's shape and dtype, allocating a result, checking ``out=`` before
anything is written, copying into it, and reading a flag array back on the host.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Optional, Sequence, Tuple, cast

import numpy as np

from . import _arrays
from ._arrays import host_array
from ._ext import _cpu


class Kind:
    """How to hand a result back: as a torch CPU tensor when the caller gave one, else as
    computed (a NumPy array, or a CUDA array of the caller's library)."""

    __slots__ = ("torch",)

    def __init__(self, torch: bool):
        self.torch = torch

    def wrap(self, a: Any) -> Any:
        if not self.torch:
            return a
        import torch

        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


_AS_IS = Kind(False)
_TORCH = Kind(True)


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    """ "float32", ... ("bfloat16" from ml_dtypes); NumPy's spelling (">f4") when not native
    (cached per dtype: ``dtype.name`` costs microseconds)."""
    return dtype.name if dtype.isnative else str(dtype)


def _name(dtype: Any) -> str:
    """A dtype given as a NumPy dtype or its name, as its name."""
    return dtype if isinstance(dtype, str) else _dtype_name(dtype)


def _host(name: str, a: Any, written: bool = False) -> Tuple[np.ndarray, Kind]:
    """A NumPy array sharing ``a``'s memory (a bfloat16 torch tensor through ml_dtypes; an
    input one made contiguous first, a ``written`` one viewed as it is)."""
    if isinstance(a, np.ndarray):
        return a, _AS_IS
    if _arrays._is_torch(a) and a.device.type == "cpu":
        import torch

        if written:
            _arrays.refuse_inference_write(name, a)
        if getattr(a, "dtype", None) == torch.bfloat16:  # NumPy has none: view the bits
            import ml_dtypes

            t = a.detach() if written else a.detach().contiguous()
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), _TORCH
        return host_array(name, a), _TORCH
    return host_array(name, a), _AS_IS


class Call:
    """One call: the compiled module that runs it (by where argument ``name``, ``first``,
    lives) and its stream (None on the host)."""

    __slots__ = ("kernels", "stream", "host")
    kernels: ModuleType  # fastopt._cpu or fastopt._cuda: the same arguments for these kernels
    stream: Optional[int]

    def __init__(self, name: str, first: Any, stream: Any):
        self.host = not _arrays.on_device(first)
        if self.host and stream is None:  # the common case, without backend()'s microseconds
            self.kernels, self.stream = _cpu, None
            return
        self.kernels, extra = _arrays.backend([first], stream, name=name)
        self.stream = extra["stream"]  # backend() raised for a host array

    def input(self, name: str, a: Any) -> Tuple[Any, Tuple[int, ...], str, Kind]:
        """(``a`` as the kernels take it, its shape, its dtype's name, how results go back).
        The kernels check dtype and layout again, on the very buffers they run on."""
        if self.host:
            h, kind = _host(name, a)
            return h, h.shape, _dtype_name(h.dtype), kind
        dtype, shape, _ = self.kernels.describe(a, name, self.stream)
        return a, tuple(shape), dtype, _AS_IS

    def empty(self, like: Any, shape: Tuple[int, ...], dtype: Any) -> Any:
        """A new C-contiguous array of ``dtype`` (a NumPy dtype or its name) on the call's
        device (``like``'s library on the GPU)."""
        if self.host:
            return np.empty(shape, dtype)
        return _arrays.device_empty(like, shape, _name(dtype), cast(int, self.stream))

    def out(
        self,
        name: str,
        out: Any,
        shape: Tuple[int, ...],
        dtype: Any,
        inputs: Sequence[Tuple[str, Any]],
    ) -> Any:
        """``out`` checked whole before anything is written -- on the call's device, shape
        and dtype (a NumPy dtype or its name), C-contiguous, writeable, sharing no memory
        with ``inputs`` ((name, array) as the kernels take them) -- and returned as the
        kernels take it."""
        if self.host:
            o = _host(name, out, written=True)[0]
            if o.shape != shape or o.dtype != dtype:
                raise ValueError(
                    f"{name}: expected shape {shape} and dtype {_name(dtype)}, "
                    f"got {o.shape} {o.dtype}"
                )
            if not o.flags.writeable:
                raise ValueError(f"{name}: must be writeable")
            if not o.flags.c_contiguous:
                raise ValueError(f"{name}: must be C-contiguous")
            if not o.flags.aligned:
                raise ValueError(f"{name}: data is not aligned to its dtype")
            for other, a in inputs:
                if o.size and a.size and np.may_share_memory(o, a):
                    raise ValueError(f"{name}: overlaps {other} in memory")
            return o
        got_dtype, got_shape, _ = self.kernels.describe(out, name, self.stream)
        if tuple(got_shape) != shape or got_dtype != _name(dtype):
            raise ValueError(
                f"{name}: expected shape {shape} and dtype {_name(dtype)}, got "
                f"{tuple(got_shape)} {got_dtype}"
            )
        self.kernels.check_arrays([(name, out)], list(inputs), self.stream)
        return out

    def copy(self, dst: Any, src: Any) -> None:
        """dst <- src, arrays of the call's device of one shape and dtype (on its stream)."""
        if self.host:
            np.copyto(dst, src)
        else:
            self.kernels.copy(dst, src, self.stream)

    def flags_on_host(self, flags: Any) -> np.ndarray:
        """A bool array the kernels wrote, flattened, on the host (on the GPU: waits for the
        call's stream)."""
        if self.host:
            return flags.reshape(-1)
        self.kernels.synchronize(flags, self.stream)
        return _arrays.to_numpy(flags).reshape(-1)
