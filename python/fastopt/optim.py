"""Stateful optimizers over the functional steps: they own their state arrays.

``opt = fastopt.Adam(params, lr=1e-3)`` takes one array or a list of arrays (NumPy or
PyTorch CPU tensors; PyTorch CUDA tensors or CuPy arrays for the GPU; updated in place),
allocates zeroed state like each param (same library and device; float32 for 16-bit
params), and
``opt.step(grads)`` (grads shaped like params) runs one fused multi-tensor step in one
C++ call. ``lr`` is settable; ``schedule=`` (see ``fastopt.schedules``) maps the step
index and ``lr`` to the rate used. ``masks=`` (settable as ``opt.masks``; one bool/uint8
array per param, e.g. from ``fastopt.prune_magnitude``) is applied by every step: where a
mask is False the param is set to 0 and its state is left as it is (see ``fastopt.sgd_``).
``state_dtype="bfloat16"`` keeps every state array in bfloat16 (half the state's bytes;
loaded exactly, updated in float32, stored rounded to nearest even; NumPy state through
``ml_dtypes``), for float32 and 16-bit params; the default ``"float32"`` is the params' own
state type (float64 for float64 params). ``state_dtype="int8"`` keeps the state of every
param of 4096 elements or more in 8 bits: uint8 codes in ``opt.state`` and a float32 absmax
per block of 256 in ``opt.absmax`` (blockwise dynamic quantization, Dettmers et al. 2022;
see ``fastopt.functional``), 1 + 4/256 bytes per element; smaller params keep float32
state, as bitsandbytes does (not for float64 params, nor Sophia, whose Hessian estimate is
updated outside the step).
``stochastic_rounding=True`` (bfloat16 params) rounds the params stochastically at every step
(see ``fastopt.sgd_``), keyed by ``seed`` (drawn when None) and the step count: bfloat16
training without a float32 master copy, reproducible for a given seed.
``master_weights=True`` (float16/bfloat16 params) keeps a float32 copy of the params,
``opt.master_params``, which the steps update in the params' place (the kernels'
``master_params=``: the 16-bit grads converted as they are loaded, the params written as
the masters rounded to nearest in the same pass): the float32 step, bit for bit, with the
params holding its values rounded.
``state_dict()`` / ``load_state_dict()`` round-trip exactly (step count, lr,
hyper-parameters, every state element, the stochastic-rounding seed), so a restored
optimizer continues bit-identically;
masks are not part of it (they belong to the model, like torch's pruning buffers).

An optimizer may be shared between threads: ``step``, ``zero_state``, ``state_dict`` and
``load_state_dict`` hold a lock of the optimizer's for their whole run, so concurrent
steps are applied one after the other and ``step_count`` counts every one (steps of one
optimizer never overlap; use one optimizer per thread for parallel work). The step count
always matches the updates applied: it is advanced before the kernel runs and put back
only when the kernel refused the call (its checks raise TypeError/ValueError before
anything is written), so an exception raised after the kernel ran -- Ctrl-C's
KeyboardInterrupt is delivered when the call returns -- leaves it counted.
"""

from __future__ import annotations

import copy
import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import _arrays, _ext, functional, reference
from ._arrays import ArrayOrList, as_list
from ._specs import OPTIMIZERS, OptimizerSpec
from ._validate import flag, real, renamed_entries, whole

Schedule = Callable[[int, float], float]
# The state types the classes allocate: "float32" is the params' own state type (float32,
# or float64 for float64 params); "bfloat16" halves the state's bytes.
STATE_DTYPES = ("float32", "bfloat16", "int8")
# state_dtype="int8": params with fewer elements keep float32 state (bitsandbytes' rule).
STATE8_MIN_ELEMENTS = 4096


def check_state_dtype(name: str, value: Any) -> str:
    """``value`` if it is one of STATE_DTYPES, else a TypeError/ValueError naming ``name``."""
    if isinstance(value, str) and value in STATE_DTYPES:
        return value
    expected = f"expected one of {', '.join(map(repr, STATE_DTYPES))}, got {value!r}"
    raise (ValueError if isinstance(value, str) else TypeError)(f"{name}: {expected}")


class Copies:
    """``copy.deepcopy`` and pickling of an optimizer class (which holds ``_lock``): the
    whole object, its arrays copied with the rest of what is copied or pickled (params
    shared with a model copied alongside stay shared), the lock and what the class makes
    again in ``_made_again`` left out. ``copy.copy`` is refused: a shallow copy would
    step the same state arrays with a step count of its own."""

    _lock: Any
    _UNCOPIED: Tuple[str, ...] = ("_lock",)

    def __getstate__(self) -> Dict[str, Any]:
        with self._lock:
            self._before_copy()
            return {k: v for k, v in self.__dict__.items() if k not in self._UNCOPIED}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._made_again()

    def __copy__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__}: copy.copy would step the same state arrays with a step "
            "count of its own; use copy.deepcopy for an independent optimizer, or "
            "state_dict() / load_state_dict()"
        )

    def _before_copy(self) -> None:
        """Makes the state final before it is copied (the GPU's queued steps)."""

    def _made_again(self) -> None:
        """Makes again what __getstate__ left out, besides the lock."""


class Optimizer(Copies):
    """Shared machinery; a subclass names the spec it steps with (``_spec``, see
    ``fastopt._specs``) and passes its hyper-parameters other than lr."""

    _spec: OptimizerSpec

    def __init__(
        self,
        params: ArrayOrList,
        *,
        lr: float,
        schedule: Optional[Schedule],
        hyper: Dict[str, Any],
        options: Optional[Dict[str, Any]] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        self._listed = isinstance(params, (list, tuple))
        given = as_list("params", params, self._listed)
        self.params: List[Any] = [
            _arrays.param_array(f"params[{i}]", a) for i, a in enumerate(given)
        ]
        _check_params(self.params, self._listed)
        # PyTorch CPU params are stepped through NumPy views of their memory: where each
        # keeps it is compared at every step, and the views follow a move in place
        # (p.data = ..., share_memory_(), which frees the memory an old view points at).
        torch_host = [
            i for i, a in enumerate(given) if _arrays._is_torch(a) and not _arrays.on_device(a)
        ]
        self._torch_params = [given[i] for i in torch_host]
        self._torch_indices = torch_host
        self._torch_layouts = (
            _ext._cpu.tensor_layouts(self._torch_params) if self._torch_params else b""
        )
        self._lock = threading.RLock()  # see the module docstring (RLock: a signal handler
        # saving a checkpoint while its thread steps must not deadlock)
        # On the GPU the checked launch tables are kept between steps (see
        # fastopt._cuda.Plan): a step re-reads only arrays that changed (new grads).
        on_device = bool(self.params) and _arrays.on_device(self.params[0])
        self._host = not on_device  # steps call the CPU kernel directly (stream=None)
        self._plan = self._new_plan()
        # the plans of the second and later kernel calls of a step (state_dtype="int8"
        # steps the params with 8-bit state and the small ones apart: one plan per call)
        self._more_plans: List[Any] = []
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"schedule: expected a callable (t, lr) -> lr, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self._kernel = functional.STEPS[self._spec.name]
        self._hyper = dict(hyper)
        self.lr = lr
        self._kw, used = self._validated(self._hyper, self._lr)
        # what each state array starts at (ArrayRole.initial): a number, lr, or an option
        set_options = options or {}
        chosen = {
            n: h.validate(n, set_options.get(n, h.default)) for n, h in self._spec.options.items()
        }
        self._initial = self._spec.initial_values({**self._kw, "lr": self._lr, **chosen})
        self.state_dtype = check_state_dtype("state_dtype", state_dtype)
        # stochastic rounding: the seed of every step, mixed with the step count;
        # master_weights: float32 copies of float16/bfloat16 params, stepped in their place
        self._rounding_seed, self.master_params = sixteen_bit_options(
            self.params, stochastic_rounding, seed, master_weights
        )
        bfloat16 = state_dtype == "bfloat16"
        # state_dtype="int8": the params whose state is 8-bit (the others keep float32)
        self._state8 = self._state8_params() if state_dtype == "int8" else []
        eight = set(self._state8)
        self.state: Dict[str, List[Any]] = {
            name: [
                _arrays.zeros_from(p, tuple(p.shape), "uint8")
                if i in eight
                else _arrays.state_like(f"params[{i}]", p, bfloat16)
                for i, p in enumerate(self.params)
            ]
            for name in used
        }
        # the block maxima of each 8-bit state array (None for float state)
        self.absmax: Dict[str, List[Any]] = {
            name: [
                _arrays.zeros_from(p, (-(-_size(p) // 256),), "float32") if i in eight else None
                for i, p in enumerate(self.params)
            ]
            for name in (used if eight else [])
        }
        self._kernel_state(used)
        self._last_stream: Any = None  # GPU: the stream the last step was queued on
        self._step = 0
        self.masks = masks
        self.zero_state()

    # -- hyper-parameters ----------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The base learning rate (the schedule, if any, is applied on top)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = real("lr", value, lo=0.0)

    @property
    def masks(self) -> Optional[List[Any]]:
        """The masks every step applies (a list aligned with params), or None."""
        return self._masks

    @masks.setter
    def masks(self, value: Optional[ArrayOrList]) -> None:
        if value is None:
            self._masks: Optional[List[Any]] = None
            return
        masks = list(as_list("masks", value, self._listed))
        if len(masks) != len(self.params):
            raise ValueError(
                f"masks: expected {len(self.params)} arrays (one per param), got {len(masks)}"
            )
        self._masks = masks

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
        return real("schedule(t, lr)", self.schedule(self._step, self._lr), lo=0.0)

    def _validated(
        self, hyper: Dict[str, Any], lr: float, state: Optional[Dict[str, Any]] = None
    ) -> Tuple[Dict[str, Any], List[str]]:
        """``hyper`` checked by the table: (the kernel's keywords but lr, the state arrays
        they use). With ``state`` (the state of an optimizer being restored), a state array
        they need and it lacks (amsgrad=True without max_exp_avg_sqs) is an error, as in
        the functional call."""
        spec = self._spec
        values = spec.validate({**hyper, "lr": lr})
        if state is not None:
            spec.require_arrays(values, state.__contains__)
        kw = spec.kernel_hyper(values)
        del kw["lr"]
        return kw, spec.state_names(values)

    def _kernel_state(self, used: List[str]) -> None:
        """Sets the state a step hands the kernel (``_used_states``: the state names in
        binding order, None for those the hyper-parameters leave unused) and the calls a
        step makes (``_calls``): one over every param, or with 8-bit state one over the
        params with 8-bit state and one over the others."""
        self._used_states = [a.name if a.name in used else None for a in self._spec.states]
        # (the params' indices or None for all, whether their state is 8-bit) per call
        self._calls: List[Tuple[Optional[List[int]], bool]] = [(None, False)]
        if self._state8:
            eight = set(self._state8)
            small = [i for i in range(len(self.params)) if i not in eight]
            self._calls = [(ix, is8) for ix, is8 in ((self._state8, True), (small, False)) if ix]

    def _state8_params(self) -> List[int]:
        """state_dtype="int8": the indices of the params whose state is 8-bit."""
        if self._spec.name == "sophia":
            raise ValueError(
                "state_dtype: 'int8' is not available for Sophia (its Hessian estimate is "
                "updated outside the step)"
            )
        for i, p in enumerate(self.params):
            if _arrays.dtype_name(p) == "float64":
                raise ValueError(
                    "state_dtype: 8-bit state is for float32 and 16-bit params; "
                    f"params[{i}] is float64"
                )
        return [i for i, p in enumerate(self.params) if _size(p) >= STATE8_MIN_ELEMENTS]

    # -- stepping --------------------------------------------------------------------------
    def step(
        self, grads: ArrayOrList, *, max_grad_norm: Optional[float] = None, stream: Any = None
    ) -> Any:
        """One step with ``grads`` (an array, or a list aligned with params). On the GPU it
        is queued on ``stream`` (default: the params' library's current stream).
        ``max_grad_norm``: the grads are clipped first to that global 2-norm, as by
        ``fastopt.clip_grad_norm_`` (without writing them on the host; see
        ``fastopt.functional``), and the norm before clipping is returned (else None)."""
        with self._lock:
            if self._torch_params:
                self._follow_torch_params()
            t = self._step + 1
            if t > STEP_LIMIT:
                raise ValueError(f"step_count: {self._step} steps taken, the most a class counts")
            kw = {**self._kw, "lr": self.current_lr()}
            # NAdam's mu_product, ASGD's eta and mu: a class's hyper-parameters hold for its
            # life (a loaded state_dict brings its own with its step count), so they follow
            # from the step (with a schedule, from this step's lr)
            for name in self._spec.carried:
                kw[name] = self._spec.carried_value(name, t, kw)
            if self._masks is not None:
                kw["masks"] = self._masks
            if self._rounding_seed is not None:
                kw["stochastic_seed"] = functional.step_seed(self._rounding_seed, t)
            grads = as_list("grads", grads, self._listed)
            if len(grads) != len(self.params):
                raise ValueError(
                    f"grads: expected {len(self.params)} arrays (one per entry of params), "
                    f"got {len(grads)}"
                )
            if self.master_params is not None:
                kw["master_params"] = self.master_params
            # the state lists as opt.state holds them now (an entry or a list replaced)
            lists = [self.params, grads]
            for used in self._used_states:
                if used is not None and used not in self.state:
                    raise ValueError(
                        f"state: has no {used!r} (the arrays this optimizer made; "
                        "load_state_dict() restores them)"
                    )
                lists.append(None if used is None else self.state[used])
            calls = self._step_calls(lists, kw, t)
            if self._host and stream is None:
                kernel, extra = self._kernel.cpu_kernel, functional.NO_KEYWORDS
            else:
                kernel, extra = self._kernel.bound(lists, stream, self._plan)
            if self._spec.takes_step:
                for _, keywords in calls:
                    keywords["step"] = t
            runs = [(a, k, self._call_extra(extra, n)) for n, (a, k) in enumerate(calls)]
            if len(runs) > 1:  # (each call checks its own arrays, not the others')
                _arrays.check_apart(
                    [
                        ("params", self.params, True),
                        ("grads", grads, False),
                        *((a.name, s, True) for a, s in zip(self._spec.states, lists[2:])),
                        *((f"absmax['{n}']", top, True) for n, top in self.absmax.items()),
                        ("masks", kw.get("masks"), False),
                        ("master_params", kw.get("master_params"), True),
                    ]
                )
            # Every call after the first is checked before the first runs (which checks
            # itself before its first write): a refused step writes nothing.
            for n, (call_lists, call_kw, call_extra) in enumerate(runs):
                if n:
                    try:
                        kernel(*call_lists, self._listed, **call_kw, **call_extra, check_only=True)
                    except (TypeError, ValueError) as exc:
                        raise self._named_as_whole(exc, n) from None
            norm = None
            if max_grad_norm is not None:
                norm, clipped = self._kernel.clip(  # on the step's stream
                    lists, self._listed, {}, max_grad_norm, extra.get("stream")
                )
                for _, call_kw, _ in runs:
                    call_kw.update(clipped)
            # Counted before the kernel runs (an attribute store, where no signal is
            # handled; nothing between it and the kernel call runs Python code that could
            # take a KeyboardInterrupt), uncounted only if its checks refused the call
            # (nothing written then): see the module docstring. A GPU step is recorded for
            # the methods that wait for it even when an exception follows the launch.
            self._step = t
            refused = False
            done = 0
            try:
                for call_lists, call_kw, call_extra in runs:
                    kernel(*call_lists, self._listed, **call_kw, **call_extra)
                    done += 1
            except (TypeError, ValueError, MemoryError) as exc:
                refused = True
                self._step = t - 1
                if isinstance(exc, MemoryError):
                    raise
                raise self._named_as_whole(exc, done) from None
            finally:
                if not refused:
                    self._queued_on(stream)
                    self._bump_versions(call_lists for call_lists, _, _ in runs)
        return norm

    def _bump_versions(self, lists: Iterable[List[Any]]) -> None:
        """After a step: the version counters of the torch tensors it wrote bumped, as
        torch's in-place ops bump theirs (a backward through a param saved by a forward
        before the step then raises, as with torch.optim). PyTorch CPU params are stepped
        through NumPy views: their tensors here; torch tensors the CPU kernel was handed
        itself (state replaced by one) it bumps; on the GPU every written one here."""
        if self._torch_params:
            _arrays.increment_versions(self._torch_params)
        elif not self._host and _arrays._is_torch(self.params[0]):
            for call_lists in lists:
                self._kernel.bump_written(call_lists)

    def _follow_torch_params(self) -> None:
        """PyTorch CPU params whose memory moved in place since the last step: their NumPy
        views made again (and checked as at construction)."""
        layouts = _ext._cpu.tensor_layouts(self._torch_params)
        if layouts == self._torch_layouts:
            return
        params = list(self.params)
        for i, t in zip(self._torch_indices, self._torch_params):
            params[i] = _arrays.param_array(f"params[{i}]", t)
        _check_params(params, self._listed)
        self.params, self._torch_layouts = params, layouts

    def _named_as_whole(self, exc: Exception, k: int) -> Exception:
        """A TypeError/ValueError of the step's k-th kernel call, naming an entry of the
        call's sub-lists ("grads[0]"), as it names it in the whole lists."""
        indices = self._calls[k][0]
        if indices is None:
            return exc
        return renamed_entries(exc, lambda role, i: f"{role}[{indices[i]}]")

    def _call_extra(self, extra: Dict[str, Any], k: int) -> Dict[str, Any]:
        """The keywords of a step's k-th kernel call: on the GPU each call has a plan of its
        own (a plan serves one set of arrays; alternating two would rebuild it each time)."""
        if k == 0 or "plan" not in extra or _ext._cuda is None:
            return extra
        while len(self._more_plans) < k:
            self._more_plans.append(self._new_plan())
        return {**extra, "plan": self._more_plans[k - 1]}

    def _step_calls(
        self, lists: List[Any], kw: Dict[str, Any], t: int
    ) -> List[Tuple[List[Any], Dict[str, Any]]]:
        """The kernel calls of step ``t`` over ``lists`` (params, grads, state) with
        keywords ``kw``: (lists, keywords) per call of ``_calls``. With two calls, the
        second (float state) draws its stochastic-rounding bits from a seed of its own."""
        if len(self._calls) == 1 and self._calls[0][0] is None:
            return [(lists, kw)]
        out = []
        for n, (indices, state8) in enumerate(self._calls):
            assert indices is not None
            sub = [None if a is None else [a[i] for i in indices] for a in lists]
            call_kw = dict(kw)
            if state8:
                call_kw["absmax"] = {
                    name: [self.absmax[name][i] for i in indices]
                    for name, arrays in zip((a.name for a in self._spec.states), lists[2:])
                    if arrays is not None
                }
            for name in ("masks", "master_params"):
                if name in kw:
                    call_kw[name] = [kw[name][i] for i in indices]
            if n and self._rounding_seed is not None:
                call_kw["stochastic_seed"] = functional.step_seed(self._rounding_seed, t, n)
            out.append((sub, call_kw))
        return out

    def zero_state(self) -> None:
        """Reset every state array to its initial value and the step count to 0."""
        with self._lock:
            self._await_steps()
            for name, arrays in self.state.items():
                value = self._initial[name]
                for i, a in enumerate(arrays):
                    maxima = self.absmax[name][i] if name in self.absmax else None
                    if maxima is None:
                        _arrays.fill(a, value)
                    else:  # every block holds `value`: one code, absmax |value|
                        codes, top = reference.quantize_state8(
                            np.full(1, value, np.float32), self._signed(name)
                        )
                        _arrays.fill(a, int(codes[0]))
                        _arrays.fill(maxima, float(top[0]))
            for p, m in zip(self.params, self.master_params or []):  # the params' values
                _arrays.copy_into(m, _arrays.float32_copy(p))
            self._await_state_writes()
            self._step = 0

    def _signed(self, name: str) -> bool:
        """Whether state ``name`` is stored with the signed 8-bit map."""
        return not next(a for a in self._spec.states if a.name == name).nonnegative

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
        return next(
            (a for arrays in self.state.values() for a in arrays if 0 not in tuple(a.shape)), None
        )

    def _queued_on(self, stream: Any) -> None:
        if self._plan is not None:  # the stream object itself, kept until waited for
            self._last_stream = _arrays.current_stream(self.params[0]) if stream is None else stream

    def _await_steps(self) -> None:
        stream, self._last_stream = self._last_stream, None
        like = self._device_state()
        if like is not None and stream is not None:
            _arrays.wait_for_stream(like, stream)

    def _await_state_writes(self) -> None:
        like = self._device_state()
        if like is not None:
            _arrays.wait_for_stream(like)

    # hyper-parameters a class fixes (AdamW's decoupled_weight_decay), checked when loading
    _FIXED_HYPER: Dict[str, Any] = {}

    # -- copies (see Copies) -------------------------------------------------------------------
    _UNCOPIED = ("_lock", "_kernel", "_plan", "_more_plans", "_ema_plan", "_last_stream")

    def _before_copy(self) -> None:
        self._await_steps()

    def _made_again(self) -> None:
        self._kernel = functional.STEPS[self._spec.name]
        self._plan = self._new_plan()
        self._more_plans = []
        self._last_stream = None
        if self._torch_params:  # views of the copied tensors' memory
            self._torch_layouts = b""
            self._follow_torch_params()

    def _new_plan(self) -> Any:
        """A launch table for one of the step's kernel calls (fastopt._cuda.Plan) on the
        GPU; None on the host."""
        return None if self._host or _ext._cuda is None else _ext._cuda.Plan()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """A deep copy of everything needed to continue exactly: type, step, lr, hyper,
        state, with 8-bit state ``"absmax"`` (each state's block maxima, None for the
        params with float32 state) and with master weights ``"master_params"``."""
        with self._lock:
            out = {
                "optimizer": type(self).__name__,
                "step": self._step,
                "lr": self._lr,
                "hyper": copy.deepcopy(self._hyper),
                "state": self._state_copies(),
            }
            if self._rounding_seed is not None:
                out["rounding_seed"] = self._rounding_seed
            if self.master_params is not None:
                out["master_params"] = [_arrays.clone(m) for m in self.master_params]
                self._await_state_writes()
            if self.absmax:
                out["absmax"] = {
                    name: [None if a is None else _arrays.clone(a) for a in arrays]
                    for name, arrays in self.absmax.items()
                }
                self._await_state_writes()
            return out

    def _state_copies(self) -> Dict[str, List[Any]]:
        self._await_steps()
        copies = {name: [_arrays.clone(a) for a in arrays] for name, arrays in self.state.items()}
        self._await_state_writes()  # the copies are complete when state_dict() returns
        return copies

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a ``state_dict()``; arrays are copied into this optimizer's own buffers.
        Atomic: every entry is checked and converted into a staged copy first (a tensor
        that cannot be read -- meta, sparse, a negative view -- is an error then), and the
        state is overwritten only when all are; on error nothing changes. State saved in
        another of float32 and 8-bit (a state_dict of a ``state_dtype="int8"`` optimizer,
        with its ``"absmax"``) is converted: quantized or decoded, on the host."""
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"state_dict: expected the dict of a state_dict(), got {type(state_dict).__name__}"
            )
        for key in _STATE_DICT_KEYS:
            if key not in state_dict:
                raise ValueError(
                    f"state_dict: missing key {key!r} (a state_dict() has {list(_STATE_DICT_KEYS)})"
                )
        saved_by = state_dict["optimizer"]
        if not isinstance(saved_by, str) or saved_by != type(self).__name__:
            raise ValueError(
                f"state_dict['optimizer']: was saved by {saved_by!r:.60}, not {type(self).__name__}"
            )
        step = _saved_step(state_dict["step"])
        lr = real("state_dict['lr']", state_dict["lr"], lo=0.0)
        hyper, state = state_dict["hyper"], state_dict["state"]
        for key, value in (("hyper", hyper), ("state", state)):
            if not isinstance(value, dict):
                raise TypeError(f"state_dict[{key!r}]: expected a dict, got {type(value).__name__}")
        hyper = dict(hyper)
        if set(hyper) != set(self._hyper):
            raise ValueError(
                f"state_dict['hyper']: expected keys {sorted(self._hyper)}, got "
                f"{sorted(map(str, hyper))}"
            )
        for key, value in self._FIXED_HYPER.items():
            if hyper[key] is not value:
                raise ValueError(
                    f"state_dict['hyper'][{key!r}]: {type(self).__name__} has {key}={value!r}, "
                    f"got {hyper[key]!r:.40}"
                )
        try:
            kw, used = self._validated(hyper, lr, self.state)
        except (TypeError, ValueError) as exc:  # named as the checkpoint's entry
            name, _, why = str(exc).partition(": ")
            where = f"['{name}']" if name in hyper else f": {name}"
            raise type(exc)(f"state_dict['hyper']{where}: {why}") from None
        if set(state) != set(self.state):
            raise ValueError(
                f"state_dict['state']: expected {sorted(self.state)}, got "
                f"{sorted(map(str, state))} (were the options the same?)"
            )
        saved_absmax = state_dict.get("absmax", {})
        if not isinstance(saved_absmax, dict):
            raise TypeError(
                f"state_dict['absmax']: expected a dict, got {type(saved_absmax).__name__}"
            )
        staged_masters = staged_master_params(state_dict, self.master_params)
        rounding_seed = saved_rounding_seed(state_dict, self._rounding_seed)
        staged: Dict[str, List[Tuple[Any, Any]]] = {}
        for name, arrays in self.state.items():
            saved = state[name]
            where = f"state_dict['state'][{name!r}]"
            if not isinstance(saved, (list, tuple)):
                raise TypeError(f"{where}: expected a list of arrays, got {type(saved).__name__}")
            if len(saved) != len(arrays):
                raise ValueError(f"{where}: expected {len(arrays)} arrays, got {len(saved)}")
            maxima = saved_absmax.get(name)
            if maxima is not None and (
                not isinstance(maxima, (list, tuple)) or len(maxima) != len(arrays)
            ):
                raise ValueError(
                    f"state_dict['absmax'][{name!r}]: expected a list of {len(arrays)} entries"
                )
            staged[name] = [
                self._staged_state(
                    f"{where}[{i}]", name, i, s, None if maxima is None else maxima[i]
                )
                for i, s in enumerate(saved)
            ]
        with self._lock:  # commit: copies between arrays of one kind, shape and dtype
            self._await_steps()
            for name, arrays in self.state.items():
                for i, (own, (s, top)) in enumerate(zip(arrays, staged[name])):
                    _arrays.copy_into(own, s)
                    if top is not None:
                        _arrays.copy_into(self.absmax[name][i], top)
            for own, saved in zip(self.master_params or [], staged_masters):
                _arrays.copy_into(own, saved)
            self._await_state_writes()
            self._step = step
            self._rounding_seed = rounding_seed
            self._lr = lr
            self._hyper = hyper
            self._kw = kw
            self._kernel_state(used)

    def _staged_state(self, where: str, name: str, i: int, saved: Any, saved_max: Any) -> Any:
        """(values, absmax or None): the staged copy of saved state entry ``saved`` (with
        its block maxima ``saved_max`` when it was 8-bit) for ``self.state[name][i]``,
        quantized or decoded on the host when one side is 8-bit and the other is not."""
        own = self.state[name][i]
        own_max = self.absmax[name][i] if name in self.absmax else None
        where_max = f"state_dict['absmax'][{name!r}][{i}]"
        if (own_max is None) == (saved_max is None):
            if own_max is None:
                return _arrays.staged(where, own, saved), None
            top = _arrays.staged(where_max, own_max, saved_max)
            _check_block_maxima(where_max, _host_copy(where_max, top))
            return _arrays.staged(where, own, saved), top
        shape = tuple(own.shape)
        if own_max is None:  # 8-bit saved, float here
            codes = _saved_part(where, saved, ("uint8",), shape, "8-bit codes")
            blocks = (-(-codes.size // reference.STATE8_BLOCK),)
            top = _saved_part(where_max, saved_max, ("float32",), blocks, "block maxima")
            _check_block_maxima(where_max, top)
            values = reference.dequantize_state8(codes, top, self._signed(name))
            return _arrays.staged(where, own, values), None
        # float saved (no block maxima), 8-bit here
        host = _saved_part(
            where, saved, _FLOAT_STATE, shape, f"float state (8-bit codes need {where_max})"
        )
        codes, top = reference.quantize_state8(host.astype(np.float32), self._signed(name))
        return _arrays.staged(where, own, codes), _arrays.staged(where, own_max, top)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return (
            f"{type(self).__name__}({len(self.params)} arrays, lr={self._lr!r}, {args}, "
            f"schedule={self.schedule!r}, step={self._step})"
        )


_STATE_DICT_KEYS = ("optimizer", "step", "lr", "hyper", "state")
STEP_LIMIT = 2**63 - 1  # the most steps a class counts (int64, as torch's)


_FLOAT_STATE = ("float32", "float64", "float16", "bfloat16")


def _saved_part(
    name: str, a: Any, dtypes: Tuple[str, ...], shape: Tuple[int, ...], what: str
) -> np.ndarray:
    """A host copy of ``a``, a saved array converted between 8-bit and float state, after
    checking it is ``what``: of one of ``dtypes`` and of ``shape``."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype") or isinstance(a, np.generic):
        raise TypeError(f"{name}: expected an array ({what}), got {type(a).__name__}")
    dtype = _arrays.dtype_name(a)
    if dtype not in dtypes or tuple(a.shape) != shape:
        raise ValueError(
            f"{name}: expected {what}: shape {shape} {' or '.join(dtypes)}, got "
            f"{tuple(a.shape)} {dtype}"
        )
    if dtype == "bfloat16" and not isinstance(a, np.ndarray):
        a = _arrays.float32_copy(a)  # (torch's bfloat16 has no NumPy twin): the same values
    try:
        return _host_copy(name, a)
    except Exception as exc:  # the library's own error for an array it cannot read
        raise TypeError(f"{name}: cannot be read ({type(exc).__name__}: {exc})") from None


def _host_copy(name: str, a: Any) -> np.ndarray:
    """A NumPy copy of a saved array (NumPy, PyTorch or CuPy)."""
    if isinstance(a, np.ndarray):
        return np.array(a)
    if hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, np.generic):
        return np.array(_arrays.to_numpy(a) if _arrays.on_device(a) else a.detach().numpy())
    raise TypeError(f"{name}: expected an array, got {type(a).__name__}")


def _check_block_maxima(name: str, top: np.ndarray) -> None:
    """ValueError unless 8-bit state's block maxima (max |x| of each block) are all finite
    and >= 0: any other value decodes the block's state to NaN, inf or flipped signs."""
    if not (np.isfinite(top).all() and (top >= 0).all()):
        raise ValueError(f"{name}: block maxima must be finite and >= 0")


def _size(a: Any) -> int:
    return int(np.prod(tuple(a.shape), dtype=np.int64))


def _saved_step(step: Any) -> int:
    """A checkpoint's step count: an integer the next steps can count on from (int64)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"state_dict['step']: expected an integer >= 0, got {step!r:.40}")
    if not 0 <= int(step) <= STEP_LIMIT:
        raise ValueError(
            f"state_dict['step']: expected an integer in [0, 2**63 - 1], got {int(step)}"
        )
    return int(step)


def sixteen_bit_options(
    params: List[Any], stochastic_rounding: Any, seed: Any, master_weights: Any
) -> Tuple[Optional[int], Optional[List[Any]]]:
    """An array class's ways to keep the small updates of 16-bit params, checked: the
    stochastic-rounding seed (``seed``, drawn when None; bfloat16 params only) or None, and
    the float32 master copies of float16/bfloat16 params or None; they exclude each other.
    A ValueError names the option."""
    rounding_seed: Optional[int] = None
    if flag("stochastic_rounding", stochastic_rounding):
        for i, p in enumerate(params):
            if _arrays.dtype_name(p) != "bfloat16":
                raise ValueError(
                    "stochastic_rounding: applies to bfloat16 params; "
                    f"params[{i}] is {_arrays.dtype_name(p)}"
                )
        rounding_seed = functional.stochastic_rounding("stochastic", seed)["stochastic_seed"]
    elif seed is not None:
        raise ValueError("seed: only applies with stochastic_rounding=True")
    if not flag("master_weights", master_weights):
        return rounding_seed, None
    if rounding_seed is not None:
        raise ValueError(
            "master_weights: excludes stochastic_rounding (both are ways to keep the "
            "small updates of 16-bit params)"
        )
    kinds = sorted({_arrays.dtype_name(p) for p in params})
    if not params or not set(kinds) <= {"float16", "bfloat16"}:
        raise ValueError(
            "master_weights: applies to float16/bfloat16 params; the params are "
            + (", ".join(kinds) or "none")
        )
    return rounding_seed, [_arrays.float32_copy(p) for p in params]


def saved_rounding_seed(state_dict: Dict[str, Any], own: Optional[int]) -> Optional[int]:
    """The stochastic-rounding seed a class continues with after loading ``state_dict``
    (its ``"rounding_seed"``, so the restored steps round as the saved ones would have;
    ``own``, this class's seed, where a checkpoint has none), checked; None without
    stochastic rounding, where a saved seed is refused."""
    saved = state_dict.get("rounding_seed")
    if saved is None:
        return own
    if own is None:
        raise ValueError(
            "state_dict: has 'rounding_seed' but this optimizer does not round "
            "stochastically (stochastic_rounding=True)"
        )
    return whole("state_dict['rounding_seed']", saved, 0, 2**64)


def staged_master_params(state_dict: Dict[str, Any], own: Optional[List[Any]]) -> List[Any]:
    """A class's ``state_dict["master_params"]`` checked against its own master copies
    ``own`` (None without master weights) and staged (copies to load), else a
    TypeError/ValueError naming the entry; [] where there are none."""
    masters = state_dict.get("master_params")
    if (masters is None) != (own is None):
        raise ValueError(
            "state_dict: "
            + ("has no 'master_params'" if masters is None else "has 'master_params'")
            + f" but this optimizer {'keeps' if masters is None else 'keeps no'} master "
            "weights (master_weights=True)"
        )
    if masters is None or own is None:
        return []
    if not isinstance(masters, (list, tuple)) or len(masters) != len(own):
        raise ValueError(f"state_dict['master_params']: expected a list of {len(own)} arrays")
    return [
        _arrays.staged(f"state_dict['master_params'][{i}]", mine, saved)
        for i, (mine, saved) in enumerate(zip(own, masters))
    ]


def _check_params(params: List[Any], listed: bool) -> None:
    """What a step would refuse about the params themselves, checked at construction: the
    same array twice, and for host arrays everything the binding checks (dtype, dense
    layout, alignment, writeable, overlaps). CUDA arrays are checked in full at a step."""
    seen: Dict[int, int] = {}
    for i, p in enumerate(params):
        j = seen.setdefault(id(p), i)
        if j != i:
            raise ValueError(f"params[{i}]: is params[{j}] again; each param may appear once")
    host = [p for p in params if isinstance(p, np.ndarray)]
    if len(host) == len(params):
        _ext._cpu.check_params(params, listed)


class SGD(Optimizer):
    """``torch.optim.SGD``: see ``fastopt.sgd_`` for the formula."""

    _spec = OPTIMIZERS["sgd"]

    def __init__(
        self,
        params: ArrayOrList,
        lr: float,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        l1: float = 0.0,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        hyper = dict(
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
            l1=l1,
        )
        super().__init__(
            params,
            lr=lr,
            schedule=schedule,
            hyper=hyper,
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )


class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: see ``fastopt.adagrad_``. State sums start at
    ``initial_accumulator_value``."""

    _spec = OPTIMIZERS["adagrad"]

    def __init__(
        self,
        params: ArrayOrList,
        lr: float = 1e-2,
        *,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        l1: float = 0.0,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        hyper = dict(
            lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize, l1=l1
        )
        super().__init__(
            params,
            lr=lr,
            schedule=schedule,
            hyper=hyper,
            options={"initial_accumulator_value": initial_accumulator_value},
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )


class RMSprop(Optimizer):
    """``torch.optim.RMSprop``: see ``fastopt.rmsprop_``."""

    _spec = OPTIMIZERS["rmsprop"]

    def __init__(
        self,
        params: ArrayOrList,
        lr: float = 1e-2,
        *,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        l1: float = 0.0,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        hyper = dict(
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
            l1=l1,
        )
        super().__init__(
            params,
            lr=lr,
            schedule=schedule,
            hyper=hyper,
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )


class Adam(Optimizer):
    """``torch.optim.Adam``: see ``fastopt.adam_`` (``decoupled_weight_decay=True`` is AdamW)."""

    _spec = OPTIMIZERS["adam"]

    def __init__(
        self,
        params: ArrayOrList,
        lr: float = 1e-3,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        l1: float = 0.0,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        hyper = dict(
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            l1=l1,
        )
        super().__init__(
            params,
            lr=lr,
            schedule=schedule,
            hyper=hyper,
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay, default 1e-2 (its hyper-
    parameters keep ``decoupled_weight_decay``, so its state dicts are Adam's)."""

    _FIXED_HYPER = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params: ArrayOrList,
        lr: float = 1e-3,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        l1: float = 0.0,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        super().__init__(
            params,
            lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
            amsgrad=amsgrad,
            maximize=maximize,
            l1=l1,
            schedule=schedule,
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )


class Sophia(Optimizer):
    """Sophia: see ``fastopt.sophia_``. ``update_hessian(estimate)`` folds a Hessian-diagonal
    estimate (Hutchinson, Gauss-Newton-Bartlett: the caller's) into the EMA the steps use;
    it starts at zero, so the first steps are clipped sign steps until it is updated."""

    _spec = OPTIMIZERS["sophia"]

    def __init__(
        self,
        params: ArrayOrList,
        lr: float = 1e-4,
        *,
        beta1: float = 0.965,
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        maximize: bool = False,
        l1: float = 0.0,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        hyper = dict(
            beta1=beta1, rho=rho, weight_decay=weight_decay, eps=eps, maximize=maximize, l1=l1
        )
        super().__init__(
            params,
            lr=lr,
            schedule=schedule,
            hyper=hyper,
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )
        self._ema_plan = self._new_plan()  # (update_hessian's)

    def _made_again(self) -> None:
        super()._made_again()
        self._ema_plan = self._new_plan()

    def update_hessian(
        self, estimate: ArrayOrList, beta2: float = 0.99, *, stream: Any = None
    ) -> None:
        """hessian_diag <- beta2*hessian_diag + (1-beta2)*estimate (shaped like params;
        float32 for 16-bit params, like the state)."""
        hessian_diags = self.state["hessian_diags"]
        with self._lock:  # the state a concurrent step reads
            functional.ema_(
                hessian_diags if self._listed else hessian_diags[0],
                estimate,
                beta=beta2,
                stream=stream,
                _plan=self._ema_plan,
            )
            self._queued_on(stream)


def _class_from_spec(spec: OptimizerSpec) -> type:
    """The class of an optimizer that needs nothing beyond its table entry:
    ``Name(params, lr=<default>, *, <its hyper-parameters and options>, schedule=None,
    masks=None, state_dtype="float32", stochastic_rounding=False, seed=None,
    master_weights=False)``, named as torch.optim's class where torch has it (``"radam"`` ->
    ``RAdam``), else after the spec (``"lion"`` -> ``Lion``), and documented by its
    functional step and where its state starts."""
    lr_default = spec.hyper["lr"].default
    others = {
        name: h.default
        for name, h in spec.hyper.items()
        if name != "lr" and name not in spec.carried
    }
    options = {name: h.default for name, h in spec.options.items()}

    def __init__(
        self: Optimizer,
        params: ArrayOrList,
        lr: Any = lr_default,
        *,
        schedule: Optional[Schedule] = None,
        masks: Optional[ArrayOrList] = None,
        state_dtype: str = "float32",
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
        **hyper: Any,
    ) -> None:
        unknown = sorted(set(hyper) - set(others) - set(options))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected keyword argument {unknown[0]!r}")
        if lr is None and lr_default is None:
            raise TypeError(f"{type(self).__name__}: missing argument 'lr'")
        Optimizer.__init__(
            self,
            params,
            lr=lr,
            schedule=schedule,
            hyper={**others, **{k: v for k, v in hyper.items() if k in others}},
            options={k: v for k, v in hyper.items() if k in options},
            masks=masks,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            master_weights=master_weights,
        )

    keyword = inspect.Parameter.KEYWORD_ONLY
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter(
                "lr",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=inspect.Parameter.empty if lr_default is None else lr_default,
            ),
            *(inspect.Parameter(n, keyword, default=d) for n, d in others.items()),
            *(inspect.Parameter(n, keyword, default=d) for n, d in options.items()),
            inspect.Parameter("schedule", keyword, default=None),
            inspect.Parameter("masks", keyword, default=None),
            inspect.Parameter("state_dtype", keyword, default="float32"),
            inspect.Parameter("stochastic_rounding", keyword, default=False),
            inspect.Parameter("seed", keyword, default=None),
            inspect.Parameter("master_weights", keyword, default=False),
        ]
    )
    name = spec.torch_name or spec.name.capitalize()
    starts = ", ".join(f"``{a.name}`` at ``{a.initial}``" for a in spec.states if a.initial)
    doc = (
        f"``fastopt.{spec.name}_`` as a class: it owns its state (see ``Optimizer``)"
        + (f"; state arrays start at 0 but {starts}" if starts else "")
        + ".\n\n"
        + (getattr(functional, f"{spec.name}_").__doc__ or "")
    )
    return type(
        name,
        (Optimizer,),
        {"_spec": spec, "__init__": __init__, "__doc__": doc, "__module__": __name__},
    )


# The class of each optimizer in the table, by its name there: the hand-written ones above
# (torch's signatures, their own extras), and one made from the table for every other.
_WRITTEN: Dict[str, type] = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
    "sophia": Sophia,
}
CLASSES: Dict[str, type] = {
    name: _WRITTEN.get(name) or _class_from_spec(spec) for name, spec in OPTIMIZERS.items()
}
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__all__ = ["Optimizer", "CLASSES", *(cls.__name__ for cls in CLASSES.values())]

if TYPE_CHECKING:
    # The classes made from the table (RAdam, Rprop, NAdam...), typed as a whole for type
    # checkers, so that adding an optimizer does not touch a list here.
    def __getattr__(name: str) -> Any: ...
