"""Magnitude pruning: masks that drop the smallest magnitudes of a list of arrays, as
``torch.nn.utils.prune`` does with ``L1Unstructured``, and N:M structured sparsity.

The threshold is found by selection -- a radix select on |x|'s bit pattern, a histogram
per digit (multi-threaded on the CPU, shared-memory atomics on the GPU) -- never by
sorting, and the count pruned is exact:

* Ties: elements are ranked by |x|, and equal magnitudes by position -- the list order of
  the arrays, then the flat (C-order) index within an array -- the earlier ranking lower,
  so among equal magnitudes the earlier element is pruned first. The masks are those of a
  stable ascending sort of |x| cut after the count (``fastopt.reference.prune_magnitude``).
* NaN ranks above +Inf, as in ``torch.topk``: a NaN is kept unless every element is
  pruned. -0 and +0 tie.

Results do not depend on the thread count, the CPU code path or the device.
"""

from __future__ import annotations

import math
import re
from typing import Any, List, Optional, Tuple

import numpy as np

from . import _arrays
from ._ext import _cpu
from ._kernels import _host
from ._validate import real

__all__ = ["prune_magnitude"]

_SCOPES = ("global", "per_tensor")
_MAX_GROUP = 64  # the largest m of an "n:m" pattern (csrc/common/prune.h, kMaxGroup)
_PATTERN = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def _pattern(pattern: Any) -> Tuple[int, int]:
    if not isinstance(pattern, str):
        raise TypeError(
            f"pattern: expected None or a str such as '2:4', got {type(pattern).__name__}"
        )
    match = _PATTERN.fullmatch(pattern)
    if match is None:
        raise ValueError(f"pattern: expected 'n:m' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= m <= _MAX_GROUP:
        raise ValueError(f"pattern: m must be in [1, {_MAX_GROUP}], got {pattern!r}")
    if n > m:
        raise ValueError(f"pattern: n must be at most m, got {pattern!r}")
    return n, m


def _prune_counts(sizes: List[int], sparsity: float, scope: str) -> List[int]:
    """Elements to prune: round(sparsity * size) (Python's round, half to even, as
    ``torch.nn.utils.prune``'s ``_compute_nparams_toprune``) over all arrays together
    (global) or per array."""
    if scope == "global":
        return [round(sparsity * sum(sizes))]
    return [round(sparsity * n) for n in sizes]


def prune_magnitude(
    arrays: Any,
    sparsity: Optional[float] = None,
    *,
    scope: str = "global",
    pattern: Optional[str] = None,
    out: Any = None,
    stream: Any = None,
) -> Any:
    """Masks (True = kept) pruning the smallest magnitudes of ``arrays``.

    ``arrays``: one array or a list of arrays of one float dtype -- float32, float64,
    float16 or bfloat16 NumPy arrays (``ml_dtypes.bfloat16``) or PyTorch CPU tensors, or
    CUDA arrays (PyTorch CUDA tensors, CuPy arrays; run on ``stream=``, default the
    library's current stream, without waiting for it). Returns a bool mask per array, of
    its shape and its library on its device (a list for a list, one mask for one array),
    or writes them into ``out=`` (bool or uint8 arrays of the same shapes, C-contiguous;
    every element written) and returns ``out``. Nothing is written when an argument is
    refused (TypeError / ValueError naming it).

    ``sparsity``: the fraction in [0, 1] to prune -- always a fraction, so 1 prunes
    everything (torch reads an int ``amount`` as a count). ``round(sparsity * n)`` elements
    are pruned (Python's round, as torch): of all arrays together for ``scope="global"``
    (n = the total, one threshold: ``torch.nn.utils.prune.global_unstructured(...,
    pruning_method=L1Unstructured)``), or of each array for ``scope="per_tensor"``
    (``l1_unstructured`` on each). The masks equal torch's wherever |x| has no ties; ties
    and NaN follow the module's rule (the earlier element is pruned first; NaN is the
    largest magnitude).

    ``pattern="n:m"`` (e.g. "2:4"): N:M structured sparsity instead -- in every group of m
    consecutive elements along the last axis (whose length must be a multiple of m, m <=
    64) the n largest |x| are kept, ties pruned earlier-first as above. ``sparsity`` must
    then be None or 1 - n/m; ``scope`` does not apply.
    """
    listed = isinstance(arrays, (list, tuple))
    alist = list(arrays) if listed else [arrays]
    if scope not in _SCOPES:
        raise ValueError(f"scope: expected 'global' or 'per_tensor', got {scope!r}")
    group: Optional[Tuple[int, int]] = None
    if pattern is not None:
        group = _pattern(pattern)
        if sparsity is not None:
            s = real("sparsity", sparsity, lo=0.0, hi=1.0)
            implied = 1.0 - group[0] / group[1]
            if abs(s - implied) > 1e-9:
                raise ValueError(
                    f"sparsity: pattern {pattern!r} prunes {implied:g} of the elements; pass "
                    f"sparsity=None or {implied:g}, got {s:g}"
                )
    elif sparsity is None:
        raise TypeError("sparsity: required (a fraction in [0, 1]) unless a pattern is given")
    else:
        s = real("sparsity", sparsity, lo=0.0, hi=1.0)
    out_list: Optional[List[Any]] = None
    if out is not None:
        if isinstance(out, (list, tuple)) != listed:
            raise TypeError(
                "out: expected a list of masks (one per array)"
                if listed
                else f"out: arrays is one array, so out must be one mask, got {type(out).__name__}"
            )
        out_list = list(out) if listed else [out]
    if not alist:
        if out_list:
            raise ValueError(
                f"out: expected 0 arrays (one per entry of arrays), got {len(out_list)}"
            )
        return out if out is not None else []
    kernels, extra = _arrays.backend(alist, stream, name="arrays")
    host = kernels is _cpu
    kinds: List[Any] = []
    if host:
        hosts = [_host(f"arrays[{i}]", a) for i, a in enumerate(alist)]
        alist = [h for h, _ in hosts]
        kinds = [kind for _, kind in hosts]
        shapes = [a.shape for a in alist]
    else:
        shapes = [
            tuple(kernels.describe(a, f"arrays[{i}]", extra["stream"])[1])
            for i, a in enumerate(alist)
        ]
    if out_list is not None:
        masks = (
            [_host(f"out[{i}]", o, written=True)[0] for i, o in enumerate(out_list)]
            if host
            else out_list
        )
    elif host:
        masks = [np.empty(shape, np.bool_) for shape in shapes]
    else:
        masks = [
            _arrays.device_empty(a, shape, "bool", extra["stream"])
            for a, shape in zip(alist, shapes)
        ]
    stream_arg = None if host else extra["stream"]
    if group is not None:
        kernels.prune_n_m(alist, masks, group[0], group[1], stream_arg)
    else:
        counts = _prune_counts([math.prod(shape) for shape in shapes], s, scope)
        kernels.prune_magnitude(alist, masks, counts, stream_arg)
    if out is not None:
        _arrays.bump_versions(out_list or [])
        return out
    if host:
        masks = [kind.wrap(m) for kind, m in zip(kinds, masks)]
    return masks if listed else masks[0]
