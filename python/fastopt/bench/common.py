"""Shared by the CPU and GPU benchmarks: the cases and their sizes, a result row, clocks,
medians over alternating blocks, the peers' helpers, running the cases and the table."""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

import numpy as np

from .. import quant
from .._specs import OPTIMIZERS as SPECS
from .._specs import OptimizerSpec
from ..optim import CLASSES

if TYPE_CHECKING:
    from .gpu import Target


# GPT-2 small (124M parameters, 148 tensors): wte, wpe, 12 x (ln_1 w,b, c_attn w,b,
# attn c_proj w,b, ln_2 w,b, c_fc w,b, mlp c_proj w,b), ln_f w,b.
def gpt2_small_shapes() -> List[Tuple[int, ...]]:
    shapes: List[Tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [
            (768,),
            (768,),
            (768, 2304),
            (2304,),
            (768, 768),
            (768,),
            (768,),
            (768,),
            (768, 3072),
            (3072,),
            (3072, 768),
            (768,),
        ]
    return shapes + [(768,), (768,)]


# ResNet-50's 53 conv weights (torchvision's layout, 23.5M parameters): the stem's 7 x 7,
# then per bottleneck a 1 x 1, a 3 x 3 and a 1 x 1 (and a 1 x 1 downsample first in each
# stage). Adafactor factors their trailing (kh, kw): matrices of 49, 9 and 1 element.
def resnet50_conv_shapes() -> List[Tuple[int, ...]]:
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7)]
    channels = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for block in range(blocks):
            shapes += [(width, channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if block == 0:
                shapes.append((4 * width, channels, 1, 1))
            channels = 4 * width
    return shapes


def adafactor_layouts(quick: bool) -> List[Tuple[str, List[Tuple[int, ...]]]]:
    """Adafactor's layouts (it factors matrices): one square matrix, GPT-2 small's list (its
    matrices and vectors) and ResNet-50's conv weights (many small matrices); the quick
    run: two transformer blocks and the first stage."""
    if quick:
        return [
            ("2048x2048", [(2048, 2048)]),
            ("gpt2-small 2 blocks", gpt2_small_shapes()[2:26]),
            ("resnet50 convs, stage 1", resnet50_conv_shapes()[:11]),
        ]
    return [
        ("4096x4096", [(4096, 4096)]),
        ("gpt2-small", gpt2_small_shapes()),
        ("resnet50 convs", resnet50_conv_shapes()),
    ]


@dataclass(frozen=True)
class OptimizerCase:
    """How to run one optimizer in every implementation: the table's spec, the class's
    keywords for this case (``hyper``, also given to torch.optim, whose names they share)
    and the torch.optim modes torch has for it on the CPU and on CUDA."""

    spec: OptimizerSpec
    hyper: Dict[str, Any]
    torch_modes: Sequence[str] = ()  # "fused", "foreach" (CPU)
    cuda_torch_modes: Sequence[str] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @functools.cached_property
    def reference_hyper(self) -> Dict[str, Any]:
        """Every keyword of the reference step (the spec's defaults, this case's values and
        the fixed ones), as validated by the table."""
        spec = self.spec
        return spec.kernel_hyper(spec.validate({**spec.defaults(), **self.hyper}))

    @functools.cached_property
    def states(self) -> List[str]:
        """The state arrays this case uses (the class's state keys)."""
        return self.spec.state_names(self.reference_hyper)

    @functools.cached_property
    def bytes_per_element(self) -> int:
        """float32 bytes that must move per element: each array the step uses read once,
        and those it writes written once."""
        used = self.spec.used_arrays(self.reference_hyper)
        return sum(4 * (1 + a.written) for a in used)

    @property
    def fastopt_class(self) -> Callable[..., Any]:
        return CLASSES[self.spec.name]

    @property
    def reference_step(self) -> Callable[..., None]:
        return self.spec.reference

    @property
    def takes_step(self) -> bool:
        return self.spec.takes_step

    @property
    def torch_name(self) -> str:
        return self.spec.torch_name or ""

    @property
    def torch_hyper(self) -> Dict[str, Any]:
        return self.hyper if self.spec.torch_name else {}


# The optimizers the bench runs: every one of the table, with the keywords of its case and
# the torch.optim modes torch has for it (torch's fused Adagrad is CPU only). Those not
# listed here run with their table example's keywords and the NumPy reference as their
# peer (those torch.optim does not have). SGD runs with momentum, so that it keeps a buffer;
# Sophia's Hessian EMA stays zero, so every step is the clipped sign step (the memory
# traffic is the same). Adam is AdamW's kernel with coupled decay: AdamW's row times both.
_CASES = {
    "adamw": (dict(lr=1e-3, weight_decay=1e-2), ("fused", "foreach"), ("fused", "foreach")),
    "sgd": (dict(lr=1e-2, momentum=0.9), ("fused", "foreach"), ("fused", "foreach")),
    "adagrad": (dict(lr=1e-2), ("fused", "foreach"), ("foreach",)),
    "rmsprop": (dict(lr=1e-2), ("foreach",), ("foreach",)),
    "adamax": (dict(lr=2e-3), ("foreach",), ("foreach",)),
    "radam": (dict(lr=1e-3), ("foreach",), ("foreach",)),
    "adadelta": (dict(lr=1.0), ("foreach",), ("foreach",)),
    "rprop": (dict(lr=1e-2), ("foreach",), ("foreach",)),
    "nadam": (dict(lr=2e-3), ("foreach",), ("foreach",)),
    "asgd": (dict(lr=1e-2, t0=2.0), ("foreach",), ("foreach",)),  # (averaging from step 3)
    "sophia": (dict(lr=1e-3), (), ()),
}
OPTIMIZERS: Dict[str, OptimizerCase] = {
    name: OptimizerCase(SPECS[name], *_CASES.get(name, (dict(SPECS[name].example), (), ())))
    for name in [*_CASES, *(n for n in SPECS if n not in _CASES and n != "adam")]
}

# int8 quantization cases: name -> bytes per element counted (each operand once).
QUANT_CASES = {
    "blockwise-256 quantize": 5,  # read 4 B, write 1 B (+4 B per 256-element block)
    "blockwise-256 dequantize": 5,  # read 1 B, write 4 B
    "per-tensor quantize": 5,  # given scale and zero point
    "dynamic per-tensor quantize": 9,  # min/max pass (4 B) + quantize pass (4 B + 1 B)
}

# Magnitude pruning: the fraction pruned, and bytes per element counted (read 4 B of float32,
# write the 1 B mask).
PRUNE_SPARSITY = 0.7
PRUNE_BYTES = 5


def prune_failure(arrays: List[Any], masks: List[Any], sparsity: float) -> Optional[str]:
    """Why global magnitude masks are wrong, or None: exactly round(sparsity * n) pruned, and
    no pruned |x| above a kept one (O(n), where the reference's argsort would take seconds)."""
    pruned = sum(int(np.count_nonzero(~m)) for m in masks)
    want = round(sparsity * sum(a.size for a in arrays))
    if pruned != want:
        return f"{pruned} elements pruned, expected {want}"
    cut = max((float(np.abs(a[~m]).max(initial=0)) for a, m in zip(arrays, masks)), default=0)
    kept = min((float(np.abs(a[m]).min(initial=np.inf)) for a, m in zip(arrays, masks)))
    if cut > kept:
        return f"a pruned magnitude {cut} exceeds a kept one {kept}"
    return None


# Batched Newton: (n, systems) per case; the quick run uses a quarter of the systems.
NEWTON_CASES = [(8, 65536), (32, 16384), (64, 4096)]


@dataclass
class Row:
    case: str
    device: str
    bytes_per_element: int
    elements: int
    tensors: int
    check: str = "ok"  # "ok", "FAIL: ..." or "ERROR: ..."
    times_ms: Dict[str, float] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)  # peer -> why it did not run
    remarks: List[str] = field(default_factory=list)  # about the row itself (sizing, parity)

    def pct_of_ceiling(self, impl: str, ceiling_gbs: float) -> float:
        gbs = self.bytes_per_element * self.elements / (self.times_ms[impl] * 1e-3) / 1e9
        return 100.0 * gbs / ceiling_gbs

    def speedup_vs_best_peer(self) -> Optional[float]:
        peers = [t for k, t in self.times_ms.items() if not k.startswith("fastopt")]
        if "fastopt" not in self.times_ms or not peers:
            return None
        return min(peers) / self.times_ms["fastopt"]


R = TypeVar("R", bound=Row)


# ---- timing ---------------------------------------------------------------------------------


class WallClock:
    """Host timing, each call on its own: CPU kernels have finished when they return."""

    def warm(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call (the first: page faults, lazy state, thread pool start)."""
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def block(self, fn: Callable[[], Any], n: int) -> List[float]:
        """Seconds of each of n calls."""
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return samples


def _median_times(
    fns: Dict[str, Callable[[], None]],
    repeats: int,
    rounds: int = 3,
    budget_s: float = 4.0,
    clock: Any = None,
) -> Dict[str, float]:
    """Median ms per call. Each implementation runs in blocks, alternating between
    implementations for `rounds` rounds; a short pause between blocks lets the previous
    library's spinning worker threads go to sleep before the next is timed. A slow
    implementation gets fewer repeats (at least `rounds`) so that it spends about
    `budget_s` seconds. `clock` gives one sample per call (WallClock, the default) or one
    per block (EventClock)."""
    clock = WallClock() if clock is None else clock
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    per_round: Dict[str, int] = {}
    for name, fn in fns.items():
        once = clock.warm(fn)
        per_round[name] = max(
            1, min(math.ceil(repeats / rounds), int(budget_s / rounds / max(once, 1e-9)))
        )
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.02)
            samples[name] += clock.block(fn, per_round[name])
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def _import_torch():
    try:
        import torch

        return torch
    except Exception:  # not installed, or broken install: reported as "not installed"
        return None


def _import_cupy():
    try:
        import cupy

        return cupy
    except Exception:  # not installed, or no usable CUDA for it: "not installed"
        return None


def _add_torch_peers(
    torch: Any,
    spec: OptimizerCase,
    modes: Sequence[str],
    make_params: Callable[[], List[Any]],
    make_grads: Callable[[], List[Any]],
    fns,
    row: Row,
) -> None:
    """torch.optim in each mode on its own copy of the params (``make_params()``), stepped
    with ``p.grad`` set once to ``make_grads()`` (torch tensors, read only); and the same
    for fastopt.torch (see torch_rows)."""
    from .torch_rows import add_fastopt_torch

    if not modes:
        return
    if torch is None:
        row.notes["torch"] = "not installed"
        return
    grads = make_grads()
    add_fastopt_torch(torch, spec, make_params, grads, fns, row)
    for mode in modes:
        tparams = make_params()
        for tp, g in zip(tparams, grads):
            tp.grad = g
        try:
            topt = getattr(torch.optim, spec.torch_name)(
                tparams, **spec.torch_hyper, **{mode: True}
            )
            topt.step()
        except Exception as exc:  # a torch build without this mode
            row.notes[f"torch-{mode}"] = f"unavailable ({type(exc).__name__})"
            continue
        fns[f"torch-{mode}"] = topt.step


def _as_tuple(result: Any) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _quant_call(name: str, x: Any) -> Callable[[], Any]:
    """fastopt's call in int8 case `name` on float32 array x (host or device), its inputs
    prepared. It returns what the case checks: (q, absmax), the dequantized array, q, or
    (scale, zero point, q) for the dynamic case."""
    if name == "blockwise-256 quantize":
        return lambda: quant.quantize_blockwise(x)
    if name == "blockwise-256 dequantize":
        q, absmax = quant.quantize_blockwise(x)
        return lambda: quant.dequantize_blockwise(q, absmax)
    if name.startswith("dynamic"):

        def dynamic() -> Any:
            s, z = quant.choose_qparams(x, symmetric=False)
            return s, z, quant.quantize_per_tensor(x, s, z)

        return dynamic
    scale, zp = quant.choose_qparams(x, symmetric=False)
    return lambda: quant.quantize_per_tensor(x, scale, zp)


def _quant_into_call(name: str, x: Any) -> Optional[Callable[[], Any]]:
    """Column "fastopt-into" of int8 case `name` (not a peer): fastopt's call writing into
    outputs allocated once (out=), with check_finite=False where the call checks, as a
    loop quantizing every step would call it; None for the dynamic case (its outputs are
    host scalars)."""
    if name == "blockwise-256 quantize":
        outs = quant.quantize_blockwise(x)
        return lambda: quant.quantize_blockwise(x, out=outs, check_finite=False)
    if name == "blockwise-256 dequantize":
        q, absmax = quant.quantize_blockwise(x)
        out = quant.dequantize_blockwise(q, absmax)
        return lambda: quant.dequantize_blockwise(q, absmax, out=out)
    if name.startswith("dynamic"):
        return None
    scale, zp = quant.choose_qparams(x, symmetric=False)
    out = quant.quantize_per_tensor(x, scale, zp)
    return lambda: quant.quantize_per_tensor(x, scale, zp, out=out, check_finite=False)


def _torch_blockwise(torch: Any) -> Tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]:
    """Blockwise-256 absmax int8 in torch, as a user writes it: quantize(x) -> (q, absmax)
    and dequantize(q, absmax) of fastopt's layout (q flat, one absmax per block)."""

    def quantize(x: Any) -> Any:
        blocks = x.reshape(-1, 256)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        return torch.clamp(torch.round(blocks * 127 / absmax), -127, 127).to(torch.int8), absmax

    def dequantize(q: Any, absmax: Any) -> Any:
        return q.view(-1, 256).to(torch.float32) * (absmax / 127.0)[:, None]

    return quantize, dequantize


def _torch_per_tensor_peer(torch: Any, name: str, tx: Any) -> Tuple[str, Callable[[], Any]]:
    """torch's own call for a per-tensor int8 case, on tensor tx: (its name, the call)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    if name.startswith("dynamic"):
        return (
            "torch.quantize_per_tensor_dynamic",
            lambda: torch.quantize_per_tensor_dynamic(tx, torch.qint8, False),
        )
    scale, zp = quant.choose_qparams(tx, symmetric=False)
    return (
        "torch.quantize_per_tensor",
        lambda: torch.quantize_per_tensor(tx, scale, zp, torch.qint8),
    )


def _newton_row(n: int, systems: int, device: str, row_type: Type[R]) -> R:
    """float32 batched damped Newton: bytes per system = H (n*n) + g + p read/written."""
    return row_type(f"newton n={n} x{systems}", device, 4 * (n * n + 3 * n), systems, 1)


def _spd_systems(
    rng: np.random.Generator, n: int, systems: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (H, g, p) of `systems` well-conditioned SPD systems (H = A A^T / n + I)."""
    A = rng.standard_normal((systems, n, n), dtype=np.float32)
    H = A @ np.swapaxes(A, -1, -2) / n + np.eye(n, dtype=np.float32)
    g = rng.standard_normal((systems, n), dtype=np.float32)
    p = rng.standard_normal((systems, n), dtype=np.float32)
    return H, g, p


def _solve64(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.linalg.solve(H.astype(np.float64), g.astype(np.float64)[..., None])[..., 0]


def _newton_failure(got: np.ndarray, want: np.ndarray) -> Optional[str]:
    """Why `got` is not the solution `want` (_solve64) to float32 accuracy, or None."""
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    if not err < 1e-3:
        return f"relative error {err:.3g} against numpy.linalg.solve (float64)"
    return None


def _torch_solvers(torch: Any, tH: Any, tg: Any) -> Dict[str, Callable[[], Any]]:
    """The batched solves of torch, on tensors H (..., n, n) and g (..., n, 1)."""
    return {
        "torch.linalg.solve": lambda: torch.linalg.solve(tH, tg),
        "torch cholesky+solve": lambda: torch.cholesky_solve(tg, torch.linalg.cholesky(tH)),
    }


def _cases(
    bench: Any, names: List[str], only: Optional[set]
) -> List[Tuple[str, Callable[[], Row]]]:
    """The selected cases of a CpuBench or GpuBench: optimizers `names` on every layout,
    then int8, Newton and pruning unless `only` leaves them out."""
    cases: List[Tuple[str, Callable[[], Row]]] = [
        (f"{n} {lay}", functools.partial(bench.optimizer_case, OPTIMIZERS[n], lay, shapes))
        for n in names
        for lay, shapes in bench.layouts()
    ]
    if only is None or "adafactor" in only:
        cases += [
            (f"adafactor {lay}", functools.partial(bench.adafactor_case, lay, shapes))
            for lay, shapes in bench.adafactor_layouts()
        ]
    if (only is None or "clip" in only) and hasattr(bench, "clip_case"):  # CPU only
        cases += [
            (f"clip_grad_norm {w}", functools.partial(bench.clip_case, c))
            for w, c in (("clipping", True), ("norm only", False))
        ]
    if only is None or "quant" in only:
        cases += [(f"int8 {q}", functools.partial(bench.quant_case, q)) for q in QUANT_CASES]
    if only is None or "newton" in only:
        cases += [
            (f"newton n={n}", functools.partial(bench.newton_case, n, b)) for n, b in NEWTON_CASES
        ]
    prune_case = getattr(bench, "prune_case", None)  # the CPU's (the GPU bench has none yet)
    if prune_case is not None and (only is None or "prune" in only):
        cases.append(("prune", prune_case))
    return cases


def _run_cases(
    cases: List[Tuple[str, Callable[[], Row]]],
    device: str,
    progress: Callable[[str], None],
    end_line: bool,
    prefix: str = "",
) -> List[Row]:
    """Runs every case, saying which through ``progress``; one that raises becomes an ERROR
    row (traceback on stderr) so that the others still run. ``end_line``: progress was
    written on one line (a terminal), which then needs ending."""
    rows: List[Row] = []
    for k, (label, case) in enumerate(cases):
        progress(f"{prefix}case {k + 1} of {len(cases)}: {label}")
        try:
            rows.append(case())
        except Exception as exc:
            traceback.print_exc()
            first = (str(exc).splitlines() or [""])[0][:200]
            rows.append(Row(label, device, 0, 0, 0, check=f"ERROR: {type(exc).__name__}: {first}"))
    progress("done")
    if end_line:
        print(file=sys.stderr)
    return rows


def _format_table(rows: List[Row], ceiling_gbs: float) -> str:
    impls: List[str] = []
    for r in rows:
        for k in r.times_ms:
            if k not in impls:
                impls.append(k)
    header = [
        "case",
        "B/el",
        *[f"{k} ms" for k in impls],
        "fastopt %ceil",
        "best peer %ceil",
        "speedup",
    ]
    lines = [header]
    for r in rows:
        if r.check != "ok":
            lines.append([r.case, str(r.bytes_per_element), r.check])
            continue
        peers = {k: t for k, t in r.times_ms.items() if not k.startswith("fastopt")}
        best = min(peers, key=peers.__getitem__) if peers else None
        sp = r.speedup_vs_best_peer()
        lines.append(
            [
                r.case,
                str(r.bytes_per_element),
                *[f"{r.times_ms[k]:.3f}" if k in r.times_ms else "-" for k in impls],
                f"{r.pct_of_ceiling('fastopt', ceiling_gbs):.0f}%",
                f"{r.pct_of_ceiling(best, ceiling_gbs):.0f}% ({best})" if best else "-",
                f"{sp:.2f}x" if sp else "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(line)) for line in lines)


def _print_rows(rows: List[Row], ceiling_gbs: float) -> None:
    """The table, then one line per missing peer and one per remark on a row."""
    print(_format_table(rows, ceiling_gbs))
    missing: Dict[Tuple[str, str], List[str]] = {}
    for r in rows:
        for peer, why in r.notes.items():
            missing.setdefault((peer, why), []).append(r.case)
    for (peer, why), cases_hit in missing.items():
        where = "every case" if len(cases_hit) == len(rows) else ", ".join(cases_hit)
        print(f"  {peer}: {why} ({where})")
    for r in rows:
        for remark in r.remarks:
            print(f"  {r.case}: {remark}")


def _row_json(r: Row, ceiling_gbs: float) -> Dict[str, Any]:
    d: Dict[str, Any] = dict(
        case=r.case,
        device=r.device,
        bytes_per_element=r.bytes_per_element,
        elements=r.elements,
        tensors=r.tensors,
        check=r.check,
        times_ms=r.times_ms,
        pct_of_ceiling={k: r.pct_of_ceiling(k, ceiling_gbs) for k in r.times_ms},
        speedup_vs_best_peer=r.speedup_vs_best_peer(),
        notes=r.notes,
    )
    if r.remarks:
        d["remarks"] = r.remarks
    # GPU rows (gpu.GpuRow): parity with the CPU kernels and the case's target.
    bit_identical = getattr(r, "bit_identical", None)
    if bit_identical is not None:
        d["bit_identical_to_cpu"] = bit_identical
    target: Optional[Target] = getattr(r, "target", None)
    if target is not None and r.check == "ok" and "fastopt" in r.times_ms:
        d["target"] = {
            "target": target.describe(),
            "achieved": target.achieved(r, ceiling_gbs),
            "met": target.met(r, ceiling_gbs),
        }
    return d
