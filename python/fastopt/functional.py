"""In-place optimizer steps with torch.optim semantics.

Every function takes one array or aligned lists of arrays per argument (``params[i]``,
``grads[i]`` and each state list's ``[i]`` have one shape and all arrays share one dtype,
float32 or float64), updates params and state in place with one pass over memory, and
processes a whole list in one C++ call (on the CPU with the GIL released). ``step`` is the 1-based
step count. Every optimizer takes ``l1``: after the step, the proximal soft-threshold
p <- sign(p) * max(|p| - lr*l1, 0). Bad input raises TypeError/ValueError naming the
argument before anything is written; zero-size arrays are a no-op.

CUDA arrays (PyTorch CUDA tensors, CuPy arrays, anything with ``__cuda_array_interface__``
or CUDA DLPack) run the CUDA kernels, chosen by where ``params`` lives: a whole list in
one kernel launch (one per 384 tensors), queued on ``stream`` -- an int handle or a
CuPy/PyTorch stream -- or by default on the current stream of the library that made the
params (PyTorch's or CuPy's); nothing synchronises. On the GPU, params and grads may also
be float16 or bfloat16; their state is then float32 and the math runs in float32.
float32/float64 results are bit-identical to the CPU kernels. The kernel is ordered after
the work already queued on its stream only: arrays produced on another stream must be
ready there (as for any CUDA library call; a ``__cuda_array_interface__`` ``stream``
entry or a DLPack producer's stream is not waited on). ``_plan`` is internal: the
optimizer classes pass their cached ``fastopt._cuda.Plan``.
"""
from __future__ import annotations

from typing import Any, Optional

from . import _arrays
from ._arrays import ArrayOrList, flag, real, step_count

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "adamw_", "sophia_", "ema_"]


def sgd_(params: ArrayOrList, grads: ArrayOrList, momentum_buffers: Optional[ArrayOrList] = None,
         *, lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
         weight_decay: float = 0.0, maximize: bool = False, step: int = 1,
         l1: float = 0.0, stream: Any = None, _plan: Any = None) -> None:
    """SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``.

    g <- -g if maximize; g <- g + weight_decay*p;
    with momentum mu > 0: buf <- g at step 1, else buf <- mu*buf + (1-dampening)*g, and
    g <- g + mu*buf (nesterov) or g <- buf; then p <- p - lr*g.
    ``momentum_buffers`` is required when momentum > 0 (its contents are ignored at step 1).
    """
    lr = real("lr", lr, lo=0.0)
    momentum = real("momentum", momentum, lo=0.0)
    dampening = real("dampening", dampening, lo=0.0, hi=1.0)
    nesterov = flag("nesterov", nesterov)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("nesterov: requires momentum > 0 and dampening == 0")
    weight_decay = real("weight_decay", weight_decay, lo=0.0)
    maximize = flag("maximize", maximize)
    step = step_count(step)
    l1 = real("l1", l1, lo=0.0)
    if momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum_buffers: required when momentum > 0")
    listed, p, lists = _arrays.prepare(
        params, grads=grads, momentum_buffers=momentum_buffers if momentum > 0.0 else None)
    kernels, extra = _arrays.backend(p, stream, _plan)
    kernels.sgd(p, lists["grads"], lists["momentum_buffers"], listed, lr=lr, momentum=momentum,
             dampening=dampening, weight_decay=weight_decay, l1=l1, nesterov=nesterov,
             maximize=maximize, step=step, **extra)


def adagrad_(params: ArrayOrList, grads: ArrayOrList, state_sums: ArrayOrList, *, step: int,
             lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
             eps: float = 1e-10, maximize: bool = False, l1: float = 0.0,
             stream: Any = None, _plan: Any = None) -> None:
    """Adagrad, as ``torch.optim.Adagrad``.

    clr = lr / (1 + (step-1)*lr_decay); g <- -g if maximize; g <- g + weight_decay*p;
    sum <- sum + g^2; p <- p - clr * g / (sqrt(sum) + eps). The L1 threshold is clr*l1.
    """
    lr = real("lr", lr, lo=0.0)
    lr_decay = real("lr_decay", lr_decay, lo=0.0)
    weight_decay = real("weight_decay", weight_decay, lo=0.0)
    eps = real("eps", eps, lo=0.0, lo_open=True)
    maximize = flag("maximize", maximize)
    step = step_count(step)
    l1 = real("l1", l1, lo=0.0)
    listed, p, lists = _arrays.prepare(params, grads=grads, state_sums=state_sums)
    kernels, extra = _arrays.backend(p, stream, _plan)
    kernels.adagrad(p, lists["grads"], lists["state_sums"], listed, lr=lr, lr_decay=lr_decay,
                 weight_decay=weight_decay, eps=eps, l1=l1, maximize=maximize, step=step, **extra)


def rmsprop_(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
             momentum_buffers: Optional[ArrayOrList] = None,
             grad_avgs: Optional[ArrayOrList] = None, *, lr: float = 1e-2, alpha: float = 0.99,
             eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
             centered: bool = False, maximize: bool = False, l1: float = 0.0,
             stream: Any = None, _plan: Any = None) -> None:
    """RMSprop, as ``torch.optim.RMSprop``.

    g <- -g if maximize; g <- g + weight_decay*p; v <- alpha*v + (1-alpha)*g^2;
    centered: gavg <- alpha*gavg + (1-alpha)*g, avg = sqrt(v - gavg^2) + eps,
    else avg = sqrt(v) + eps; momentum mu > 0: buf <- mu*buf + g/avg, p <- p - lr*buf,
    else p <- p - lr*g/avg. ``momentum_buffers`` is required when momentum > 0 and
    ``grad_avgs`` when centered (both start at zero, as in torch).
    """
    lr = real("lr", lr, lo=0.0)
    alpha = real("alpha", alpha, lo=0.0, hi=1.0)
    eps = real("eps", eps, lo=0.0, lo_open=True)
    weight_decay = real("weight_decay", weight_decay, lo=0.0)
    momentum = real("momentum", momentum, lo=0.0)
    centered = flag("centered", centered)
    maximize = flag("maximize", maximize)
    l1 = real("l1", l1, lo=0.0)
    if momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum_buffers: required when momentum > 0")
    if centered and grad_avgs is None:
        raise ValueError("grad_avgs: required when centered=True")
    listed, p, lists = _arrays.prepare(
        params, grads=grads, square_avgs=square_avgs,
        momentum_buffers=momentum_buffers if momentum > 0.0 else None,
        grad_avgs=grad_avgs if centered else None)
    kernels, extra = _arrays.backend(p, stream, _plan)
    kernels.rmsprop(p, lists["grads"], lists["square_avgs"], lists["momentum_buffers"],
                 lists["grad_avgs"], listed, lr=lr, alpha=alpha, eps=eps,
                 weight_decay=weight_decay, momentum=momentum, l1=l1, centered=centered,
                 maximize=maximize, **extra)


def adam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
          exp_avg_sqs: ArrayOrList, max_exp_avg_sqs: Optional[ArrayOrList] = None, *,
          step: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
          amsgrad: bool = False, maximize: bool = False, l1: float = 0.0,
          stream: Any = None, _plan: Any = None) -> None:
    """Adam / AdamW, as ``torch.optim.Adam`` / ``AdamW``.

    g <- -g if maximize; decoupled: p <- p*(1 - lr*weight_decay), else g <- g + weight_decay*p;
    m <- beta1*m + (1-beta1)*g; v <- beta2*v + (1-beta2)*g^2; amsgrad: vmax <- max(vmax, v)
    and vmax replaces v below; p <- p - (lr/(1-beta1^t)) * m / (sqrt(v)/sqrt(1-beta2^t) + eps).
    ``max_exp_avg_sqs`` is required when amsgrad.
    """
    lr = real("lr", lr, lo=0.0)
    beta1 = real("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = real("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    eps = real("eps", eps, lo=0.0, lo_open=True)
    weight_decay = real("weight_decay", weight_decay, lo=0.0)
    decoupled_weight_decay = flag("decoupled_weight_decay", decoupled_weight_decay)
    amsgrad = flag("amsgrad", amsgrad)
    maximize = flag("maximize", maximize)
    step = step_count(step)
    l1 = real("l1", l1, lo=0.0)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs: required when amsgrad=True")
    listed, p, lists = _arrays.prepare(
        params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else None)
    kernels, extra = _arrays.backend(p, stream, _plan)
    kernels.adam(p, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
              lists["max_exp_avg_sqs"], listed, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
              weight_decay=weight_decay, l1=l1, decoupled_weight_decay=decoupled_weight_decay,
              amsgrad=amsgrad, maximize=maximize, step=step, **extra)


def adamw_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, max_exp_avg_sqs: Optional[ArrayOrList] = None, *,
           step: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
           eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
           maximize: bool = False, l1: float = 0.0, stream: Any = None,
           _plan: Any = None) -> None:
    """AdamW, as ``torch.optim.AdamW``: ``adam_`` with decoupled weight decay (default 1e-2)."""
    adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr, beta1=beta1,
          beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True,
          amsgrad=amsgrad, maximize=maximize, l1=l1, stream=stream, _plan=_plan)


def sophia_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
            hessian_diags: ArrayOrList, *, lr: float, beta1: float = 0.965, rho: float = 0.04,
            weight_decay: float = 0.1, eps: float = 1e-15, maximize: bool = False,
            l1: float = 0.0, stream: Any = None, _plan: Any = None) -> None:
    """Sophia (clipped diagonal Newton, Liu et al. 2023), fused in one pass.

    g <- -g if maximize; m <- beta1*m + (1-beta1)*g; p <- p*(1 - lr*weight_decay);
    p <- p - lr * sign(m) * min(|m| / max(rho*h, eps), 1), with h = ``hessian_diags``
    (read only: the caller's EMA of a Hessian-diagonal estimate, see ``ema_`` and
    ``fastopt.Sophia.update_hessian``). A negative or zero h gives the clipped sign step.
    """
    lr = real("lr", lr, lo=0.0)
    beta1 = real("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    rho = real("rho", rho, lo=0.0, lo_open=True)
    weight_decay = real("weight_decay", weight_decay, lo=0.0)
    eps = real("eps", eps, lo=0.0, lo_open=True)
    maximize = flag("maximize", maximize)
    l1 = real("l1", l1, lo=0.0)
    listed, p, lists = _arrays.prepare(params, grads=grads, exp_avgs=exp_avgs,
                                       hessian_diags=hessian_diags)
    kernels, extra = _arrays.backend(p, stream, _plan)
    kernels.sophia(p, lists["grads"], lists["exp_avgs"], lists["hessian_diags"], listed, lr=lr,
                beta1=beta1, rho=rho, weight_decay=weight_decay, eps=eps, l1=l1,
                maximize=maximize, **extra)


def ema_(averages: ArrayOrList, samples: ArrayOrList, *, beta: float, stream: Any = None,
         _plan: Any = None) -> None:
    """Exponential moving average in place: average <- beta*average + (1-beta)*sample."""
    beta = real("beta", beta, lo=0.0, hi=1.0)
    listed = isinstance(averages, (list, tuple))
    avg = _arrays.as_list("averages", averages, listed)
    kernels, extra = _arrays.backend(avg, stream, _plan)
    kernels.ema(avg, _arrays.as_list("samples", samples, listed), listed, beta=beta, **extra)
