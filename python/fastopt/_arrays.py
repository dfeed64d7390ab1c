"""Array adapters and argument checks shared by every public function.

A call names its arrays by role (``params``, ``grads``, state lists...). ``as_list`` turns
each into a Python list aligned with the params; the CPU module converts PyTorch CPU
tensors in them to NumPy views (same memory) through ``to_host_array``. The per-array
structural checks (dtype, shape, contiguity, writability, aliasing) run in the C++
binding, in one pass, because a step over thousands of tensors must not pay Python's
per-attribute cost for each; they raise the same ``TypeError``/``ValueError`` naming the
argument, before any write.
Hyper-parameter checks are in ``_validate``.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import _ext
from ._validate import renamed_entries

ArrayOrList = Any  # an array, or a list/tuple of arrays


def _not_a_host_array(name: str) -> TypeError:
    why = _ext.cuda_unavailable_reason()
    if not why:
        return TypeError(
            f"{name}: is a CUDA array, but this call's other arrays are host "
            "arrays; all arrays of one call must be on the same device"
        )
    return TypeError(
        f"{name}: is a CUDA array, but {why}; pass NumPy arrays (or CPU tensors) to run on the CPU"
    )


def _plain_ndarray(name: str, a: np.ndarray) -> np.ndarray:
    """An ndarray subclass as a plain ndarray view of its memory (np.memmap...), refusing
    the subclasses whose values are not just their memory: a masked array's mask would be
    ignored, np.matrix changes what operators mean."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name}: masked arrays are not supported (the mask would be ignored); pass "
            "a.filled(value) or a.data"
        )
    if isinstance(a, np.matrix):
        raise TypeError(f"{name}: np.matrix is not supported; pass np.asarray(a)")
    return a.view(np.ndarray)


def _not_on_host_or_cuda(name: str, a: Any) -> TypeError:
    """A torch tensor on neither the CPU nor a CUDA device (meta, mps, xla...)."""
    if a.device.type == "meta":
        return TypeError(f"{name}: is a meta tensor, which has no data")
    return TypeError(
        f"{name}: is a tensor on device {a.device.type!r}; fastopt runs on CPU and CUDA arrays"
    )


def to_host_array(name: str, a: Any) -> Any:
    """A NumPy view of ``a`` sharing its memory; called by the C++ binding for any list
    element that is not an ndarray (ndarray subclasses included). ``name`` is the argument,
    e.g. "grads[3]"."""
    if isinstance(a, np.ndarray):
        return _plain_ndarray(name, a)
    if _is_torch(a):
        if a.device.type != "cpu":
            if a.device.type != "cuda":
                raise _not_on_host_or_cuda(name, a)
            raise _not_a_host_array(name)
        if a.is_neg() or a.is_conj():
            raise ValueError(
                f"{name}: is a {'negative' if a.is_neg() else 'conjugate'} view; call "
                f".resolve_{'neg' if a.is_neg() else 'conj'}() first"
            )
        if a.dtype == sys.modules["torch"].bfloat16:  # NumPy has none: its bits viewed
            try:
                import ml_dtypes
            except ImportError:
                raise TypeError(
                    f"{name}: a bfloat16 tensor is read here as an ml_dtypes.bfloat16 "
                    "array: install ml_dtypes (or step it with fastopt.torch or the "
                    "functional steps, which take bfloat16 tensors as they are)"
                ) from None
            bits = a.detach().view(sys.modules["torch"].int16)  # (shares memory)
            return bits.numpy().view(ml_dtypes.bfloat16)
        try:
            return a.detach().numpy()  # shares memory; writes land in the tensor
        except (TypeError, RuntimeError) as exc:  # a dtype NumPy has not
            raise TypeError(f"{name}: a {a.dtype} tensor has no NumPy view ({exc})") from None
    if on_device(a):
        raise _not_a_host_array(name)
    raise TypeError(
        f"{name}: expected a NumPy array or a PyTorch CPU tensor, got {type(a).__name__}"
    )


# ---- CUDA arrays --------------------------------------------------------------------------

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _is_torch(a: Any) -> bool:
    """Whether ``a`` is a torch tensor, a subclass's (a user's, from any module) included
    (not a torch.Size or a dtype, which would pass for an array otherwise). fastopt never
    imports torch: a caller holding a tensor has."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def bump_versions(arrays: Iterable[Any]) -> None:
    """The version counters of the torch tensors among ``arrays`` bumped: they were written
    in place by a kernel (torch's own in-place ops bump theirs)."""
    tensors = [a for a in arrays if _is_torch(a)]
    if tensors:
        increment_versions(tensors)


def increment_versions(tensors: List[Any]) -> None:
    """``torch.autograd.graph.increment_version(tensors)``, a list of torch tensors, through
    the C function it wraps where torch has it (a third of the wrapper's cost)."""
    torch = sys.modules["torch"]
    bump = getattr(torch._C, "_increment_version", None)
    if bump is None:
        torch.autograd.graph.increment_version(tensors)
    else:
        bump(tensors)


def refuse_inference_write(name: str, a: Any) -> None:
    """ValueError for torch tensor ``a``, to be written in place, if it is an inference
    tensor and torch.inference_mode() is off (torch refuses such writes too)."""
    if a.is_inference() and not sys.modules["torch"].is_inference_mode_enabled():
        raise ValueError(
            f"{name}: is an inference tensor, which cannot be updated in place outside "
            "torch.inference_mode()"
        )


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.startswith("cupy")


def on_device(a: Any) -> bool:
    """Whether ``a`` is a CUDA array: a PyTorch CUDA tensor, or an object exposing
    ``__cuda_array_interface__`` (CuPy, Numba) or DLPack with a CUDA device."""
    if isinstance(a, np.ndarray):
        return False
    if _is_torch(a):
        return bool(getattr(a, "is_cuda", False))
    if hasattr(type(a), "__cuda_array_interface__") or "__cuda_array_interface__" in getattr(
        a, "__dict__", ()
    ):
        return True
    dlpack_device = getattr(a, "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            return int(dlpack_device()[0]) in _DLPACK_CUDA
        except Exception:  # a producer that cannot say: not ours to run
            return False
    return False


_torch_registered = False


def _register_torch(cuda_module: Any) -> None:
    """Tell the CUDA binding torch.Tensor and its dtypes (fastopt never imports torch)."""
    global _torch_registered
    import torch

    cuda_module.set_torch_types(
        torch.Tensor,
        (
            torch.float32,
            torch.float64,
            torch.float16,
            torch.bfloat16,
            torch.int8,
            torch.uint8,
            torch.bool,
        ),
    )
    _torch_registered = True


Roles = Sequence[Tuple[str, Optional[Sequence[Any]], bool]]
UNALIASED = "arrays updated in place must not alias"


def _flat(roles: Roles) -> Tuple[List[Any], List[bool], List[Tuple[str, int]]]:
    """``roles``' arrays in one list, with their written flags and (role, index) places."""
    arrays: List[Any] = []
    written: List[bool] = []
    places: List[Tuple[str, int]] = []
    for role, items, writes in roles:
        for i, a in enumerate(items or ()):
            if a is not None:
                arrays.append(a)
                written.append(writes)
                places.append((role, i))
    return arrays, written, places


def check_apart(
    roles: Roles,
    name: Callable[[str, int], str] = lambda role, i: f"{role}[{i}]",
    why: str = UNALIASED,
) -> None:
    """The aliasing check across the kernel calls of one step, where a step is several
    (8-bit state beside float32 state, buckets of other step counts or masks...): each call
    checks its own arrays only, and the calls do not run in the params' order, so an
    array one call writes must not share memory with any array of another either, as
    within one call; else a ValueError naming both, before anything is written.
    ``roles``: (role, its arrays -- None entries skipped -- or None, written); ``name(role,
    i)`` names an entry; ``why`` ends the message."""
    Apart(roles, name, why)


class Apart:
    """check_apart over arrays a caller keeps from step to step (params, state, masks),
    their memory described once; ``check`` then takes each step's new arrays (grads)
    against them, at the cost of describing those alone."""

    def __init__(
        self,
        roles: Roles,
        name: Callable[[str, int], str] = lambda role, i: f"{role}[{i}]",
        why: str = UNALIASED,
    ):
        arrays, written, self.places = _flat(roles)
        self.name, self.why = name, why
        self._raise(self._overlap(arrays, written, None, self.places), self.places)
        self.known = _ext._cpu.memory_spans(arrays, written)

    def check(self, roles: Sequence[Tuple[str, Sequence[Any]]]) -> None:
        """``roles``: (role, its arrays, no None among them) read by this step."""
        arrays = [a for _, items in roles for a in items]
        places = lambda: _flat([(role, items, False) for role, items in roles])[2]  # noqa: E731
        hit = self._overlap(arrays, [False] * len(arrays), self.known, places)
        if hit is not None:
            self._raise(hit, places() + self.places)

    def _overlap(
        self,
        arrays: List[Any],
        written: List[bool],
        known: Optional[bytes],
        places: Any,  # the arrays' places, or a function making them
    ) -> Optional[Tuple[int, int]]:
        """first_overlap, with an array it cannot describe ("arrays[3]: ...") named as the
        caller knows it."""
        try:
            return _ext._cpu.first_overlap(arrays, written, known)
        except (TypeError, ValueError) as exc:
            where = places() if callable(places) else places
            raise renamed_entries(exc, lambda _, k: self.name(*where[k])) from None

    def _raise(self, hit: Optional[Tuple[int, int]], places: List[Tuple[str, int]]) -> None:
        if hit is not None:
            (role, i), (other, j) = places[hit[1]], places[hit[0]]
            raise ValueError(
                f"{self.name(role, i)} overlaps {self.name(other, j)} in memory; {self.why}"
            )


SHARED_GRADS_CLIPPED = (
    "max_grad_norm clips as clip_grad_norm_ does, which takes grads that do not share "
    "memory (a shared grad would count twice in the norm and be scaled once)"
)


def release_device_caches() -> None:
    """Empties torch's and CuPy's GPU caches of their unused blocks. The CUDA module calls
    it when its scratch memory (the CUDA runtime's stream-ordered pool, which those caching
    allocators do not draw from) ran out, then tries the allocation once more: a training
    loop whose framework has cached most of the GPU gets its clipping, Adafactor, Newton,
    pruning and quantization scratch from what the cache held idle."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def stream_handle(stream: Any, first: Any) -> int:
    """The CUDA stream a call runs on, as an integer handle: ``stream`` if given (an int, a
    CuPy stream, a PyTorch stream, or anything with ``cuda_stream`` / ``ptr``), else the
    current stream of the library that produced ``first`` (PyTorch's or CuPy's), else the
    stream a ``__cuda_array_interface__`` names, else 0 (the default stream)."""
    if stream is not None:
        if isinstance(stream, bool):
            raise TypeError("stream: expected an int handle or a CuPy/PyTorch stream, got bool")
        if isinstance(stream, numbers.Integral):
            if int(stream) < 0:
                raise ValueError(f"stream: must be a handle >= 0, got {int(stream)}")
            return int(stream)
        for attr in ("cuda_stream", "ptr"):
            handle = getattr(stream, attr, None)
            if isinstance(handle, numbers.Integral) and not isinstance(handle, bool):
                return int(handle)
        raise TypeError(
            f"stream: expected an int handle or a CuPy/PyTorch stream, got {type(stream).__name__}"
        )
    if _is_torch(first):
        import torch

        return int(torch.cuda.current_stream(first.device).cuda_stream)
    if _is_cupy(first):
        import cupy

        with first.device:
            return int(cupy.cuda.get_current_stream().ptr)
    cai = getattr(first, "__cuda_array_interface__", None)
    if isinstance(cai, dict) and cai.get("stream") is not None:
        return int(cai["stream"])
    return 0


def backend(
    plist: List[Any], stream: Any, plan: Any = None, name: str = "params"
) -> Tuple[Any, Dict[str, Any]]:
    """The compiled module that runs a call whose ``name`` argument is ``plist`` (by where
    ``plist[0]`` lives) and the extra arguments it takes."""
    if not plist:  # nothing to do, wherever it would run
        return _ext._cpu, {}
    first = plist[0]
    if not on_device(first):
        if stream is not None:
            raise ValueError(f"stream: only applies to CUDA arrays; {name} is a host array")
        return _ext._cpu, {}
    why = _ext.cuda_unavailable_reason()
    if why:
        raise TypeError(f"{name}: is a CUDA array, but {why}")
    if not _torch_registered and "torch" in sys.modules:
        _register_torch(_ext._cuda)
    return _ext._cuda, {"stream": stream_handle(stream, first), "plan": plan}


def host_array(name: str, a: Any) -> Any:
    """``a`` itself if it is a NumPy array, else its NumPy view (``to_host_array``)."""
    return a if type(a) is np.ndarray else to_host_array(name, a)


def param_array(name: str, a: Any) -> Any:
    """How an optimizer class holds a param: CUDA arrays as given, host arrays as NumPy."""
    return a if on_device(a) else host_array(name, a)


# ---- state arrays of the optimizer classes: the params' library and device -----------------


def state_like(name: str, a: Any, bfloat16: bool = False) -> Any:
    """A zeroed C-contiguous state array shaped like param ``a``, from the same library on
    the same device: bfloat16 when asked (NumPy through ml_dtypes; not for float64 params),
    else float32 for float16/bfloat16 params (the kernels' state type), else ``a``'s dtype.
    Device params must be PyTorch tensors or CuPy arrays."""
    if bfloat16 and dtype_name(a) == "float64":
        raise ValueError(
            f"state_dtype: bfloat16 state is for float32 and 16-bit params; {name} is float64"
        )
    if isinstance(a, np.ndarray):
        if bfloat16:
            import ml_dtypes

            return np.zeros(a.shape, ml_dtypes.bfloat16)
        half = dtype_name(a) in ("float16", "bfloat16")
        return np.zeros(a.shape, np.float32 if half else a.dtype)
    if _is_torch(a):
        import torch

        dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        if bfloat16:
            dtype = torch.bfloat16
        return torch.zeros(tuple(a.shape), dtype=dtype, device=a.device)
    if bfloat16:
        raise TypeError(
            f"{name}: bfloat16 state needs NumPy or PyTorch arrays ({type(a).__name__} "
            "has no bfloat16)"
        )
    if _is_cupy(a):
        import cupy

        dtype = np.float32 if a.dtype == np.float16 else a.dtype
        with a.device:
            return cupy.zeros(a.shape, dtype)
    raise TypeError(
        f"{name}: the optimizer classes allocate state with PyTorch or CuPy; "
        f"{type(a).__name__} arrays can be stepped with the functional API"
    )


def zeros_from(like: Any, shape: Tuple[int, ...], dtype: str) -> Any:
    """A zeroed C-contiguous array of ``dtype`` ("uint8", "float32", ...) and ``shape`` from
    array ``like``'s library (NumPy, PyTorch or CuPy) on its device."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype)
    if _is_torch(like):
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)
    import cupy

    with like.device:
        return cupy.zeros(shape, dtype)


def device_empty(like: Any, shape: Tuple[int, ...], dtype: str, stream: int) -> Any:
    """An uninitialised C-contiguous CUDA array of ``dtype`` ("int8", "float32", ...) from
    ``like``'s library (PyTorch or CuPy) on its device, allocated on ``stream`` (the one
    the call runs on): the library's caching allocator may then reuse its memory only
    after the work queued there."""
    current = stream == stream_handle(None, like)
    if _is_torch(like):
        import torch

        make = lambda: torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)  # noqa: E731
        if current:
            return make()
        with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=like.device)):
            return make()
    if _is_cupy(like):
        import cupy

        with like.device:
            if current:
                return cupy.empty(shape, dtype)
            with cupy.cuda.ExternalStream(stream):
                return cupy.empty(shape, dtype)
    raise TypeError(
        f"{type(like).__name__}: fastopt allocates results with PyTorch or CuPy; "
        "pass out= for other CUDA arrays"
    )


def current_stream(like: Any) -> Any:
    """The current stream object of PyTorch or CuPy array ``like``'s library and device."""
    if _is_torch(like):
        import torch

        return torch.cuda.current_stream(like.device)
    import cupy

    with like.device:
        return cupy.cuda.get_current_stream()


def wait_for_stream(like: Any, stream: Any = None) -> None:
    """Blocks the host until the work queued so far on ``stream`` (default: the current
    stream of ``like``'s library) on CUDA array ``like``'s device has finished."""
    assert _ext._cuda is not None  # ``like`` is a CUDA array that ran a kernel
    _ext._cuda.synchronize(like, stream_handle(stream, like))


def to_numpy(a: Any) -> np.ndarray:
    """A host copy of a PyTorch or CuPy CUDA array (queued on the library's current stream:
    wait for the stream that wrote ``a`` first)."""
    if _is_torch(a):
        return a.detach().cpu().numpy()
    return a.get()


def fill(a: Any, value: float) -> None:
    if _is_torch(a):
        a.fill_(value)
    else:
        a.fill(value)


def clone(a: Any) -> Any:
    return a.clone() if _is_torch(a) else a.copy()


def float32_copy(a: Any) -> Any:
    """A new float32 array with ``a``'s values, from its library on its device."""
    if _is_torch(a):
        import torch

        return a.detach().to(torch.float32, copy=True)
    return a.astype(np.float32)  # NumPy (ml_dtypes bfloat16 too) and CuPy: a new array


def dtype_name(a: Any) -> str:
    """ "float32", ... for NumPy, CuPy and PyTorch arrays alike."""
    if _is_torch(a):
        return str(a.dtype).replace("torch.", "")
    return np.dtype(a.dtype).name


def staged(name: str, like: Any, src: Any) -> Any:
    """A new array of ``like``'s library, device, shape and dtype holding ``src``'s values
    (a NumPy, PyTorch or CuPy array, or a nested list): the staged copy of a state entry
    being loaded, which then goes into ``like`` with a copy that cannot fail. A ``src`` of
    another shape or dtype, or one that cannot be read (a meta, sparse or negative-view
    tensor, a masked array), raises naming ``name``."""
    if isinstance(src, np.ndarray) and type(src) is not np.ndarray:
        src = _plain_ndarray(name, src)
    elif not hasattr(src, "shape") or not hasattr(src, "dtype"):
        try:
            src = np.asarray(src)
        except (TypeError, ValueError) as exc:  # a ragged list, say
            raise TypeError(f"{name}: expected an array, got {type(src).__name__}: {exc}") from None
    shape, dtype = tuple(src.shape), dtype_name(src)
    if shape != tuple(like.shape) or dtype != dtype_name(like):
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)} {dtype_name(like)}, got {shape} {dtype}"
        )
    try:
        if isinstance(like, np.ndarray):
            if _is_torch(src):
                src = src.detach().cpu().resolve_neg().numpy()
            elif _is_cupy(src):
                src = src.get()
            return np.array(src, dtype=like.dtype, order="C", copy=True)
        if _is_torch(like):
            import torch

            out = torch.empty_like(like, memory_format=torch.contiguous_format)
            out.copy_(src if isinstance(src, torch.Tensor) else torch.as_tensor(np.asarray(src)))
            return out
        import cupy

        with like.device:
            return cupy.array(src if _is_cupy(src) else np.asarray(src), dtype=like.dtype)
    except Exception as exc:  # the library's own error for an array it cannot copy
        raise TypeError(f"{name}: cannot be copied from ({type(exc).__name__}: {exc})") from None


def copy_into(dst: Any, src: Any) -> None:
    """dst[...] = src across libraries (NumPy source into a device array included)."""
    if isinstance(dst, np.ndarray):
        if _is_torch(src):
            src = src.detach().cpu().numpy()
        elif _is_cupy(src):
            src = src.get()
        np.copyto(dst, np.asarray(src))
    elif _is_torch(dst):
        import torch

        dst.copy_(src if isinstance(src, torch.Tensor) else torch.as_tensor(np.asarray(src)))
    else:
        import cupy

        cupy.copyto(dst, src if _is_cupy(src) else cupy.asarray(src))


def as_list(name: str, value: Any, listed: bool) -> List[Any]:
    """``value`` as a list aligned with the params (``listed``: params was a list).
    Elements that are not ndarrays are converted by the C++ binding through
    ``to_host_array`` only when met, so NumPy lists pay nothing here."""
    if listed:
        if not isinstance(value, (list, tuple)):
            raise TypeError(
                f"{name}: params is a list, so {name} must be a list of arrays, "
                f"got {type(value).__name__}"
            )
        return value if type(value) is list else list(value)
    if isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name}: params is a single array, so {name} must be one array, got a "
            f"{type(value).__name__}"
        )
    return [value]


# The C++ binding converts list elements that are not ndarrays through this.
_ext._cpu.set_array_adapter(to_host_array)
