"""The compiled modules: fastopt._cpu always, fastopt._cuda when it was built."""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Dict, Optional

from . import _cpu

try:
    from . import _cuda  # type: ignore[attr-defined]
    _cuda_import_error: Optional[str] = None
except ImportError as exc:  # built without CUDA, or the module cannot load
    _cuda = None
    _cuda_import_error = str(exc)


def _apply_cpu_env() -> None:
    """FASTOPT_CPU=scalar|avx2|auto forces the CPU path (used by the tests)."""
    requested = os.environ.get("FASTOPT_CPU", "").strip()
    if requested:
        try:
            _cpu.set_cpu_path(requested)
        except ValueError as exc:
            warnings.warn(f"FASTOPT_CPU={requested!r} ignored: {exc}", RuntimeWarning, stacklevel=2)


_apply_cpu_env()


def _install_array_adapter() -> None:
    from ._arrays import to_host_array

    _cpu.set_array_adapter(to_host_array)


_install_array_adapter()


@functools.lru_cache(maxsize=None)
def _cuda_status() -> Dict[str, Any]:
    if _cuda is None:
        return {"usable": False, "built": False,
                "reason": "fastopt was built without CUDA (no CUDA compiler at build time, "
                          "or FASTOPT_CUDA=OFF)" if _cuda_import_error is None or "No module" in _cuda_import_error
                          else f"fastopt._cuda failed to load: {_cuda_import_error}"}
    status = dict(_cuda.device_status())
    status["built"] = True
    if not status["usable"] and status["driver_version"] == 0:
        status["reason"] = f"no NVIDIA driver found ({status['reason']})"
    return status


def cuda_status() -> Dict[str, Any]:
    """Whether fastopt._cuda is built and sees a GPU, and if not, why (queried once: the
    step functions consult it on every call)."""
    return dict(_cuda_status())


def cuda_unavailable_reason() -> str:
    """Why CUDA cannot be used ("" when it can)."""
    status = _cuda_status()
    return "" if status["usable"] else f"CUDA is not usable: {status['reason']}"
