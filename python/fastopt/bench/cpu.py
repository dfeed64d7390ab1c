"""The CPU benchmark: fastopt against the NumPy reference and torch.optim (CPU), and the
in-place ``a += b`` ceiling."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import _runtime, quant, reference
from .._ext import _cpu
from ..adafactor import Adafactor, machine_epsilon, state_shapes
from ..clip import clip_grad_norm_
from ..newton import cholesky_solve, newton_
from ..prune import prune_magnitude
from .common import (
    PRUNE_BYTES,
    PRUNE_SPARSITY,
    QUANT_CASES,
    OptimizerCase,
    Row,
    _add_torch_peers,
    _as_tuple,
    _import_torch,
    _median_times,
    _newton_failure,
    _newton_row,
    _quant_call,
    _quant_into_call,
    _solve64,
    _spd_systems,
    _torch_blockwise,
    _torch_per_tensor_peer,
    _torch_solvers,
    adafactor_layouts,
    gpt2_small_shapes,
    prune_failure,
)


class CpuBench:
    def __init__(self, quick: bool, progress: Callable[[str], None]):
        self.quick = quick
        self.progress = progress
        self.rng = np.random.default_rng(0)
        self.torch = _import_torch()
        if self.torch is not None:
            self.torch.set_num_threads(_runtime.get_num_threads())
        self.repeats = 7 if quick else 15

    # -- the ceiling ------------------------------------------------------------------
    def ceiling(self) -> Dict[str, float]:
        n = 1 << (23 if self.quick else 25)
        a = self.rng.random(n, dtype=np.float32)
        b = self.rng.random(n, dtype=np.float32)
        ms = _median_times({"add": lambda: _cpu.add_inplace(a, b)}, self.repeats * 2)["add"]
        return {"elements": n, "bytes_per_element": 12, "ms": ms, "gbs": 12 * n / (ms * 1e-3) / 1e9}

    # -- optimizer cases ----------------------------------------------------------------
    def layouts(self) -> List[Tuple[str, List[Tuple[int, ...]]]]:
        if self.quick:
            return [("1x2^22", [(1 << 22,)]), ("200x4096", [(4096,)] * 200)]
        return [
            ("1x2^24", [(1 << 24,)]),
            ("1000x4096", [(4096,)] * 1000),
            ("gpt2-small", gpt2_small_shapes()),
        ]

    def optimizer_case(
        self, spec: OptimizerCase, layout: str, shapes: List[Tuple[int, ...]]
    ) -> Row:
        elements = sum(int(np.prod(s)) for s in shapes)
        row = Row(f"{spec.name} {layout}", "cpu", spec.bytes_per_element, elements, len(shapes))
        params = [self.rng.standard_normal(s, dtype=np.float32) for s in shapes]
        grads = [self.rng.standard_normal(s, dtype=np.float32) for s in shapes]
        failure = self.check(spec, params, grads)
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        fns: Dict[str, Callable[[], None]] = {}
        opt = spec.fastopt_class([p.copy() for p in params], **spec.hyper)
        fns["fastopt"] = lambda: opt.step(grads)
        ref_params = [p.copy() for p in params]
        # the state as the class starts it (zeros; Rprop's step sizes at lr)
        ref_states = [[a.copy() for a in opt.state[name]] for name in spec.states]

        def numpy_reference() -> None:
            for i, (p, g) in enumerate(zip(ref_params, grads)):
                kwargs = dict(spec.reference_hyper)
                if spec.takes_step:
                    kwargs["step"] = 2
                spec.reference_step(p, g, *[s[i] for s in ref_states], **kwargs)

        fns["numpy"] = numpy_reference
        self.add_torch_peers(spec, params, grads, fns, row)
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def adafactor_layouts(self) -> List[Tuple[str, List[Tuple[int, ...]]]]:
        return adafactor_layouts(self.quick)

    def adafactor_case(self, layout: str, shapes: List[Tuple[int, ...]]) -> Row:
        """Adafactor: ``fastopt.Adafactor`` against ``torch.optim.Adafactor`` (foreach and
        single-tensor) and the NumPy reference (float32 arrays), each on its own copy.
        Bytes per element: a matrix's 24 (p and g read for the sums, g read for the
        update's norm, p and g read and p written); vectors move 32 but hold few elements."""
        elements = sum(int(np.prod(s)) for s in shapes)
        row = Row(f"adafactor {layout}", "cpu", 24, elements, len(shapes))
        params = [self.rng.standard_normal(s, dtype=np.float32) for s in shapes]
        grads = [self.rng.standard_normal(s, dtype=np.float32) for s in shapes]
        failure = _adafactor_failure(params[:3], grads[:3])
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        opt = Adafactor([p.copy() for p in params])
        fns: Dict[str, Callable[[], None]] = {"fastopt": lambda: opt.step(grads)}
        ref_params = [p.copy() for p in params]
        ref_states = [
            {k: np.zeros(v, np.float32) for k, v in state_shapes(p.shape).items()} for p in params
        ]

        def numpy_reference() -> None:
            for p, g, s in zip(ref_params, grads, ref_states):
                reference.adafactor(
                    p,
                    g,
                    s.get("row_vars"),
                    s.get("col_vars"),
                    s.get("variances"),
                    step=2,
                    eps1=machine_epsilon("float32"),
                )

        fns["numpy"] = numpy_reference
        torch = self.torch
        if torch is None:
            row.notes["torch"] = "not installed"
        else:
            from .. import torch as fastopt_torch

            tgrads = [torch.from_numpy(g) for g in grads]
            makers: Dict[str, Callable[[List[Any]], Any]] = {
                "fastopt.torch": fastopt_torch.Adafactor,
                "torch-foreach": functools.partial(torch.optim.Adafactor, foreach=True),
                "torch-single": functools.partial(torch.optim.Adafactor, foreach=False),
            }
            for name, make in makers.items():
                tparams = [torch.from_numpy(p.copy()) for p in params]
                for tp, g in zip(tparams, tgrads):
                    tp.grad = g
                fns[name] = make(tparams).step
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def clip_case(self, clipping: bool) -> Row:
        """Gradient clipping over GPT-2 small's grads (the quick run: its first 2 blocks):
        ``fastopt.torch.clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_``
        (foreach) and NumPy, each on its own copy. ``clipping``: max_norm 0, so every call
        scales (by 0: the same work whatever the values); else max_norm inf, where fastopt
        reads the grads once and torch still multiplies them by 1. Bytes per element:
        fastopt's (norm 4 B, + 8 B for the scaling)."""
        shapes = gpt2_small_shapes()
        if self.quick:
            shapes = shapes[: 2 + 2 * 12][2:]  # two transformer blocks, no embeddings
        elements = sum(int(np.prod(s)) for s in shapes)
        what = "clipping" if clipping else "norm only"
        row = Row(
            f"clip_grad_norm ({what}) gpt2-small{' 2 blocks' if self.quick else ''}",
            "cpu",
            12 if clipping else 4,
            elements,
            len(shapes),
        )
        grads = [self.rng.standard_normal(s, dtype=np.float32) for s in shapes]
        want = reference.grad_norm(grads)
        got = clip_grad_norm_([g.copy() for g in grads], math.inf)
        if abs(got - want) > 1e-12 * want:
            row.check = f"FAIL: norm {got!r}, float64 reference {want!r}"
            return row
        max_norm = 0.0 if clipping else math.inf
        arrays = [g.copy() for g in grads]
        fns: Dict[str, Callable[[], Any]] = {}

        def numpy_clip() -> None:
            norm = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in arrays))
            c = min(max_norm / (norm + 1e-6), 1.0)
            for g in arrays:
                g *= np.float32(c)

        torch = self.torch
        if torch is None:
            fns["fastopt"] = lambda: clip_grad_norm_(arrays, max_norm)
            row.notes["torch"] = "not installed"
        else:
            from ..torch import clip_grad_norm_ as torch_clip

            def params() -> List[Any]:
                out = []
                for g in grads:  # a param without memory of its own: only .grad is used
                    p = torch.zeros(1).expand(g.shape)
                    p.grad = torch.from_numpy(g.copy())
                    out.append(p)
                return out

            ours, theirs = params(), params()
            fns["fastopt"] = lambda: torch_clip(ours, max_norm)
            fns["torch foreach"] = lambda: torch.nn.utils.clip_grad_norm_(
                theirs, max_norm, foreach=True
            )
        fns["numpy"] = numpy_clip
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def add_torch_peers(self, spec: OptimizerCase, params, grads, fns, row: Row) -> None:
        torch = self.torch
        _add_torch_peers(
            torch,
            spec,
            spec.torch_modes,
            lambda: [torch.from_numpy(p.copy()) for p in params],
            lambda: [torch.from_numpy(g) for g in grads],
            fns,
            row,
        )

    def newton_case(self, n: int, systems: int) -> Row:
        """float32 batched damped Newton: bytes per system = H (n*n) + g + p read/written."""
        if self.quick:
            systems //= 4
        row = _newton_row(n, systems, "cpu", Row)
        H, g, p = _spd_systems(self.rng, n, systems)
        failure = _newton_failure(cholesky_solve(H, g), _solve64(H, g))
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        fns: Dict[str, Callable[[], Any]] = {"fastopt": lambda: newton_(p, g, H, lr=1e-3)}
        fns["numpy.linalg.solve"] = lambda: np.linalg.solve(H, g[..., None])
        if self.torch is not None:
            fns.update(
                _torch_solvers(
                    self.torch, self.torch.from_numpy(H), self.torch.from_numpy(g)[..., None]
                )
            )
        else:
            row.notes["torch"] = "not installed"
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def quant_case(self, name: str) -> Row:
        """float32 input; fastopt is timed through its public API (output allocation
        included, as for every peer), and as "fastopt-into" into outputs allocated once
        (out=, check_finite=False). Results must equal the reference bit for bit."""
        n = 1 << (22 if self.quick else 25)
        row = Row(f"int8 {name}", "cpu", QUANT_CASES[name], n, 1)
        x = self.rng.standard_normal(n, dtype=np.float32)
        torch = self.torch
        tx: Any = torch.from_numpy(x) if torch is not None else None
        fastopt_call = _quant_call(name, x)
        fns: Dict[str, Callable[[], Any]] = {"fastopt": fastopt_call}
        got = fastopt_call()
        if name == "blockwise-256 quantize":
            want = reference.quantize_blockwise(x)
            fns["numpy"] = lambda: reference.quantize_blockwise(x)
            if torch is not None:

                def torch_eager():
                    blocks = tx.view(-1, 256)
                    absmax = blocks.abs().amax(dim=1)
                    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
                    return torch.round(blocks * scale[:, None]).to(torch.int8), absmax

                fns["torch eager"] = torch_eager
        elif name == "blockwise-256 dequantize":
            q, absmax = quant.quantize_blockwise(x)
            want = reference.dequantize_blockwise(q, absmax)
            fns["numpy"] = lambda: reference.dequantize_blockwise(q, absmax)
            if torch is not None:
                dequantize = _torch_blockwise(torch)[1]
                tq, ta = torch.from_numpy(q), torch.from_numpy(absmax)
                fns["torch eager"] = lambda: dequantize(tq, ta)
        else:
            dynamic = name.startswith("dynamic")
            scale, zp = quant.choose_qparams(x, symmetric=False)
            want = reference.quantize_affine(x, scale, zp, -128, 127).astype(np.int8)
            if dynamic:
                want = (scale, zp, want)

            def numpy_fn():
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                s = np.float32((hi - lo) / 255.0) if dynamic else scale
                z = int(-128 - round(lo / s)) if dynamic else zp
                return reference.quantize_affine(x, s, z, -128, 127).astype(np.int8)

            fns["numpy"] = numpy_fn
            if torch is not None:
                peer, fn = _torch_per_tensor_peer(torch, name, tx)
                fns[peer] = fn
        if torch is None:
            row.notes["torch"] = "not installed"
        into = _quant_into_call(name, x)
        if into is not None:
            fns["fastopt-into"] = into
        for result in [got] + ([into()] if into is not None else []):
            if not all(np.array_equal(a, b) for a, b in zip(_as_tuple(result), _as_tuple(want))):
                row.check = "FAIL: differs from the float32 reference"
                return row
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def prune_case(self) -> Row:
        """Global magnitude pruning of float32 arrays (GPT-2 small's parameter list; 200 x
        4096 for --quick) against ``torch.nn.utils.prune.global_unstructured(...,
        L1Unstructured)`` on modules made afresh per call around the same arrays (no copy).
        Both allocate their masks; torch also computes the pruned weights (its API does
        that in the same call). The torch peer runs at most three times (it takes tens of
        seconds on GPT-2 small)."""
        layout, shapes = (
            ("200x4096", [(4096,)] * 200) if self.quick else ("gpt2-small", gpt2_small_shapes())
        )
        elements = sum(int(np.prod(s)) for s in shapes)
        row = Row(f"prune {PRUNE_SPARSITY:.0%} {layout}", "cpu", PRUNE_BYTES, elements, len(shapes))
        arrays = [self.rng.standard_normal(s, dtype=np.float32) for s in shapes]
        failure = prune_failure(arrays, prune_magnitude(arrays, PRUNE_SPARSITY), PRUNE_SPARSITY)
        if failure:
            row.check = f"FAIL: {failure}"
            return row
        fns: Dict[str, Callable[[], Any]] = {
            "fastopt": lambda: prune_magnitude(arrays, PRUNE_SPARSITY)
        }
        torch = self.torch
        if torch is not None:
            from torch.nn.utils import prune

            def torch_prune() -> None:
                modules = []
                for a in arrays:
                    module = torch.nn.Module()
                    module.weight = torch.nn.Parameter(torch.from_numpy(a))
                    modules.append(module)
                prune.global_unstructured(
                    [(m, "weight") for m in modules],
                    pruning_method=prune.L1Unstructured,
                    amount=PRUNE_SPARSITY,
                )

            fns["torch.nn.utils.prune"] = torch_prune
        else:
            row.notes["torch"] = "not installed"
        row.times_ms = _median_times(fns, self.repeats, rounds=2 if not self.quick else 3)
        return row

    def check(self, spec: OptimizerCase, params, grads) -> Optional[str]:
        """Three steps of fastopt against the float64 reference on the first tensors."""
        sample = list(range(min(3, len(params))))
        ps = [params[i].copy() for i in sample]
        gs = [grads[i] for i in sample]
        opt = spec.fastopt_class(ps, **spec.hyper)
        ref = [params[i].astype(np.float64) for i in sample]
        ref_states = [[a.astype(np.float64) for a in opt.state[name]] for name in spec.states]
        for t in range(1, 4):
            opt.step(gs)
            for i, (p, g) in enumerate(zip(ref, gs)):
                kwargs = dict(spec.reference_hyper)
                if spec.takes_step:
                    kwargs["step"] = t
                spec.reference_step(p, g.astype(np.float64), *[s[i] for s in ref_states], **kwargs)
        for got, want in zip(ps, ref):
            err = float(np.max(np.abs(got - want), initial=0.0))
            if not np.all(np.isfinite(got)) or err > 1e-5 * (1 + float(np.max(np.abs(want)))):
                return f"max abs error {err:.3g} against the float64 reference"
        return None


def _adafactor_failure(params: List[np.ndarray], grads: List[np.ndarray]) -> Optional[str]:
    """Three steps of fastopt.Adafactor against the float64 reference, or why they differ."""
    ps = [p.copy() for p in params]
    opt = Adafactor(ps)
    ref = [p.astype(np.float64) for p in params]
    states = [{k: np.zeros(v) for k, v in state_shapes(p.shape).items()} for p in params]
    for t in range(1, 4):
        opt.step(grads)
        for p, g, s in zip(ref, grads, states):
            reference.adafactor(
                p,
                g.astype(np.float64),
                s.get("row_vars"),
                s.get("col_vars"),
                s.get("variances"),
                step=t,
                eps1=machine_epsilon("float32"),
            )
    for got, want in zip(ps, ref):
        err = float(np.max(np.abs(got - want), initial=0.0))
        if not np.all(np.isfinite(got)) or err > 1e-5 * (1 + float(np.max(np.abs(want)))):
            return f"max abs error {err:.3g} against the float64 reference"
    return None


# ---- the GPU ---------------------------------------------------------------------------------
