"""Stateful optimizers over the functional steps: they own their state arrays.

``opt = fastopt.Adam(params, lr=1e-3)`` takes one array or a list of arrays (NumPy or
PyTorch CPU tensors; PyTorch CUDA tensors or CuPy arrays for the GPU; updated in place),
allocates zeroed state like each param (same library and device; float32 for 16-bit
params), and
``opt.step(grads)`` (grads shaped like params) runs one fused multi-tensor step in one
C++ call. ``lr`` is settable; ``schedule=`` (see ``fastopt.schedules``) maps the step
index and ``lr`` to the rate used. ``state_dict()`` / ``load_state_dict()`` round-trip
exactly (step count, lr, hyper-parameters, every state element), so a restored optimizer
continues bit-identically.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import _arrays, _build, functional
from ._arrays import ArrayOrList

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Sophia"]

Schedule = Callable[[int, float], float]


class Optimizer:
    """Shared machinery; subclasses name their functional step and state lists."""

    _step_fn: Callable[..., None]
    _takes_step = True  # whether the functional takes step= (RMSprop does not)

    def __init__(self, params: ArrayOrList, *, lr: float, schedule: Optional[Schedule],
                 hyper: Dict[str, Any], state_args: List[Optional[str]],
                 initial_state: Optional[Dict[str, float]] = None):
        # state_args: the functional's positional state arguments by state name, None for
        # one the options leave unused (e.g. momentum_buffers without momentum).
        self._state_args = state_args
        self._listed = isinstance(params, (list, tuple))
        self.params: List[Any] = [
            _arrays.param_array(f"params[{i}]", a)
            for i, a in enumerate(_arrays.as_list("params", params, self._listed))]
        # On the GPU the checked launch tables are kept between steps (see
        # fastopt._cuda.Plan): a step re-reads only arrays that changed (new grads).
        on_device = bool(self.params) and _arrays.on_device(self.params[0])
        self._plan = _build._cuda.Plan() if on_device and _build._cuda is not None else None
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule: expected a callable (t, lr) -> lr, got {type(schedule).__name__}")
        self.schedule = schedule
        self._hyper = dict(hyper)
        self.lr = lr
        self._validate_hyper(self._hyper)
        self._initial = dict(initial_state or {})
        self.state: Dict[str, List[Any]] = {
            name: [_arrays.state_like(f"params[{i}]", p) for i, p in enumerate(self.params)]
            for name in state_args if name is not None}
        self._last_stream: Any = None  # GPU: the stream the last step was queued on
        self.zero_state()

    # -- hyper-parameters ----------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The base learning rate (the schedule, if any, is applied on top)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _arrays.real("lr", value, lo=0.0)

    @property
    def hyper(self) -> Dict[str, Any]:
        """The hyper-parameters other than lr (read-only copy)."""
        return dict(self._hyper)

    @property
    def step_count(self) -> int:
        """Number of steps taken so far."""
        return self._step

    def current_lr(self) -> float:
        """The learning rate the next step will use."""
        if self.schedule is None:
            return self._lr
        return _arrays.real("schedule(t, lr)", self.schedule(self._step, self._lr), lo=0.0)

    def _validate_hyper(self, hyper: Dict[str, Any]) -> None:
        # The functional step is the single place hyper-parameters are checked: a call on
        # zero-size arrays validates them without touching anything.
        # State this optimizer does not have is passed as None, so hyper-parameters that
        # need it (e.g. amsgrad=True loaded into an optimizer built without) are rejected.
        empty = np.empty(0, dtype=np.float32)
        states = [None if name is None else empty for name in self._state_args]
        kwargs = dict(hyper, lr=self._lr)
        if self._takes_step:
            kwargs["step"] = 1
        type(self)._step_fn(empty, empty, *states, **kwargs)

    # -- stepping --------------------------------------------------------------------------
    def step(self, grads: ArrayOrList, *, stream: Any = None) -> None:
        """One step with ``grads`` (an array, or a list aligned with params). On the GPU it
        is queued on ``stream`` (default: the params' library's current stream)."""
        t = self._step + 1
        lr = self.current_lr()
        states = [self._arg(name) for name in self._state_args]
        params = self.params if self._listed else self.params[0]
        kwargs = dict(self._hyper, lr=lr)
        if self._takes_step:
            kwargs["step"] = t
        type(self)._step_fn(params, grads, *states, **kwargs, stream=stream, _plan=self._plan)
        self._step = t
        self._queued_on(stream)

    def _arg(self, name: Optional[str]) -> Any:
        if name is None:
            return None
        return self.state[name] if self._listed else self.state[name][0]

    def zero_state(self) -> None:
        """Reset every state array to its initial value and the step count to 0."""
        self._await_steps()
        for name, arrays in self.state.items():
            for a in arrays:
                _arrays.fill(a, self._initial.get(name, 0.0))
        self._await_state_writes()
        self._step = 0

    # On the GPU, steps run on their stream= while the methods below read or write the state
    # with the library's own calls, on its current stream: each waits for the last step
    # before it touches the state, and for its own writes before the next step, whichever
    # stream that step is queued on. (Steps themselves never wait.) Waiting for the last
    # step is enough: steps on different streams must be ordered by the caller anyway,
    # since each reads the state the one before wrote.
    def _device_state(self) -> Optional[Any]:
        """A non-empty state array if the state lives on the GPU, else None."""
        if self._plan is None:
            return None
        return next((a for arrays in self.state.values() for a in arrays
                     if 0 not in tuple(a.shape)), None)

    def _queued_on(self, stream: Any) -> None:
        if self._plan is not None:  # the stream object itself, kept until waited for
            self._last_stream = (_arrays.current_stream(self.params[0]) if stream is None
                                 else stream)

    def _await_steps(self) -> None:
        stream, self._last_stream = self._last_stream, None
        like = self._device_state()
        if like is not None and stream is not None:
            _arrays.wait_for_stream(like, stream)

    def _await_state_writes(self) -> None:
        like = self._device_state()
        if like is not None:
            _arrays.wait_for_stream(like)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """A deep copy of everything needed to continue exactly: type, step, lr, hyper, state."""
        return {
            "optimizer": type(self).__name__,
            "step": self._step,
            "lr": self._lr,
            "hyper": copy.deepcopy(self._hyper),
            "state": self._state_copies(),
        }

    def _state_copies(self) -> Dict[str, List[Any]]:
        self._await_steps()
        copies = {name: [_arrays.clone(a) for a in arrays] for name, arrays in self.state.items()}
        self._await_state_writes()  # the copies are complete when state_dict() returns
        return copies

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a ``state_dict()``; arrays are copied into this optimizer's own buffers.
        Everything is checked first: on error nothing changes."""
        if state_dict.get("optimizer") != type(self).__name__:
            raise ValueError(f"state_dict: was saved by {state_dict.get('optimizer')!r}, "
                             f"not {type(self).__name__}")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"state_dict['step']: expected an integer >= 0, got {step!r}")
        lr = _arrays.real("state_dict['lr']", state_dict["lr"], lo=0.0)
        hyper = dict(state_dict["hyper"])
        if set(hyper) != set(self._hyper):
            raise ValueError(f"state_dict['hyper']: expected keys {sorted(self._hyper)}, "
                             f"got {sorted(hyper)}")
        saved_lr, self._lr = self._lr, lr
        try:
            self._validate_hyper(hyper)
        finally:
            self._lr = saved_lr
        state = state_dict["state"]
        if set(state) != set(self.state):
            raise ValueError(f"state_dict['state']: expected {sorted(self.state)}, got "
                             f"{sorted(state)} (were the options the same?)")
        for name, arrays in self.state.items():
            saved = state[name]
            if len(saved) != len(arrays):
                raise ValueError(f"state_dict['state'][{name!r}]: expected {len(arrays)} arrays, "
                                 f"got {len(saved)}")
            for i, (own, s) in enumerate(zip(arrays, saved)):
                if not hasattr(s, "shape"):
                    s = np.asarray(s)
                if tuple(s.shape) != tuple(own.shape) or _arrays.dtype_name(s) != _arrays.dtype_name(own):
                    raise ValueError(f"state_dict['state'][{name!r}][{i}]: expected shape "
                                     f"{tuple(own.shape)} {_arrays.dtype_name(own)}, got "
                                     f"{tuple(s.shape)} {_arrays.dtype_name(s)}")
        self._await_steps()
        for name, arrays in self.state.items():
            for own, s in zip(arrays, state[name]):
                _arrays.copy_into(own, s)
        self._await_state_writes()
        self._step = int(step)
        self._lr = lr
        self._hyper = hyper

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return (f"{type(self).__name__}({len(self.params)} arrays, lr={self._lr!r}, {args}, "
                f"schedule={self.schedule!r}, step={self._step})")


class SGD(Optimizer):
    """``torch.optim.SGD``: see ``fastopt.sgd_`` for the formula."""

    _step_fn = staticmethod(functional.sgd_)

    def __init__(self, params: ArrayOrList, lr: float, *, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 maximize: bool = False, l1: float = 0.0, schedule: Optional[Schedule] = None):
        hyper = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                     weight_decay=weight_decay, maximize=maximize, l1=l1)
        super().__init__(params, lr=lr, schedule=schedule, hyper=hyper,
                         state_args=["momentum_buffers" if momentum != 0.0 else None])


class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: see ``fastopt.adagrad_``. State sums start at
    ``initial_accumulator_value``."""

    _step_fn = staticmethod(functional.adagrad_)

    def __init__(self, params: ArrayOrList, lr: float = 1e-2, *, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, maximize: bool = False, l1: float = 0.0,
                 schedule: Optional[Schedule] = None):
        init = _arrays.real("initial_accumulator_value", initial_accumulator_value, lo=0.0)
        hyper = dict(lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
                     l1=l1)
        super().__init__(params, lr=lr, schedule=schedule, hyper=hyper,
                         state_args=["state_sums"], initial_state={"state_sums": init})


class RMSprop(Optimizer):
    """``torch.optim.RMSprop``: see ``fastopt.rmsprop_``."""

    _step_fn = staticmethod(functional.rmsprop_)
    _takes_step = False

    def __init__(self, params: ArrayOrList, lr: float = 1e-2, *, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, maximize: bool = False, l1: float = 0.0,
                 schedule: Optional[Schedule] = None):
        hyper = dict(alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                     centered=centered, maximize=maximize, l1=l1)
        super().__init__(params, lr=lr, schedule=schedule, hyper=hyper,
                         state_args=["square_avgs", "momentum_buffers" if momentum != 0.0 else None,
                                     "grad_avgs" if centered else None])


class Adam(Optimizer):
    """``torch.optim.Adam``: see ``fastopt.adam_`` (``decoupled_weight_decay=True`` is AdamW)."""

    _step_fn = staticmethod(functional.adam_)

    def __init__(self, params: ArrayOrList, lr: float = 1e-3, *, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, amsgrad: bool = False,
                 maximize: bool = False, l1: float = 0.0, schedule: Optional[Schedule] = None):
        hyper = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                     maximize=maximize, l1=l1)
        super().__init__(params, lr=lr, schedule=schedule, hyper=hyper,
                         state_args=["exp_avgs", "exp_avg_sqs",
                                     "max_exp_avg_sqs" if amsgrad else None])


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay, default 1e-2."""

    def __init__(self, params: ArrayOrList, lr: float = 1e-3, *, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, maximize: bool = False, l1: float = 0.0,
                 schedule: Optional[Schedule] = None):
        super().__init__(params, lr, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay, decoupled_weight_decay=True,
                         amsgrad=amsgrad, maximize=maximize, l1=l1, schedule=schedule)


class Sophia(Optimizer):
    """Sophia: see ``fastopt.sophia_``. ``update_hessian(estimate)`` folds a Hessian-diagonal
    estimate (Hutchinson, Gauss-Newton-Bartlett: the caller's) into the EMA the steps use;
    it starts at zero, so the first steps are clipped sign steps until it is updated."""

    _step_fn = staticmethod(functional.sophia_)
    _takes_step = False

    def __init__(self, params: ArrayOrList, lr: float = 1e-4, *, beta1: float = 0.965,
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15,
                 maximize: bool = False, l1: float = 0.0, schedule: Optional[Schedule] = None):
        hyper = dict(beta1=beta1, rho=rho, weight_decay=weight_decay, eps=eps,
                     maximize=maximize, l1=l1)
        super().__init__(params, lr=lr, schedule=schedule, hyper=hyper,
                         state_args=["exp_avgs", "hessian_diags"])
        self._ema_plan = None if self._plan is None else _build._cuda.Plan()

    def update_hessian(self, estimate: ArrayOrList, beta2: float = 0.99, *,
                       stream: Any = None) -> None:
        """hessian_diag <- beta2*hessian_diag + (1-beta2)*estimate (shaped like params;
        float32 for 16-bit params, like the state)."""
        functional.ema_(self._arg("hessian_diags"), estimate, beta=beta2, stream=stream,
                        _plan=self._ema_plan)
        self._queued_on(stream)
