"""The fixed cost of one functional step: ``python -m fastopt.bench.overhead``.

Each optimizer's functional step (``fastopt.sgd_``, ``fastopt.adam_``, ...) is timed on one
float32 array of 1 element, where the kernel's own work is a few nanoseconds, so the time is
the call's fixed cost: validating the hyper-parameters (cached per distinct set), turning
the arguments into the binding's lists and the binding's checks. Beside them: the same step
on 650 elements and NumPy's own ``p -= lr * g`` on 650 elements (a NumPy user's SGD step).
Figures are the best of ``--rounds`` blocks of ``--calls`` calls each, in microseconds.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from .._specs import OPTIMIZERS


def _best_us(fn: Callable[[], Any], rounds: int, calls: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


def _call(f: Callable[..., Any], arrays: Tuple[Any, ...], takes_step: bool) -> Callable[[], Any]:
    if takes_step:
        return lambda: f(*arrays, lr=1e-3, step=3)
    return lambda: f(*arrays, lr=1e-3)


def step_calls(size: int, rng: np.random.Generator) -> Dict[str, Callable[[], Any]]:
    """{optimizer: a call of its functional step, as a user writes it, with its default
    hyper-parameters on fresh float32 arrays of ``size`` elements}, for every optimizer of
    the table."""
    import fastopt

    calls: Dict[str, Callable[[], Any]] = {}
    for name, spec in OPTIMIZERS.items():
        # the required arrays, positional (they come first in every signature), and the
        # keywords a user writes: lr, and step where the optimizer counts steps
        arrays = tuple(
            np.abs(rng.standard_normal(size)).astype(np.float32) + 0.5
            for a in spec.arrays
            if not a.optional
        )
        calls[name] = _call(getattr(fastopt, f"{name}_"), arrays, spec.takes_step)
    return calls


def measure(rounds: int, calls: int) -> List[Dict[str, Any]]:
    rng = np.random.default_rng(0)
    p = rng.standard_normal(650).astype(np.float32)
    g = rng.standard_normal(650).astype(np.float32)
    rows = [
        {
            "case": "numpy p -= lr * g",
            "1 element": None,
            "650 elements": _best_us(lambda: np.subtract(p, 1e-3 * g, out=p), rounds, calls),
        }
    ]
    small, larger = step_calls(1, rng), step_calls(650, rng)
    for name in small:
        rows.append(
            {
                "case": f"fastopt.{name}_",
                "1 element": _best_us(small[name], rounds, calls),
                "650 elements": _best_us(larger[name], rounds, calls),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'case':24s} {'1 element':>10s} {'650 elements':>13s}   (us per call, best block)")
    for row in measure(args.rounds, args.calls):
        one = "" if row["1 element"] is None else f"{row['1 element']:.2f}"
        print(f"{row['case']:24s} {one:>10s} {row['650 elements']:13.2f}")


if __name__ == "__main__":
    main()
