"""The benchmark behind ``python -m fastopt bench``: fastopt against its peers and the
machine's ceiling, side by side, in one run.

Every case first checks fastopt's result against the float64 reference (a wrong kernel
prints FAIL, never a time), then times fastopt and each peer present on the machine:
the NumPy reference written one operator per pass (``fastopt.reference`` run on float32
arrays, which is what a NumPy user writes) and ``torch.optim`` fused / foreach. Figures
are medians over repeats; implementations are timed in alternating blocks so that slow
drift of a shared machine hits all of them alike. Achieved bandwidth counts the bytes
that must move (each operand read once, each output written once) and is given as a
percentage of the ceiling measured in the same run: an in-place ``a += b`` over a large
array with all threads (fastopt's own multithreaded AVX2 loop).
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _runtime, optim, quant, reference
from .newton import cholesky_solve, newton_
from ._build import _cpu

# GPT-2 small (124M parameters, 148 tensors): wte, wpe, 12 x (ln_1 w,b, c_attn w,b,
# attn c_proj w,b, ln_2 w,b, c_fc w,b, mlp c_proj w,b), ln_f w,b.
def gpt2_small_shapes() -> List[Tuple[int, ...]]:
    shapes: List[Tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                   (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


@dataclass
class OptimizerCase:
    """How to run one optimizer in every implementation."""
    name: str
    bytes_per_element: int            # float32: params, grads, each state read + written
    states: List[str]                 # fastopt state names (class attribute order)
    fastopt_class: Callable[..., Any]
    reference_step: Callable[..., None]
    hyper: Dict[str, Any]
    reference_hyper: Dict[str, Any]
    torch_name: str
    torch_hyper: Dict[str, Any]
    torch_modes: Sequence[str]        # "fused", "foreach"
    takes_step: bool = True


OPTIMIZERS = {
    "adamw": OptimizerCase("adamw", 28, ["exp_avgs", "exp_avg_sqs"], optim.AdamW, reference.adam,
                       dict(lr=1e-3, weight_decay=1e-2),
                       dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
                       "AdamW", dict(lr=1e-3, weight_decay=1e-2), ("fused", "foreach")),
    "sgd": OptimizerCase("sgd", 20, ["momentum_buffers"], optim.SGD, reference.sgd,
                     dict(lr=1e-2, momentum=0.9), dict(lr=1e-2, momentum=0.9),
                     "SGD", dict(lr=1e-2, momentum=0.9), ("fused", "foreach")),
    "adagrad": OptimizerCase("adagrad", 20, ["state_sums"], optim.Adagrad, reference.adagrad,
                         dict(lr=1e-2), dict(lr=1e-2), "Adagrad", dict(lr=1e-2),
                         ("fused", "foreach")),
    "rmsprop": OptimizerCase("rmsprop", 20, ["square_avgs"], optim.RMSprop, reference.rmsprop,
                         dict(lr=1e-2), dict(lr=1e-2), "RMSprop", dict(lr=1e-2), ("foreach",),
                         takes_step=False),
    # torch has no Sophia: the NumPy reference is its peer. (The Hessian EMA stays zero, so
    # every step is the clipped sign step; the memory traffic is the same.)
    "sophia": OptimizerCase("sophia", 24, ["exp_avgs", "hessian_diags"], optim.Sophia,
                            reference.sophia, dict(lr=1e-3), dict(lr=1e-3), "", {}, (),
                            takes_step=False),
}

# int8 quantization cases: name -> bytes per element counted (each operand once).
QUANT_CASES = {
    "blockwise-256 quantize": 5,      # read 4 B, write 1 B (+4 B per 256-element block)
    "blockwise-256 dequantize": 5,    # read 1 B, write 4 B
    "per-tensor quantize": 5,         # given scale and zero point
    "dynamic per-tensor quantize": 9,  # min/max pass (4 B) + quantize pass (4 B + 1 B)
}

# Batched Newton: (n, systems) per case; the quick run uses a quarter of the systems.
NEWTON_CASES = [(8, 65536), (32, 16384), (64, 4096)]


@dataclass
class Row:
    case: str
    device: str
    bytes_per_element: int
    elements: int
    tensors: int
    check: str = "ok"                               # "ok" or "FAIL: ..."
    times_ms: Dict[str, float] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)  # peer -> why it did not run

    def pct_of_ceiling(self, impl: str, ceiling_gbs: float) -> float:
        gbs = self.bytes_per_element * self.elements / (self.times_ms[impl] * 1e-3) / 1e9
        return 100.0 * gbs / ceiling_gbs

    def speedup_vs_best_peer(self) -> Optional[float]:
        peers = [t for k, t in self.times_ms.items() if k != "fastopt"]
        if "fastopt" not in self.times_ms or not peers:
            return None
        return min(peers) / self.times_ms["fastopt"]


def _median_times(fns: Dict[str, Callable[[], None]], repeats: int, rounds: int = 3,
                  budget_s: float = 4.0) -> Dict[str, float]:
    """Median ms per call. Each implementation runs in blocks, alternating between
    implementations for `rounds` rounds; a short pause between blocks lets the previous
    library's spinning worker threads go to sleep before the next is timed. A slow
    implementation gets fewer repeats (at least `rounds`) so that it spends about
    `budget_s` seconds."""
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    per_round: Dict[str, int] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up: page faults, lazy state allocation, thread pool start
        once = time.perf_counter() - t0
        per_round[name] = max(1, min(math.ceil(repeats / rounds), int(budget_s / rounds / max(once, 1e-9))))
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.02)
            for _ in range(per_round[name]):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def _import_torch():
    try:
        import torch  # noqa: F401
        return torch
    except Exception:  # not installed, or broken install: reported as "not installed"
        return None


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
        return {"elements": n, "bytes_per_element": 12, "ms": ms,
                "gbs": 12 * n / (ms * 1e-3) / 1e9}

    # -- optimizer cases ----------------------------------------------------------------
    def layouts(self) -> List[Tuple[str, List[Tuple[int, ...]]]]:
        if self.quick:
            return [("1x2^22", [(1 << 22,)]), ("200x4096", [(4096,)] * 200)]
        return [("1x2^24", [(1 << 24,)]), ("1000x4096", [(4096,)] * 1000),
                ("gpt2-small", gpt2_small_shapes())]

    def optimizer_case(self, spec: OptimizerCase, layout: str, shapes: List[Tuple[int, ...]]) -> Row:
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
        ref_states = [[np.zeros_like(p) for p in params] for _ in spec.states]

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

    def add_torch_peers(self, spec: OptimizerCase, params, grads, fns, row: Row) -> None:
        if not spec.torch_modes:
            return
        if self.torch is None:
            row.notes["torch"] = "not installed"
            return
        torch = self.torch
        for mode in spec.torch_modes:
            tparams = [torch.from_numpy(p.copy()) for p in params]
            for tp, g in zip(tparams, grads):
                tp.grad = torch.from_numpy(g)
            try:
                topt = getattr(torch.optim, spec.torch_name)(tparams, **spec.torch_hyper,
                                                             **{mode: True})
                topt.step()
            except Exception as exc:  # a torch build without this mode
                row.notes[f"torch-{mode}"] = f"unavailable ({type(exc).__name__})"
                continue
            fns[f"torch-{mode}"] = topt.step

    def newton_case(self, n: int, systems: int) -> Row:
        """float32 batched damped Newton: bytes per system = H (n*n) + g + p read/written."""
        if self.quick:
            systems //= 4
        row = Row(f"newton n={n} x{systems}", "cpu", 4 * (n * n + 3 * n), systems, 1)
        A = self.rng.standard_normal((systems, n, n), dtype=np.float32)
        H = A @ np.swapaxes(A, -1, -2) / n + np.eye(n, dtype=np.float32)
        g = self.rng.standard_normal((systems, n), dtype=np.float32)
        p = self.rng.standard_normal((systems, n), dtype=np.float32)
        want = np.linalg.solve(H.astype(np.float64), g.astype(np.float64)[..., None])[..., 0]
        got = cholesky_solve(H, g)
        err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
        if not err < 1e-3:
            row.check = f"FAIL: relative error {err:.3g} against numpy.linalg.solve (float64)"
            return row
        fns: Dict[str, Callable[[], None]] = {"fastopt": lambda: newton_(p, g, H, lr=1e-3)}
        fns["numpy.linalg.solve"] = lambda: np.linalg.solve(H, g[..., None])
        if self.torch is not None:
            torch = self.torch
            tH, tg = torch.from_numpy(H), torch.from_numpy(g)[..., None]
            fns["torch.linalg.solve"] = lambda: torch.linalg.solve(tH, tg)
            fns["torch cholesky+solve"] = lambda: torch.cholesky_solve(
                tg, torch.linalg.cholesky(tH))
        else:
            row.notes["torch"] = "not installed"
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def quant_case(self, name: str) -> Row:
        """float32 input; fastopt is timed through its public API (output allocation
        included, as for every peer). Results must equal the reference bit for bit."""
        n = 1 << (22 if self.quick else 25)
        row = Row(f"int8 {name}", "cpu", QUANT_CASES[name], n, 1)
        x = self.rng.standard_normal(n, dtype=np.float32)
        torch = self.torch
        tx = torch.from_numpy(x) if torch is not None else None
        fns: Dict[str, Callable[[], Any]] = {}
        if name == "blockwise-256 quantize":
            got, want = quant.quantize_blockwise(x), reference.quantize_blockwise(x)
            fns["fastopt"] = lambda: quant.quantize_blockwise(x)
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
            got = quant.dequantize_blockwise(q, absmax)
            want = reference.dequantize_blockwise(q, absmax)
            fns["fastopt"] = lambda: quant.dequantize_blockwise(q, absmax)
            fns["numpy"] = lambda: reference.dequantize_blockwise(q, absmax)
            if torch is not None:
                tq, ta = torch.from_numpy(q).view(-1, 256), torch.from_numpy(absmax)
                fns["torch eager"] = lambda: tq.to(torch.float32) * (ta / 127.0)[:, None]
        else:
            dynamic = name.startswith("dynamic")
            scale, zp = quant.choose_qparams(x, symmetric=False)
            if dynamic:
                def fastopt_fn():
                    s, z = quant.choose_qparams(x, symmetric=False)
                    return quant.quantize_per_tensor(x, s, z)
            else:
                def fastopt_fn():
                    return quant.quantize_per_tensor(x, scale, zp)
            got = fastopt_fn()
            want = reference.quantize_affine(x, scale, zp, -128, 127).astype(np.int8)
            fns["fastopt"] = fastopt_fn

            def numpy_fn():
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                s = np.float32((hi - lo) / 255.0) if dynamic else scale
                z = int(-128 - round(lo / s)) if dynamic else zp
                return reference.quantize_affine(x, s, z, -128, 127).astype(np.int8)
            fns["numpy"] = numpy_fn
            if torch is not None:
                import warnings
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                if dynamic:
                    fns["torch.quantize_per_tensor_dynamic"] = \
                        lambda: torch.quantize_per_tensor_dynamic(tx, torch.qint8, False)
                else:
                    fns["torch.quantize_per_tensor"] = \
                        lambda: torch.quantize_per_tensor(tx, scale, zp, torch.qint8)
        if torch is None:
            row.notes["torch"] = "not installed"
        same = all(np.array_equal(a, b) for a, b in zip(
            got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)))
        if not same:
            row.check = "FAIL: differs from the float32 reference"
            return row
        row.times_ms = _median_times(fns, self.repeats)
        return row

    def check(self, spec: OptimizerCase, params, grads) -> Optional[str]:
        """Three steps of fastopt against the float64 reference on the first tensors."""
        sample = list(range(min(3, len(params))))
        ps = [params[i].copy() for i in sample]
        gs = [grads[i] for i in sample]
        opt = spec.fastopt_class(ps, **spec.hyper)
        ref = [params[i].astype(np.float64) for i in sample]
        ref_states = [[np.zeros_like(p) for p in ref] for _ in spec.states]
        for t in range(1, 4):
            opt.step(gs)
            for i, (p, g) in enumerate(zip(ref, gs)):
                kwargs = dict(spec.reference_hyper)
                if spec.takes_step:
                    kwargs["step"] = t
                spec.reference_step(p, g.astype(np.float64), *[s[i] for s in ref_states],
                                    **kwargs)
        for got, want in zip(ps, ref):
            err = float(np.max(np.abs(got - want), initial=0.0))
            if not np.all(np.isfinite(got)) or err > 1e-5 * (1 + float(np.max(np.abs(want)))):
                return f"max abs error {err:.3g} against the float64 reference"
        return None


def _machine(cuda: Dict[str, Any]) -> Dict[str, Any]:
    facts = _runtime.info()
    torch = _import_torch()
    facts["torch"] = torch.__version__ if torch is not None else "not installed"
    facts["platform"] = platform.platform()
    facts["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    facts["cuda"] = cuda
    return facts


def _format_table(rows: List[Row], ceiling_gbs: float) -> str:
    impls: List[str] = []
    for r in rows:
        for k in r.times_ms:
            if k not in impls:
                impls.append(k)
    header = ["case", "B/el", *[f"{k} ms" for k in impls], "fastopt %ceil", "best peer %ceil",
              "speedup"]
    lines = [header]
    for r in rows:
        if r.check != "ok":
            lines.append([r.case, str(r.bytes_per_element), r.check])
            continue
        peers = {k: t for k, t in r.times_ms.items() if k != "fastopt"}
        best = min(peers, key=peers.get) if peers else None
        sp = r.speedup_vs_best_peer()
        lines.append([r.case, str(r.bytes_per_element),
                      *[f"{r.times_ms[k]:.3f}" if k in r.times_ms else "-" for k in impls],
                      f"{r.pct_of_ceiling('fastopt', ceiling_gbs):.0f}%",
                      f"{r.pct_of_ceiling(best, ceiling_gbs):.0f}% ({best})" if best else "-",
                      f"{sp:.2f}x" if sp else "-"])
    widths = [max(len(l[i]) for l in lines if i < len(l)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(l)) for l in lines)


def _plot(rows: List[Row], ceiling_gbs: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.check == "ok"]
    impls = sorted({k for r in ok for k in r.times_ms}, key=lambda k: (k != "fastopt", k))
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ok)), 4))
    for j, impl in enumerate(impls):
        xs = [i + j * width for i, r in enumerate(ok) if impl in r.times_ms]
        ys = [r.pct_of_ceiling(impl, ceiling_gbs) for r in ok if impl in r.times_ms]
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ok))])
    ax.set_xticklabels([r.case for r in ok], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of bandwidth ceiling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(argv_options: Any) -> int:
    """Entry point of ``python -m fastopt bench`` (options parsed in __main__)."""
    only = set(argv_options.only.split(",")) if argv_options.only else None
    known = set(OPTIMIZERS) | {"newton", "quant"}
    unknown = (only or set()) - known
    if unknown:
        print(f"--only: unknown case(s) {sorted(unknown)}; known: {sorted(known)}",
              file=sys.stderr)
        return 2
    show = sys.stderr.isatty() or argv_options.progress

    def progress(msg: str) -> None:
        if show:
            print(f"\r\033[K[bench] {msg}", end="", file=sys.stderr, flush=True)

    from ._build import cuda_status, cuda_unavailable_reason

    cuda = cuda_status()
    devices = ["cpu", "cuda"] if argv_options.device == "all" else [argv_options.device]
    rows: List[Row] = []
    result: Dict[str, Any] = {"machine": _machine(cuda), "quick": argv_options.quick}
    if "cuda" in devices:
        why = cuda_unavailable_reason()
        print(f"cuda: skipped ({why})")
        result["cuda_skipped"] = why
    if "cpu" in devices:
        bench = CpuBench(argv_options.quick, progress)
        progress("ceiling")
        ceiling = bench.ceiling()
        result["ceiling_cpu"] = ceiling
        names = [n for n in OPTIMIZERS if only is None or n in only]
        cases: List[Tuple[str, Callable[[], Row]]] = [
            (f"{n} {lay}", lambda s=OPTIMIZERS[n], lay=lay, shapes=shapes:
             bench.optimizer_case(s, lay, shapes))
            for n in names for lay, shapes in bench.layouts()]
        if only is None or "quant" in only:
            cases += [(f"int8 {q}", lambda q=q: bench.quant_case(q)) for q in QUANT_CASES]
        if only is None or "newton" in only:
            cases += [(f"newton n={n}", lambda n=n, b=b: bench.newton_case(n, b))
                      for n, b in NEWTON_CASES]
        for k, (label, case) in enumerate(cases):
            progress(f"{k + 1}/{len(cases)} {label}")
            rows.append(case())
        progress("done")
        if show:
            print(file=sys.stderr)
        m = result["machine"]
        print(f"CPU: {m['cpu_model']}, {m['num_threads']} threads, path {m['cpu_path']}; "
              f"numpy {m['numpy']}, torch {m['torch']}")
        print(f"ceiling (in-place a += b, {ceiling['elements']} float32, all threads): "
              f"{ceiling['gbs']:.1f} GB/s")
        print(_format_table(rows, ceiling["gbs"]))
        missing: Dict[Tuple[str, str], List[str]] = {}
        for r in rows:
            for peer, why in r.notes.items():
                missing.setdefault((peer, why), []).append(r.case)
        for (peer, why), cases_hit in missing.items():
            where = "every case" if len(cases_hit) == len(rows) else ", ".join(cases_hit)
            print(f"  {peer}: {why} ({where})")
        result["cases"] = [
            dict(case=r.case, device=r.device, bytes_per_element=r.bytes_per_element,
                 elements=r.elements, tensors=r.tensors, check=r.check, times_ms=r.times_ms,
                 pct_of_ceiling={k: r.pct_of_ceiling(k, ceiling["gbs"]) for k in r.times_ms},
                 speedup_vs_best_peer=r.speedup_vs_best_peer(), notes=r.notes)
            for r in rows]
        if argv_options.plot:
            try:
                _plot(rows, ceiling["gbs"], argv_options.plot)
                print(f"plot: {argv_options.plot}")
            except ImportError:
                print("plot: skipped (matplotlib not installed: pip install fastopt[bench])")
    if argv_options.json:
        with open(argv_options.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"json: {argv_options.json}")
    return 1 if any(r.check != "ok" for r in rows) else 0
