"""NumPy float64 reference of every fastopt kernel: the oracle of the tests.

Written for reading: one function per operation, one line per formula step, each step a
separate NumPy pass (which is also what a NumPy user would write, and what the benchmark
times as the "NumPy reference" peer). Every function updates its float64 arrays in place
and follows ``torch.optim`` (formulas in ``../shared/DESIGN.md`` and each docstring of
``fastopt.functional``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["soft_threshold", "sgd", "adagrad", "rmsprop", "adam", "sophia", "ema",
           "damped_newton_step"]


def soft_threshold(p: np.ndarray, threshold: float) -> None:
    """Proximal step of the L1 penalty: p <- sign(p) * max(|p| - threshold, 0)."""
    p[...] = np.sign(p) * np.maximum(np.abs(p) - threshold, 0.0)


def sgd(p: np.ndarray, g: np.ndarray, buf: Optional[np.ndarray], *, lr: float,
        momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, maximize: bool = False, step: int = 1,
        l1: float = 0.0) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g = g + weight_decay * p
    if momentum != 0.0:
        if step == 1:
            buf[...] = g
        else:
            buf[...] = momentum * buf + (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf.copy()
    p -= lr * g
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def adagrad(p: np.ndarray, g: np.ndarray, state_sum: np.ndarray, *, step: int, lr: float = 1e-2,
            lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
            maximize: bool = False, l1: float = 0.0) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g = g + weight_decay * p
    clr = lr / (1.0 + (step - 1) * lr_decay)
    state_sum += g * g
    p -= clr * (g / (np.sqrt(state_sum) + eps))
    if l1 != 0.0:
        soft_threshold(p, clr * l1)


def rmsprop(p: np.ndarray, g: np.ndarray, square_avg: np.ndarray,
            momentum_buffer: Optional[np.ndarray] = None, grad_avg: Optional[np.ndarray] = None, *,
            lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False,
            l1: float = 0.0) -> None:
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g = g + weight_decay * p
    square_avg[...] = alpha * square_avg + (1.0 - alpha) * g * g
    if centered:
        grad_avg[...] = alpha * grad_avg + (1.0 - alpha) * g
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum != 0.0:
        momentum_buffer[...] = momentum * momentum_buffer + g / avg
        p -= lr * momentum_buffer
    else:
        p -= lr * (g / avg)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def adam(p: np.ndarray, g: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
         max_exp_avg_sq: Optional[np.ndarray] = None, *, step: int, lr: float = 1e-3,
         beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
         decoupled_weight_decay: bool = False, amsgrad: bool = False, maximize: bool = False,
         l1: float = 0.0) -> None:
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
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    denom = np.sqrt(second) / np.sqrt(bias_correction2) + eps
    p -= (lr / bias_correction1) * (exp_avg / denom)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def sophia(p: np.ndarray, g: np.ndarray, exp_avg: np.ndarray, hessian_diag: np.ndarray, *,
           lr: float, beta1: float = 0.965, rho: float = 0.04, weight_decay: float = 0.1,
           eps: float = 1e-15, maximize: bool = False, l1: float = 0.0) -> None:
    g = -g if maximize else g
    exp_avg[...] = beta1 * exp_avg + (1.0 - beta1) * g
    p *= 1.0 - lr * weight_decay
    ratio = np.minimum(np.abs(exp_avg) / np.maximum(rho * hessian_diag, eps), 1.0)
    p -= lr * (np.sign(exp_avg) * ratio)
    if l1 != 0.0:
        soft_threshold(p, lr * l1)


def ema(average: np.ndarray, sample: np.ndarray, *, beta: float) -> None:
    """average <- beta*average + (1-beta)*sample (Sophia's Hessian-diagonal EMA)."""
    average[...] = beta * average + (1.0 - beta) * sample


def damped_newton_step(p: np.ndarray, g: np.ndarray, H: np.ndarray, *, lr: float = 1.0,
                       damping: float = 0.0) -> np.ndarray:
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
