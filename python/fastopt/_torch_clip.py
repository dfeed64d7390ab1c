"""``fastopt.torch.clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_`` over fastopt's
clipping kernels (fastopt/clip.py), for the grads of PyTorch parameters."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _arrays, _ext, clip
from ._validate import flag


def _host_norm(
    grads: List[torch.Tensor], norm_type: float, writeable: bool
) -> Tuple[float, List[List[torch.Tensor]]]:
    """Host grads, any mix of the four float dtypes: (the norm -- one kernel call per dtype,
    their totals combined in order of first appearance --, the per-dtype lists)."""
    groups: Dict[torch.dtype, List[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    lists = list(groups.values())
    totals = [_ext._cpu.grad_norm_total(gs, True, norm_type, writeable) for gs in lists]
    total = totals[0]
    for t in totals[1:]:  # the kernels' combining rule: NaN-propagating max, or the sum
        if math.isinf(norm_type):
            total = t if t > total or math.isnan(t) else total
        else:
            total += t
    return clip.finish(total, norm_type), lists


_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _result_dtype(grads: List[torch.Tensor]) -> torch.dtype:
    """The norm's dtype, as torch's: the grads' (a complex one's real dtype) promoted."""
    dtype = _REAL.get(grads[0].dtype, grads[0].dtype)
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, _REAL.get(g.dtype, g.dtype))
    return dtype


def _readable(grads: List[torch.Tensor], moduli: bool) -> Tuple[List[torch.Tensor], bool]:
    """The grads as the norm kernels read them, and whether any is a copy (then scaled by
    torch, not through them). A complex grad's norm is that of its elements' moduli, as
    torch's: with ``moduli``, of ``abs()`` (a copy); else (enough for the 2-norm) of its
    parts, the float view of them, written through, the grad is. A negative or conjugate
    view (zero-copy ``-x``, ``x.conj()``) is read through a copy too."""
    if not any(g.is_complex() or g.is_neg() for g in grads):
        return grads, False
    if moduli and any(g.is_complex() for g in grads):
        return [g.abs() if g.is_complex() else g.resolve_neg() for g in grads], True
    copied = any(g.is_neg() or g.is_conj() for g in grads)
    out = [g.resolve_conj().resolve_neg() for g in grads] if copied else grads
    return [torch.view_as_real(g) if g.is_complex() else g for g in out], copied


def _grads_norm(
    grads: List[torch.Tensor], norm_type: float, writeable: bool
) -> Tuple[float, List[List[torch.Tensor]], bool]:
    """Host grads, any mix of the four float and two complex dtypes: (the norm, the lists
    _scale writes through, whether they are copies); see _readable."""
    read, copied = _readable(grads, norm_type != 2.0)
    norm, lists = _host_norm(read, norm_type, writeable)
    if math.isnan(norm) and norm_type == 2.0 and any(g.is_complex() for g in grads):
        # the parts of inf + nan*j sum to NaN; its modulus is inf (torch's, C's hypot)
        read, copied = _readable(grads, True)
        norm, lists = _host_norm(read, norm_type, writeable)
    return norm, lists, copied


def _scale(
    grads: List[torch.Tensor], read: List[List[torch.Tensor]], copied: bool, c: float
) -> None:
    """Multiplies the grads by ``c`` in place: through ``read`` (_host_norm's lists of
    _readable's views), or where those are copies, by torch."""
    if copied:
        for g in grads:
            g.mul_(c)
    else:
        for gs in read:
            _ext._cpu.scale_grads(gs, True, c)
    torch.autograd.graph.increment_version(grads)


def step_grad_scale(
    param_groups: List[Dict[str, Any]], max_grad_norm: Any, grad_scale: float
) -> Tuple[torch.Tensor, float, Dict[str, Any]]:
    """``max_grad_norm`` in a fastopt.torch step: (the global 2-norm of every grad, unscaled
    by a GradScaler's ``grad_scale``; the scale the step kernels divide the grads by; the
    keywords the kernels take besides). Host grads: the norm pass, then grad_scale /
    coefficient goes to the kernels (the grads are not written; a coefficient of 0 or NaN
    multiplies them in place instead, as clip_grad_norm_). CUDA grads of one dtype and
    device: the norm pass into device memory, which the kernels read (``grad_norm``, with
    ``max_grad_norm`` = max_grad_norm * grad_scale: the coefficient of the scaled grads
    after the division by grad_scale); the grads are not written and nothing waits for the
    device. Other grads (mixed CUDA dtypes or devices, DTensors): clipped in place first
    by clip_grad_norm_, to grad_scale * max_grad_norm under a GradScaler (the same but for
    the 1e-6 guard, which then applies to the scaled norm)."""
    limit = clip.max_norm_of(max_grad_norm, "max_grad_norm")
    places = [
        (index, i)
        for index, group in enumerate(param_groups)
        for i, p in enumerate(group["params"])
        if p.grad is not None
    ]
    params = [param_groups[index]["params"][i] for index, i in places]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0), grad_scale, {}
    if len(grads) > 1:
        _arrays.check_apart(
            [("grads", [g.to_local() if hasattr(g, "to_local") else g for g in grads], True)],
            lambda _, k: "param_groups[{}]['params'][{}].grad".format(*places[k]),
            _arrays.SHARED_GRADS_CLIPPED,
        )
    first = grads[0]
    if first.device.type != "cpu" or any(type(g) is not torch.Tensor for g in grads):
        if all(type(g) is torch.Tensor for g in grads) and all(
            g.dtype == first.dtype and g.device == first.device for g in grads
        ):
            out, reads = clip.device_clip(
                _readable(grads, False)[0], True, limit * grad_scale, None
            )
            dtype = _result_dtype(grads)
            norm = out.to(dtype) if out.dtype != dtype else out
            return (norm / grad_scale if grad_scale != 1.0 else norm), grad_scale, reads
        norm = clip_grad_norm_(params, limit * grad_scale)
        return (norm / grad_scale if grad_scale != 1.0 else norm), grad_scale, {}
    scaled, lists, copied = _grads_norm(grads, 2.0, False)
    norm = scaled / grad_scale
    result = torch.tensor(norm, dtype=_result_dtype(grads))
    c = clip.coefficient(limit, norm)
    if c == 1.0:
        return result, grad_scale, {}
    if c > 0.0:  # neither 0 nor NaN
        return result, grad_scale / c, {}
    _scale(grads, lists, copied, c)
    return result, grad_scale, {}


def _total_and_scale(
    grads: List[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> float:
    """Host grads, any mix of the four float and two complex dtypes: the norm, then the
    scaling."""
    norm, lists, copied = _grads_norm(grads, norm_type, True)  # all checked before scaling
    if error_if_nonfinite and not math.isfinite(norm):
        raise clip.nonfinite_error(norm_type)
    c = clip.coefficient(max_norm, norm)
    if c != 1.0:
        _scale(grads, lists, copied, c)
    return norm


@torch.compiler.disable  # one compiled pass already: dynamo runs it as it is
@torch.no_grad()
def clip_grad_norm_(
    parameters: Any,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``: scales the ``.grad`` of ``parameters`` (a tensor
    or an iterable of them; those without a grad are skipped) in place so that their norm,
    taken over all elements together, is at most ``max_norm``, and returns that norm before
    clipping as a tensor of the grads' dtype (promoted across them; a complex grad counts
    as its real dtype), on their device. Complex grads are taken as their real and
    imaginary parts (the 2-norm is theirs; other norms are of the moduli, as torch's).

    Same formulas and edge cases as torch (coefficient min(max_norm / (norm + 1e-6), 1); NaN
    and inf propagate; ``error_if_nonfinite`` raises RuntimeError before any grad changes;
    ``norm_type`` may be ``"inf"``). Differences: the norm is accumulated in float64 in one
    pass over all grads (torch: one norm per tensor in the grads' dtype, then the norm of
    those), so it is at least as accurate, and identical for every thread count and CPU
    path; bad arguments (max_norm < 0, norm_type <= 0) raise ValueError. ``foreach`` is
    accepted and ignored: fastopt always runs its multi-tensor kernels. CUDA grads of mixed
    dtypes or devices, and DTensor grads, are handed to torch's own implementation.
    """
    max_norm = clip.max_norm_of(float(max_norm) if isinstance(max_norm, torch.Tensor) else max_norm)
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(
            f"norm_type: expected a real number > 0 (or 'inf'), got {norm_type!r}"
        ) from None
    norm_type = clip.norm_type_of(p)
    error_if_nonfinite = flag("error_if_nonfinite", error_if_nonfinite)
    if foreach is not None:
        flag("foreach", foreach)
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [q.grad for q in params if q.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    dtype = _result_dtype(grads)
    first = grads[0]
    if any(type(g) is not torch.Tensor for g in grads):  # DTensor and other subclasses
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    if first.device.type == "cpu":
        norm = _total_and_scale(grads, max_norm, norm_type, error_if_nonfinite)
        return torch.tensor(norm, dtype=dtype)
    read, copied = _readable(grads, norm_type != 2.0)
    if copied or any(g.dtype != first.dtype or g.device != first.device for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    out = clip.clip_grad_norm_(read, max_norm, norm_type, error_if_nonfinite)
    torch.autograd.graph.increment_version(grads)
    return out if out.dtype == dtype else out.to(dtype)


__all__ = ["clip_grad_norm_"]
