"""Second order: batched damped Newton by Cholesky.

Every leading index of the arrays is one independent problem: params and grads have
shape (..., n), hessians (..., n, n). Only the lower triangle of each Hessian is read and
the Hessians are never written. float32 systems are factored and solved in float32
(accumulating in float32); float64 in float64.

CUDA arrays (PyTorch CUDA tensors, CuPy arrays) run on the GPU, on ``stream=`` (default:
the library's current stream): for n <= 64 one warp per system with the matrix in shared
memory, in the CPU's order of operations (the same results, bit for bit); for larger n
one thread block per system. ``cholesky_solve`` and ``on_failure="raise"`` wait for the
stream once, to learn which systems solved; ``"skip"`` does not wait and returns the
mask as a device bool array (written on that stream).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _arrays
from ._arrays import host_array, real
from ._ext import _cpu

__all__ = ["NotPositiveDefiniteError", "newton_", "cholesky_solve"]


class NotPositiveDefiniteError(ValueError):
    """(H + damping*I) is not positive definite for the systems in ``.indices`` (batch
    indices, as tuples over the leading dimensions)."""

    def __init__(self, indices: list, total: int):
        self.indices = indices
        shown = ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")
        super().__init__(f"hessians: {len(indices)} of {total} systems are not positive "
                         f"definite (add damping, or on_failure='skip'): {shown}")


def _check_dtypes_and_shapes(dtypes: Dict[str, str], shapes: Dict[str, Tuple[int, ...]]) -> int:
    """The checks shared by host and CUDA arrays, by role ("hessians", "grads", and "params"
    when given; dtypes as strings, ">f4" for a non-native one): float32 or float64, one
    dtype for all, grads (..., n), hessians (..., n, n), params like grads. Returns n."""
    for name, dtype in dtypes.items():
        if dtype not in ("float32", "float64"):
            raise TypeError(f"{name}: dtype {dtype} is not supported (float32 or float64)")
        if dtype != dtypes["hessians"]:
            raise TypeError(f"{name}: dtype {dtype} differs from hessians' {dtypes['hessians']}")
    gshape, hshape = shapes["grads"], shapes["hessians"]
    if len(gshape) < 1:
        raise ValueError("grads: expected shape (..., n), got a 0-d array")
    n = gshape[-1]
    if n < 1:
        raise ValueError(f"grads: n = grads.shape[-1] must be >= 1, got shape {gshape}")
    if hshape != gshape + (n,):
        raise ValueError(f"hessians: expected shape {gshape + (n,)} for grads of shape "
                         f"{gshape}, got {hshape}")
    if "params" in shapes and shapes["params"] != gshape:
        raise ValueError(f"params: shape {shapes['params']} does not match grads' {gshape}")
    return n


def _check_systems(hessians: Any, grads: Any, params: Optional[Any] = None
                   ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], int, int]:
    """Validate shapes, dtypes, layout and aliasing; return the arrays, batch and n."""
    H = host_array("hessians", hessians)
    g = host_array("grads", grads)
    p = None if params is None else host_array("params", params)
    named = [("hessians", H), ("grads", g)] + ([] if p is None else [("params", p)])
    n = _check_dtypes_and_shapes({name: str(a.dtype) for name, a in named},
                                 {name: a.shape for name, a in named})
    for name, a in named:
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous")
        if not a.flags.aligned:
            raise ValueError(f"{name}: data is not aligned to its dtype")
    if p is not None:
        if not p.flags.writeable:
            raise ValueError("params: is read-only but is updated in place")
        for name, a in named[:2]:
            if p.size and a.size and np.may_share_memory(p, a):
                raise ValueError(f"params: overlaps {name} in memory")
    batch = g.size // n
    return H, g, p, batch, n


def _device_systems(cuda: Any, hessians: Any, grads: Any, params: Optional[Any] = None
                    ) -> Tuple[str, Tuple[int, ...], int, int]:
    """The checks of _check_systems for CUDA arrays (layout, devices and aliasing are
    checked by the binding): (dtype, grads' shape, batch, n)."""
    named = [("hessians", hessians), ("grads", grads)] + ([] if params is None else [("params", params)])
    info = {name: cuda.describe(a, name) for name, a in named}
    n = _check_dtypes_and_shapes({name: dtype for name, (dtype, _, _) in info.items()},
                                 {name: tuple(shape) for name, (_, shape, _) in info.items()})
    gshape = tuple(info["grads"][1])
    return info["hessians"][0], gshape, math.prod(gshape) // n, n


def _device_solve(cuda: Any, handle: int, hessians: Any, grads: Any, dtype: str,
                  gshape: Tuple[int, ...], batch: int, n: int, damping: float) -> Tuple[Any, Any]:
    """Phase 1 on the GPU: (d, solved: a bool array shaped like the batch)."""
    d = _arrays.device_empty(grads, gshape, dtype, handle)
    solved = _arrays.device_empty(grads, gshape[:-1], "bool", handle)
    if batch:
        cuda.newton_solve(hessians, grads, d, solved, batch, n, damping, handle)
    return d, solved


def _solved_on_host(cuda: Any, handle: int, solved: Any) -> np.ndarray:
    """The solved flags, flattened, on the host (waits for the call's stream)."""
    cuda.synchronize(solved, handle)
    return _arrays.to_numpy(solved).reshape(-1)


def _failed_indices(solved: np.ndarray, batch_shape: Tuple[int, ...]) -> list:
    return [tuple(int(i) for i in np.unravel_index(k, batch_shape))
            for k in np.flatnonzero(~solved)]


def cholesky_solve(hessians: Any, grads: Any, *, damping: float = 0.0,
                   stream: Any = None) -> Any:
    """d = (H + damping*I)^-1 g for every system, by Cholesky; a new array shaped like
    grads. Raises ``NotPositiveDefiniteError`` naming the systems that failed."""
    damping = real("damping", damping, lo=0.0)
    kernels, extra = _arrays.backend([hessians], stream, name="hessians")
    if kernels is not _cpu:
        dtype, gshape, batch, n = _device_systems(kernels, hessians, grads)
        d, solved = _device_solve(kernels, extra["stream"], hessians, grads, dtype, gshape,
                                  batch, n, damping)
        ok = _solved_on_host(kernels, extra["stream"], solved)
        if not ok.all():
            raise NotPositiveDefiniteError(_failed_indices(ok, gshape[:-1]), batch)
        return d
    H, g, _, batch, n = _check_systems(hessians, grads)
    d = np.empty_like(g)
    if batch == 0:
        return d
    solved = _cpu.newton_solve(H, g, d, batch, n, damping)
    if not solved.all():
        raise NotPositiveDefiniteError(_failed_indices(solved, g.shape[:-1]), batch)
    return d


def newton_(params: Any, grads: Any, hessians: Any, *, lr: float = 1.0, damping: float = 0.0,
            on_failure: str = "raise", stream: Any = None) -> Optional[Any]:
    """Damped Newton step in place: solve (H + damping*I) d = g by Cholesky, p <- p - lr*d.

    params, grads (..., n) and hessians (..., n, n): one independent system per leading
    index; only the lower triangle of H is read. If a system is not positive definite:
    ``on_failure="raise"`` raises ``NotPositiveDefiniteError`` (listing the batch indices)
    and changes no parameter at all; ``"skip"`` updates the systems that solved, leaves the
    others untouched and returns the boolean mask (shape ``params.shape[:-1]``) of solved
    systems. Returns None with "raise".
    """
    lr = real("lr", lr, lo=0.0)
    damping = real("damping", damping, lo=0.0)
    if on_failure not in ("raise", "skip"):
        raise ValueError(f"on_failure: expected 'raise' or 'skip', got {on_failure!r}")
    kernels, extra = _arrays.backend([params], stream)
    if kernels is not _cpu:
        return _device_newton(kernels, extra["stream"], params, grads, hessians, lr, damping,
                              on_failure)
    H, g, p, batch, n = _check_systems(hessians, grads, params)
    if batch == 0:
        return None if on_failure == "raise" else np.ones(g.shape[:-1], dtype=bool)
    d = np.empty_like(g)
    solved = _cpu.newton_solve(H, g, d, batch, n, damping)
    if on_failure == "raise":
        if not solved.all():
            raise NotPositiveDefiniteError(_failed_indices(solved, g.shape[:-1]), batch)
        _cpu.newton_apply(p, d, None, batch, n, lr)
        return None
    _cpu.newton_apply(p, d, solved, batch, n, lr)
    return solved.reshape(g.shape[:-1])


def _device_newton(cuda: Any, handle: int, params: Any, grads: Any, hessians: Any, lr: float,
                   damping: float, on_failure: str) -> Optional[Any]:
    dtype, gshape, batch, n = _device_systems(cuda, hessians, grads, params)
    cuda.check_arrays([("params", params)], [("grads", grads), ("hessians", hessians)], handle)
    d, solved = _device_solve(cuda, handle, hessians, grads, dtype, gshape, batch, n, damping)
    if batch == 0:
        return None if on_failure == "raise" else solved
    if on_failure == "raise":
        ok = _solved_on_host(cuda, handle, solved)
        if not ok.all():
            raise NotPositiveDefiniteError(_failed_indices(ok, gshape[:-1]), batch)
        cuda.newton_apply(params, d, None, batch, n, lr, handle)
        return None
    cuda.newton_apply(params, d, solved, batch, n, lr, handle)
    return solved
