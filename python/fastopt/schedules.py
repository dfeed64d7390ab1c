"""Learning-rate schedules for the optimizer classes (``schedule=``).

A schedule is a callable ``schedule(t, base_lr) -> lr`` where ``t`` is the 0-based index
of the step about to be taken (0 for the first step) and ``base_lr`` the optimizer's
``lr``. Any callable with that signature works; these are the common ones.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

from ._validate import real

__all__ = ["Schedule", "Constant", "StepDecay", "InverseTime", "Cosine", "LinearWarmup"]


def _count(name: str, value: int, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {lo}, got {type(value).__name__}")
    if not lo <= value < 2**63:  # step counts are 64-bit
        raise ValueError(f"{name}: expected an integer in [{lo}, 2**63), got {int(value)}")
    return int(value)


class Schedule:
    """Base of the schedules below: ``__call__`` checks ``t`` (an integer >= 0) and
    ``base_lr`` (a finite real >= 0), then returns ``rate(t, base_lr)``."""

    def __call__(self, t: int, base_lr: float) -> float:
        return self.rate(_count("t", t, 0), real("base_lr", base_lr, lo=0.0))

    def rate(self, t: int, base_lr: float) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """lr_t = lr."""

    def rate(self, t: int, base_lr: float) -> float:
        return base_lr


class StepDecay(Schedule):
    """lr_t = lr * gamma^(t // step_size)."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size = _count("step_size", step_size, 1)
        self.gamma = real("gamma", gamma, lo=0.0)

    def rate(self, t: int, base_lr: float) -> float:
        try:
            return base_lr * self.gamma ** (t // self.step_size)
        except OverflowError:  # gamma > 1 after many steps: refused as non-finite by the user
            return math.inf


class InverseTime(Schedule):
    """lr_t = lr / (1 + alpha * t / T): the seeds' inverse-time decay."""

    def __init__(self, alpha: float, T: float):
        self.alpha = real("alpha", alpha, lo=0.0)
        self.T = real("T", T, lo=0.0, lo_open=True)

    def rate(self, t: int, base_lr: float) -> float:
        return base_lr / (1.0 + self.alpha * t / self.T)


class Cosine(Schedule):
    """lr_t = min_lr + (lr - min_lr) * (1 + cos(pi * min(t, total_steps) / total_steps)) / 2."""

    def __init__(self, total_steps: int, min_lr: float = 0.0):
        self.total_steps = _count("total_steps", total_steps, 1)
        self.min_lr = real("min_lr", min_lr, lo=0.0)

    def rate(self, t: int, base_lr: float) -> float:
        frac = min(t, self.total_steps) / self.total_steps
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


class LinearWarmup(Schedule):
    """lr_t = lr * (t + 1) / warmup_steps for t < warmup_steps, then ``then(t - warmup_steps,
    lr)`` (constant lr when ``then`` is None): warmup followed by any other schedule."""

    def __init__(self, warmup_steps: int, then: Optional[Schedule] = None):
        self.warmup_steps = _count("warmup_steps", warmup_steps, 1)
        if then is not None and not callable(then):
            raise TypeError(f"then: expected a schedule, got {type(then).__name__}")
        self.then = then

    def rate(self, t: int, base_lr: float) -> float:
        if t < self.warmup_steps:
            return base_lr * (t + 1) / self.warmup_steps
        return base_lr if self.then is None else self.then(t - self.warmup_steps, base_lr)
