"""fastopt: fused CPU (AVX2) and CUDA kernels for optimizer steps, with torch.optim semantics."""
from . import reference, schedules
from ._runtime import (cuda_available, get_cpu_path, get_num_threads, info, set_cpu_path,
                       set_num_threads)
from .functional import adagrad_, adam_, adamw_, ema_, lion_, rmsprop_, sgd_, sophia_
from .newton import NotPositiveDefiniteError, cholesky_solve, newton_
from .optim import SGD, Adagrad, Adam, AdamW, Lion, Optimizer, RMSprop, Sophia
from .quant import (choose_qparams, dequantize, dequantize_blockwise, quantize_blockwise,
                    quantize_per_channel, quantize_per_tensor)

__version__: str = info()["version"]

__all__ = [
    "sgd_", "adagrad_", "rmsprop_", "adam_", "adamw_", "sophia_", "lion_", "ema_",
    "newton_", "cholesky_solve", "NotPositiveDefiniteError",
    "quantize_per_tensor", "quantize_per_channel", "dequantize", "choose_qparams",
    "quantize_blockwise", "dequantize_blockwise",
    "Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Sophia", "Lion",
    "schedules", "reference",
    "set_num_threads", "get_num_threads", "set_cpu_path", "get_cpu_path",
    "cuda_available", "info", "__version__",
]
