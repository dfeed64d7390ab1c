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

from typing import Any, Optional, Tuple

import numpy as np

from . import _arrays
from ._kernels import Call
from ._validate import real

__all__ = ["NotPositiveDefiniteError", "newton_", "cholesky_solve"]


class NotPositiveDefiniteError(ValueError):
    """(H + damping*I) is not positive definite for the systems in ``.indices`` (batch
    indices, as tuples over the leading dimensions)."""

    def __init__(self, indices: list, total: int):
        self.indices = indices
        shown = ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")
        super().__init__(
            f"hessians: {len(indices)} of {total} systems are not positive "
            f"definite (add damping, or on_failure='skip'): {shown}"
        )


def _solve(
    call: Call, hessians: Any, grads: Any, params: Optional[Any], damping: float
) -> Tuple[Any, Any, Any, Tuple[int, ...]]:
    """Phase 1: d = (H + damping*I)^-1 g and the solved flags (a bool array shaped like the
    batch) of every system, on the call's device. The kernels check the arrays' dtypes,
    shapes, layout and aliasing (params included, before anything runs). Returns (d,
    solved, params as the kernels take it, the batch shape)."""
    H = call.input("hessians", hessians)[0]
    g, gshape, dtype, _ = call.input("grads", grads)
    p = None if params is None else call.input("params", params)[0]
    d = call.empty(g, gshape, dtype)
    solved = call.empty(g, gshape[:-1], "bool")
    call.kernels.newton_solve(H, g, d, solved, damping, p, call.stream)
    return d, solved, p, gshape[:-1]


def _failed_indices(solved: np.ndarray, batch_shape: Tuple[int, ...]) -> list:
    return [
        tuple(int(i) for i in np.unravel_index(k, batch_shape)) for k in np.flatnonzero(~solved)
    ]


def _raise_unless_all_solved(call: Call, solved: Any, batch_shape: Tuple[int, ...]) -> None:
    ok = call.flags_on_host(solved)
    if not ok.all():
        raise NotPositiveDefiniteError(_failed_indices(ok, batch_shape), ok.size)


def cholesky_solve(hessians: Any, grads: Any, *, damping: float = 0.0, stream: Any = None) -> Any:
    """d = (H + damping*I)^-1 g for every system, by Cholesky; a new array shaped like
    grads. Raises ``NotPositiveDefiniteError`` naming the systems that failed."""
    damping = real("damping", damping, lo=0.0)
    call = Call("hessians", hessians, stream)
    d, solved, _, batch_shape = _solve(call, hessians, grads, None, damping)
    _raise_unless_all_solved(call, solved, batch_shape)
    return d


def newton_(
    params: Any,
    grads: Any,
    hessians: Any,
    *,
    lr: float = 1.0,
    damping: float = 0.0,
    on_failure: str = "raise",
    stream: Any = None,
) -> Optional[Any]:
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
    call = Call("params", params, stream)
    d, solved, p, batch_shape = _solve(call, hessians, grads, params, damping)
    if on_failure == "raise":
        _raise_unless_all_solved(call, solved, batch_shape)
        call.kernels.newton_apply(p, d, None, lr, call.stream)
        _arrays.bump_versions([params])
        return None
    call.kernels.newton_apply(p, d, solved, lr, call.stream)
    _arrays.bump_versions([params])
    return solved
