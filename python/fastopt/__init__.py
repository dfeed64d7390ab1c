"""fastopt: fused CPU (AVX2) and CUDA kernels for optimizer steps, with torch.optim semantics."""

from typing import TYPE_CHECKING, Any

from . import functional, optim, reference, schedules
from ._runtime import (
    cuda_available,
    get_cpu_path,
    get_num_threads,
    info,
    set_cpu_path,
    set_num_threads,
)
from .adafactor import Adafactor, adafactor_
from .clip import clip_grad_norm_
from .functional import *  # noqa: F403  (every step function: functional.__all__)
from .io import QuantizedTensor, load_quantized, save_quantized
from .newton import NotPositiveDefiniteError, cholesky_solve, newton_
from .optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop, Sophia  # noqa: F401
from .prune import prune_magnitude
from .quant import (
    choose_qparams,
    dequantize,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_per_channel,
    quantize_per_tensor,
)

# One class per optimizer of the table (fastopt._specs): the hand-written ones above, and
# those made from the table.
globals().update({cls.__name__: cls for cls in optim.CLASSES.values()})

__version__: str = info()["version"]

if TYPE_CHECKING:
    # The classes made from the table (fastopt.optim's), typed as a whole for type checkers.
    def __getattr__(name: str) -> Any: ...


__all__ = [
    *functional.__all__,
    "adafactor_",
    "Adafactor",
    "newton_",
    "cholesky_solve",
    "NotPositiveDefiniteError",
    "quantize_per_tensor",
    "quantize_per_channel",
    "dequantize",
    "choose_qparams",
    "quantize_blockwise",
    "dequantize_blockwise",
    "save_quantized",
    "load_quantized",
    "QuantizedTensor",
    "clip_grad_norm_",
    "prune_magnitude",
    "Optimizer",
    *(cls.__name__ for cls in optim.CLASSES.values()),
    "schedules",
    "reference",
    "set_num_threads",
    "get_num_threads",
    "set_cpu_path",
    "get_cpu_path",
    "cuda_available",
    "info",
    "__version__",
]
