"""Fewer bytes per parameter: AdamW with bfloat16 and 8-bit state and with masks against
float32 state and ``torch.optim.AdamW(fused=True)``, on the CPU or the GPU.

``python -m fastopt.bench.lowbit_rows [--device cpu|cuda] [--log2 24] [--model
one|gpt2-small] [--rounds 9]`` times, interleaved in rotating order per round on one float32
tensor of 2^log2 elements or on GPT-2 small's params (torch tensors: the same library for
every column), fastopt.torch.AdamW with float32 state (28 B per element: p, m, v read and
written, g read), with bfloat16 state (20 B), with a mask (29 B: one byte more), and torch's
fused AdamW (28 B); then bfloat16 params, grads and state (14 B): fastopt with stochastic
rounding against torch's fused AdamW on bfloat16 params, and with float32 master weights (28
B). Then 8-bit state (16 B per element with float32 params; 10 B with bfloat16 params and
grads, stochastic rounding), and bitsandbytes' and torchao's ``AdamW8bit`` when they are
installed (the same 8-bit state bytes). It prints per column the median ms per step with the
spread (min-max) over the rounds, the bytes per element, the achieved GB/s and the median
per-round ratio of torch fused's time to the column's (> 1: faster than torch fused).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

from fastopt.bench.common import gpt2_small_shapes


def columns(torch: Any, shapes: List[Tuple[int, ...]], device: str) -> Dict[str, Any]:
    """(step function, bytes per element) per column, each on its own params (one per
    shape) with one grad each."""
    import fastopt.torch as fot

    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    masks = [(torch.rand(s, generator=gen) < 0.5).to(device) for s in shapes]

    def params() -> List[Any]:
        out = []
        for v, g in zip(values, grads):
            p = v.clone().to(device).requires_grad_()
            p.grad = g
            out.append(p)
        return out

    out: Dict[str, Any] = {}
    out["fastopt fp32 state"] = (fot.AdamW(params(), lr=1e-3).step, 28)
    out["fastopt bf16 state"] = (fot.AdamW(params(), lr=1e-3, state_dtype="bfloat16").step, 20)
    masked = params()
    out["fastopt masked"] = (fot.AdamW(masked, lr=1e-3, masks=masks).step, 29)
    out["torch fused"] = (torch.optim.AdamW(params(), lr=1e-3, fused=True).step, 28)

    def bf16_params() -> List[Any]:
        out = []
        for v, g in zip(values, grads):
            p = v.to(torch.bfloat16).to(device).requires_grad_()
            p.grad = g.to(torch.bfloat16)
            out.append(p)
        return out

    # bfloat16 params, grads and state: 14 B per element (torch keeps the state in the
    # params' dtype, so its fused AdamW moves the same bytes, rounding to nearest)
    sr = fot.AdamW(bf16_params(), lr=1e-3, state_dtype="bfloat16", stochastic_rounding=True)
    out["fastopt bf16 all, SR"] = (sr.step, 14)
    out["torch fused bf16"] = (torch.optim.AdamW(bf16_params(), lr=1e-3, fused=True).step, 14)
    # bfloat16 params and grads with float32 master weights and state, one fused pass:
    # master (r+w) 8, p (w) 2, g 2, m and v (r+w) 16
    master = fot.AdamW(bf16_params(), lr=1e-3, master_weights=True)
    out["fastopt bf16 master"] = (master.step, 28)
    # 8-bit state: p (r+w) 8, g 4, m and v (r+w) 1 each: 16 B; bfloat16 params and grads: 10 B
    out["fastopt int8 state"] = (fot.AdamW(params(), lr=1e-3, state_dtype="int8").step, 16)
    sr8 = fot.AdamW(bf16_params(), lr=1e-3, state_dtype="int8", stochastic_rounding=True)
    out["fastopt bf16+int8, SR"] = (sr8.step, 10)
    try:
        import bitsandbytes

        out["bitsandbytes 8bit"] = (bitsandbytes.optim.AdamW8bit(params(), lr=1e-3).step, 16)
    except ImportError:
        pass
    try:
        from torchao.optim import AdamW8bit

        out["torchao 8bit"] = (AdamW8bit(params(), lr=1e-3).step, 16)
    except ImportError:
        pass
    return out


def compare(
    shapes: List[Tuple[int, ...]], device: str, rounds: int, calls: int
) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """(ms per step per round, bytes per element) for every column, interleaved in rotating
    order."""
    import torch

    cols = columns(torch, shapes, device)
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else lambda: None
    for fn, _ in cols.values():
        fn()
    sync()
    samples: Dict[str, List[float]] = {k: [] for k in cols}
    names = list(cols)
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            fn = cols[name][0]
            time.sleep(0.02)
            sync()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append(1e3 * (time.perf_counter() - t) / calls)
    return samples, {k: b for k, (_, b) in cols.items()}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--log2", type=int, default=24, help="elements: 2^log2")
    parser.add_argument(
        "--model",
        default="one",
        choices=["one", "gpt2-small"],
        help="one tensor of 2^log2 elements, or GPT-2 small's 148 params (124M elements)",
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="steps per timed block")
    args = parser.parse_args()
    if args.model == "gpt2-small":
        shapes = gpt2_small_shapes()
        what = f"GPT-2 small's {len(shapes)} float32 params"
    else:
        shapes = [(1 << args.log2,)]
        what = f"one float32 tensor of 2^{args.log2} elements"
    n = sum(math.prod(s) for s in shapes)
    samples, bytes_per = compare(shapes, args.device, args.rounds, args.calls)
    fused = samples["torch fused"]
    print(
        f"AdamW, {what} on {args.device}, {args.rounds} rounds x {args.calls} steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (B/elem: of the "
        "tensors with 8-bit state; those under 4096 elements keep float32 state)"
    )
    print(
        f"  {'column':20s} {'ms median (min-max)':>24s} {'B/elem':>6s} {'GB/s':>6s} "
        f"{'torch fused / it':>16s}"
    )
    for name, values in samples.items():
        med = statistics.median(values)
        gbs = bytes_per[name] * n / (med * 1e-3) / 1e9
        ratio = statistics.median(f / v for f, v in zip(fused, values))
        spread = f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"
        print(f"  {name:20s} {spread:>24s} {bytes_per[name]:6d} {gbs:6.1f} {ratio:16.2f}")


if __name__ == "__main__":
    main()
