"""In-place optimizer steps with torch.optim semantics.

Every function takes one array or aligned lists of arrays per argument (``params[i]``,
``grads[i]`` and each state list's ``[i]`` have one shape; params and grads share one dtype,
float32, float64, float16 or bfloat16 -- ``ml_dtypes.bfloat16`` for NumPy -- with float32
state for the 16-bit ones), updates params and state in place with one pass over memory, and
processes a whole list in one C++ call (on the CPU with the GIL released). ``step`` is the
1-based step count. Every optimizer but Rprop and ASGD takes ``l1``: after the step, the
proximal soft-threshold p <- sign(p) * max(|p| - lr*l1, 0). Bad input raises
TypeError/ValueError naming the argument before anything is written; zero-size arrays are a
no-op.

Every step takes ``masks=``: one bool or uint8 array per param, shaped and laid out like it
(e.g. from ``fastopt.prune_magnitude``). Where a mask is False (0) the param is set to 0 and
no state array changes; elsewhere the step is the unmasked one, bit for bit. The mask is
read in the same pass (one more byte per element), so a pruned model stays pruned while it
trains and its pruned elements keep their state for when a mask is lifted.

Every step takes ``rounding="nearest" | "stochastic"`` and ``seed=``: with bfloat16 params,
``"stochastic"`` rounds the updated params to bfloat16 stochastically (unbiased, so updates
smaller than half an ulp are not lost: bfloat16 training without a float32 master copy),
from a counter-based hash of (seed, step, the tensor's position in the list, the element's
index): reproducible for a given seed, the same on every path, thread count and device.
Optimizers without ``step`` (RMSprop, Sophia, Lion, Adadelta, Rprop) key only by the seed:
give each step its own (the classes do). ``seed=None`` draws a fresh one. Nearest is round
half to even.

CUDA arrays (PyTorch CUDA tensors, CuPy arrays, anything with ``__cuda_array_interface__``
or CUDA DLPack) run the CUDA kernels, chosen by where ``params`` lives: a whole list in
one kernel launch (one per 256 tensors), queued on ``stream`` -- an int handle or a
CuPy/PyTorch stream -- or by default on the current stream of the library that made the
params (PyTorch's or CuPy's); nothing synchronises. 16-bit params and grads, on either
device, keep float32 state, and the math runs in float32.
float32/float64 results are bit-identical to the CPU kernels. The kernel is ordered after
the work already queued on its stream only: arrays produced on another stream must be
ready there (as for any CUDA library call; a ``__cuda_array_interface__`` ``stream``
entry or a DLPack producer's stream is not waited on). ``_plan`` is internal: the
optimizer classes pass their cached ``fastopt._cuda.Plan``.

8-bit state (``state_dtype="int8"`` of the classes): state arrays of dtype uint8 hold the
codes of blockwise quantized state (``fastopt.reference.quantize_state8``: blocks of 256
elements, a float32 absmax each, the dynamic maps of Dettmers et al. 2022 -- signed for
first moments and momentum, unsigned for second moments), and ``absmax=`` gives each
state's block maxima: {state name: a float32 array (list) of ceil(size / 256) elements
per param}. Each block is decoded, updated and encoded again with its new absmax in the
one pass over memory. float32 and 16-bit params, on the CPU and the GPU (which give the
same bits); the classes keep float32 state for tensors under 4096 elements.

Master weights (``master_params=``, float16/bfloat16 params): float32 arrays (a list like
the params, shaped and laid out like them) that the step reads and writes in the params'
place, with the 16-bit grads converted as they are loaded; the params are written as the
masters rounded to nearest in the same pass (p 2 B written, master 8, grads 2 instead of
the float32 step's 12 plus a conversion of the grads and a copy back). The result is the
float32 step's, bit for bit. It excludes stochastic rounding.

``max_grad_norm=`` (every step but ``ema_``) clips the grads first, as
``fastopt.clip_grad_norm_(grads, max_grad_norm)`` would (global 2-norm, coefficient
min(max_grad_norm / (norm + 1e-6), 1)), and the step returns the norm before clipping
(else None). The norm pass reads the grads, and the step multiplies each grad by the
coefficient as it loads it: two passes, the grads never written, and the bits of
clip-then-step for float32/float64 grads (whose clipped grads are the same products,
stored). On the host the coefficient is computed there; on the GPU the norm stays in
device memory, where the step reads it (nothing synchronises) and the norm returned is a
0-d array.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _arrays, _ext, clip
from ._arrays import ArrayOrList, as_list
from ._specs import EMA, OPTIMIZERS, OptimizerSpec, Real, binding_mismatches
from ._validate import step_count, whole

__all__ = [
    "sgd_",
    "adagrad_",
    "rmsprop_",
    "adam_",
    "adamw_",
    "sophia_",
    "lion_",
    "adamax_",
    "radam_",
    "adadelta_",
    "rprop_",
    "nadam_",
    "asgd_",
    "ema_",
]

# Validated hyper-parameters are cached per tuple of values and their types; only for these
# types, whose equal values validate alike (True == 1 == 1.0 is why the types are in the key;
# None stands for the carried ones, checked at each call).
_CACHEABLE = frozenset({float, int, bool, type(None)})
_CACHE_SIZE = 256
_NDARRAY = np.ndarray


class Checked(NamedTuple):
    """What a tuple of hyper-parameters validates to."""

    kw: Dict[str, Any]  # the kernel's keywords, fixed ones included, no step
    needed: Tuple[Tuple[int, str], ...]  # (index, message) of each optional array needed
    unused: Tuple[int, ...]  # indices of the optional arrays left unused
    # the CPU kernel with these keywords read once (``_cpu.bind_step``): called with the
    # lists, listed and the per-call keywords only (no keyword dict to build and parse);
    # None for a spec with carried hyper-parameters (new at every step: StepKernel.carried)
    cpu_bound: Optional[Callable[..., None]]


NO_KEYWORDS: Dict[str, Any] = {}  # the extra keywords of a host call: none (never written)


class StepKernel:
    """The step of one spec, bound once: validates hyper-parameters by the table (cached per
    distinct tuple of values), requires the optional arrays they need, turns the arrays
    into aligned lists, picks the compiled module by where the params live and calls the
    spec's kernel. The functional steps and the optimizer classes both run through it."""

    __slots__ = ("spec", "kernel", "names", "takes_step", "cpu_kernel", "carried", "_checked")

    def __init__(self, spec: OptimizerSpec):
        self.spec = spec
        self.kernel = spec.kernel
        self.names = tuple(a.name for a in spec.arrays)
        self.takes_step = spec.takes_step
        self.cpu_kernel = getattr(_ext._cpu, spec.kernel)
        # (position in the hyper tuple, name) of each carried hyper-parameter: a new value
        # at every step, checked apart from the others (which are cached)
        self.carried = tuple((i, n) for i, n in enumerate(spec.hyper) if n in spec.carried)
        self._checked: Dict[Any, Checked] = {}  # (hyper tuple, its types) -> Checked

    def run(
        self,
        arrays: List[Any],
        hyper: Tuple[Any, ...],
        step: Any,
        stream: Any,
        plan: Any,
        masks: Any = None,
        rounding: str = "nearest",
        seed: Any = None,
        max_grad_norm: Any = None,
        absmax: Any = None,
        master_params: Any = None,
    ) -> Any:
        """One step: ``arrays`` in binding order (None for an optional one not given),
        ``hyper`` the values in the spec's order, ``step`` (when the spec takes it),
        ``masks`` (None, or an array or list like the params), ``absmax`` (8-bit state:
        {state name: an array or list per param}).
        Written for a small step's cost (loops, not comprehensions: Python 3.11 calls a
        function per comprehension)."""
        given: Tuple[Any, ...] = ()
        if self.carried:  # checked apart: the cache holds the others
            given = tuple(hyper[i] for i, _ in self.carried)
            hyper = tuple(
                None if n in self.spec.carried else v for n, v in zip(self.spec.hyper, hyper)
            )
        try:
            checked = self._checked.get((hyper, tuple(map(type, hyper))))
        except TypeError:  # an unhashable value: the full check names it
            checked = None
        if checked is None:
            checked = self._check(hyper)
        if self.takes_step and (type(step) is not int or step < 1):
            step = step_count(step)
        # the keywords of a call that cannot use the bound kernel: with the carried
        # hyper-parameters computed for this step
        hyper_kw: Optional[Dict[str, Any]] = None
        if self.carried:
            if type(step) is not int or step >= 2**63:  # the binding's range, checked first
                step = whole("step", step, 1, 2**63)
            hyper_kw = dict(checked.kw)
            for (_, name), value in zip(self.carried, given):
                hyper_kw[name] = (
                    self.spec.carried_value(name, step, hyper_kw)
                    if value is None
                    else self.spec.hyper[name].validate(name, value)
                )
        for i, message in checked.needed:
            if arrays[i] is None:
                raise ValueError(message)
        for i in checked.unused:
            arrays[i] = None
        # The lists as_list makes, calling it only for what is not a list or a NumPy array.
        lists: List[Optional[List[Any]]] = []
        append = lists.append
        listed = isinstance(arrays[0], (list, tuple))
        if listed:
            for name, a in zip(self.names, arrays):
                append(a if type(a) is list or a is None else as_list(name, a, True))
        else:
            other = False  # an argument that is neither a NumPy array nor None
            for a in arrays:
                if type(a) is _NDARRAY:
                    append([a])
                else:
                    append(a)
                    other = other or a is not None
            if other:
                for k, a in enumerate(arrays):
                    if type(a) is not _NDARRAY and a is not None:
                        lists[k] = as_list(self.names[k], a, False)
        first = lists[0]
        host = stream is None and first and type(first[0]) is _NDARRAY  # the CPU, as bound()
        if (
            host
            and masks is None
            and absmax is None
            and master_params is None
            and max_grad_norm is None
            and rounding == "nearest"
            and seed is None
        ):  # a plain step on the host: the bound kernel with the step count only
            if checked.cpu_bound is None:
                self.cpu_kernel(*lists, listed, step=step, **(hyper_kw or checked.kw))
            elif self.takes_step:
                checked.cpu_bound(*lists, listed, step=step)
            else:
                checked.cpu_bound(*lists, listed)
            return None
        # the call's own keywords, beside the hyper-parameters
        extra: Dict[str, Any] = {"step": step} if self.takes_step else {}
        if masks is not None:
            extra["masks"] = (
                masks if listed and type(masks) is list else as_list("masks", masks, listed)
            )
        if absmax is not None:
            extra["absmax"] = block_maxima(absmax, listed)
        if master_params is not None:
            extra["master_params"] = (
                master_params
                if listed and type(master_params) is list
                else as_list("master_params", master_params, listed)
            )
        if rounding != "nearest" or seed is not None:
            extra.update(stochastic_rounding(rounding, seed))
        gpu = False
        if host and checked.cpu_bound is not None:
            kernel, device = checked.cpu_bound, NO_KEYWORDS
        elif host:
            kernel, device = self.cpu_kernel, hyper_kw or checked.kw
        else:
            kernel, device = self.bound(lists, stream, plan)
            gpu = bool(device)  # (the CUDA module's stream and plan; nothing on the host)
            device = {**(hyper_kw or checked.kw), **device}
        norm = None
        if max_grad_norm is not None:
            # on the step's stream (the params' library's), whichever library the grads are
            norm, extra = self.clip(lists, listed, extra, max_grad_norm, device.get("stream"))
        kernel(*lists, listed, **extra, **device)
        if gpu:  # (the CPU binding bumps the torch tensors it wrote)
            self.bump_written(lists)
        return norm

    def bump_written(self, lists: Sequence[Optional[List[Any]]]) -> None:
        """After a GPU call over ``lists`` (binding order): the version counters of the
        torch tensors of the roles it writes bumped, as torch's in-place ops bump theirs."""
        _arrays.bump_versions(
            a
            for arrays, role in zip(lists, self.spec.arrays)
            if role.written and arrays is not None
            for a in arrays
        )

    @staticmethod
    def clip(
        lists: Sequence[Optional[List[Any]]],
        listed: bool,
        kw: Dict[str, Any],
        max_grad_norm: Any,
        stream: Any,
    ) -> Tuple[Any, Dict[str, Any]]:
        """Clipping by the grads' global 2-norm before a step: (the norm, the step's
        keywords ``kw`` with what clipping adds). On the host the coefficient goes to the
        kernel as grad_clip (the grads are read once more and never written; see
        ``clip.step_grad_scale``); on the GPU the norm stays in device memory, where the
        step reads it (grad_norm, max_grad_norm) to scale the grads as it loads them: two
        passes, the grads never written, nothing waits for the host."""
        limit = clip.max_norm_of(max_grad_norm, "max_grad_norm")
        grads = lists[1]
        if grads and len(grads) > 1:
            _arrays.check_apart(
                [("grads", grads, True)],
                (lambda role, i: f"{role}[{i}]") if listed else (lambda role, i: role),
                _arrays.SHARED_GRADS_CLIPPED,
            )
        if grads and _arrays.on_device(grads[0]):
            out, reads = clip.device_clip(grads, listed, limit, stream)
            return out, {**kw, **reads}
        norm, c = clip.step_grad_scale(grads or [], listed, limit)
        return norm, kw if c == 1.0 else {**kw, "grad_clip": c}

    def _check(self, hyper: Tuple[Any, ...]) -> Checked:
        spec = self.spec
        values = spec.kernel_hyper(spec.validate(dict(zip(spec.hyper, hyper))))
        checked = Checked(
            kw=values,
            needed=tuple(
                (i, f"{a.name}: required when {a.needed_when}")
                for i, a in enumerate(spec.arrays)
                if a.optional and a.used(values)
            ),
            unused=tuple(i for i, a in enumerate(spec.arrays) if not a.used(values)),
            cpu_bound=None if spec.carried else _ext._cpu.bind_step(spec.kernel, **values),
        )
        types = tuple(map(type, hyper))
        if _CACHEABLE.issuperset(types):
            if len(self._checked) >= _CACHE_SIZE:
                self._checked.clear()
            self._checked[(hyper, types)] = checked
        return checked

    def bound(
        self, lists: Sequence[Optional[List[Any]]], stream: Any, plan: Any
    ) -> Tuple[Callable[..., None], Dict[str, Any]]:
        """The compiled kernel for ``lists`` (by where the params live) and the extra
        keywords it takes there (stream, plan); the call itself is left to the caller."""
        kernels, extra = _arrays.backend(lists[0] or [], stream, plan)
        return getattr(kernels, self.kernel), extra


def block_maxima(absmax: Any, listed: bool) -> Dict[str, List[Any]]:
    """A step's ``absmax=`` as the binding takes it: {state name: a list of arrays}."""
    if not isinstance(absmax, Mapping):
        raise TypeError(
            f"absmax: expected a dict {{state name: arrays}}, got {type(absmax).__name__}"
        )
    out = {}
    for name, arrays in absmax.items():
        if not isinstance(name, str):
            raise TypeError(f"absmax: keys are state names (str), got {type(name).__name__}")
        out[name] = as_list(f"absmax[{name!r}]", arrays, listed)
    return out


def stochastic_rounding(rounding: Any, seed: Any) -> Dict[str, int]:
    """The kernel keyword for ``rounding=``/``seed=``: {} for round-to-nearest, else
    ``stochastic_seed`` (``seed``, or a fresh one when None)."""
    if rounding == "nearest":
        if seed is not None:
            raise ValueError("seed: only applies with rounding='stochastic'")
        return {}
    if rounding != "stochastic":
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    if seed is None:
        return {"stochastic_seed": secrets.randbits(64)}
    return {"stochastic_seed": whole("seed", seed, 0, 2**64)}


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A class's stochastic-rounding seed for its ``step``-th step (``salt``: which of its
    calls): every step gets its own, also for the kernels that take no step count."""
    return (seed ^ (step * 0x9E3779B97F4A7C15) ^ salt) % 2**64


STEPS: Dict[str, StepKernel] = {name: StepKernel(spec) for name, spec in OPTIMIZERS.items()}
# The bound runs the functions below call (a bound method is the cheapest call).
(
    _SGD,
    _ADAGRAD,
    _RMSPROP,
    _ADAM,
    _ADAMW,
    _SOPHIA,
    _LION,
    _ADAMAX,
    _RADAM,
    _ADADELTA,
    _RPROP,
    _NADAM,
    _ASGD,
) = (
    STEPS[n].run
    for n in (
        "sgd",
        "adagrad",
        "rmsprop",
        "adam",
        "adamw",
        "sophia",
        "lion",
        "adamax",
        "radam",
        "adadelta",
        "rprop",
        "nadam",
        "asgd",
    )
)
_EMA = StepKernel(EMA).run


def sgd_(
    params: ArrayOrList,
    grads: ArrayOrList,
    momentum_buffers: Optional[ArrayOrList] = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    step: int = 1,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``.

    g <- -g if maximize; g <- g + weight_decay*p;
    with momentum mu > 0: buf <- g at step 1, else buf <- mu*buf + (1-dampening)*g, and
    g <- g + mu*buf (nesterov) or g <- buf; then p <- p - lr*g.
    ``momentum_buffers`` is required when momentum > 0 (its contents are ignored at step 1).
    """
    return _SGD(
        [params, grads, momentum_buffers],
        (lr, momentum, dampening, nesterov, weight_decay, maximize, l1),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def adagrad_(
    params: ArrayOrList,
    grads: ArrayOrList,
    state_sums: ArrayOrList,
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Adagrad, as ``torch.optim.Adagrad``.

    clr = lr / (1 + (step-1)*lr_decay); g <- -g if maximize; g <- g + weight_decay*p;
    sum <- sum + g^2; p <- p - clr * g / (sqrt(sum) + eps). The L1 threshold is clr*l1.
    """
    return _ADAGRAD(
        [params, grads, state_sums],
        (lr, lr_decay, weight_decay, eps, maximize, l1),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def rmsprop_(
    params: ArrayOrList,
    grads: ArrayOrList,
    square_avgs: ArrayOrList,
    momentum_buffers: Optional[ArrayOrList] = None,
    grad_avgs: Optional[ArrayOrList] = None,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """RMSprop, as ``torch.optim.RMSprop``.

    g <- -g if maximize; g <- g + weight_decay*p; v <- alpha*v + (1-alpha)*g^2;
    centered: gavg <- alpha*gavg + (1-alpha)*g, avg = sqrt(v - gavg^2) + eps,
    else avg = sqrt(v) + eps; momentum mu > 0: buf <- mu*buf + g/avg, p <- p - lr*buf,
    else p <- p - lr*g/avg. ``momentum_buffers`` is required when momentum > 0 and
    ``grad_avgs`` when centered (both start at zero, as in torch).
    """
    return _RMSPROP(
        [params, grads, square_avgs, momentum_buffers, grad_avgs],
        (lr, alpha, eps, weight_decay, momentum, centered, maximize, l1),
        None,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def adam_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    exp_avg_sqs: ArrayOrList,
    max_exp_avg_sqs: Optional[ArrayOrList] = None,
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
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Adam / AdamW, as ``torch.optim.Adam`` / ``AdamW``.

    g <- -g if maximize; decoupled: p <- p*(1 - lr*weight_decay), else g <- g + weight_decay*p;
    m <- beta1*m + (1-beta1)*g; v <- beta2*v + (1-beta2)*g^2; amsgrad: vmax <- max(vmax, v)
    and vmax replaces v below; p <- p - (lr/(1-beta1^t)) * m / (sqrt(v)/sqrt(1-beta2^t) + eps).
    ``max_exp_avg_sqs`` is required when amsgrad.
    """
    return _ADAM(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
        (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, l1),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def adamw_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    exp_avg_sqs: ArrayOrList,
    max_exp_avg_sqs: Optional[ArrayOrList] = None,
    *,
    step: int,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """AdamW, as ``torch.optim.AdamW``: ``adam_`` with decoupled weight decay (default 1e-2)."""
    return _ADAMW(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
        (lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, l1),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def sophia_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    hessian_diags: ArrayOrList,
    *,
    lr: float,
    beta1: float = 0.965,
    rho: float = 0.04,
    weight_decay: float = 0.1,
    eps: float = 1e-15,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Sophia (clipped diagonal Newton, Liu et al. 2023), fused in one pass.

    g <- -g if maximize; m <- beta1*m + (1-beta1)*g; p <- p*(1 - lr*weight_decay);
    p <- p - lr * sign(m) * min(|m| / max(rho*h, eps), 1), with h = ``hessian_diags``
    (read only: the caller's EMA of a Hessian-diagonal estimate, see ``ema_`` and
    ``fastopt.Sophia.update_hessian``). A negative or zero h gives the clipped sign step.
    """
    return _SOPHIA(
        [params, grads, exp_avgs, hessian_diags],
        (lr, beta1, rho, weight_decay, eps, maximize, l1),
        None,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def lion_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    *,
    lr: float = 1e-4,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    g <- -g if maximize; c = beta1*m + (1-beta1)*g; p <- p*(1 - lr*weight_decay);
    p <- p - lr*sign(c) (sign(0) = 0); m <- beta2*m + (1-beta2)*g. Every element moves by
    lr (or not at all): use a learning rate 3-10x smaller than AdamW's, and a weight decay
    as many times larger.
    """
    return _LION(
        [params, grads, exp_avgs],
        (lr, beta1, beta2, weight_decay, maximize, l1),
        None,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def adamax_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    exp_infs: ArrayOrList,
    *,
    step: int,
    lr: float = 2e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Adamax (Kingma & Ba 2015, section 7.1), as ``torch.optim.Adamax``.

    g <- -g if maximize; g <- g + weight_decay*p; m <- beta1*m + (1-beta1)*g;
    u <- max(beta2*u, |g| + eps) (a NaN on either side is kept, as torch.maximum);
    p <- p - (lr/(1-beta1^t)) * m/u.
    """
    return _ADAMAX(
        [params, grads, exp_avgs, exp_infs],
        (lr, beta1, beta2, eps, weight_decay, maximize, l1),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def radam_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    exp_avg_sqs: ArrayOrList,
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
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and
    Beyond"), as ``torch.optim.RAdam``.

    g <- -g if maximize; decoupled: p <- p*(1 - lr*weight_decay), else g <- g +
    weight_decay*p; m <- beta1*m + (1-beta1)*g; v <- beta2*v + (1-beta2)*g^2;
    rho_inf = 2/(1-beta2) - 1, rho_t = rho_inf - 2t*beta2^t/(1-beta2^t); where rho_t > 5:
    p <- p - (lr*r_t*sqrt(1-beta2^t)/(1-beta1^t)) * m/(sqrt(v) + eps) with
    r_t = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t)); before that
    (the first steps: 5 with the default betas), p <- p - (lr/(1-beta1^t)) * m.
    """
    return _RADAM(
        [params, grads, exp_avgs, exp_avg_sqs],
        (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, l1),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def nadam_(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    exp_avg_sqs: ArrayOrList,
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
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), as
    ``torch.optim.NAdam``.

    g <- -g if maximize; decoupled: p <- p*(1 - lr*weight_decay), else g <- g +
    weight_decay*p; mu_t = beta1*(1 - 0.5*0.96^(t*momentum_decay)); m <- beta1*m +
    (1-beta1)*g; v <- beta2*v + (1-beta2)*g^2; denom = sqrt(v/(1-beta2^t)) + eps;
    p <- p - lr*(1-mu_t)/(1-P_t) * g/denom - lr*mu_{t+1}/(1-P_t*mu_{t+1}) * m/denom, where
    P_t = mu_1*...*mu_t is ``mu_product``: torch.optim.NAdam's ``state["mu_product"]``
    after the step (a float32 product), in [0, 1). None (the default) computes it as if
    beta1 and momentum_decay had had their present values at every step
    (``fastopt.reference.nadam_mu_product``, cheap when steps count up one by one); pass
    it where they change during training, multiplying your own float32 product by
    ``fastopt.reference.nadam_mu(t, beta1, momentum_decay)`` at each step, as torch does.
    """
    return _NADAM(
        [params, grads, exp_avgs, exp_avg_sqs],
        (
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            momentum_decay,
            mu_product,
            decoupled_weight_decay,
            maximize,
            l1,
        ),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def asgd_(
    params: ArrayOrList,
    grads: ArrayOrList,
    axs: ArrayOrList,
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
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """ASGD (averaged SGD: Polyak and Juditsky 1992), as ``torch.optim.ASGD``.

    g <- -g if maximize; g <- g + weight_decay*p; p <- p*(1 - lambd*eta); p <- p - eta*g;
    where mu != 1: ax <- ax + (p - ax)*mu, else ax <- p. ``eta`` (the step size) and ``mu``
    (the averaging weight) are torch.optim.ASGD's ``state["eta"]`` and ``state["mu"]`` as
    this step reads them: set by the step before, t - 1, to lr/(1 + lambd*lr*(t-1))^alpha
    and 1/max(1, t - 1 - t0) (float32), lr and 1 at the first step. None (the default)
    computes them so from ``step``, lr, lambd, alpha and t0 (``fastopt.reference.asgd_taken``):
    with lr changing during training (a schedule) torch's eta follows it one step later,
    so pass your own. ``axs`` is the average (start it at 0 or at the params; it follows
    the params until the step after t0). No ``l1``: ASGD's step size is eta, not lr.
    """
    return _ASGD(
        [params, grads, axs],
        (lr, lambd, alpha, t0, weight_decay, eta, mu, maximize),
        step,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def adadelta_(
    params: ArrayOrList,
    grads: ArrayOrList,
    square_avgs: ArrayOrList,
    acc_deltas: ArrayOrList,
    *,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    maximize: bool = False,
    l1: float = 0.0,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Adadelta (Zeiler 2012, "ADADELTA: An Adaptive Learning Rate Method"), as
    ``torch.optim.Adadelta``.

    g <- -g if maximize; g <- g + weight_decay*p; v <- rho*v + (1-rho)*g^2;
    d = sqrt(u + eps) / sqrt(v + eps) * g; u <- rho*u + (1-rho)*d^2; p <- p - lr*d.
    """
    return _ADADELTA(
        [params, grads, square_avgs, acc_deltas],
        (lr, rho, eps, weight_decay, maximize, l1),
        None,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def rprop_(
    params: ArrayOrList,
    grads: ArrayOrList,
    prevs: ArrayOrList,
    step_sizes: ArrayOrList,
    *,
    lr: float = 1e-2,
    etaminus: float = 0.5,
    etaplus: float = 1.2,
    step_size_min: float = 1e-6,
    step_size_max: float = 50.0,
    maximize: bool = False,
    masks: Optional[ArrayOrList] = None,
    absmax: Optional[Mapping[str, ArrayOrList]] = None,
    master_params: Optional[ArrayOrList] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    stream: Any = None,
    _plan: Any = None,
) -> Any:
    """Rprop (Riedmiller and Braun 1993, "A Direct Adaptive Method for Faster
    Backpropagation Learning: The RPROP Algorithm"), as ``torch.optim.Rprop``: every
    element has its own step size, in ``step_sizes``.

    g <- -g if maximize; s = g * prev (the product, as torch);
    s > 0: size <- clamp(size*etaplus, step_size_min, step_size_max);
    s < 0: size <- clamp(size*etaminus, ...), g <- 0 (the element does not move);
    s = 0 or NaN: size <- clamp(size, ...);
    p <- p - sign(g)*size (torch's sign: 0 for NaN); prev <- g.
    So a NaN grad, or an inf one against a prev of 0, leaves its param and step size as
    they were, as in torch. step_size_min/max must be finite and >= 0 (torch does not
    check them). With ``state_dtype="int8"`` prev is blockwise 8-bit: a grad below ~3e-7
    of its block's largest reads back as 0 (no sign) at the next step.

    ``lr`` is not read by the step: it is where step sizes start (``fastopt.Rprop`` and
    ``fastopt.torch.Rprop`` fill new ``step_sizes`` with it, as torch.optim.Rprop does, so
    the classes' ``schedule=`` has no effect); start ``prevs`` at 0.
    """
    return _RPROP(
        [params, grads, prevs, step_sizes],
        (lr, etaminus, etaplus, step_size_min, step_size_max, maximize),
        None,
        stream,
        _plan,
        masks,
        rounding,
        seed,
        max_grad_norm,
        absmax,
        master_params,
    )


def ema_(
    averages: ArrayOrList,
    samples: ArrayOrList,
    *,
    beta: float,
    stream: Any = None,
    _plan: Any = None,
) -> None:
    """Exponential moving average in place: average <- beta*average + (1-beta)*sample."""
    _EMA([averages, samples], (beta,), None, stream, _plan)


# ---- the signatures above and the compiled kernels agree with the table --------------------


def _signature_mismatches(fn: Callable[..., None], spec: OptimizerSpec) -> List[str]:
    """Where ``fn``'s explicit signature disagrees with ``spec``: array arguments in binding
    order (the optional ones last, defaulting to None), keyword hyper-parameters in the
    spec's order with its defaults (none where required), ``step`` exactly when it takes
    one."""
    code, out = fn.__code__, []
    positional = code.co_varnames[: code.co_argcount]
    keywords = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    roles = tuple(a.name for a in spec.arrays)
    optional = tuple(a.name for a in spec.arrays if a.optional)
    if positional != roles or roles[len(roles) - len(fn.__defaults__ or ()) :] != optional:
        out.append(f"{fn.__name__}: arrays {positional} != {roles} (optional {optional})")
    generic = (
        "step",
        "masks",
        "absmax",
        "master_params",
        "rounding",
        "seed",
        "max_grad_norm",
        "stream",
        "_plan",
    )
    hyper = tuple(k for k in keywords if k not in generic)
    if hyper != tuple(spec.hyper):
        out.append(f"{fn.__name__}: hyper-parameters {hyper} != {tuple(spec.hyper)}")
    if ("step" in keywords) != spec.takes_step:
        out.append(f"{fn.__name__}: takes step: {'step' in keywords} != {spec.takes_step}")
    defaults = fn.__kwdefaults__ or {}
    for name, h in spec.hyper.items():
        if defaults.get(name) != h.default:
            out.append(
                f"{fn.__name__}: {name} defaults to {defaults.get(name)!r}, the "
                f"table says {h.default!r}"
            )
    return out


def _check_against_table() -> None:
    problems = [
        m
        for name, spec in OPTIMIZERS.items()
        for m in _signature_mismatches(globals()[f"{name}_"], spec)
    ]
    problems += _signature_mismatches(ema_, EMA)
    for module in (_ext._cpu, _ext._cuda):
        if module is None:
            continue
        described = module.optimizers()
        for spec in OPTIMIZERS.values():
            if spec.kernel not in described:
                problems.append(f"{spec.name}: {module.__name__} has no kernel {spec.kernel!r}")
            else:
                problems += binding_mismatches(spec, described[spec.kernel])
    if problems:
        raise RuntimeError("fastopt's optimizer table disagrees with:\n  " + "\n  ".join(problems))


_check_against_table()


def _register_ranges() -> None:
    """Hands each kernel the ranges of its real hyper-parameters (from the table), which the
    compiled step bindings then check too: a binding called directly refuses what the
    functions above refuse. Specs sharing a kernel (Adam, AdamW) must agree on them."""
    ranges: Dict[str, Dict[str, Tuple[float, float, bool, bool]]] = {}
    for spec in [*OPTIMIZERS.values(), EMA]:
        kernel = ranges.setdefault(spec.kernel, {})
        for name, h in spec.hyper.items():
            if isinstance(h, Real):
                interval = (h.lo, h.hi, h.lo_open, h.hi_open)
                if kernel.setdefault(name, interval) != interval:
                    raise RuntimeError(f"{spec.name}: {name}'s range differs from its kernel's")
    for module in (_ext._cpu, _ext._cuda):
        if module is not None:
            for kernel_name, fields in ranges.items():
                module.set_hyper_ranges(kernel_name, fields)


_register_ranges()
