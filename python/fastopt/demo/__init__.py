"""``python -m fastopt demo``: from training to shipping a model on scikit-learn's digits,
every parameter update through fastopt.

The stages (``stages.STAGES``, run in order) compare optimizers and damped Newton on
logistic regression, learning-rate schedules and L1 vs L2, choose hyper-parameters by
5-fold cross-validation, train an MLP with AdamW and distil it into a smaller student,
quantize the MLP to int8, prune it (50/70/90%, 2:4) and fine-tune it with masked AdamW,
and ship it as a quantized safetensors file. It prints one table (stage, method, final
loss, test accuracy, training time, notes), shows progress on stderr, and with ``--plot``
/ ``--json`` draws every stage's panels and writes every figure. ``--quick`` is the same
run, shorter (under a minute on 2 cores; the test suite runs it). Seeds are fixed: a run
is deterministic but for its times.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from typing import Any, Dict, List, Sequence

from .. import _runtime
from .common import Context, Digits, Panel, Progress, Row, StageResult, seconds_text


def run(args: Any) -> int:
    """Entry point of ``python -m fastopt demo`` (``args``: quick, plot, json)."""
    try:
        data = Digits.load()
        if args.plot:
            import matplotlib  # noqa: F401  (checked before the run, used after it)
    except ImportError as e:
        print(
            "fastopt demo needs scikit-learn, and matplotlib for --plot "
            f"(pip install 'fastopt[demo]'): {e}",
            file=sys.stderr,
        )
        return 1
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    from .stages import STAGES

    ctx = Context(data, bool(args.quick), Progress())
    started = time.perf_counter()
    results: Dict[str, StageResult] = {}
    # The models are small: one BLAS thread is faster for them (and steady on a busy machine).
    with threadpool_limits(limits=1, user_api="blas"):
        for name, stage in STAGES:
            results[name] = stage(ctx)
    elapsed = time.perf_counter() - started
    rows = [row for result in results.values() for row in result.rows]
    print(format_table(rows))
    print(
        f"\n{'quick' if ctx.quick else 'full'} run: {elapsed:.1f} s "
        f"({len(data.y_train)} training / {len(data.y_test)} test images)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_report(ctx, results, elapsed), f, indent=1, default=_jsonable)
        print(f"wrote {args.json}")
    if args.plot:
        plot([panel for result in results.values() for panel in result.panels], args.plot)
        print(f"wrote {args.plot}")
    return 0


def format_table(rows: Sequence[Row]) -> str:
    header = ["stage", "method", "final loss", "accuracy", "time", "notes"]
    cells = [
        [r.stage, r.method, f"{r.loss:.4g}", f"{r.accuracy:.4f}", seconds_text(r.seconds), r.notes]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header) - 1)]
    right = {2, 3, 4}  # numbers

    def line(c: List[str]) -> str:
        parts = [
            f"{v:>{w}}" if i in right else f"{v:<{w}}" for i, (v, w) in enumerate(zip(c, widths))
        ]
        return "  ".join([*parts, c[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths) + "  -----"
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def _report(ctx: Context, results: Dict[str, StageResult], elapsed: float) -> Dict[str, Any]:
    facts = _runtime.info()
    facts["platform"] = platform.platform()
    facts["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return {
        "quick": ctx.quick,
        "seconds": elapsed,
        "machine": facts,
        "data": {"name": "digits", "train": len(ctx.data.y_train), "test": len(ctx.data.y_test)},
        "rows": [vars(r) for result in results.values() for r in result.rows],
        "stages": {
            name: {
                "extra": result.extra,
                "panels": [vars(p) for p in result.panels],
            }
            for name, result in results.items()
        },
    }


def _jsonable(value: Any) -> Any:
    """NumPy scalars and arrays as plain numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot(
    panels: Sequence[Panel],
    path: str,
    *,
    title: str = "fastopt demo: scikit-learn digits",
    cols: int = 3,
) -> None:
    """The panels in one figure (``cols`` columns), written with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _draw(ax: Any, panel: Panel) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.grid is not None:
        xlabels, ylabels, values = panel.grid
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xlabels)), xlabels)
        ax.set_yticks(range(len(ylabels)), ylabels)
        middle = (min(map(min, values)) + max(map(max, values))) / 2
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                color = "k" if v > middle else "w"  # readable on viridis' light and dark ends
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color=color)
        ax.figure.colorbar(image, ax=ax)
        return
    if panel.bars is not None:
        names, heights = list(panel.bars), list(panel.bars.values())
        ax.bar(range(len(names)), heights, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, fontsize=8)
        return
    for i, (name, (xs, ys)) in enumerate(panel.series.items()):
        style = "-" if i < 10 else "--"
        marker = "o" if len(xs) <= 12 else None  # a few points: show each
        ax.plot(xs, ys, label=name, color=f"C{i % 10}", linestyle=style, marker=marker)
    if panel.logy:
        ax.set_yscale("log")
    if panel.logx:
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
