"""fastopt CUDA kernels (multi-tensor launches on the caller's stream):
csrc/bindings/cuda_module.cpp.

Array arguments are CUDA arrays (CuPy, PyTorch CUDA tensors, anything with
__cuda_array_interface__); ``stream`` is a cudaStream_t handle as an int (0: the legacy
default stream). Quantization and Newton take the same arguments as fastopt._cpu's."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

class Plan:
    """The checked launch tables of one optimizer's arrays, kept between steps; pass it as
    plan= to the step functions."""

    def __init__(self) -> None: ...
    @property
    def launches(self) -> int: ...
    @property
    def num_tensors(self) -> int: ...

# The step functions, one per optimizer of csrc/common/optim/registry.h, generated from its
# descriptor: name(<one list of arrays per role, in roles order>, listed, **keywords), the
# keywords being the descriptor's hyper fields, `step` when it takes one, and optionally
# `grad_scale`, `grad_clip`, `masks`, `stochastic_seed`, `absmax`, `master_params`,
# `check_only` (every check of the call, then no step), `stream`, `plan`, and `grad_norm`
# (a one-element float array on the device) with `max_grad_norm`: the grads multiplied by
# min(max_grad_norm / (grad_norm + 1e-6), 1) as they are loaded; `device_grad_scale` and
# `found_inf` (a GradScaler's one-element float32 arrays on the device, read by the kernel:
# the grads divided by the scale; nothing written where found_inf != 0).
# optimizers() lists each one's roles and keywords; they are typed here as a whole so that
# adding an optimizer does not touch this file.
def __getattr__(name: str) -> Callable[..., None]: ...

# Optimizer `name`'s step function with its hyper-parameters read once (as in fastopt._cpu).
def bind_step(name: str, **hyper: Any) -> Callable[..., None]: ...

# {name: {"roles": [(name, kind, written, optional)], "hyper": [field names],
#  "takes_step": bool}} for every optimizer.
def optimizers() -> Dict[str, Dict[str, Any]]: ...
def set_hyper_ranges(
    optimizer: str, ranges: Dict[str, Tuple[float, float, bool, bool]]
) -> None: ...

# Quantization: each returns x's first non-finite flat index with check_finite (waiting for
# the stream), else -1 at once.
def quantize_blockwise(
    x: Any,
    q: Any,
    absmax: Any,
    block: int,
    stochastic: bool,
    seed: int,
    check_finite: bool,
    stream: int,
) -> int: ...

# Dequantizers: out's dtype (float32, float16 or bfloat16) is the stored type.
def dequantize_blockwise(q: Any, absmax: Any, out: Any, block: int, stream: int) -> None: ...

# Magnitude pruning masks into `out`, queued on the stream (no wait): see fastopt._cpu.
def prune_magnitude(
    arrays: List[Any], out: List[Any], prune_counts: List[int], stream: int
) -> None: ...
def prune_n_m(arrays: List[Any], out: List[Any], n: int, m: int, stream: int) -> None: ...
def quantize_affine(
    x: Any,
    q: Any,
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    axis: Optional[int],
    check_finite: bool,
    stream: int,
) -> int: ...
def dequantize_affine(
    q: Any,
    out: Any,
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    axis: Optional[int],
    stream: int,
) -> None: ...

# (first non-finite flat index or -1, mins, maxs) per channel along axis; waits for the stream.
def minmax(
    x: Any, axis: Optional[int], stream: int
) -> Tuple[int, npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

# Batched damped Newton: solve d = (H + damping*I)^-1 g (and the solved flags), then apply.
def newton_solve(
    hessians: Any,
    grads: Any,
    d: Any,
    solved: Any,
    damping: float,
    params: Optional[Any],
    stream: int,
) -> None: ...
def newton_apply(params: Any, d: Any, use: Optional[Any], lr: float, stream: int) -> None: ...

# Gradient clipping over a list of grads of one dtype: out[0] <- their norm of order
# norm_type (out: a one-element float array on their device), and
# g <- g * min(max_norm / (norm[0] + 1e-6), 1) with the norm read on the device.
def grad_norm(grads: List[Any], listed: bool, out: Any, norm_type: float, stream: int) -> None: ...
def clip_grads(grads: List[Any], listed: bool, norm: Any, max_norm: float, stream: int) -> None: ...

# Adafactor over one list of CUDA params of one dtype, queued on the stream (see _cpu's).
def adafactor_step(
    params: List[Any],
    grads: List[Any],
    row_vars: List[Any],
    col_vars: List[Any],
    variances: List[Any],
    steps: List[int],
    lr: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    listed: bool,
    stream: int,
    *,
    check_only: bool = False,
    stochastic_seed: Optional[int] = None,
    master_params: Optional[List[Any]] = None,
) -> None: ...

# Layout, device and aliasing checks of (name, array) pairs before writing `written`.
def check_arrays(
    written: Sequence[Tuple[str, Any]], read: Sequence[Tuple[str, Any]], stream: int
) -> None: ...

# dst <- src (the same size in bytes), device to device on the stream.
def copy(dst: Any, src: Any, stream: int) -> None: ...

# (dtype name, shape, device) of a CUDA array; raises naming `name` if it is not one.
def describe(obj: Any, name: str, stream: int = 0) -> Tuple[str, Tuple[int, ...], int]: ...

# Registers torch.Tensor and its dtypes float32, float64, float16, bfloat16, int8, uint8, bool.
def set_torch_types(tensor: Any, dtypes: Tuple[Any, ...]) -> None: ...

# Waits for the work queued on `stream` of `like`'s device (the GIL released).
def synchronize(like: Any, stream: int) -> None: ...

# {"usable", "device_count", "reason", "runtime_version", "driver_version", "devices",
#  "architectures", "compiler"}: whether a CUDA device is usable, and if not, why.
def device_status() -> Dict[str, Any]: ...
