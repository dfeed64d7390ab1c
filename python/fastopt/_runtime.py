"""Threads, CPU code path and build/runtime facts."""

from __future__ import annotations

import numbers
import os
import platform
import warnings
from typing import Any, Dict

import numpy as np

from ._ext import _cpu, cuda_status


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (default: OMP_NUM_THREADS, else all cores).
    Results are bit-identical for any thread count."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int >= 1, got {type(n).__name__}")
    n = int(n)  # (a NumPy integer too)
    if not -(2**63) <= n < 2**63:  # past the binding's 64-bit integer, which checks the range
        raise ValueError(f"n: number of threads out of range, got {n}")
    _cpu.set_num_threads(n)


def get_num_threads() -> int:
    """The threads a CPU kernel call uses (``set_num_threads``; default: OMP_NUM_THREADS,
    else all cores)."""
    return _cpu.get_num_threads()


def set_cpu_path(path: str) -> None:
    """Force the CPU code path: "scalar", "avx2" or "auto" (the best the CPU supports).
    Both paths give bit-identical results; the environment variable FASTOPT_CPU sets it at
    import."""
    if not isinstance(path, str):
        raise TypeError(f"path: expected a str, got {type(path).__name__}")
    _cpu.set_cpu_path(path)


def get_cpu_path() -> str:
    """The CPU kernels in use: "avx2" or "scalar" (``set_cpu_path``, ``FASTOPT_CPU``)."""
    return _cpu.get_cpu_path()


def _apply_cpu_env() -> None:
    """FASTOPT_CPU=scalar|avx2|auto forces the CPU path at import (used by the tests)."""
    requested = os.environ.get("FASTOPT_CPU", "").strip()
    if requested:
        try:
            _cpu.set_cpu_path(requested)
        except ValueError as exc:
            warnings.warn(f"FASTOPT_CPU={requested!r} ignored: {exc}", RuntimeWarning, stacklevel=2)


_apply_cpu_env()


def cuda_available() -> bool:
    """True when fastopt._cuda is built and sees a usable GPU."""
    return bool(cuda_status()["usable"])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> Dict[str, Any]:
    """Version, build options, CPU features, dispatch path, threads and CUDA status."""
    build = dict(_cpu.build_info())
    return {
        "version": build["version"],
        "compiler": build["compiler"],
        "openmp": build["openmp"],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_has_avx2_fma": build["cpu_has_avx2_fma"],
        "cpu_paths_built": list(build["cpu_paths"]),
        "cpu_path": get_cpu_path(),
        "fastopt_cpu_env": os.environ.get("FASTOPT_CPU"),
        "num_threads": get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": cuda_status(),
    }
