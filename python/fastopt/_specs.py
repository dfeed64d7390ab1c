"""The optimizer table: everything the Python side knows about each optimizer, in one place.

Per optimizer (keyed by its functional name without the underscore: ``"sgd"`` for
``fastopt.sgd_``): its arrays in the order the binding takes them (role, kind, whether the
step writes it, and for an optional array the condition under which it is needed), its
hyper-parameters in signature order with their ranges and defaults, whether it takes the
1-based ``step``, the compiled kernel it runs (a function of ``fastopt._cpu`` /
``fastopt._cuda``), hyper-parameters fixed for that kernel (AdamW is the Adam kernel with
decoupled weight decay), cross-parameter checks, and its float64 reference.

``functional`` validates and dispatches by it, ``optim`` builds its classes' state from it,
and the tests, the benchmark and ``bench/sanitize_small.py`` draw their cases from it.
Adding an optimizer here means: its kernel (C++ header and registry line), one
``OptimizerSpec`` below, its reference function, its functional signature and its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from . import reference
from ._validate import flag, real

__all__ = [
    "Real",
    "Flag",
    "Hyper",
    "ArrayRole",
    "Carried",
    "OptimizerSpec",
    "OPTIMIZERS",
    "EMA",
    "binding_mismatches",
]

Values = Mapping[str, Any]


@dataclass(frozen=True)
class Real:
    """A real hyper-parameter in [lo, hi] (an end excluded when ``lo_open``/``hi_open``);
    ``default`` None means the argument is required."""

    default: Optional[float] = None
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def validate(self, name: str, value: Any) -> float:
        return real(name, value, lo=self.lo, hi=self.hi, lo_open=self.lo_open, hi_open=self.hi_open)


@dataclass(frozen=True)
class Flag:
    """A bool hyper-parameter."""

    default: bool = False

    def validate(self, name: str, value: Any) -> bool:
        return flag(name, value)


Hyper = Union[Real, Flag]


@dataclass(frozen=True)
class ArrayRole:
    """One array argument of a step. ``kind``: "param" (updated in place; decides the
    device and whether the call is a list), "grad" (read only) or "state". An optional
    array has ``needed``, a predicate on the validated hyper-parameters, and
    ``needed_when``, its words in messages ("momentum > 0"). A state array starts at
    ``initial`` where the classes make it: a number, or "lr" or the name of a class option
    (OptimizerSpec.options) whose value it starts at (Rprop's step sizes at "lr", Adagrad's
    sums at "initial_accumulator_value")."""

    name: str
    kind: str
    written: bool
    needed: Optional[Callable[[Values], bool]] = None
    needed_when: str = ""
    nonnegative: bool = False  # never negative (second moments): the unsigned 8-bit map
    initial: Union[float, str] = 0.0

    @property
    def optional(self) -> bool:
        return self.needed is not None

    def used(self, hyper: Values) -> bool:
        return self.needed is None or self.needed(hyper)


@dataclass(frozen=True)
class Carried:
    """A hyper-parameter that is state: a number per param that a step takes and its
    caller carries between steps (torch keeps it in ``state[p]``): NAdam's mu_product,
    ASGD's eta and mu. It starts at ``initial`` (a number, or "lr": the group's lr when the
    state is made). After step t (1-based) it becomes ``advance(value, t, hyper, stored)``
    (the validated hyper-parameters, lr included; ``stored`` rounds a number as its torch
    tensor keeps it: to float32, or as it is for float64). A step takes the value its
    advance gives (``taken="after"``: NAdam's product through this step) or the one held
    (``"before"``: ASGD's, set by the step before). ``through(t, hyper)`` is the value step
    t takes when the hyper-parameters never changed: what a step computes where it is not
    given. The value a step takes must lie in its hyper-parameter's range; ``held`` is
    the range of the value kept between steps, ``initial`` included."""

    initial: Union[float, str]
    advance: Callable[[float, int, Values, Callable[[float], float]], float]
    through: Callable[[int, Values], float]
    held: Real
    taken: str = "after"


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: see the module docstring. ``example`` is a valid set of hyper-
    parameters (``lr`` included) under which every array is used, for tests and checks;
    ``torch_name`` the ``torch.optim`` class with the same semantics, if any."""

    name: str
    kernel: str
    arrays: Tuple[ArrayRole, ...]
    hyper: Mapping[str, Hyper]
    takes_step: bool
    reference: Callable[..., None]
    example: Mapping[str, Any]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    check: Optional[Callable[[Values], None]] = None
    torch_name: Optional[str] = None
    # The hyper-parameters that are state (see Carried), by name; each is also in hyper
    # (its range) and may be None or missing there.
    carried: Mapping[str, Carried] = field(default_factory=dict)
    # The classes' options that are not the kernel's, in signature order, with their ranges
    # and defaults: the values a state array may start at (ArrayRole.initial).
    options: Mapping[str, Hyper] = field(default_factory=dict)

    @property
    def states(self) -> Tuple[ArrayRole, ...]:
        """Every state array, optional ones included."""
        return tuple(a for a in self.arrays if a.kind == "state")

    def used_arrays(self, hyper: Values) -> List[ArrayRole]:
        """The arrays a step with (validated) ``hyper`` reads or writes."""
        return [a for a in self.arrays if a.used(hyper)]

    def state_names(self, hyper: Values) -> List[str]:
        """The state arrays a step with (validated) ``hyper`` uses, in binding order."""
        return [a.name for a in self.used_arrays(hyper) if a.kind == "state"]

    def defaults(self) -> Dict[str, Any]:
        """The hyper-parameters that have a default, with it."""
        return {k: h.default for k, h in self.hyper.items() if h.default is not None}

    def validate(self, hyper: Values) -> Dict[str, Any]:
        """``hyper`` (every hyper-parameter of the spec, no others; a ``carried`` one may
        be None or missing, and is then left out) checked field by field in signature
        order, then across fields: the values as float/bool."""
        out = {
            name: h.validate(name, hyper[name])
            for name, h in self.hyper.items()
            if name not in self.carried or hyper.get(name) is not None
        }
        if self.check is not None:
            self.check(out)
        return out

    def __post_init__(self) -> None:
        starts = [(a.name, a.initial) for a in self.states]
        starts += [(name, c.initial) for name, c in self.carried.items()]
        for name, initial in starts:  # what they may name (fastopt.torch reads it in a group)
            if isinstance(initial, str) and initial != "lr" and initial not in self.options:
                raise ValueError(f"{self.name}: {name} starts at {initial!r}: not lr nor an option")

    def carried_value(self, name: str, step: int, values: Values) -> float:
        """Carried hyper-parameter ``name`` computed for 1-based ``step`` (``through``) from
        the validated ``values``, checked against its range (a product of NAdam's mu_t
        reaches 1 where beta1 rounds to 1 in float32)."""
        value = self.carried[name].through(step, values)
        return self.hyper[name].validate(f"{name} (computed for step {step})", value)

    def initial_values(self, values: Values) -> Dict[str, float]:
        """What each state array starts at, by name, given the validated ``values`` of the
        hyper-parameters (lr included) and options that state arrays start at."""
        return {
            a.name: float(values[a.initial]) if isinstance(a.initial, str) else a.initial
            for a in self.states
        }

    def kernel_hyper(self, hyper: Values) -> Dict[str, Any]:
        """Validated ``hyper`` with the fixed ones: the kernel's and the reference's keywords."""
        return {**hyper, **self.fixed}

    def require_arrays(self, hyper: Values, present: Callable[[str], bool]) -> None:
        """ValueError naming the first optional array that (validated) ``hyper`` needs and
        ``present(name)`` says is missing."""
        for a in self.arrays:
            if a.optional and a.used(hyper) and not present(a.name):
                raise ValueError(f"{a.name}: required when {a.needed_when}")


# ---- the table ----------------------------------------------------------------------------

PARAMS = ArrayRole("params", "param", True)
GRADS = ArrayRole("grads", "grad", False)


def _state(
    name: str,
    needed: Optional[Callable[[Values], bool]] = None,
    needed_when: str = "",
    written: bool = True,
    nonnegative: bool = False,
    initial: Union[float, str] = 0.0,
) -> ArrayRole:
    return ArrayRole(name, "state", written, needed, needed_when, nonnegative, initial)


def _momentum(h: Values) -> bool:
    return bool(h["momentum"] > 0.0)


def _check_nesterov(h: Values) -> None:
    if h["nesterov"] and (h["momentum"] <= 0.0 or h["dampening"] != 0.0):
        raise ValueError("nesterov: requires momentum > 0 and dampening == 0")


def _positive(default: Optional[float]) -> Real:
    return Real(default, lo_open=True)  # (0, inf)


def _beta(default: Optional[float]) -> Real:
    return Real(default, hi=1.0, hi_open=True)  # [0, 1)


def _unit(default: Optional[float]) -> Real:
    return Real(default, hi=1.0)  # [0, 1]


NONNEG = Real(0.0)  # [0, inf), default 0

SGD = OptimizerSpec(
    name="sgd",
    kernel="sgd",
    takes_step=True,
    reference=reference.sgd,
    torch_name="SGD",
    arrays=(PARAMS, GRADS, _state("momentum_buffers", _momentum, "momentum > 0")),
    hyper={
        "lr": Real(None),
        "momentum": NONNEG,
        "dampening": Real(0.0, lo=-math.inf),  # any, as torch.optim.SGD allows
        "nesterov": Flag(),
        "weight_decay": NONNEG,
        "maximize": Flag(),
        "l1": NONNEG,
    },
    check=_check_nesterov,
    example=dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
)

ADAGRAD = OptimizerSpec(
    name="adagrad",
    kernel="adagrad",
    takes_step=True,
    reference=reference.adagrad,
    torch_name="Adagrad",
    arrays=(
        PARAMS,
        GRADS,
        _state("state_sums", nonnegative=True, initial="initial_accumulator_value"),
    ),
    hyper={
        "lr": Real(1e-2),
        "lr_decay": NONNEG,
        "weight_decay": NONNEG,
        "eps": Real(1e-10),  # >= 0, as torch.optim allows
        "maximize": Flag(),
        "l1": NONNEG,
    },
    options={"initial_accumulator_value": NONNEG},  # >= 0, as torch.optim.Adagrad
    example=dict(lr=1e-2, lr_decay=1e-3, weight_decay=1e-2),
)

RMSPROP = OptimizerSpec(
    name="rmsprop",
    kernel="rmsprop",
    takes_step=False,
    reference=reference.rmsprop,
    torch_name="RMSprop",
    arrays=(
        PARAMS,
        GRADS,
        _state("square_avgs", nonnegative=True),
        _state("momentum_buffers", _momentum, "momentum > 0"),
        _state("grad_avgs", lambda h: bool(h["centered"]), "centered=True"),
    ),
    hyper={
        "lr": Real(1e-2),
        "alpha": Real(0.99),  # >= 0, as torch.optim.RMSprop allows
        "eps": Real(1e-8),  # >= 0, as torch.optim allows
        "weight_decay": NONNEG,
        "momentum": NONNEG,
        "centered": Flag(),
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
)

_ADAM_ARRAYS = (
    PARAMS,
    GRADS,
    _state("exp_avgs"),
    _state("exp_avg_sqs", nonnegative=True),
    _state("max_exp_avg_sqs", lambda h: bool(h["amsgrad"]), "amsgrad=True", nonnegative=True),
)

ADAM = OptimizerSpec(
    name="adam",
    kernel="adam",
    takes_step=True,
    reference=reference.adam,
    torch_name="Adam",
    arrays=_ADAM_ARRAYS,
    hyper={
        "lr": Real(1e-3),
        "beta1": _beta(0.9),
        "beta2": _beta(0.999),
        "eps": Real(1e-8),  # >= 0, as torch.optim allows
        "weight_decay": NONNEG,
        "decoupled_weight_decay": Flag(),
        "amsgrad": Flag(),
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=1e-3, amsgrad=True, weight_decay=1e-2),
)

ADAMW = OptimizerSpec(
    name="adamw",
    kernel="adam",
    takes_step=True,
    reference=reference.adam,
    torch_name="AdamW",
    arrays=_ADAM_ARRAYS,
    hyper={
        "lr": Real(1e-3),
        "beta1": _beta(0.9),
        "beta2": _beta(0.999),
        "eps": Real(1e-8),  # >= 0, as torch.optim allows
        "weight_decay": Real(1e-2),
        "amsgrad": Flag(),
        "maximize": Flag(),
        "l1": NONNEG,
    },
    fixed={"decoupled_weight_decay": True},
    example=dict(lr=1e-3, amsgrad=True),
)

SOPHIA = OptimizerSpec(
    name="sophia",
    kernel="sophia",
    takes_step=False,
    reference=reference.sophia,
    arrays=(PARAMS, GRADS, _state("exp_avgs"), _state("hessian_diags", written=False)),
    hyper={
        "lr": Real(None),
        "beta1": _beta(0.965),
        "rho": _positive(0.04),
        "weight_decay": Real(0.1),
        "eps": _positive(1e-15),
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=1e-3),
)

LION = OptimizerSpec(
    name="lion",
    kernel="lion",
    takes_step=False,
    reference=reference.lion,
    arrays=(PARAMS, GRADS, _state("exp_avgs")),
    hyper={
        "lr": Real(1e-4),
        "beta1": _beta(0.9),
        "beta2": _beta(0.99),
        "weight_decay": NONNEG,
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=1e-4, weight_decay=1e-2),
)

ADAMAX = OptimizerSpec(
    name="adamax",
    kernel="adamax",
    takes_step=True,
    reference=reference.adamax,
    torch_name="Adamax",
    arrays=(PARAMS, GRADS, _state("exp_avgs"), _state("exp_infs", nonnegative=True)),
    hyper={
        "lr": Real(2e-3),
        "beta1": _beta(0.9),
        "beta2": _beta(0.999),
        "eps": Real(1e-8),  # >= 0, as torch.optim allows
        "weight_decay": NONNEG,
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=2e-3, weight_decay=1e-2),
)

RADAM = OptimizerSpec(
    name="radam",
    kernel="radam",
    takes_step=True,
    reference=reference.radam,
    torch_name="RAdam",
    arrays=(PARAMS, GRADS, _state("exp_avgs"), _state("exp_avg_sqs", nonnegative=True)),
    hyper={
        "lr": Real(1e-3),
        "beta1": _beta(0.9),
        "beta2": _beta(0.999),
        "eps": Real(1e-8),  # >= 0, as torch.optim allows
        "weight_decay": NONNEG,
        "decoupled_weight_decay": Flag(),
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=1e-3, weight_decay=1e-2),
)

ADADELTA = OptimizerSpec(
    name="adadelta",
    kernel="adadelta",
    takes_step=False,
    reference=reference.adadelta,
    torch_name="Adadelta",
    arrays=(
        PARAMS,
        GRADS,
        _state("square_avgs", nonnegative=True),
        _state("acc_deltas", nonnegative=True),
    ),
    hyper={
        "lr": Real(1.0),
        "rho": _unit(0.9),  # [0, 1], as torch.optim.Adadelta allows
        "eps": Real(1e-6),  # >= 0, as torch.optim allows
        "weight_decay": NONNEG,
        "maximize": Flag(),
        "l1": NONNEG,
    },
    example=dict(lr=1.0, weight_decay=1e-2),
)

RPROP = OptimizerSpec(
    name="rprop",
    kernel="rprop",
    takes_step=False,
    reference=reference.rprop,
    torch_name="Rprop",
    arrays=(
        PARAMS,
        GRADS,
        _state("prevs"),
        _state("step_sizes", nonnegative=True, initial="lr"),
    ),
    hyper={
        "lr": Real(1e-2),  # the step sizes' initial value (the classes'); the step ignores it
        "etaminus": Real(0.5, hi=1.0, lo_open=True, hi_open=True),  # torch: 0 < etaminus < 1
        "etaplus": Real(1.2, lo=1.0, lo_open=True),  # torch: 1 < etaplus
        "step_size_min": Real(1e-6),  # >= 0 (min > max: every size becomes max, as torch)
        "step_size_max": Real(50.0),
        "maximize": Flag(),
    },
    example=dict(lr=1e-2, etaminus=0.4, etaplus=1.3, step_size_min=1e-4, step_size_max=0.5),
)

NADAM = OptimizerSpec(
    name="nadam",
    kernel="nadam",
    takes_step=True,
    reference=reference.nadam,
    torch_name="NAdam",
    arrays=(PARAMS, GRADS, _state("exp_avgs"), _state("exp_avg_sqs", nonnegative=True)),
    hyper={
        "lr": Real(2e-3),
        "beta1": _beta(0.9),
        "beta2": _beta(0.999),
        "eps": Real(1e-8),  # >= 0, as torch.optim allows
        "weight_decay": NONNEG,
        "momentum_decay": Real(4e-3),  # >= 0, as torch.optim.NAdam
        "mu_product": Real(None, hi=1.0, hi_open=True),  # a product of mu_t in [0, beta1)
        "decoupled_weight_decay": Flag(),
        "maximize": Flag(),
        "l1": NONNEG,
    },
    carried={
        "mu_product": Carried(  # times mu_t at each step, as torch's float32 tensor
            1.0,
            advance=lambda v, t, h, stored: stored(
                v * stored(reference.nadam_mu(t, h["beta1"], h["momentum_decay"]))
            ),
            through=lambda t, h: reference.nadam_mu_product(t, h["beta1"], h["momentum_decay"]),
            held=Real(None, hi=1.0),  # 1 before the first step
        )
    },
    example=dict(lr=2e-3, weight_decay=1e-2, momentum_decay=4e-3),
)

ASGD = OptimizerSpec(
    name="asgd",
    kernel="asgd",
    takes_step=True,
    reference=reference.asgd,
    torch_name="ASGD",
    arrays=(PARAMS, GRADS, _state("axs")),
    hyper={
        "lr": Real(1e-2),
        "lambd": Real(1e-4, lo=-math.inf),  # any, as torch.optim.ASGD allows
        "alpha": Real(0.75, lo=-math.inf),
        "t0": Real(1e6, lo=-math.inf),
        "weight_decay": NONNEG,
        "eta": Real(None),  # the step size this step takes, >= 0
        "mu": _unit(None),  # the weight of the new params in the average: [0, 1]
        "maximize": Flag(),
    },
    carried={
        # set after each step as torch sets them: a new tensor of the default dtype
        # (torch.as_tensor: float32) copied into the state's
        "eta": Carried(
            "lr",
            advance=lambda v, t, h, stored: stored(
                reference.float32_round(reference.asgd_eta(t, h["lr"], h["lambd"], h["alpha"]))
            ),
            through=lambda t, h: reference.asgd_taken(t, h["lr"], h["lambd"], h["alpha"], h["t0"])[
                0
            ],
            held=Real(None),
            taken="before",
        ),
        "mu": Carried(
            1.0,
            advance=lambda v, t, h, stored: stored(
                reference.float32_round(reference.asgd_mu(t, h["t0"]))
            ),
            through=lambda t, h: reference.asgd_taken(t, h["lr"], h["lambd"], h["alpha"], h["t0"])[
                1
            ],
            held=_unit(None),
            taken="before",
        ),
    },
    example=dict(lr=1e-2, weight_decay=1e-2, t0=2.0),
)

OPTIMIZERS: Dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        SGD,
        ADAGRAD,
        RMSPROP,
        ADAM,
        ADAMW,
        SOPHIA,
        LION,
        ADAMAX,
        RADAM,
        ADADELTA,
        RPROP,
        NADAM,
        ASGD,
    )
}

# Not an optimizer, the same machinery: average <- beta*average + (1-beta)*sample (Sophia's
# Hessian-diagonal EMA). "averages" plays the params' part (device, list or single array).
EMA = OptimizerSpec(
    name="ema",
    kernel="ema",
    takes_step=False,
    reference=reference.ema,
    arrays=(ArrayRole("averages", "param", True), ArrayRole("samples", "grad", False)),
    hyper={"beta": _unit(None)},
    example=dict(beta=0.99),
)


def binding_mismatches(spec: OptimizerSpec, described: Mapping[str, Any]) -> List[str]:
    """Where ``spec`` disagrees with a compiled module's description of its kernel
    (``fastopt._cpu.optimizers()[spec.kernel]``: roles as (name, kind, written, optional),
    hyper field names, takes_step); empty when they agree."""
    out = []
    roles = [(a.name, a.kind, a.written, a.optional) for a in spec.arrays]
    bound = [tuple(r) for r in described["roles"]]
    if roles != bound:
        out.append(f"{spec.name}: arrays {roles} != the kernel's {bound}")
    names = set(spec.hyper) | set(spec.fixed)
    if names != set(described["hyper"]):
        out.append(
            f"{spec.name}: hyper-parameters {sorted(names)} != the kernel's "
            f"{sorted(described['hyper'])}"
        )
    nonnegative = [a.name for a in spec.arrays if a.nonnegative]
    bound_nonnegative = list(described["nonnegative"])
    if nonnegative != bound_nonnegative:
        out.append(
            f"{spec.name}: nonnegative states {nonnegative} != the kernel's {bound_nonnegative}"
        )
    if spec.takes_step != bool(described["takes_step"]):
        out.append(
            f"{spec.name}: takes_step {spec.takes_step} != the kernel's {described['takes_step']}"
        )
    return out
