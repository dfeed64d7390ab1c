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

On the GPU (``--device cuda|all`` when CUDA is usable) the same optimizer, int8 and
Newton cases run on device arrays made with PyTorch (or CuPy without a CUDA build of
torch), are checked against fastopt's CPU kernels (optimizer steps are meant to be, int8
results and Newton for n <= 64 must be bit-identical) and are timed with CUDA events over
blocks of calls. The peers are ``torch.optim`` fused / foreach and a hand-written CuPy
``ElementwiseKernel`` called once per tensor; blockwise absmax written in torch as a user
would (eager, and ``torch.compile`` of it where it compiles in time),
``torch.quantize_per_tensor[_dynamic]``; ``torch.linalg.solve``, torch Cholesky +
``cholesky_solve`` and ``cupy.linalg.solve``. The ceiling is a large device-to-device
copy (read + write); each case's target is marked met or NOT MET under the table.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from .. import _ext, _runtime
from .common import OPTIMIZERS, Row, _cases, _import_torch, _print_rows, _row_json, _run_cases
from .cpu import CpuBench
from .gpu import DeviceArrays, _device_arrays, _run_gpu


def _machine(cuda: Dict[str, Any]) -> Dict[str, Any]:
    facts = _runtime.info()
    torch = _import_torch()
    facts["torch"] = torch.__version__ if torch is not None else "not installed"
    facts["platform"] = platform.platform()
    facts["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    facts["cuda"] = cuda
    return facts


def _plot(panels: List[Tuple[str, List[Row], float]], path: str) -> None:
    """One bar chart per device: % of that device's ceiling per case and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [r for r in rows if r.check == "ok"], c) for title, rows, c in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError("no row passed its check")
    widest = max(len(ok) for _, ok, _ in panels)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6, 1.2 * widest), 4 * len(panels)), squeeze=False
    )
    for ax, (title, ok, ceiling_gbs) in zip(axes[:, 0], panels):
        impls = sorted({k for r in ok for k in r.times_ms}, key=lambda k: (k != "fastopt", k))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs = [i + j * width for i, r in enumerate(ok) if impl in r.times_ms]
            ys = [r.pct_of_ceiling(impl, ceiling_gbs) for r in ok if impl in r.times_ms]
            ax.bar(xs, ys, width, label=impl)
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ok))])
        ax.set_xticklabels([r.case for r in ok], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("% of bandwidth ceiling")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv_options: Any) -> int:
    """Entry point of ``python -m fastopt bench`` (options parsed in __main__)."""
    only = set(argv_options.only.split(",")) if argv_options.only else None
    known = set(OPTIMIZERS) | {"adafactor", "newton", "quant", "clip", "prune"}
    unknown = (only or set()) - known
    if unknown:
        print(f"--only: unknown case(s) {sorted(unknown)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    # Progress on stderr: in a terminal on one line, rewritten; elsewhere a line per case
    # for a full run (minutes) or with --progress.
    overwrite = sys.stderr.isatty()
    show = overwrite or argv_options.progress or not argv_options.quick

    def progress(msg: str) -> None:
        if overwrite:
            print(f"\r\033[K[bench] {msg}", end="", file=sys.stderr, flush=True)
        elif show:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    cuda = _ext.cuda_status()
    devices = ["cpu", "cuda"] if argv_options.device == "all" else [argv_options.device]
    names = [n for n in OPTIMIZERS if only is None or n in only]
    rows: List[Row] = []
    panels: List[Tuple[str, List[Row], float]] = []
    result: Dict[str, Any] = {"machine": _machine(cuda), "quick": argv_options.quick}
    gpu_arrays: Optional[DeviceArrays] = None
    if "cuda" in devices:
        why = _ext.cuda_unavailable_reason()
        if not why:
            gpu_arrays, why = _device_arrays()
        if why:
            print(f"cuda: skipped ({why})")
            result["cuda_skipped"] = why
    if "cpu" in devices:
        bench = CpuBench(argv_options.quick, progress)
        progress("ceiling")
        ceiling = bench.ceiling()
        result["ceiling_cpu"] = ceiling
        cpu_rows = _run_cases(_cases(bench, names, only), "cpu", progress, overwrite)
        m = result["machine"]
        print(
            f"CPU: {m['cpu_model']}, {m['num_threads']} threads, path {m['cpu_path']}; "
            f"numpy {m['numpy']}, torch {m['torch']}"
        )
        print(
            f"ceiling (in-place a += b, {ceiling['elements']} float32, all threads): "
            f"{ceiling['gbs']:.1f} GB/s"
        )
        _print_rows(cpu_rows, ceiling["gbs"])
        result["cases"] = [_row_json(r, ceiling["gbs"]) for r in cpu_rows]
        rows += cpu_rows
        panels.append(
            (
                f"CPU: {m['cpu_model']}, {m['num_threads']} threads; ceiling "
                f"{ceiling['gbs']:.1f} GB/s (in-place a += b)",
                cpu_rows,
                ceiling["gbs"],
            )
        )
    if gpu_arrays is not None:
        if "cpu" in devices:
            print()
        try:
            gpu_rows, gpu_gbs = _run_gpu(
                gpu_arrays, names, only, argv_options.quick, progress, overwrite, cuda, result
            )
        except Exception as exc:  # the ceiling or the setup: no GPU row can be trusted
            traceback.print_exc()
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            print(f"cuda: ERROR ({why})")
            result["cuda_error"] = why
            rows.append(Row("cuda", "cuda", 0, 0, 0, check=f"ERROR: {why}"))
        else:
            result.setdefault("cases", []).extend(_row_json(r, gpu_gbs) for r in gpu_rows)
            rows += gpu_rows
            panels.append(
                (
                    f"GPU: {result['gpu']['device']}; ceiling {gpu_gbs:.0f} GB/s "
                    "(device-to-device copy)",
                    gpu_rows,
                    gpu_gbs,
                )
            )
    if argv_options.plot and panels:
        try:
            _plot(panels, argv_options.plot)
            print(f"plot: {argv_options.plot}")
        except ImportError:
            print("plot: skipped (matplotlib not installed: pip install fastopt[bench])")
        except ValueError as exc:
            print(f"plot: skipped ({exc})")
    if argv_options.json:
        with open(argv_options.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"json: {argv_options.json}")
    return 1 if any(r.check != "ok" for r in rows) else 0
