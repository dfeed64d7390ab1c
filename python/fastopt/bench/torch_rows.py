"""``fastopt.torch`` in the benchmark, and the cost of the drop-in over the array-list class.

``add_fastopt_torch`` gives an optimizer row a "fastopt.torch" column: the case's optimizer as
a ``torch.optim.Optimizer`` (``fastopt.torch.<Class>``) stepping its own torch copy of the
params with ``p.grad`` set once, on the CPU or the GPU, timed with the other columns (it is
not a peer: the speedup column compares the array-list class with torch.optim).

``python -m fastopt.bench.torch_rows`` times, paired and interleaved on the same float32 host
arrays, the array-list class (``fastopt.AdamW(list).step(grads)``), ``fastopt.torch.AdamW``
and ``torch.optim.AdamW(fused=True)`` over GPT-2 small's 148 tensors and 1000 x 4096 (the array
class also with the grads as torch tensors, as a torch user would pass them), and prints per
implementation the median ms and the spread (min-max) over the rounds, and per round the
ratios fastopt.torch / array class and torch fused / fastopt.torch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from .common import OptimizerCase, Row, gpt2_small_shapes


def add_fastopt_torch(
    torch: Any,
    spec: OptimizerCase,
    make_params: Callable[[], List[Any]],
    grads: List[Any],
    fns: Dict[str, Callable[[], Any]],
    row: Row,
) -> None:
    """The "fastopt.torch" column of an optimizer row (torch tensors from ``make_params()``
    on the row's device, ``grads`` torch tensors there, read only)."""
    from ..torch import CLASSES

    params = make_params()
    for p, g in zip(params, grads):
        p.grad = g
    try:
        opt = CLASSES[spec.name](params, **spec.hyper)
        opt.step()
    except Exception as exc:  # reported in the row, as an unavailable peer is
        row.notes["fastopt.torch"] = f"failed ({type(exc).__name__}: {exc})"
        return
    fns["fastopt.torch"] = opt.step


# ---- the paired comparison ---------------------------------------------------------------------


def _time_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median ms per call over ``calls`` calls."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def compare(shapes: List[Tuple[int, ...]], rounds: int, calls: int) -> Dict[str, Any]:
    """Times the three implementations on the same arrays, in rotating order per round."""
    import torch

    import fastopt
    from fastopt.torch import AdamW as TorchAdamW

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    array_opt = fastopt.AdamW(arrays, lr=1e-3)
    tensors = [torch.from_numpy(a).requires_grad_() for a in arrays]  # the same memory
    fused_params = [torch.from_numpy(a.copy()).requires_grad_() for a in arrays]
    for p, q, g in zip(tensors, fused_params, grads):
        p.grad = q.grad = torch.from_numpy(g)
    torch_opt = TorchAdamW(tensors, lr=1e-3)
    fused = torch.optim.AdamW(fused_params, lr=1e-3, fused=True)
    grad_tensors = [p.grad for p in tensors]
    fns = {
        "array class": lambda: array_opt.step(grads),
        "array class, torch grads": lambda: array_opt.step(grad_tensors),
        "fastopt.torch": torch_opt.step,
        "torch fused": fused.step,
    }
    for fn in fns.values():
        fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            time.sleep(0.02)
            samples[name].append(_time_ms(fns[name], calls if name != "torch fused" else 1))

    def ratio(a: str, b: str) -> List[float]:
        return [x / y for x, y in zip(samples[a], samples[b])]

    return {
        "samples": samples,
        "torch/array": ratio("fastopt.torch", "array class"),
        "torch/array-tg": ratio("fastopt.torch", "array class, torch grads"),
        "fused/torch": ratio("torch fused", "fastopt.torch"),
    }


def _spread(values: List[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed block")
    args = parser.parse_args()
    layouts: List[Tuple[str, List[Tuple[int, ...]]]] = [
        ("gpt2-small", gpt2_small_shapes()),
        ("1000x4096", [(4096,)] * 1000),
    ]
    for layout, shapes in layouts:
        out = compare(shapes, args.rounds, args.calls)
        print(f"{layout} ({len(shapes)} tensors), AdamW float32, ms per step:")
        for name, values in out["samples"].items():
            print(f"  {name:25s} {_spread(values)}")
        print(f"  fastopt.torch / array class, per round: {_spread(out['torch/array'])}")
        print(f"  fastopt.torch / array class with torch grads: {_spread(out['torch/array-tg'])}")
        print(f"  torch fused / fastopt.torch, per round: {_spread(out['fused/torch'])}")


if __name__ == "__main__":
    main()
