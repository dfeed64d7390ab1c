"""Where the time of a large CPU quantize/dequantize call goes: the kernel alone (into
outputs allocated once), the public call (which allocates its outputs, as every peer
does), and what allocating and first touching an output of that size costs by itself.

    python bench/quant_alloc.py [--log2 25] [--repeats 21]

A fresh output's pages are zeroed by the kernel on first touch (page faults), which on a
VM can cost more than the quantization itself; `python -m fastopt bench` times the public
calls. Figures are medians, as % of the in-place `a += b` ceiling measured in this run.
"""
import argparse
import statistics
import time

import numpy as np

import fastopt
from fastopt._ext import _cpu


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    n, r = 1 << args.log2, args.repeats
    rng = np.random.default_rng(0)
    a, b = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    ceiling_ms = median_ms(lambda: _cpu.add_inplace(a, b), r)
    ceiling_gbs = 12 * n / ceiling_ms / 1e6
    print(f"n = 2^{args.log2}, {fastopt.get_num_threads()} threads; ceiling (a += b) "
          f"{ceiling_gbs:.1f} GB/s")

    def row(what: str, ms: float, bytes_per_element: int = 5) -> None:
        pct = bytes_per_element * n / ms / 1e6 / ceiling_gbs * 100
        print(f"  {what:<58} {ms:8.2f} ms  {pct:4.0f}% of the ceiling")

    q, absmax = np.empty(n, np.int8), np.empty(n // 256, np.float32)
    row("blockwise-256 quantize, kernel into allocated outputs",
        median_ms(lambda: _cpu.quantize_blockwise(x, q, absmax, 256, False, 1, False), r))
    row("blockwise-256 quantize, fastopt.quantize_blockwise",
        median_ms(lambda: fastopt.quantize_blockwise(x), r))
    q, absmax = fastopt.quantize_blockwise(x)
    out = np.empty(n, np.float32)
    row("blockwise-256 dequantize, kernel into an allocated output",
        median_ms(lambda: _cpu.dequantize_blockwise(q, absmax, out, 256), r))
    row("blockwise-256 dequantize, fastopt.dequantize_blockwise",
        median_ms(lambda: fastopt.dequantize_blockwise(q, absmax), r))
    scale, zero_point = np.array([0.02], np.float32), np.array([3.0], np.float32)
    qa = np.empty(n, np.int8)
    row("per-tensor quantize, kernel into an allocated output",
        median_ms(lambda: _cpu.quantize_affine(x, qa, scale, zero_point, None, False), r))
    row("per-tensor quantize, fastopt.quantize_per_tensor",
        median_ms(lambda: fastopt.quantize_per_tensor(x, 0.02, 3), r))
    print(f"  allocating and touching a fresh int8 output: "
          f"{median_ms(lambda: np.empty(n, np.int8).fill(1), r):.2f} ms "
          f"(filling an allocated one: {median_ms(lambda: qa.fill(1), r):.2f} ms); "
          f"float32: {median_ms(lambda: np.empty(n, np.float32).fill(1), r):.2f} ms "
          f"({median_ms(lambda: out.fill(1), r):.2f} ms)")


if __name__ == "__main__":
    main()
