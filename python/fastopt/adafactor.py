"""Adafactor (Shazeer & Stern 2018), as ``torch.optim.Adafactor``: the step function
``adafactor_`` and the array class ``Adafactor`` (``fastopt.torch.Adafactor`` is the torch
one). The formulas are in ``csrc/common/optim/adafactor.h`` and ``reference.adafactor``.

A param of two or more dimensions keeps its second moment factored over its last two
dimensions: a row factor shaped (..., rows, 1) and a column factor (..., 1, cols), torch's
shapes, so its state is rows + cols numbers per matrix instead of rows * cols. A vector (or
0-d) param keeps a full second moment shaped like it. The learning rate is relative: a
step moves a param by about min(lr, 1/sqrt(t)) times its root mean square (at least
eps2), and the update's own root mean square is clipped at d.

A step is three passes over a matrix (sums of squares; the update's norm; the
update) and two over a vector, param by param with every thread, in float32 math for
float32 and 16-bit params (float64 for float64) and float64 sums in a fixed order: the
results are bit-identical across the scalar and AVX2 paths and thread counts, and agree
with torch to float32 rounding (torch's norms are float32 reductions). State is in the
math type (float32 for 16-bit params, where torch keeps it in the params' dtype). Small
matrices (conv kernels: a (out, in, 3, 3) weight is out * in matrices of 3 x 3, a 1 x 1
conv's of 1 x 1) are stepped several thousand elements at a time, their factor work in
vector bodies across matrices. The partial sums and factors of a CPU step are scratch kept
by the calling thread between steps (grown to the largest param's need: about 20 bytes per
row and column of its matrices, 8 per 32 elements, and 4 per element of matrices under 16
columns; 11 MB for GPT-2's 50257 x 768 embedding), so that a step maps no fresh memory. Grads
large enough to overflow torch's float32 intermediates leave the step finite here (the
float64 reference's step): in a matrix above ~4e9, where torch's product of the factors
(g^4 in scale) overflows and its update of those elements becomes 0; above ~1.8e19
anywhere, where torch's norms overflow and make the whole param NaN.

CUDA arrays (PyTorch CUDA tensors, CuPy arrays) run the same passes as CUDA kernels on the
caller's stream, each pass one launch over up to 64 params (small matrices a thread each),
with nothing waiting for the host (the norms stay in device memory). Their float64 sums
are taken in another fixed order than the CPU's: the same from run to run, and equal to
the CPU's results within float rounding, not bit for bit.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _arrays, functional
from ._arrays import ArrayOrList, as_list
from ._validate import flag, is_inf, real, step_count
from .optim import (
    Copies,
    _check_params,
    saved_rounding_seed,
    sixteen_bit_options,
    staged_master_params,
)

__all__ = ["adafactor_", "Adafactor", "adafactor_hyper", "machine_epsilon"]

# eps1=None: the machine epsilon of the params' dtype, as torch.finfo(dtype).eps
_EPSILON = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def machine_epsilon(dtype_name: str, name: str = "params") -> float:
    """torch.finfo(dtype).eps of a params dtype ("float32", ...): eps1's default; a
    TypeError naming ``name`` for a dtype Adafactor does not step."""
    if dtype_name not in _EPSILON:
        raise TypeError(
            f"{name}: dtype {dtype_name} is not supported (float32, float64, float16 or bfloat16)"
        )
    return _EPSILON[dtype_name]


def adafactor_hyper(
    lr: Any,
    beta2_decay: Any,
    eps: Any,
    d: Any,
    weight_decay: Any,
    maximize: Any,
    name: Callable[[str], str] = str,
) -> Tuple[float, float, Optional[float], float, float, float, bool]:
    """The hyper-parameters checked as torch checks them, else a TypeError/ValueError
    naming ``name(argument)``: (lr, beta2_decay, eps1 or None, eps2, d, weight_decay,
    maximize)."""
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise TypeError(f"{name('eps')}: expected a pair (eps1 or None, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else real(f"{name('eps')}[0]", eps[0], lo=0.0)
    return (
        real(name("lr"), lr, lo=0.0),
        real(name("beta2_decay"), beta2_decay, hi=0.0),
        eps1,
        real(f"{name('eps')}[1]", eps[1], lo=0.0),
        _at_least_one(name("d"), d),
        real(name("weight_decay"), weight_decay, lo=0.0),
        flag(name("maximize"), maximize),
    )


def _at_least_one(name: str, value: Any) -> float:
    """d: a real >= 1, inf allowed (no clipping of the update), as torch allows."""
    if is_inf(value):
        return math.inf
    return real(name, value, lo=1.0)


def run_step(
    arrays: Sequence[List[Any]],
    steps: List[int],
    hyper: Tuple[float, float, Optional[float], float, float, float, bool],
    listed: bool,
    stream: Any = None,
    check_only: bool = False,
    seed: Optional[int] = None,
    masters: Optional[List[Any]] = None,
) -> None:
    """One kernel call over aligned lists ``arrays`` = (params, grads, row_vars, col_vars,
    variances), on the CPU or, for CUDA arrays, on ``stream`` (default: the current stream
    of the params' library); the binding checks every array (``check_only``: and does
    nothing more). ``seed``: bfloat16 params rounded stochastically with this seed (the
    kernels mix in each param's step and place in the lists); ``masters``: float32 copies
    of 16-bit params, stepped in their place (the params written rounded)."""
    lr, beta2_decay, eps1, eps2, d, weight_decay, maximize = hyper
    params, grads, row_vars, col_vars, variances = arrays
    if params and eps1 is None:
        eps1 = machine_epsilon(_arrays.dtype_name(params[0]), "params[0]" if listed else "params")
    module, extra = _arrays.backend(params, stream)
    module.adafactor_step(
        params,
        grads,
        row_vars,
        col_vars,
        variances,
        steps,
        lr,
        beta2_decay,
        0.0 if eps1 is None else eps1,
        eps2,
        d,
        weight_decay,
        maximize,
        listed,
        **({"stream": extra["stream"]} if extra else {}),
        check_only=check_only,
        stochastic_seed=seed,
        master_params=masters,
    )
    if extra and not check_only:  # (the CPU binding bumps the torch tensors it wrote)
        _arrays.bump_versions(
            a for arrays in (params, row_vars, col_vars, variances) for a in arrays
        )


def adafactor_(
    params: ArrayOrList,
    grads: ArrayOrList,
    row_vars: ArrayOrList,
    col_vars: ArrayOrList,
    variances: ArrayOrList,
    *,
    step: Any,
    lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: Tuple[Optional[float], float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    master_params: Optional[ArrayOrList] = None,
    stream: Any = None,
) -> None:
    """Adafactor step in place, as torch.optim.Adafactor (see the module docstring).

    For each param p of two or more dimensions, ``row_vars`` holds its row factor shaped
    (..., rows, 1) and ``col_vars`` its column factor (..., 1, cols), with None in
    ``variances``; for a vector or 0-d param, ``variances`` holds its second moment (shaped
    like it) and the other two None. State starts at 0, in float32 for float32 and 16-bit
    params, float64 for float64. CUDA arrays run the CUDA kernels on ``stream`` (an int
    handle or a CuPy/PyTorch stream; default: the current stream of the params' library),
    queued, without waiting. ``step``: the 1-based step this call takes, one int for
    every param or a list of them. ``eps = (eps1, eps2)``: eps1 None is the machine epsilon
    of the params' dtype. ``rounding="stochastic"`` (bfloat16 params; ``seed``, drawn when
    None): the params are written rounded stochastically, as ``fastopt.sgd_``'s, keyed by
    the seed, each param's step and its place in the list. ``master_params`` (float16 or
    bfloat16 params): float32 copies shaped like them, stepped in their place with the
    16-bit grads as they are (the float32 step, bit for bit), the params written as the
    copies rounded to nearest in the same pass; excludes stochastic rounding. eps1 None is
    still the params' machine epsilon.

    w = t^beta2_decay; rho = min(lr, 1/sqrt(t)); alpha = max(eps2, rms(p)) * rho;
    R <- lerp(R, mean of g^2 over cols, w); C <- lerp(C, mean of g^2 over rows, w);
    v = R C / max(mean(R), eps1) (a vector: V <- lerp(V, g^2, w), v = V);
    u = g / sqrt(max(v, eps1^2)); p <- p * (1 - lr*weight_decay) - alpha / max(1, rms(u)/d) * u.
    """
    listed = isinstance(params, (list, tuple))
    plist = as_list("params", params, listed)
    lists = [
        as_list(name, value, listed)
        for name, value in (
            ("grads", grads),
            ("row_vars", row_vars),
            ("col_vars", col_vars),
            ("variances", variances),
        )
    ]
    if isinstance(step, (list, tuple)):
        if len(step) != len(plist):
            raise ValueError(
                f"step: expected {len(plist)} step counts (one per param), got {len(step)}"
            )
        steps = [_step(s, f"step[{i}]") for i, s in enumerate(step)]
    else:
        steps = [_step(step, "step")] * len(plist)
    hyper = adafactor_hyper(lr, beta2_decay, eps, d, weight_decay, maximize)
    seed = functional.stochastic_rounding(rounding, seed).get("stochastic_seed")
    masters = None if master_params is None else as_list("master_params", master_params, listed)
    run_step([plist, *lists], steps, hyper, listed, stream, seed=seed, masters=masters)


def _step(value: Any, name: str) -> int:
    """A step count: a whole number in [1, 2**53] (the kernels take it as a float64)."""
    t = step_count(value, name)
    if t > 2**53:
        raise ValueError(f"{name}: must be <= 2**53, got {t}")
    return t


def state_shapes(shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
    """The state a param of this shape keeps: {"row_vars": ..., "col_vars": ...} for two or
    more dimensions, else {"variances": shape}."""
    if len(shape) >= 2:
        return {"row_vars": shape[:-1] + (1,), "col_vars": shape[:-2] + (1, shape[-1])}
    return {"variances": shape}


class Adafactor(Copies):
    """Adafactor over a list of arrays (NumPy arrays, PyTorch tensors, CuPy arrays; updated
    in place; state made by the params' library on their device), as
    ``torch.optim.Adafactor``: ``opt = fastopt.Adafactor(params, lr=1e-2)``,
    ``opt.step(grads)``. State is ``opt.state = {"row_vars": [...], "col_vars": [...],
    "variances": [...]}`` (None where a param keeps no such state). ``lr`` is settable and
    ``schedule=`` (see ``fastopt.schedules``) maps the step index and lr to the rate used.
    ``state_dict()`` / ``load_state_dict()`` round-trip exactly. Steps hold a lock, as the
    other classes' do. ``stochastic_rounding=True`` (bfloat16 params): the params are
    rounded stochastically at every step, keyed by ``seed`` (drawn when None) and the step
    count, as the other classes' (bfloat16 training without a float32 master copy).
    ``master_weights=True`` (float16/bfloat16 params): float32 copies,
    ``opt.master_params``, stepped in the params' place (see ``adafactor_``'s
    ``master_params``); state_dict carries them."""

    STATE_NAMES = ("row_vars", "col_vars", "variances")

    def __init__(
        self,
        params: ArrayOrList,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: Tuple[Optional[float], float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        schedule: Optional[Callable[[int, float], float]] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        self._listed = isinstance(params, (list, tuple))
        self.params: List[Any] = [
            _arrays.param_array(f"params[{i}]", a)
            for i, a in enumerate(as_list("params", params, self._listed))
        ]
        for i, p in enumerate(self.params):
            machine_epsilon(_arrays.dtype_name(p), f"params[{i}]")  # a supported dtype
            if isinstance(p, np.ndarray) and p.size and not p.flags.c_contiguous:
                raise ValueError(
                    f"params[{i}]: must be C-contiguous (Adafactor factors its last two dimensions)"
                )
        _check_params(self.params, self._listed)  # what every step would refuse
        self._hyper = adafactor_hyper(lr, beta2_decay, eps, d, weight_decay, maximize)
        # the stochastic-rounding seed (mixed with the step count at each step), or masters
        self._rounding_seed, self.master_params = sixteen_bit_options(
            self.params, stochastic_rounding, seed, master_weights
        )
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"schedule: expected a callable (t, lr) -> lr, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self._lock = threading.RLock()
        self.state: Dict[str, List[Any]] = {name: [] for name in self.STATE_NAMES}
        for p in self.params:
            shapes = state_shapes(tuple(p.shape))
            for name in self.STATE_NAMES:
                self.state[name].append(
                    _arrays.zeros_from(p, shapes[name], _state_dtype(p)) if name in shapes else None
                )
        self._step = 0

    @property
    def lr(self) -> float:
        """The base learning rate (the schedule, if any, is applied on top)."""
        return self._hyper[0]

    @lr.setter
    def lr(self, value: float) -> None:
        self._hyper = (real("lr", value, lo=0.0), *self._hyper[1:])

    @property
    def step_count(self) -> int:
        return self._step

    def current_lr(self) -> float:
        """The rate the next step uses (the schedule applied to lr)."""
        if self.schedule is None:
            return self.lr
        return real("schedule(t, lr)", self.schedule(self._step, self.lr), lo=0.0)

    def step(self, grads: ArrayOrList, *, stream: Any = None) -> None:
        """One Adafactor step over every param (grads aligned with the params); CUDA
        params: queued on ``stream`` (default: the current stream of their library)."""
        with self._lock:
            glist = as_list("grads", grads, self._listed)
            hyper = (self.current_lr(), *self._hyper[1:])
            t = self._step + 1
            seed = self._rounding_seed
            run_step(
                [self.params, glist, *(self.state[n] for n in self.STATE_NAMES)],
                [t] * len(self.params),
                hyper,
                self._listed,
                stream,
                seed=None if seed is None else functional.step_seed(seed, t),
                masters=self.master_params,
            )
            self._step += 1

    def zero_state(self) -> None:
        """State back to 0 and the step count to 0."""
        with self._lock:
            for arrays in self.state.values():
                for a in arrays:
                    if a is not None:
                        _arrays.fill(a, 0.0)
            for p, m in zip(self.params, self.master_params or []):  # the params' values
                _arrays.copy_into(m, _arrays.float32_copy(p))
            self._step = 0

    def state_dict(self) -> Dict[str, Any]:
        with self._lock:
            lr, beta2_decay, eps1, eps2, d, weight_decay, maximize = self._hyper
            return {
                "step": self._step,
                "lr": lr,
                "hyper": {
                    "beta2_decay": beta2_decay,
                    "eps": (eps1, eps2),
                    "d": d,
                    "weight_decay": weight_decay,
                    "maximize": maximize,
                },
                "state": {
                    name: [None if a is None else _arrays.clone(a) for a in arrays]
                    for name, arrays in self.state.items()
                },
                **(
                    {}
                    if self.master_params is None
                    else {"master_params": [_arrays.clone(m) for m in self.master_params]}
                ),
                **({} if self._rounding_seed is None else {"rounding_seed": self._rounding_seed}),
            }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a ``state_dict()`` of an Adafactor over params of the same shapes
        (checked before anything changes)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        missing = {"step", "lr", "hyper", "state"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict: missing {sorted(missing)}")
        step = state_dict["step"]
        if (
            isinstance(step, bool)
            or not isinstance(step, (int, np.integer))
            or not 0 <= step < 2**53
        ):
            raise ValueError(f"state_dict['step']: expected an integer in [0, 2**53), got {step!r}")
        h = state_dict["hyper"]
        if not isinstance(h, dict):
            raise TypeError("state_dict['hyper']: expected a dict")
        try:
            hyper = adafactor_hyper(
                state_dict["lr"],
                h["beta2_decay"],
                h["eps"],
                h["d"],
                h["weight_decay"],
                h["maximize"],
                lambda k: "state_dict['lr']" if k == "lr" else f"state_dict['hyper']['{k}']",
            )
        except KeyError as e:
            raise ValueError(f"state_dict['hyper']: missing {e}") from None
        saved = state_dict["state"]
        if not isinstance(saved, dict) or set(saved) != set(self.STATE_NAMES):
            raise ValueError(f"state_dict['state']: expected the keys {list(self.STATE_NAMES)}")
        staged_masters = staged_master_params(state_dict, self.master_params)
        rounding_seed = saved_rounding_seed(state_dict, self._rounding_seed)
        staged: Dict[str, List[Any]] = {}
        for name in self.STATE_NAMES:
            arrays = saved[name]
            if not isinstance(arrays, (list, tuple)) or len(arrays) != len(self.params):
                raise ValueError(
                    f"state_dict['state']['{name}']: expected {len(self.params)} entries"
                )
            staged[name] = []
            for i, (mine, theirs) in enumerate(zip(self.state[name], arrays)):
                where = f"state_dict['state']['{name}'][{i}]"
                if (mine is None) != (theirs is None):
                    raise ValueError(f"{where}: {'None' if mine is None else 'an array'} expected")
                staged[name].append(None if mine is None else _arrays.staged(where, mine, theirs))
        with self._lock:
            for name in self.STATE_NAMES:
                for mine, new in zip(self.state[name], staged[name]):
                    if mine is not None:
                        _arrays.copy_into(mine, new)
            for mine, new in zip(self.master_params or [], staged_masters):
                _arrays.copy_into(mine, new)
            self._hyper = hyper
            self._step = int(step)
            self._rounding_seed = rounding_seed

    def __repr__(self) -> str:
        lr, beta2_decay, eps1, eps2, d, weight_decay, maximize = self._hyper
        return (
            f"Adafactor({len(self.params)} params, lr={lr}, beta2_decay={beta2_decay}, "
            f"eps=({eps1}, {eps2}), d={d}, weight_decay={weight_decay}, maximize={maximize}, "
            f"step={self._step})"
        )


def _state_dtype(p: Any) -> str:
    return "float64" if _arrays.dtype_name(p) == "float64" else "float32"
