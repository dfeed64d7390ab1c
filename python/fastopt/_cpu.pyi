"""fastopt CPU kernels (scalar and AVX2 paths, OpenMP threads): csrc/bindings/cpu_module.cpp.

Array arguments are NumPy arrays, or objects the array adapter (set_array_adapter) views as
one (PyTorch CPU tensors). Quantization and Newton take the same arguments as fastopt._cuda's;
``stream`` must be None here."""

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

# The step functions, one per optimizer of csrc/common/optim/registry.h, generated from its
# descriptor: name(<one list of arrays per role, in roles order>, listed, **keywords), the
# keywords being the descriptor's hyper fields, `step` when it takes one, and optionally
# `grad_scale`, `grad_clip`, `masks`, `stochastic_seed`, `absmax`, `master_params` and
# `check_only` (every check of the call, then no step). optimizers() lists each one's
# roles and keywords; they are typed here as a whole so that adding an optimizer does not
# touch this file.
def __getattr__(name: str) -> Callable[..., None]: ...

# Optimizer `name`'s step function with its hyper-parameters (the descriptor's hyper fields,
# all of them, as keywords) read once: it takes the step's other arguments, (<role lists>,
# listed, step=..., grad_scale=..., ...). The functional steps keep one per distinct set
# of validated hyper-parameters.
def bind_step(name: str, **hyper: Any) -> Callable[..., None]: ...

# {name: {"roles": [(name, kind, written, optional)], "hyper": [field names],
#  "takes_step": bool, "nonnegative": [state roles stored with the unsigned 8-bit map]}}
# for every optimizer.
def optimizers() -> Dict[str, Dict[str, Any]]: ...
def set_hyper_ranges(
    optimizer: str, ranges: Dict[str, Tuple[float, float, bool, bool]]
) -> None: ...
def state8_map(signed: bool) -> np.ndarray: ...

# Quantization: each returns x's first non-finite flat index with check_finite, else -1.
def quantize_affine(
    x: Any,
    q: Any,
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    axis: Optional[int],
    check_finite: bool,
    stream: None = None,
) -> int: ...

# Dequantizers: out's dtype (float32, float16 or bfloat16) is the stored type.
def dequantize_affine(
    q: Any,
    out: Any,
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    axis: Optional[int],
    stream: None = None,
) -> None: ...

# (first non-finite flat index or -1, mins, maxs) per channel along axis.
def minmax(
    x: Any, axis: Optional[int], stream: None = None
) -> Tuple[int, npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def quantize_blockwise(
    x: Any,
    q: Any,
    absmax: Any,
    block: int,
    stochastic: bool,
    seed: int,
    check_finite: bool,
    stream: None = None,
) -> int: ...
def dequantize_blockwise(
    q: Any, absmax: Any, out: Any, block: int, stream: None = None
) -> None: ...

# Batched damped Newton: solve d = (H + damping*I)^-1 g (and the solved flags), then apply.
def newton_solve(
    hessians: Any,
    grads: Any,
    d: Any,
    solved: Any,
    damping: float,
    params: Optional[Any] = None,
    stream: None = None,
) -> None: ...
def newton_apply(
    params: Any, d: Any, use: Optional[Any], lr: float, stream: None = None
) -> None: ...

# Gradient clipping over a list of grads of one dtype: the total of the norm terms (sum of
# |g|^norm_type, max |g| for inf; writeable: check the grads as scale_grads will), and
# g <- g * coefficient.
def grad_norm_total(grads: List[Any], listed: bool, norm_type: float, writeable: bool) -> float: ...
def scale_grads(grads: List[Any], listed: bool, coefficient: float) -> None: ...

# Adafactor over one list of params of one dtype (fastopt.adafactor): row_vars, col_vars and
# variances hold None where a param keeps no such state; steps: the step t >= 1 of each param;
# stochastic_seed: bfloat16 params rounded stochastically (keyed by it, each step and place);
# master_params: float32 copies of 16-bit params, stepped in their place.
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
    *,
    check_only: bool = False,
    stochastic_seed: Optional[int] = None,
    master_params: Optional[List[Any]] = None,
) -> None: ...

# Magnitude pruning masks into `out` (bool/uint8 per array): prune_counts is one count (a
# threshold over all arrays) or one per array; N:M keeps n of each m along the last axis.
def prune_magnitude(
    arrays: List[Any], out: List[Any], prune_counts: List[int], stream: None = None
) -> None: ...
def prune_n_m(arrays: List[Any], out: List[Any], n: int, m: int, stream: None = None) -> None: ...

# dst += src with all threads (the benchmark's bandwidth ceiling).
def add_inplace(dst: npt.NDArray[Any], src: npt.NDArray[Any]) -> None: ...

# Where each torch tensor keeps its elements (pointer, device, dtype, shape, strides), as
# bytes: equal bytes, the same memory laid out the same way.
def tensor_layouts(tensors: List[Any]) -> bytes: ...

# The first pair (i, j) of arrays sharing memory where either is written, else None;
# known: memory_spans of more arrays, numbered after these.
def first_overlap(
    arrays: List[Any], written: List[bool], known: Optional[bytes] = None
) -> Optional[Tuple[int, int]]: ...

# The arrays' byte spans, for first_overlap's known=.
def memory_spans(arrays: List[Any], written: List[bool]) -> bytes: ...

# Checks an optimizer class's params as its steps will (dtype, layout, writeable, overlaps).
def check_params(params: List[Any], listed: bool) -> None: ...
def set_cpu_path(path: str) -> None: ...
def get_cpu_path() -> str: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

# {"version", "compiler", "openmp", "cpu_paths", "cpu_has_avx2_fma"}
def build_info() -> Dict[str, Any]: ...

# adapter(name, obj) -> a NumPy view of obj, for array arguments that are not ndarrays.
def set_array_adapter(adapter: Optional[Callable[[str, Any], Any]]) -> None: ...
