"""NumPy reference of every fastopt kernel, the oracle of the tests: in float64 for the
optimizers and Newton, in float32 operation by operation for quantization and 8-bit state
(whose kernels the tests hold to the bit).

Written for reading: one function per operation, one line per formula step, each step a
separate NumPy pass (which is also what a NumPy user would write, and what the benchmark
times as the "NumPy reference" peer). Every function updates its float64 arrays in place
and follows ``torch.optim`` where torch has the optimizer (the formulas are in the
docstrings of ``fastopt.functional``).
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "soft_threshold",
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "sophia",
    "lion",
    "adamax",
    "radam",
    "adadelta",
    "rprop",
    "nadam",
    "nadam_mu",
    "nadam_mu_product",
    "asgd",
    "asgd_eta",
    "asgd_mu",
    "asgd_taken",
    "float32_round",
    "ema",
    "masked",
    "grad_norm",
    "clip_coefficient",
    "clip_grad_norm",
    "damped_newton_step",
    "quantize_affine",
    "dequantize_affine",
    "quantize_blockwise",
    "dequantize_blockwise",
    "uniform24",
    "bfloat16_stochastic",
    "dynamic_map",
    "quantize_state8",
    "dequantize_state8",
    "prune_magnitude",
    "prune_n_m",
]


def soft_threshold(p: np.ndarray, threshold: float) -> None:
    """Proximal step of the L1 penalty: p <- sign(p) * max(|p| - threshold, 0)."""
    p[...] = np.sign(p) * np.maximum(np.abs(p) - threshold, 0.0)


def sgd(
    p: np.ndarray,
    g: np.ndarray,
    buf: Optional[np.ndarray],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    step: int = 1,
    l1: float = 0.0,
) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g = g + weight_decay * p
    if momentum != 0.0:
        assert buf is not None, "momentum > 0 needs buf"
        if step == 1:
            buf[...] = g
        else:
            buf[...] = momentum * buf + (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf.copy()
    p -= lr * g
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def adagrad(
    p: np.ndarray,
    g: np.ndarray,
    state_sum: np.ndarray,
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g = g + weight_decay * p
    clr = lr / (1.0 + (step - 1) * lr_decay)
    state_sum += g * g
    p -= clr * (g / (np.sqrt(state_sum) + eps))
    if l1 != 0.0:
        soft_threshold(p, clr * l1)


def rmsprop(
    p: np.ndarray,
    g: np.ndarray,
    square_avg: np.ndarray,
    momentum_buffer: Optional[np.ndarray] = None,
    grad_avg: Optional[np.ndarray] = None,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g = g + weight_decay * p
    square_avg[...] = alpha * square_avg + (1.0 - alpha) * g * g
    if centered:
        assert grad_avg is not None, "centered needs grad_avg"
        grad_avg[...] = alpha * grad_avg + (1.0 - alpha) * g
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum != 0.0:
        assert momentum_buffer is not None, "momentum > 0 needs momentum_buffer"
        momentum_buffer[...] = momentum * momentum_buffer + g / avg
        p -= lr * momentum_buffer
    else:
        p -= lr * (g / avg)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def adam(
    p: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray] = None,
    *,
    step: int,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            p *= 1.0 - lr * weight_decay
        else:
            g = g + weight_decay * p
    exp_avg[...] = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1.0 - beta2) * g * g
    second = exp_avg_sq
    if amsgrad:
        assert max_exp_avg_sq is not None, "amsgrad needs max_exp_avg_sq"
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = np.sqrt(second) / np.sqrt(bias_correction2) + eps
    p -= (lr / bias_correction1) * (exp_avg / denom)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def sophia(
    p: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    hessian_diag: np.ndarray,
    *,
    lr: float,
    beta1: float = 0.965,
    rho: float = 0.04,
    weight_decay: float = 0.1,
    eps: float = 1e-15,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    g = -g if maximize else g
    exp_avg[...] = beta1 * exp_avg + (1.0 - beta1) * g
    p *= 1.0 - lr * weight_decay
    ratio = np.minimum(np.abs(exp_avg) / np.maximum(rho * hessian_diag, eps), 1.0)
    p -= lr * (np.sign(exp_avg) * ratio)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def lion(
    p: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    *,
    lr: float = 1e-4,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    """Lion (Chen et al. 2023): the sign of an interpolation of momentum and gradient;
    sign(0) = 0."""
    g = -g if maximize else g
    c = beta1 * exp_avg + (1.0 - beta1) * g
    if weight_decay != 0.0:
        p *= 1.0 - lr * weight_decay
    p -= lr * np.sign(c)
    exp_avg[...] = beta2 * exp_avg + (1.0 - beta2) * g
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def adamax(
    p: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    exp_inf: np.ndarray,
    *,
    step: int,
    lr: float = 2e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    """Adamax (Kingma & Ba 2015, section 7.1), as torch.optim.Adamax: Adam's second moment
    replaced by an exponentially weighted infinity norm."""
    g = -g if maximize else g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    exp_avg[...] = beta1 * exp_avg + (1.0 - beta1) * g
    exp_inf[...] = np.maximum(beta2 * exp_inf, np.abs(g) + eps)  # NaN from either side
    p -= (lr / (1.0 - beta1**step)) * (exp_avg / exp_inf)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def radam(
    p: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    """RAdam (Liu et al. 2020), as torch.optim.RAdam: Adam with its adaptive step scaled by
    the rectification term r_t while the second moment's variance is tractable (rho_t > 5),
    and momentum SGD before."""
    g = -g if maximize else g
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            p *= 1.0 - lr * weight_decay
        else:
            g = g + weight_decay * p
    exp_avg[...] = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1.0 - beta2) * g * g
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2**step / bias_correction2
    if rho_t > 5.0:
        rect = math.sqrt(
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        )
        adaptive = math.sqrt(bias_correction2) / (np.sqrt(exp_avg_sq) + eps)
        p -= (lr / bias_correction1) * rect * (exp_avg * adaptive)
    else:
        p -= (lr / bias_correction1) * exp_avg
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def adadelta(
    p: np.ndarray,
    g: np.ndarray,
    square_avg: np.ndarray,
    acc_delta: np.ndarray,
    *,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    """Adadelta (Zeiler 2012), as torch.optim.Adadelta: the step is g scaled by the ratio
    of the RMS of past updates to the RMS of past gradients."""
    g = -g if maximize else g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    square_avg[...] = rho * square_avg + (1.0 - rho) * g * g
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g
    acc_delta[...] = rho * acc_delta + (1.0 - rho) * delta * delta
    p -= lr * delta
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def rprop(
    p: np.ndarray,
    g: np.ndarray,
    prev: np.ndarray,
    step_size: np.ndarray,
    *,
    lr: float = 1e-2,
    etaminus: float = 0.5,
    etaplus: float = 1.2,
    step_size_min: float = 1e-6,
    step_size_max: float = 50.0,
    maximize: bool = False,
) -> None:
    """Rprop (Riedmiller and Braun 1993), as torch.optim.Rprop: each element's step size
    grows by etaplus where g kept its sign, shrinks by etaminus where it flipped (and that
    element does not move); p moves by sign(g) times it. ``lr`` is the step sizes' initial
    value, never read by the step."""
    g = -g if maximize else g
    with np.errstate(invalid="ignore"):
        s = g * prev  # the product, not the signs: one that underflows to 0 counts as 0
        factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0))  # 1: s 0 or NaN
        step_size[...] = np.minimum(np.maximum(step_size * factor, step_size_min), step_size_max)
        g = np.where(s < 0, 0.0, g)
        p -= np.where(g > 0, 1.0, np.where(g < 0, -1.0, 0.0)) * step_size  # torch.sign
    prev[...] = g


def nadam_mu(step: int, beta1: float, momentum_decay: float) -> float:
    """NAdam's momentum coefficient mu_t at 1-based ``step``, as torch.optim.NAdam computes
    it (in double precision): beta1*(1 - 0.5*0.96^(step*momentum_decay))."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def float32_round(x: float) -> float:
    """``x`` rounded to float32 (to nearest even), as a Python float."""
    value: float = struct.unpack("f", struct.pack("f", x))[0]
    return value


# (beta1, momentum_decay) -> (step, product through it): the last product computed, so
# that a step count going up one at a time costs one multiply
_MU_PRODUCTS: Dict[Tuple[float, float], Tuple[int, float]] = {}


def nadam_mu_product(step: int, beta1: float, momentum_decay: float) -> float:
    """mu_1*...*mu_step (see ``nadam_mu``) as torch.optim.NAdam's ``state["mu_product"]``
    holds it after that step when beta1 and momentum_decay never changed: a float32 0-d
    tensor multiplied by each mu_t in turn (each product rounded to float32; the product
    of two float32 values is exact in double, so rounding it once is the float32 multiply).
    The last result per (beta1, momentum_decay) is kept: step counts going up one at a time
    cost one multiply each. Once mu_t rounds to float32(beta1) for good (t ~ 1e5 with the
    default momentum_decay) the rest is multiplied in float32 by NumPy, chunk by chunk,
    until the product stops changing (0, or a subnormal that float32(beta1) times rounds
    back to itself), so any step count costs at most that."""
    key = (beta1, momentum_decay)
    done, product = _MU_PRODUCTS.get(key, (0, 1.0))
    if step < done:
        done, product = 0, 1.0
    limit = float32_round(beta1)
    t = done
    while t < step and product != 0.0:
        t += 1
        mu = float32_round(nadam_mu(t, beta1, momentum_decay))
        product = float32_round(product * mu)
        if mu == limit:  # every later mu_t rounds to it too (they lie between it and beta1)
            # until it stops changing: 0, or a subnormal that limit times rounds back to
            while t < step and float32_round(product * limit) != product:
                n = min(step - t, 1 << 16)
                chunk = np.full(n + 1, limit, np.float32)
                chunk[0] = product
                product = float(np.multiply.accumulate(chunk, dtype=np.float32)[-1])
                t += n
            break
    if len(_MU_PRODUCTS) >= 64:
        _MU_PRODUCTS.clear()
    _MU_PRODUCTS[key] = (step, product)
    return product


def nadam(
    p: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 2e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    mu_product: Optional[float] = None,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
) -> None:
    """NAdam (Dozat 2016), as torch.optim.NAdam: Adam whose step looks ahead along the
    momentum (Nesterov), with the momentum coefficient mu_t warming up to beta1.
    ``mu_product``: mu_1*...*mu_step (None: ``nadam_mu_product``)."""
    if mu_product is None:
        mu_product = nadam_mu_product(step, beta1, momentum_decay)
    g = -g if maximize else g
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            p *= 1.0 - lr * weight_decay
        else:
            g = g + weight_decay * p
    mu = nadam_mu(step, beta1, momentum_decay)
    mu_next = nadam_mu(step + 1, beta1, momentum_decay)
    exp_avg[...] = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1.0 - beta2) * g * g
    denom = np.sqrt(exp_avg_sq / (1.0 - beta2**step)) + eps
    p -= lr * (1.0 - mu) / (1.0 - mu_product) * g / denom
    p -= lr * mu_next / (1.0 - mu_product * mu_next) * exp_avg / denom
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def asgd_eta(step: int, lr: float, lambd: float, alpha: float) -> float:
    """The step size torch.optim.ASGD sets after 1-based ``step`` (in double precision; its
    state keeps it in float32): lr / (1 + lambd*lr*step)^alpha."""
    return lr / ((1 + lambd * lr * step) ** alpha)


def asgd_mu(step: int, t0: float) -> float:
    """The averaging weight torch.optim.ASGD sets after ``step``: 1/max(1, step - t0)."""
    return 1 / max(1, step - t0)


def asgd_taken(step: int, lr: float, lambd: float, alpha: float, t0: float) -> Tuple[float, float]:
    """(eta, mu) that step ``step`` of torch.optim.ASGD takes when its hyper-parameters never
    changed: float32(lr) and 1 at the first step, else what the step before set, rounded
    to float32 as its state tensors keep them."""
    if step <= 1:
        return float32_round(lr), 1.0
    return (
        float32_round(asgd_eta(step - 1, lr, lambd, alpha)),
        float32_round(asgd_mu(step - 1, t0)),
    )


def asgd(
    p: np.ndarray,
    g: np.ndarray,
    ax: np.ndarray,
    *,
    step: int,
    lr: float = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    eta: Optional[float] = None,
    mu: Optional[float] = None,
    maximize: bool = False,
) -> None:
    """ASGD, as torch.optim.ASGD: SGD with a decaying step size eta and a running average ax
    of the params (from t0 on; before, ax follows the params). ``eta``, ``mu``: the values
    this step takes (None: ``asgd_taken``)."""
    taken = asgd_taken(step, lr, lambd, alpha, t0)
    eta = taken[0] if eta is None else eta
    mu = taken[1] if mu is None else mu
    g = -g if maximize else g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    p *= 1.0 - lambd * eta
    p -= eta * g
    if mu != 1.0:
        ax += (p - ax) * mu
    else:
        ax[...] = p


def adafactor(
    p: np.ndarray,
    g: np.ndarray,
    row_var: Optional[np.ndarray],
    col_var: Optional[np.ndarray],
    variance: Optional[np.ndarray],
    *,
    step: int,
    lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps1: float,
    eps2: float = 1e-3,
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """Adafactor (Shazeer & Stern 2018), as torch.optim.Adafactor. A param of two or more
    dimensions keeps its second moment factored over the last two: ``row_var`` shaped
    (..., rows, 1) and ``col_var`` (..., 1, cols); a vector or 0-d one keeps ``variance``,
    shaped like it. eps1 is torch's eps[0] resolved (the params' machine epsilon for None).
    A param without elements is left as it is (torch would divide by its zero size)."""
    if p.size == 0:
        return
    g = -g if maximize else g
    weight = float(step) ** beta2_decay
    rho = min(lr, 1.0 / float(step) ** 0.5)
    alpha = max(eps2, float(np.sqrt(np.sum(p * p))) / p.size**0.5) * rho
    if weight_decay != 0.0:
        p *= 1.0 - lr * weight_decay
    if p.ndim >= 2:
        assert row_var is not None and col_var is not None
        row_var += weight * (np.mean(g * g, axis=-1, keepdims=True) - row_var)
        col_var += weight * (np.mean(g * g, axis=-2, keepdims=True) - col_var)
        mean = np.maximum(np.mean(row_var, axis=-2, keepdims=True), eps1)  # NaN kept
        estimate = row_var * col_var / mean
    else:
        assert variance is not None
        variance += weight * (g * g - variance)
        estimate = variance
    update = g / np.sqrt(np.maximum(estimate, eps1 * eps1))
    denom = max(1.0, float(np.sqrt(np.sum(update * update))) / (update.size**0.5 * d))
    p -= (alpha / denom) * update


def ema(average: np.ndarray, sample: np.ndarray, *, beta: float) -> None:
    """average <- beta*average + (1-beta)*sample (Sophia's Hessian-diagonal EMA)."""
    average[...] = beta * average + (1.0 - beta) * sample


def masked(
    update: Callable[..., None], mask: np.ndarray, p: np.ndarray, /, *arrays, **hyper
) -> None:
    """Optimizer step ``update`` (one of the functions above, called as ``update(p, *arrays,
    **hyper)``) under ``mask``: where the mask is False (0) the param is set to 0 and no
    state array changes; elsewhere the step is the unmasked one."""
    pruned = ~np.asarray(mask, dtype=bool)
    before = [None if a is None else a[pruned] for a in arrays]
    update(p, *arrays, **hyper)
    p[pruned] = 0.0
    for a, old in zip(arrays, before):
        if a is not None and old is not None:
            a[pruned] = old


def grad_norm(grads: Sequence[np.ndarray], norm_type: float = 2.0) -> float:
    """The norm of all grads together, as one vector, in float64: (sum |g|^p)^(1/p),
    max |g| for p = inf (0 for no elements). NaN anywhere gives NaN."""
    flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in grads] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    a = np.abs(flat)
    if np.isinf(norm_type):
        return float(np.nan if np.isnan(a).any() else a.max())
    if norm_type == 2.0:
        return float(np.sqrt(np.sum(a * a)))
    if norm_type == 1.0:
        return float(np.sum(a))
    return float(np.sum(a**norm_type) ** (1.0 / norm_type))


def clip_coefficient(max_norm: float, norm: float) -> float:
    """min(max_norm / (norm + 1e-6), 1), as torch.nn.utils.clip_grad_norm_; NaN stays NaN."""
    c = max_norm / (norm + 1e-6)
    return c if c < 1.0 or math.isnan(c) else 1.0


def clip_grad_norm(grads: Sequence[np.ndarray], max_norm: float, norm_type: float = 2.0) -> float:
    """torch.nn.utils.clip_grad_norm_ on float64 arrays: g <- g * clip_coefficient in place;
    returns the norm before clipping."""
    norm = grad_norm(grads, norm_type)
    c = clip_coefficient(max_norm, norm)
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in torch
        for g in grads:
            g *= c
    return norm


def damped_newton_step(
    p: np.ndarray, g: np.ndarray, H: np.ndarray, *, lr: float = 1.0, damping: float = 0.0
) -> np.ndarray:
    """p <- p - lr * (H + damping*I)^-1 g per system (leading indices); H symmetric, only
    its lower triangle is used. Returns the mask of systems that are positive definite;
    the others are left unchanged."""
    n = g.shape[-1]
    lower = np.tril(H)
    sym = lower + np.swapaxes(np.tril(H, -1), -1, -2) + damping * np.eye(n)
    eig_min = np.linalg.eigvalsh(sym)[..., 0] if n else np.ones(g.shape[:-1])
    ok = eig_min > 0
    d = np.zeros_like(g)
    if ok.any():
        d[ok] = np.linalg.solve(sym[ok], g[ok][..., None])[..., 0]
    p -= lr * d
    return ok


# ---- int8 quantization -----------------------------------------------------------------
# Unlike the optimizers, these follow the kernels' float32 arithmetic operation by operation
# (common/quant.h), so that results are exact: a float64 rint would round differently at
# ties of the float32 quotient.


def _broadcast_qparams(scale, zero_point, ndim: int, axis: Optional[int]):
    """float32 scale and zero point, shaped to broadcast along ``axis`` when per channel."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point).astype(np.float32)
    if axis is not None:
        shape = [1] * ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


def quantize_affine(
    x: np.ndarray, scale, zero_point, qmin: int, qmax: int, axis: Optional[int] = None
) -> np.ndarray:
    """q = clamp(rint(x / scale) + zero_point, qmin, qmax) in float32; per channel along
    ``axis`` when scale/zero_point are 1-D. Returns float32 values (cast to the q dtype)."""
    f32 = np.float32
    x = np.asarray(x).astype(f32)
    s, z = _broadcast_qparams(scale, zero_point, x.ndim, axis)
    return np.clip(np.rint(x / s) + z, f32(qmin), f32(qmax))


def _stored(x32: np.ndarray, out_dtype: Any) -> np.ndarray:
    """float32 values stored as ``out_dtype`` (float32, float16, or ml_dtypes' bfloat16):
    rounded to nearest even, every NaN as 0x7FFF, as the kernels store them."""
    if np.dtype(out_dtype) == np.float32:
        return x32
    out = x32.astype(out_dtype)
    out.view(np.uint16)[np.isnan(x32)] = 0x7FFF
    return out


def dequantize_affine(
    q: np.ndarray, scale, zero_point, axis: Optional[int] = None, out_dtype: Any = np.float32
) -> np.ndarray:
    """(q - zero_point) * scale in float32, stored as ``out_dtype``."""
    s, z = _broadcast_qparams(scale, zero_point, q.ndim, axis)
    return _stored((q.astype(np.float32) - z) * s, out_dtype)


def _mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _u32(x: int) -> np.ndarray:
    return np.array([x & 0xFFFFFFFF], dtype=np.uint64).astype(np.uint32)


def _seed_key(seed: int) -> np.ndarray:
    """The 32-bit key of a 64-bit seed (common/quant.h's seed_key)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _mix32(_u32(seed) ^ _mix32(_u32((seed >> 32) + 0x9E3779B9)))


def _index_hash(key: np.ndarray, index: np.ndarray) -> np.ndarray:
    """32 random bits per element index under ``key`` (common/quant.h's index_hash)."""
    index = np.asarray(index, dtype=np.uint64)
    lo = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (index >> np.uint64(32)).astype(np.uint32)
    return _mix32(lo ^ _mix32(hi ^ key))


def bfloat16_stochastic(x: np.ndarray, seed: int, step: int, tensor: int) -> np.ndarray:
    """float32 ``x`` (element j at index j of tensor ``tensor`` of a call at ``step`` with
    ``seed``) rounded stochastically to bfloat16, as the bits (uint16) the kernels store:
    the 16 bits cut off are compared with 16 random bits of a counter-based hash of
    (seed, step, tensor, j), so x rounds up with probability equal to its distance from the
    lower bfloat16 value over the gap; NaN becomes 0x7FFF."""
    key = _mix32(_mix32(_seed_key(seed) ^ _seed_key(step)) ^ _mix32(_u32(int(tensor) + 0x7F4A7C15)))
    random = _index_hash(key, np.arange(x.size, dtype=np.uint64))
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    out = ((u.astype(np.uint64) + (random >> np.uint32(16))) >> np.uint64(16)).astype(np.uint16)
    out[(u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)] = 0x7FFF
    return out.reshape(x.shape)


def uniform24(seed: int, index: np.ndarray) -> np.ndarray:
    """The counter-based uniform in [0, 1) of stochastic rounding (float32, 24 bits)."""
    h = _index_hash(_seed_key(seed), index)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def quantize_blockwise(
    x: np.ndarray, block_size: int = 256, *, rounding: str = "nearest", seed: int = 0
):
    """(q int8 shaped like x, absmax float32 per block) over consecutive blocks of the
    flattened x: s = 2^64 for tiny blocks (absmax < 2^-64) else 1, f = 127/(absmax*s) (0 for
    an all-zero block), v = (x*s)*f; q = rint(v), or floor(v) + (u < v - floor(v)) with
    u = uniform24(seed, index) when stochastic; clamped to [-127, 127]."""
    f32 = np.float32
    flat = np.asarray(x).astype(f32).reshape(-1)
    n = flat.size
    blocks = -(-n // block_size)
    padded = np.zeros(blocks * block_size, dtype=f32)
    padded[:n] = flat
    absmax = np.abs(padded.reshape(blocks, block_size)).max(axis=1) if blocks else np.zeros(0, f32)
    pre = np.where(absmax < f32(2.0**-64), f32(2.0**64), f32(1)).astype(f32)
    with np.errstate(divide="ignore"):
        factor = np.where(absmax > 0, f32(127) / (absmax * pre), f32(0)).astype(f32)
    v = (flat * np.repeat(pre, block_size)[:n]) * np.repeat(factor, block_size)[:n]
    if rounding == "stochastic":
        down = np.floor(v)
        u = uniform24(seed, np.arange(n, dtype=np.uint64))
        q = down + (u < v - down).astype(f32)
    else:
        q = np.rint(v)
    q = np.clip(q, f32(-127), f32(127)).astype(np.int8).reshape(np.shape(x))
    return q, absmax.astype(f32)


def dequantize_blockwise(
    q: np.ndarray, absmax: np.ndarray, block_size: int = 256, out_dtype: Any = np.float32
) -> np.ndarray:
    """q * (absmax / 127) per block in float32, stored as ``out_dtype``."""
    f32 = np.float32
    scale = (absmax.astype(f32) / f32(127)).astype(f32)
    flat = q.reshape(-1).astype(f32) * np.repeat(scale, block_size)[: q.size]
    return _stored(flat.reshape(q.shape), out_dtype)


STATE8_BLOCK = 256


def _dynamic_map_parts(signed: bool):
    """(the 256 map values, the encoder's per-decade tables): the dynamic map of Dettmers
    et al. 2022 as csrc/common/state8.cpp builds it, with the same operations. Decade d
    (10^(d-6)) holds the midpoints of 2^d (signed) or 2^(d+1) (unsigned) equal bins of
    [0.1, 1] * 10^(d-6), midpoint k being first + k * step in float32 (first, the first
    midpoint, and step, the bin width, computed in double and rounded; product, then sum);
    then 0 and 1.0, and for the signed map the mirrored negatives; sorted, so a code is its
    value's rank."""
    decade = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    positive: List[float] = []
    base, scale, offset, top = [], [], [], []
    for d in range(7):
        bins = 1 << d if signed else 2 << d
        base.append(len(positive))
        scale.append(np.float32(bins / (0.9 * decade[d])))
        offset.append(np.float32(bins / 9.0))
        top.append(np.float32(bins - 1))
        first = np.float32(decade[d] * (0.1 + 0.9 / float(2 * bins)))
        step = np.float32(decade[d] * 0.9 / float(bins))
        positive += [float(first + np.float32(np.float32(k) * step)) for k in range(bins)]
    pos = np.array(positive, np.float32)
    zero = 127 if signed else 0
    values = np.zeros(256, np.float32)
    values[zero + 1 : zero + 1 + pos.size] = pos
    if signed:
        values[:127] = -pos[::-1]
    values[255] = 1.0

    def midway(a: float, b: float) -> np.float32:
        return np.float32((float(a) + float(b)) / 2.0)

    lower = [midway(0.0, pos[0])] + [midway(pos[b - 1], pos[b]) for b in base[1:]]
    lower.append(midway(pos[-1], 1.0))
    tables = dict(
        lower=np.array(lower, np.float32),
        scale=np.array(scale, np.float32),
        offset=np.array(offset, np.float32),
        top=np.array(top, np.float32),
        base=np.array(base, np.int64),
        zero=zero,
    )
    return values, tables


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 float32 values of 8-bit state's dynamic quantization map (signed: first
    moments and momentum; unsigned: second moments), ascending: code -> value in [-1, 1]."""
    return _dynamic_map_parts(signed)[0]


def _encode_state8(s: np.ndarray, inv: np.ndarray, signed: bool) -> np.ndarray:
    """The codes of float32 values s in blocks of reciprocal absmax inv (per element): the
    float32 operations of common/state8.h's state8_encode."""
    _, t = _dynamic_map_parts(signed)
    f32 = np.float32
    negative = (s < 0) if signed else np.zeros(s.shape, bool)
    with np.errstate(invalid="ignore", over="ignore"):
        x = (np.where(negative, -s, s) * inv).astype(f32)
        d = np.zeros(s.shape, np.int64)
        for level in t["lower"][1:7]:
            d += x >= level
        k = (x * t["scale"][d]).astype(f32)
        k = (k - t["offset"][d]).astype(f32)
        k = np.minimum(np.maximum(np.nan_to_num(k, nan=0.0), f32(0)), t["top"][d])
        positive = t["zero"] + 1 + t["base"][d] + k.astype(np.int64)
        code = np.where(negative, 254 - positive, positive)
        code = np.where(~negative & (x >= t["lower"][7]), 255, code)
        code = np.where(~(x >= t["lower"][0]), t["zero"], code)
    return code.astype(np.uint8)


def _storage_order(x: np.ndarray) -> np.ndarray:
    """The axes of dense ``x`` from the largest stride to the smallest: ``x.transpose`` of
    them walks x's elements in memory order, the order the kernels step them in."""
    return np.argsort([-s for s in x.strides], kind="stable")


def quantize_state8(x: np.ndarray, signed: bool):
    """8-bit state (``state_dtype="int8"``) of float32 ``x``: (codes uint8 shaped and laid
    out like x, absmax float32 per block of 256 of x's elements in memory order). Per
    block, absmax = max |x| (NaN if any x is; then every NaN is the same one); each code is
    the nearest map value of x / absmax, computed as the kernels do (``_encode_state8``)."""
    f32 = np.float32
    x = np.asarray(x)
    order = _storage_order(x)
    walked = np.ascontiguousarray(x.transpose(order), dtype=f32)
    flat = walked.reshape(-1)
    n = flat.size
    blocks = -(-n // STATE8_BLOCK)
    padded = np.zeros(blocks * STATE8_BLOCK, f32)
    padded[:n] = flat
    with np.errstate(invalid="ignore"):
        mags = np.abs(padded.reshape(blocks, STATE8_BLOCK))
        absmax = np.where(np.isnan(mags).any(axis=1), f32(np.nan), mags.max(axis=1, initial=0.0))
    absmax = absmax.astype(f32)
    with np.errstate(divide="ignore"):
        inv = (f32(1) / absmax).astype(f32)
    codes = _encode_state8(flat, np.repeat(inv, STATE8_BLOCK)[:n], signed)
    return codes.reshape(walked.shape).transpose(np.argsort(order)), absmax


def dequantize_state8(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    """float32 values of 8-bit state: map[code] * its block's absmax (laid out like codes,
    blocks in memory order)."""
    values = dynamic_map(signed)
    order = _storage_order(codes)
    walked = np.ascontiguousarray(codes.transpose(order))
    flat = walked.reshape(-1)
    with np.errstate(invalid="ignore"):
        out = values[flat] * np.repeat(absmax.astype(np.float32), STATE8_BLOCK)[: flat.size]
    return out.astype(np.float32).reshape(walked.shape).transpose(np.argsort(order))


def _magnitudes(a: np.ndarray) -> np.ndarray:
    """|a| in float64, flattened (exact for every float dtype; NaN stays NaN, which
    np.argsort ranks above +Inf)."""
    return np.abs(np.asarray(a).astype(np.float64)).reshape(-1)


def prune_magnitude(
    arrays: Sequence[np.ndarray], sparsity: float, scope: str = "global"
) -> List[np.ndarray]:
    """Masks (True = kept): round(sparsity * n) elements pruned, those first in a stable
    ascending argsort of |x| -- over the arrays concatenated in list order (global) or per
    array (per_tensor). Equal magnitudes: the earlier element is pruned first."""
    groups = [list(arrays)] if scope == "global" else [[a] for a in arrays]
    masks: List[np.ndarray] = []
    for group in groups:
        flat = np.concatenate([_magnitudes(a) for a in group]) if group else np.zeros(0)
        keep = np.ones(flat.size, dtype=bool)
        keep[np.argsort(flat, kind="stable")[: round(sparsity * flat.size)]] = False
        start = 0
        for a in group:
            masks.append(keep[start : start + a.size].reshape(a.shape))
            start += a.size
    return masks


def prune_n_m(a: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M mask (True = kept): in each group of m consecutive elements along the last axis
    the m - n first in a stable ascending argsort of |x| are pruned."""
    groups = _magnitudes(a).reshape(-1, m)
    order = np.argsort(groups, axis=1, kind="stable")
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, : m - n], False, axis=1)
    return keep.reshape(a.shape)
