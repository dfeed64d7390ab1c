"""The compiled modules: fastopt._cpu always, fastopt._cuda when it was built and loads.

A leaf of the package: it imports nothing else from fastopt, so every other module can
import it. Run-time settings that act on the modules (the FASTOPT_CPU variable, the array
adapter) are applied by the modules that own them (_runtime, _arrays)."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Dict, Optional

from . import _cpu

_cuda: Optional[ModuleType]
try:  # by name: "from . import _cuda" would report a missing module as a circular import
    _cuda = importlib.import_module(f"{__package__}._cuda")
    _cuda_import_error: Optional[str] = None
except ImportError as exc:  # built without CUDA ("No module named"), or it cannot load
    _cuda = None
    _cuda_import_error = str(exc)

__all__ = ["_cpu", "_cuda", "cuda_status", "cuda_unavailable_reason"]


@functools.cache
def _cuda_status() -> Dict[str, Any]:
    if _cuda is None:
        not_built = _cuda_import_error is None or "No module" in _cuda_import_error
        return {
            "usable": False,
            "built": False,
            "reason": "fastopt was built without CUDA (no CUDA compiler at build time, "
            "or FASTOPT_CUDA=OFF)"
            if not_built
            else f"fastopt._cuda failed to load: {_cuda_import_error}",
        }
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
