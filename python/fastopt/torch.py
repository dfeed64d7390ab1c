"""fastopt's kernels as ``torch.optim.Optimizer`` subclasses: a drop-in for PyTorch users.

``opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)`` behaves as ``torch.optim.AdamW``:
the same constructor (signature and defaults), param groups with their own hyper-parameters,
``add_param_group``, ``zero_grad``, ``step(closure=None)`` returning the loss, step pre/post
hooks, every ``torch.optim.lr_scheduler`` (they edit ``group["lr"]``, read at each step; a
0-d tensor lr works too), ``torch.amp.GradScaler``, DDP, ``ZeroRedundancyOptimizer`` and FSDP2.
The formulas are fastopt's (``fastopt.adam_`` etc., which follow torch.optim), so the
trajectories are torch's within float rounding.

How a step runs. Each param group's params that have a ``.grad`` are split into buckets by
(device, dtype, and the step count for kernels that take one: Adam, AdamW, Adagrad, Adamax,
RAdam, NAdam, ASGD, and SGD's first step); each bucket is one fused multi-tensor call of the
compiled kernel (one C++ call on the CPU, a few launches on the GPU). The buckets (which
params, the packed step counts, on the CPU NumPy views of params and state, on the GPU the
launch tables of ``fastopt._cuda.Plan``) are kept between steps and rebuilt only when the
set of params with a grad changes (or a param of a group's list is replaced), the group's
options change, or the state changes (``load_state_dict``; an entry, a state tensor or a
step count replaced or edited in place, a key added or removed), or the memory of a param, a
state tensor, a step count or a mask is replaced in place (``t.data = ...``, as the usual
loop that moves optimizer state between devices does, ``t.set_(...)``, ``resize_()``). The
buckets keep each param's state entry and every tensor they read from it and compare them at
each step by identity (the state dict's keys and values, the entries' tensors; no
``state[p]`` lookups unless the state dict changed), and where those tensors keep their
elements (pointer, dtype, shape, strides: one C call over the bucket, ~70 ns per tensor); a
rebuild checks the state as a first step does, so an entry or a tensor replaced between
steps is checked, then stepped, as in torch.optim. Params whose ``.grad`` is None are
skipped and keep their state, as in torch.optim. A param may be in one group only
(torch.optim's rule; a step refuses one put in two groups past ``add_param_group``).

State: torch's layout and keys, as torch tensors, so ``state_dict()`` / ``load_state_dict()``
are interchangeable with torch.optim's both ways (a torch.optim checkpoint continues on the
same trajectory here, and the reverse; ``torch.load(..., weights_only=True)`` works):
``state[p]["step"]`` is a float CPU tensor as torch's default (non-capturable) one; Adam(W):
``"exp_avg"``, ``"exp_avg_sq"``, ``"max_exp_avg_sq"`` (amsgrad); SGD: ``"momentum_buffer"``
(momentum > 0, no step, as torch); Adagrad: ``"sum"`` (made at construction, as torch);
RMSprop: ``"square_avg"``, ``"momentum_buffer"``, ``"grad_avg"``; Adamax: ``"exp_avg"``,
``"exp_inf"``; RAdam: ``"exp_avg"``, ``"exp_avg_sq"``; Adadelta: ``"square_avg"``,
``"acc_delta"``; Rprop: ``"prev"``, ``"step_size"`` (filled with lr, as torch); NAdam:
``"mu_product"`` (a float32 0-d tensor, packed per bucket as the step counts are),
``"exp_avg"``, ``"exp_avg_sq"``; ASGD: ``"eta"``, ``"mu"`` (float32 0-d tensors, packed
likewise), ``"ax"``; Lion:
``"exp_avg"`` (no step); Sophia: ``"exp_avg"``, ``"hessian"``. State is made lazily at a
param's first step, like the param (``torch.zeros_like``, same strides; a DTensor for a
DTensor param), except that float16/bfloat16 params get float32 state and float32 math,
the kernels' rule on every device (``load_state_dict`` keeps such state float32;
torch.optim would cast it to the param's dtype). The step counts of a bucket are 0-d views
of one tensor (one add per step instead of one per param); a rebuild repacks them and puts
the new views in the state, so a ``state[p]["step"]`` held from before a rebuild (or a
``state_dict()`` taken then) stops following the count while its other tensors, being the
live ones as in torch.optim, go on: take a ``state_dict()`` when it is saved or sent.

Decisions, where torch.optim offers a choice:
- ``foreach`` and ``fused`` are accepted and stored in the groups (checkpoints carry them) and
  change nothing: every step is already one fused multi-tensor call (both True together is
  refused, as torch refuses it).
- Moving averages are ``b*m + (1-b)*g`` where torch.optim writes ``m.lerp_(g, 1-b)`` (Adam,
  Adamax, RAdam's first moment, RMSprop's centered mean; the same within rounding): after
  an infinite grad element ``m`` stays +-inf where torch's becomes NaN one step later. The
  param is NaN either way, except in RAdam's steps before rectification (``m`` alone),
  where it is +-inf here.
- Complex params (complex64, complex128) are stepped as torch.optim steps them: through
  ``torch.view_as_real``, their real and imaginary parts as real numbers of their own
  (Adagrad's ``initial_accumulator_value`` set in both), with complex state of torch's keys;
  a grad that is a conjugate view is taken by value. Not by Sophia, and with float state
  only (no 8-bit or bfloat16 state, no masks).
- Under ``torch.compile``, ``step`` and ``clip_grad_norm_`` are ``torch.compiler.disable``d:
  dynamo does not trace into them (their Python bookkeeping would split the graph many
  times and recompile) and runs them as they are, each one compiled call per bucket
  already; a compiled training step breaks its graph once there.
- Hyper-parameters take what torch.optim takes: ``betas`` any pair (a tuple, a list, a NumPy
  array, a config library's list), ``eps`` >= 0, any ``dampening``, RMSprop's ``alpha`` >= 0,
  and for the bool options also 0, 1 and None (False), as torch reads them by truth value;
  other values of a bool option (a string) raise a TypeError naming it.
- ``capturable=True`` and ``differentiable=True`` are rejected with a ValueError (at
  construction, and at a step when a loaded checkpoint's group sets them): the kernels take
  lr and the step count as host scalars and write in place outside autograd.
- ``lr`` (and Adam's betas) may be 0-d tensors; they are read as Python floats at each step,
  which on the GPU costs a device-to-host copy when they live there.
- Sparse gradients raise a TypeError naming the param (use torch.optim.SparseAdam).
- A grad sharing memory with a param or a state tensor (``p.grad = p.detach()``) raises a
  ValueError naming it: the one-pass kernel would read memory it writes (torch.optim's
  separate ops define an order; pass ``p.detach().clone()``).
- Params (and their grads and state) may be dense in any stride order (channels_last, a
  transposed view of a whole storage): they are stepped over their storage. A grad whose
  strides differ from its param's is copied to the param's strides for the call (it is not
  written back; grads are read only). Params with gaps (a slice of a bigger tensor) are
  refused with a ValueError. State tensors of other strides than their param's (or
  negative views) are taken as their values: copied to the param's strides at the step.
- Writes bump autograd's version counters of every param and state tensor they update, so
  stepping between a forward and its backward raises exactly as with torch.optim, and
  inference tensors are refused outside ``torch.inference_mode`` with torch's own message.
- Hyper-parameters are checked by fastopt's table at each step (cached per distinct set of
  values): a bad value raises a ValueError/TypeError naming ``param_groups[i]['...']``.
  ``state_dtype`` is checked when a group is made (constructor, ``add_param_group``) and at
  each step, before the group's state is touched.
- ``torch.amp.GradScaler`` (``_step_supports_amp_scaling = True``, as torch's fused
  optimizers): the scaler hands its scale and ``found_inf`` to the step, which divides the
  grads by the scale inside the kernel (the grads are not written) and skips the whole step,
  step counts included, when ``found_inf`` is set. On the CPU both are read on the host. On
  the GPU the kernels read them from device memory and skip their writes themselves, as
  torch's fused optimizers do, so nothing waits for the device: the step counts move as for
  a step taken, and are made exact (a skipped step's go back) when found_inf, copied to
  pinned memory behind the kernels, is read at the next step, ``state_dict()`` or
  ``load_state_dict()`` (that wait ends where the step ended on the GPU). Until then
  ``state[p]["step"]`` of a skipped step reads one more. With ``max_grad_norm`` (clipping
  takes the scale on the host), or params the kernels cannot hand the tensors to (DTensors,
  another device than found_inf's), they are read on the host: one synchronisation per
  step. After ``scaler.unscale_`` (for clipping) the grads are taken as they are. The
  trajectory is torch.optim's under the same scaler.
- ``state_dtype=`` (every class, keyword-only, a group option): ``"float32"`` (default: the
  state types above) or ``"bfloat16"`` (every state tensor but ``step`` and the numbers
  of NAdam and ASGD, ``mu_product``, ``eta``, ``mu``, in bfloat16: half the state's
  bytes; loaded exactly, updated in float32, stored rounded to nearest even; not for
  float64 params). State of another float type (a checkpoint saved with the other
  choice, or a group whose ``state_dtype`` changed) is converted at the next step.
  ``"int8"``: blockwise 8-bit state (1 + 4/256 bytes per element; CPU and CUDA)
  for the params of ``group["min_8bit_size"]`` (default 4096) elements or more, float32 for
  the others, as bitsandbytes. An 8-bit entry keeps torch's key for its codes (uint8, laid
  out like the param) and adds ``key + "_absmax"`` (float32, one per 256 elements of the
  param's storage); ``fastopt.reference.dequantize_state8`` decodes them. Float state (a
  torch.optim checkpoint) is quantized at the next step, and 8-bit state decoded when the
  group's ``state_dtype`` goes back to a float type; a torch.optim optimizer cannot load
  8-bit state. ``Adam8bit``, ``AdamW8bit``, ``SGD8bit``, ``RMSprop8bit``, ``Lion8bit`` and
  ``Adagrad8bit`` take bitsandbytes' constructor arguments and set ``state_dtype="int8"``.
- ``master_weights=`` (every class, keyword-only, a group option; default False): the
  group's float16/bfloat16 params keep a float32 copy, ``state[p]["master_param"]`` (made
  from the param at its first step), which the kernel steps in the param's place (the
  16-bit grads converted as they are loaded); the param is written, in the same pass, as
  the result rounded to nearest. Mixed-precision training as apex's O2 and DeepSpeed do,
  4 bytes per param more than the state; a checkpoint carries the copy. Excludes
  ``stochastic_rounding`` (the other way to keep small updates): refused together at
  construction, by ``add_param_group`` and, for edited groups, at the step.
- ``stochastic_rounding=`` (every class, keyword-only, a group option; default False): the
  group's bfloat16 params are rounded stochastically at every step (unbiased; bfloat16
  training without float32 master weights), keyed by the group's ``"rounding_seed"`` (from
  ``seed=``, drawn when None), the group's count of such steps (``"rounding_step"``, set in
  the group by its first step), the group's place and the param's: reproducible, and a
  checkpoint or a copy carries both group keys, so it goes on with the next keys. The
  group's other params round to nearest as always. A DTensor's shards (FSDP2) also mix in
  the rank's place along the mesh dimensions that shard it, so shards draw their own bits
  while replicas draw the same. ``ZeroRedundancyOptimizer`` gives each rank an optimizer
  over its own params, placed as in a group of their own: pass ``seed=`` a seed per rank
  (``seed + rank``), else the ranks' params at the same places draw the same bits.
- ``masks=`` (every class, keyword-only; or ``set_masks`` later): pruning masks, e.g. from
  ``fastopt.prune_magnitude``, as a dict {param: mask} or one mask per param. Where a mask is
  False the step sets the param to 0 and leaves its state untouched, inside the one fused
  pass (a masked param is bucketed apart from unmasked ones). Masks are the model's, not the
  optimizer's: ``state_dict`` does not carry them.
- ``opt.max_grad_norm = 1.0`` (an attribute, default None, so that the constructors and
  checkpoints stay torch's) clips every step's grads to that global 2-norm over all groups,
  as ``clip_grad_norm_`` before the step would, and leaves the norm in ``opt.last_grad_norm``.
  On the CPU the clip coefficient joins the GradScaler scale the kernel divides the grads by;
  on the GPU (grads of one dtype and device) the kernels read the norm from device memory:
  either way two reads of the grads, no write, no synchronisation. Other grads (CUDA grads
  of mixed dtypes or devices, DTensors) are clipped in place first by torch's
  ``clip_grad_norm_``.
- DTensor params (FSDP2's ``fully_shard``, tensor parallel) are stepped on their local shards
  (``to_local()``, re-read at every step); their state is made with ``zeros_like`` and is a
  DTensor with the same placements, as torch.optim's, so
  ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` works.

Hardening:
- Params are checked when a group is added (construction, ``add_param_group``): dtype,
  device (CPU or CUDA; a meta tensor is named as such), dense strided layout, and no param
  twice in a group (torch.optim only warns); a bad group is not added.
- ``load_state_dict`` is atomic: torch.optim's builds the new state before replacing the
  old, and fastopt's float32 state for 16-bit params is converted before either; a
  malformed checkpoint raises TypeError/ValueError (torch's own KeyError,
  NotImplementedError... are re-raised as such) and changes nothing.
- A step is checked whole before anything is written. Where it is more than one kernel
  call (several groups, or buckets: dtypes, 8-bit and float state, master copies or not),
  rebuilds buckets or clips the grads, every call's checks run before the first call
  (the kernels' ``check_only``); state it makes, converts (float and 8-bit, another float
  type, the param's strides; each checked first) or drops is staged and written only once
  every check passed. A refused step raises a TypeError/ValueError naming the param, its
  state entry or the group option, and leaves params, grads, state and step counts as
  they were.
- Group options edited after construction (``master_weights``, ``stochastic_rounding``,
  ``rounding_seed``, ``min_8bit_size``) are checked as the constructor checks them.
- ``state[p]["step"]`` may be a Python number, as in torch < 1.12's checkpoints (torch.optim
  takes them): it becomes torch's 0-d tensor at the load or step. A step count must be a
  whole number >= 0, checked at the load and at the step.
- ``load_state_dict`` refuses malformed 8-bit state (codes without their block maxima,
  maxima of another shape or dtype, maxima beside float state) then, not at the step.
- A step's count matches the updates applied: once a bucket's kernel has run its step
  counts move, also when an exception follows (Ctrl-C's KeyboardInterrupt arrives when
  the call returns); a call the kernel refused (nothing written then) is not counted.
- A step holds the optimizer's lock: a shared optimizer stepped from several threads
  applies the steps one after the other and counts each.

The kernels run with the GIL released on the CPU; on the GPU they are queued on torch's
current stream without any synchronisation (but the host reads named above).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
import threading
from collections import OrderedDict, defaultdict
from typing import (
    Any,
    Callable,
    DefaultDict,
    Dict,
    List,
    NamedTuple,
    Optional,
    Tuple,
    Union,
    cast,
)

import torch
from torch.optim.optimizer import _use_grad_for_differentiable

from . import _arrays, _ext, functional, reference
from ._specs import OPTIMIZERS, Flag, OptimizerSpec
from ._torch_clip import clip_grad_norm_, step_grad_scale
from ._validate import flag, real, renamed_entries, whole
from .adafactor import adafactor_hyper, machine_epsilon, state_shapes
from .adafactor import run_step as run_adafactor
from .clip import max_norm_of
from .optim import check_state_dtype

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "Lion",
    "Sophia",
    "Adamax",
    "RAdam",
    "Adadelta",
    "Rprop",
    "NAdam",
    "ASGD",
    "Adafactor",
    "Adam8bit",
    "AdamW8bit",
    "SGD8bit",
    "RMSprop8bit",
    "Lion8bit",
    "Adagrad8bit",
    "clip_grad_norm_",
]

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

# state_dtype="int8": params with fewer elements keep float32 state (bitsandbytes' rule);
# each 8-bit state tensor (uint8 codes, laid out like its param) has its block maxima
# under its key + ABSMAX (float32, one per 256 elements of the param's storage).
STATE8_MIN_ELEMENTS = 4096
ABSMAX = "_absmax"
# master_weights=True: the float32 copy of a float16/bfloat16 param
MASTER = "master_param"

# torch.optim's state key for each state array of fastopt's table.
STATE_KEYS = {
    "exp_avgs": "exp_avg",
    "exp_avg_sqs": "exp_avg_sq",
    "max_exp_avg_sqs": "max_exp_avg_sq",
    "momentum_buffers": "momentum_buffer",
    "state_sums": "sum",
    "square_avgs": "square_avg",
    "grad_avgs": "grad_avg",
    "hessian_diags": "hessian",
    "exp_infs": "exp_inf",
    "acc_deltas": "acc_delta",
    "prevs": "prev",
    "step_sizes": "step_size",
    "axs": "ax",
}

_HALF = (torch.float16, torch.bfloat16)
_COMPLEX = (torch.complex64, torch.complex128)
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16) + _COMPLEX
_DTYPES = "float32, float64, float16, bfloat16, complex64, complex128"
# Where a hyper-parameter of the table lives in a param group (betas are a pair in torch).
_GROUP_PATH = {
    "beta1": ("betas", 0),
    "beta2": ("betas", 1),
    "etaminus": ("etas", 0),
    "etaplus": ("etas", 1),
    "step_size_min": ("step_sizes", 0),
    "step_size_max": ("step_sizes", 1),
}
_CACHE_SIZE = 256


def _step_dtype() -> torch.dtype:
    """torch.optim's dtype for state["step"] (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers a gap-free span of its storage in some stride order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


_NOT_DENSE = (
    "{}: must be dense (its elements filling one block of memory in some order): a slice "
    "with gaps or an expanded view (stride 0) is not; fastopt steps dense tensors, make it "
    "contiguous"
)


def _entry_size(entry: Optional[Dict[str, Any]]) -> int:
    return 0 if entry is None else len(entry)


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter; None for an inference tensor (made under
    ``torch.inference_mode()``), which has none."""
    return None if t.is_inference() else t._version


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return cast(Any, t).to_local() if _is_dtensor(t) else t


def _memory(value: Any) -> Optional[torch.Tensor]:
    """A state value as the aliasing checks take it: a dense tensor's local memory, None
    for anything else (a number, a sparse or meta tensor: refused later, by name)."""
    if not isinstance(value, torch.Tensor):
        return None
    local = _local(value)
    return local if local.layout == torch.strided and local.device.type != "meta" else None


def _placement(p: torch.Tensor) -> Any:
    """A DTensor's mesh and placements (None for a plain tensor): the params of a bucket
    share them, so that its stochastic rounding key follows each param's shard."""
    if not _is_dtensor(p):
        return None
    return cast(Any, p).device_mesh, tuple(cast(Any, p).placements)


def _shard_seed(key: int, p: torch.Tensor) -> int:
    """Stochastic rounding's ``key`` for DTensor ``p``'s local shard: mixed with this rank's
    coordinates along the mesh dimensions that shard ``p`` (a shard's local element indices
    repeat on every rank), not along those that replicate it (replicas must round alike)."""
    if not _is_dtensor(p):
        return key
    mesh = cast(Any, p).device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank holds none of p
        return key
    place = 0
    for dim, placement in enumerate(cast(Any, p).placements):
        if not placement.is_replicate():
            place = place * mesh.size(dim) + coordinate[dim]
    return (key ^ (place * 0xBF58476D1CE4E5B9)) % 2**64


_GRAD = operator.attrgetter("grad")


def _host_view(t: torch.Tensor) -> Any:
    """A NumPy view of host tensor ``t`` (its memory), or ``t`` where NumPy lacks its dtype."""
    return t if t.dtype == torch.bfloat16 else t.detach().numpy()


def _real_grads(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """A complex bucket's grads as the kernel takes them: the float views of their real and
    imaginary parts (``view_as_real``: a trailing dimension of 2), each part a real number
    of its own as torch.optim steps them; conjugate or negative views taken by value
    (copied)."""
    return [
        torch.view_as_real(g.resolve_conj().resolve_neg()) if g.is_complex() else g for g in grads
    ]


def _host_float(value: Any, name: str) -> Any:
    """One-element tensors as Python numbers (hyper-parameters may be tensors, as in
    torch.optim); another tensor raises a ValueError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() != 1 or value.layout != torch.strided or value.device.type == "meta":
        raise ValueError(f"{name}: a tensor hyper-parameter must have 1 element, got {value!r:.60}")
    return value.item()


class _Changes:
    """Whether an optimizer's state may have changed since its last step looked at it, and
    what that step saw (the state, its keys and values; shared by ``copy.copy``'s copies,
    which share the state and the buckets)."""

    __slots__ = ("changed", "seen")

    def __init__(self) -> None:
        self.changed = True
        self.seen: Optional[Tuple[Any, List[Any], List[Any]]] = None


def _noting(method: Callable[..., Any]) -> Callable[..., Any]:
    """A dict method that first notes a change in the container's _Changes."""

    @functools.wraps(method)
    def noted(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._changes.changed = True
        return method(self, *args, **kwargs)

    return noted


class _NotesChanges:
    """The dict methods that change items, each noting the change in ``self._changes``
    first (a mixin of _StateEntry and _State, before their dict base)."""

    __slots__ = ()
    _changes: _Changes

    __setitem__ = _noting(dict.__setitem__)
    __delitem__ = _noting(dict.__delitem__)
    __ior__ = _noting(dict.__ior__)
    clear = _noting(dict.clear)
    pop = _noting(dict.pop)
    popitem = _noting(dict.popitem)
    setdefault = _noting(dict.setdefault)
    update = _noting(dict.update)


class _StateEntry(_NotesChanges, Dict[Any, Any]):
    """``state[p]``: a dict that notes every change of its items (a state tensor replaced,
    a key added or removed), so that a step looks the state tensors up again only after
    one instead of checking a thousand entries at every step. Pickled, copied and saved as
    a plain dict."""

    __slots__ = ("_changes",)

    def __init__(self, changes: Optional[_Changes] = None, *args: Any):
        super().__init__(*args)
        self._changes = _Changes() if changes is None else changes  # None: its own

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


class _State(_NotesChanges, DefaultDict[Any, Any]):
    """The optimizer's ``state``: torch.optim's ``defaultdict(dict)``, whose entries are
    _StateEntry and which notes every change of its own items (an entry set or removed).
    A plain dict set as an entry (``opt.state[p] = {...}``) cannot note its changes: while
    one is stepped, every step checks every entry, as for a plain state dict. Pickled and
    copied as a plain ``defaultdict(dict)`` of plain dicts."""

    __slots__ = ("_changes",)

    def __init__(self, changes: _Changes, entries: Any = ()):
        super().__init__(dict)  # what torch.optim's has (__missing__ below makes entries)
        self._changes = changes
        for key, entry in entries:
            dict.__setitem__(self, key, _StateEntry(changes, entry))

    def __missing__(self, key: Any) -> _StateEntry:
        entry = self[key] = _StateEntry(self._changes)
        return entry

    def __reduce__(self) -> Any:
        entries = ((k, dict(v) if type(v) is _StateEntry else v) for k, v in self.items())
        return (defaultdict, (dict,), None, None, entries)

    def copy(self) -> _State:
        """A shallow copy: the same entries (as torch.optim's ``defaultdict`` copy), in a
        state that notes its own changes."""
        out = _State(_Changes())
        dict.update(out, self)
        return out

    __copy__ = copy


class _Staged:
    """The state entry of one param as a step will leave it: ``view`` holds the entry's
    items with the step's changes (what the checks and the kernels' check_only calls see),
    ``commit`` writes the changes into ``state[p]`` once every check of the step passed,
    so that a refused step makes, converts and removes nothing."""

    __slots__ = ("param", "view", "changes", "removed")

    def __init__(self, param: torch.Tensor, entry: Optional[Dict[str, Any]]):
        self.param = param
        self.view: Dict[str, Any] = {} if entry is None else dict(entry)
        self.changes: Dict[str, Any] = {}
        self.removed: List[str] = []

    def set(self, key: str, value: Any) -> None:
        self.view[key] = value
        self.changes[key] = value

    def pop(self, key: str) -> None:
        if key in self.view:
            del self.view[key]
            self.changes.pop(key, None)
            self.removed.append(key)

    def commit(self, state: Any) -> Optional[Dict[str, Any]]:
        """Writes the changes into ``state[param]`` (made if missing, as torch.optim's);
        None where there is no entry and nothing to write (SGD without momentum keeps no
        state, as torch.optim's)."""
        if not self.changes and self.param not in state:
            return None
        entry = state[self.param]
        for key in self.removed:
            entry.pop(key, None)
        if self.changes:
            entry.update(self.changes)
        return cast(Dict[str, Any], entry)


class _Pending(NamedTuple):
    """A state array to make (see _FusedOptimizer._make_pending): ``staged.view[key]``,
    state array ``role`` (its index in the spec's states) of ``staged.param``, ``dtype``,
    all ``value``."""

    role: int
    staged: _Staged
    key: str
    value: float
    dtype: torch.dtype


class _Checked(NamedTuple):
    """What a group's hyper-parameters validate to."""

    kw: Dict[str, Any]  # the kernel's keywords but lr and step
    used: Tuple[bool, ...]  # per state array of the table: whether these options use it


class _Bucket:
    """The params of one group sharing (device, dtype, and the step count when the kernel
    takes one), ready for one call. Their state entries (``state[p]``) and every tensor
    the call reads from them are kept and compared at each step: an entry or a tensor
    replaced, a key added or removed, has the bucket rebuilt, through every check of a
    first step, and the new one is stepped, as in torch.optim."""

    __slots__ = (
        "index",
        "params",
        "keys",
        "tracked",
        "getters",
        "held",
        "sizes",
        "steps",
        "steps_version",
        "steps_view",
        "steps_seen",
        "done",
        "done_before",
        "calls",
        "plan",
        "params_inference",
        "inference",
        "distributed",
        "host",
        "entries",
        "states",
        "written",
        "layouts",
        "param_views",
        "state_views",
        "masks",
        "mask_tensors",
        "followed",
        "absmax_keys",
        "absmax",
        "masters",
        "complex",
        "carried",
        "carried_values",
        "carried_before",
        "carried_versions",
        "carried_views",
        "apart",
    )

    def __init__(
        self,
        index: List[int],
        params: List[torch.Tensor],
        entries: List[Optional[Dict[str, Any]]],
        keys: List[Optional[str]],
        steps: Optional[torch.Tensor],
        done: int,
        masks: Optional[List[torch.Tensor]],
        absmax_keys: Optional[Dict[str, str]] = None,
        masters: bool = False,
        carried: Optional[Dict[str, Tuple[torch.Tensor, float]]] = None,
    ):
        # The carried hyper-parameters (NAdam's mu_product, ASGD's eta and mu; see
        # _specs.Carried), each packed
        # as the step counts are: {state key: the tensor whose 0-d views are in the state},
        # their value on the host (equal in the bucket), the value before the last step
        # (to take back a step a GradScaler skipped on the GPU), their versions.
        self.carried = {k: t for k, (t, _) in (carried or {}).items()}
        self.carried_values = {k: v for k, (_, v) in (carried or {}).items()}
        self.carried_before = dict(self.carried_values)
        # 8-bit state: {table name of each state array: its block maxima's state key}
        self.absmax_keys = absmax_keys
        self.index = index  # position of each param in the group's "params"
        self.params = params  # the group's params, in bucket order
        # state[p] of each param (staged ones until committed; None: no entry, nothing kept)
        self.entries = entries
        self.keys = keys  # per state array of the table: its state key, None if unused
        # Every key whose tensors the call reads (state arrays; master_weights: the float32
        # copies the kernel steps in the params' place, master_params=; 8-bit: the block
        # maxima; the step counts, 0-d views of `steps`), compared at each step by identity.
        self.tracked = [k for k in keys if k is not None]
        if masters:
            self.tracked.append(MASTER)
        if absmax_keys is not None:
            self.tracked += absmax_keys.values()
        if steps is not None:
            self.tracked.append("step")
        self.tracked += self.carried
        # (a bucket with tracked keys has an entry for every param)
        self.getters: List[Callable[[Any], Any]] = [operator.itemgetter(k) for k in self.tracked]
        self.steps = steps  # packed step counts, or None
        # NumPy views of the packed counts and carried values, to see them edited where
        # autograd does not (see counts_edited)
        self.steps_view: Any = None if steps is None else steps.numpy()
        self.carried_views = {k: t.numpy() for k, t in self.carried.items()}
        self.note_counts()
        # the step count the bucket's step tensors hold (the steps taken so far, as a float32
        # tensor counts them: from 2**24 on it stays, as torch's does), its value before the
        # last step, and the kernel calls made (counted, not refused)
        self.done = done
        self.done_before = done
        self.calls = 0
        self.params_inference = any(p.is_inference() for p in params)
        self.distributed = any(map(_is_dtensor, params))
        first = _local(params[0])
        self.plan = _ext._cuda.Plan() if first.is_cuda and _ext._cuda is not None else None
        # On the CPU the kernel is handed NumPy views of params and state (the binding reads
        # a NumPy array in a fraction of a torch tensor's time), made once; where each
        # tensor keeps its elements is compared at each step (see moved()). Grads are
        # passed as they are (new at every backward).
        self.host = first.device.type == "cpu" and not self.distributed
        self.complex = first.is_complex()  # stepped through real views (view_as_real)
        # the masks of a masked bucket (read only; their views are made in take())
        self.mask_tensors = None if masks is None else [_local(m) for m in masks]
        # the first bucket of a group of several: the group's params, state and masks,
        # checked apart (see _check_buckets_apart)
        self.apart: Optional[_arrays.Apart] = None
        self.take()

    def take(self) -> None:
        """Takes the entries' tensors, and the kernel's views of them."""
        self.held = [list(map(getter, self.entries)) for getter in self.getters]
        self.sizes = list(map(_entry_size, self.entries))
        by_key = dict(zip(self.tracked, self.held))
        # per state array: the state tensors (None if unused), their kernel views
        self.states: List[Optional[List[torch.Tensor]]] = [
            None if k is None else by_key[k] for k in self.keys
        ]
        counts = ["step", *self.carried]  # (0-d views of a tensor the bucket writes)
        read = [t for k, ts in by_key.items() if k not in counts for t in ts]
        self.written = self.params + read  # what a step writes: versions to bump
        # what the call reads through views or tables made here: followed by moved()
        self.followed = self.written + (self.mask_tensors or [])
        for k in counts:
            self.followed += by_key.get(k, [])
        self.layouts = self.memory()
        self.inference = (
            self.params_inference
            or any(t.is_inference() for t in read)
            or (self.steps is not None and self.steps.is_inference())
            or any(t.is_inference() for t in self.carried.values())
        )
        view = _host_view if self.host else _local
        if self.complex:  # (never a DTensor)
            view = (
                (lambda t: _host_view(torch.view_as_real(t))) if self.host else torch.view_as_real
            )
        self.param_views = (
            list(map(view, self.params)) if self.host or self.complex else self.params
        )
        self.state_views: List[Optional[List[Any]]] = [
            None if s is None else list(map(view, s)) for s in self.states
        ]
        self.masks = None if self.mask_tensors is None else list(map(view, self.mask_tensors))
        self.masters = list(map(view, by_key[MASTER])) if MASTER in by_key else None
        self.absmax = (
            None
            if self.absmax_keys is None
            else {n: list(map(view, by_key[k])) for n, k in self.absmax_keys.items()}
        )

    def note_counts(self) -> None:
        """Notes the step counts' and carried values' versions and the counts' value as the
        bucket has just written them (see counts_edited)."""
        if self.steps is not None:
            self.steps_version = _version(self.steps)
            self.steps_seen = self.steps[0].item()  # (through the tensor: see counts_edited)
        self.carried_versions = {k: _version(t) for k, t in self.carried.items()}

    def counts_edited(self) -> bool:
        """Whether a step count or a carried value (NAdam's mu_product, ASGD's eta) was
        written since the bucket wrote it: in place (``fill_``: its version moved), or
        where autograd does not see it (``t.data.zero_()``, a NumPy view: its value). Only
        once moved() has said that their memory is where the views were made."""
        steps = self.steps
        if steps is not None and (
            _version(steps) != self.steps_version or not (self.steps_view == self.steps_seen).all()
        ):
            return True
        return any(
            _version(t) != self.carried_versions[k]
            or not (self.carried_views[k] == self.carried_values[k]).all()
            for k, t in self.carried.items()
        )

    def current(self, state: Any, look_up: bool) -> bool:
        """Whether the kept entries and tensors are still the state's (``look_up``: each
        ``state[p]`` again, when the state dict changed)."""
        if look_up and not all(map(operator.is_, map(state.get, self.params), self.entries)):
            return False
        if list(map(_entry_size, self.entries)) != self.sizes:  # a key added or removed
            return False
        try:
            for getter, kept in zip(self.getters, self.held):
                if not all(map(operator.is_, map(getter, self.entries), kept)):
                    return False
        except KeyError:
            return False
        return True

    def memory(self) -> bytes:
        """Where the params, every state tensor, the step counts and the masks keep their
        elements (data pointer, device, dtype, shape, strides; a DTensor's local shard)."""
        if self.distributed:  # (the shard itself: to_local() would make a view per call)
            local = [cast(Any, t)._local_tensor if _is_dtensor(t) else t for t in self.followed]
            return _ext._cpu.tensor_layouts(local)
        return _ext._cpu.tensor_layouts(self.followed)

    def moved(self) -> bool:
        """Whether the memory of a param, a state tensor, a step count or a mask was replaced
        in place since the bucket was built (``t.data = ...``, ``t.set_(...)``,
        ``resize_()``, ``share_memory_()``: the views and tables hold the old memory, which
        may be freed): the bucket is then rebuilt, as for a tensor replaced."""
        return self.memory() != self.layouts

    def kernel_lists(self) -> Tuple[List[Any], List[Optional[List[Any]]]]:
        """The params and state as the kernel takes them (see __init__)."""
        if self.distributed:
            return (
                [_local(p) for p in self.params],
                [None if s is None else [_local(t) for t in s] for s in self.states],
            )
        return self.param_views, self.state_views


class _GroupCache:
    """A group's buckets and what they were built from (checked at each step)."""

    __slots__ = (
        "params",
        "has_grad",
        "state",
        "roles",
        "buckets",
        "whole",
        "masks_version",
        "state_dtype",
    )

    def __init__(
        self,
        params: List[torch.Tensor],
        has_grad: List[bool],
        state: Any,
        roles: Tuple[bool, ...],
        buckets: List[_Bucket],
        masks_version: int,
        state_dtype: Any,
    ):
        self.masks_version = masks_version
        self.state_dtype = state_dtype  # the group's state options the state was made for
        self.params = params
        self.has_grad = has_grad
        self.state = state
        self.roles = roles
        self.buckets = buckets
        # One bucket holding every param in group order: the grads list is used as it is.
        self.whole = (
            len(buckets) == 1 and all(has_grad) and buckets[0].index == list(range(len(params)))
        )


# One kernel call of a step: see _FusedOptimizer._prepare_group.
# stochastic rounding's key of a step: (the group's seed, the group's step, the group's place)
_Rounding = Optional[Tuple[int, int, int]]
_Call = Tuple[str, _Bucket, List[Any], Dict[str, Any], float, _Rounding]


class _Unsettled(NamedTuple):
    """A GPU step under a GradScaler (see _FusedOptimizer._settle): its found_inf copied to
    pinned host memory, the event after the copy, the buckets it stepped."""

    found_inf: torch.Tensor
    done: Any  # torch.cuda.Event
    buckets: List[_Bucket]

    @staticmethod
    def behind(found_inf: torch.Tensor, buckets: List[_Bucket]) -> _Unsettled:
        """``found_inf`` copied to the host behind the kernels queued on its device's
        current stream (where the buckets' kernels ran), without waiting."""
        stream = torch.cuda.current_stream(found_inf.device)
        flag = torch.empty((), dtype=torch.float32, pin_memory=True)
        with torch.cuda.stream(stream):
            flag.copy_(found_inf.reshape(()), non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        return _Unsettled(flag, done, buckets)


def _takes_device_scaler(bucket: _Bucket, scaler: Dict[str, torch.Tensor]) -> bool:
    """Whether the CUDA kernel of ``bucket`` can read ``scaler``'s tensors: its params are
    plain CUDA tensors on their device."""
    return (
        not bucket.host
        and not bucket.distributed
        and bucket.params[0].device == scaler["found_inf"].device
    )


class _Rebuilt(NamedTuple):
    """A group whose buckets a step rebuilt: committed once every check of the step passed."""

    group_index: int
    cache: _GroupCache
    staged: List[_Staged]


class _FusedOptimizer(torch.optim.Optimizer):
    """What the classes below share. A subclass names its entry of fastopt's table
    (``_spec``) and says whether torch keeps ``state["step"]`` for it (``_tracks_step``)."""

    _spec: OptimizerSpec
    _tracks_step = True
    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf
    # Set to clip every step's grads to this global 2-norm (see the module docstring);
    # each step then leaves the norm before clipping in last_grad_norm.
    max_grad_norm: Optional[float] = None
    last_grad_norm: Optional[torch.Tensor] = None

    def __init__(self, params: Any, defaults: Dict[str, Any], masks: Any = None):
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's
        if defaults.get("capturable"):
            raise ValueError(
                "capturable: fastopt.torch steps cannot be captured in a CUDA "
                "graph (the kernels take lr and the step count from the host)"
            )
        if defaults.get("differentiable"):
            raise ValueError(
                "differentiable: fastopt.torch steps write in place outside "
                "autograd; use torch.optim to differentiate through a step"
            )
        self._checked: Dict[Any, _Checked] = {}
        self._validate_group("", defaults)
        _check_group_options("", defaults)
        self._lr("", defaults)
        self._lock = threading.RLock()  # a step at a time (see the module docstring)
        super().__init__(params, defaults)
        self._track_state()
        self._caches: Dict[int, _GroupCache] = {}
        self._masks: Dict[torch.Tensor, torch.Tensor] = {}
        self._masks_version = 0
        # A GPU step under a GradScaler whose found_inf is not read yet: see _settle
        self._unsettled: Optional[_Unsettled] = None
        self.set_masks(masks)

    # -- masks -------------------------------------------------------------------------------
    @property
    def masks(self) -> Dict[torch.Tensor, torch.Tensor]:
        """The masks the steps apply, by param (a copy; change them with ``set_masks``)."""
        return dict(self._masks)

    def set_masks(self, masks: Any) -> None:
        """Masks for the next steps: None (no masks), a dict {param: mask}, or a sequence
        with one mask (or None) per param of every group, in group order. A mask is a bool
        or uint8 tensor shaped like its param, on its device, laid out like it; where it is
        False (0) every step sets the param to 0 and leaves its state as it is (params not
        named keep stepping unmasked). Checked whole before any is taken."""
        params = [p for group in self.param_groups for p in group["params"]]
        if masks is None:
            pairs: List[Tuple[torch.Tensor, Any]] = []
        elif isinstance(masks, dict):
            known = set(map(id, params))
            pairs = list(masks.items())
            for k, (p, _) in enumerate(pairs):
                if not isinstance(p, torch.Tensor) or id(p) not in known:
                    raise ValueError(f"masks: key {k} is not a param of this optimizer")
        elif isinstance(masks, (list, tuple)):
            if len(masks) != len(params):
                raise ValueError(
                    f"masks: expected {len(params)} masks (one per param, None for none), "
                    f"got {len(masks)}"
                )
            pairs = [(p, m) for p, m in zip(params, masks) if m is not None]
        else:
            raise TypeError(
                "masks: expected None, a dict {param: mask} or a list, got "
                f"{type(masks).__name__}"
            )
        for k, (p, m) in enumerate(pairs):
            where = f"masks[{k}]"
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{where}: expected a tensor, got {type(m).__name__}")
            if m.dtype not in (torch.bool, torch.uint8):
                raise TypeError(f"{where}: dtype {m.dtype} is not a mask's (bool or uint8)")
            if m.shape != p.shape or m.device != p.device:
                raise ValueError(
                    f"{where}: a {tuple(m.shape)} mask on {m.device} for a "
                    f"{tuple(p.shape)} param on {p.device}"
                )
            if m.requires_grad:
                raise ValueError(f"{where}: must not require grad")
            if p.is_complex():
                raise ValueError(f"{where}: masks are for real params; its param is {p.dtype}")
        self._masks = dict(pairs)
        self._masks_version += 1

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch.optim's, with the params checked as a step will check them (see the module
        docstring); a group with a bad param is not added."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._check_group_params(index, self.param_groups[index]["params"])
            group = self.param_groups[index]
            check_state_dtype(f"param_groups[{index}]['state_dtype']", group.get("state_dtype"))
            _check_group_options(f"param_groups[{index}]", group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_group_params(index: int, params: List[torch.Tensor]) -> None:
        _check_no_repeats(index, params)
        for i, p in enumerate(params):
            name = f"param_groups[{index}]['params'][{i}]"
            if torch.nn.parameter.is_lazy(p):  # (LazyLinear's before its first forward)
                continue  # checked at its first step, as every param is
            if p.device.type not in ("cpu", "cuda"):
                raise TypeError(
                    f"{name}: is a meta tensor, which has no data"
                    if p.device.type == "meta"
                    else f"{name}: is on device {p.device.type!r}; fastopt runs on CPU and CUDA"
                )
            if p.dtype not in _SUPPORTED:
                raise TypeError(f"{name}: dtype {p.dtype} is not supported ({_DTYPES})")
            if p.layout != torch.strided:
                raise TypeError(f"{name}: {p.layout} params are not supported (dense tensors)")
            if not _dense(_local(p)):
                raise ValueError(_NOT_DENSE.format(name))

    # -- hyper-parameters ------------------------------------------------------------------
    def _group_hyper(self, where: str, group: Dict[str, Any]) -> Tuple[Any, ...]:
        """The group's values of the table's hyper-parameters but lr, in table order; a
        missing one, or betas that are not a pair, raise naming ``where`` + its key."""
        out = []
        for name in self._spec.hyper:
            if name == "lr" or name in self._spec.carried:  # (carried: in the state)
                continue
            path = _GROUP_PATH.get(name)
            key = path[0] if path else name
            place = f"{where}['{key}']" if where else key
            if key not in group:
                raise ValueError(f"{place}: missing from the group")
            value = group[key]
            if path:
                value = _pair(place, value)[path[1]]
                place = f"{place}[{path[1]}]"
            elif isinstance(self._spec.hyper[name], Flag):
                value = _as_torch_reads(value)
            out.append(_host_float(value, place))
        return tuple(out)

    def _validate_group(self, where: str, group: Dict[str, Any]) -> _Checked:
        """The kernel's keywords (lr excluded) for ``group`` and the state arrays they use,
        checked by the table (cached per distinct tuple of values); a bad value raises
        naming ``where`` + its place in the group ("betas[0]")."""
        if group.get("capturable") or group.get("differentiable"):
            key = "capturable" if group.get("capturable") else "differentiable"
            raise ValueError(
                f"{where}['{key}']: not supported by fastopt.torch (see the "
                "fastopt.torch docstring)"
                if where
                else f"{key}: not supported by fastopt.torch"
            )
        check_state_dtype(
            f"{where}['state_dtype']" if where else "state_dtype",
            group.get("state_dtype", "float32"),
        )
        hyper = self._group_hyper(where, group)
        types = tuple(map(type, hyper))
        try:
            checked = self._checked.get((hyper, types))
        except TypeError:  # unhashable: the check names it
            checked = None
        if checked is not None:
            return checked
        names = [n for n in self._spec.hyper if n != "lr" and n not in self._spec.carried]
        try:
            values = self._spec.validate({**dict(zip(names, hyper)), "lr": 0.0})
        except (TypeError, ValueError) as exc:
            raise type(exc)(self._rename(where, str(exc))) from None
        kw = self._spec.kernel_hyper(values)
        del kw["lr"]
        checked = _Checked(kw, tuple(a.used(values) for a in self._spec.states))
        if set(types) <= {float, int, bool}:  # equal values of these validate alike
            if len(self._checked) >= _CACHE_SIZE:
                self._checked.clear()
            self._checked[(hyper, types)] = checked
        return checked

    @staticmethod
    def _rename(where: str, message: str) -> str:
        """A table message ("beta1: ...") in the group's terms
        ("param_groups[0]['betas'][0]: ...")."""
        name, _, rest = message.partition(": ")
        path = _GROUP_PATH.get(name)
        if where:
            place = f"{where}['{path[0]}'][{path[1]}]" if path else f"{where}['{name}']"
        else:
            place = f"{path[0]}[{path[1]}]" if path else name
        return f"{place}: {rest}" if rest else message

    def _lr(self, where: str, group: Dict[str, Any]) -> float:
        lr = group.get("lr")
        if type(lr) is float and 0.0 <= lr < float("inf"):
            return lr
        name = f"{where}['lr']" if where else "lr"
        return real(name, _host_float(lr, name), lo=0.0)

    # -- state -------------------------------------------------------------------------------
    def _start(self, where: str, initial: Union[float, str], group: Dict[str, Any]) -> float:
        """What fresh state of the param at ``where`` starts at, by the table's ``initial``
        (ArrayRole's, Carried's): a number, or the group's lr or option of that name
        (checked, a bad one named by its place in the group)."""
        if not isinstance(initial, str):
            return initial
        place = where.rpartition("['params']")[0]  # the group's ("param_groups[0]")
        if initial == "lr":
            return self._lr(place, group)
        name = f"{place}['{initial}']"
        value = _host_float(group.get(initial), name)  # (a 0-d tensor too, as torch)
        return float(self._spec.options[initial].validate(name, value))

    def _state_type(self, where: str, p: torch.Tensor, group: Dict[str, Any]) -> torch.dtype:
        """The dtype of ``p``'s state under ``group["state_dtype"]`` (torch.uint8: 8-bit),
        the group's options checked before (_check_group_options)."""
        kind = group.get("state_dtype", "float32")
        if p.is_complex():
            self._check_complex(where, p, kind)
            return p.dtype
        if kind == "int8":
            if p.dtype == torch.float64 or _is_dtensor(p) or self._spec.name == "sophia":
                raise ValueError(
                    f"{where}: state_dtype='int8' is for float32 and 16-bit params (not "
                    "float64 nor DTensor params) of every optimizer but Sophia"
                )
            least = group.get("min_8bit_size", STATE8_MIN_ELEMENTS)
            return torch.uint8 if p.numel() >= least else torch.float32
        if kind == "bfloat16":
            if p.dtype == torch.float64:
                raise ValueError(
                    f"{where}: state_dtype='bfloat16' is for float32 and 16-bit params, not float64"
                )
            return torch.bfloat16
        return torch.float32 if p.dtype in _HALF else p.dtype

    def _check_complex(self, where: str, p: torch.Tensor, kind: str) -> None:
        """Complex params are stepped as torch.optim steps them, as pairs of real numbers
        (see _real_grads), with complex state of their dtype: not by Sophia (whose curvature
        estimate is not a per-part one), nor with 16-bit or 8-bit state, nor as DTensors."""
        if self._spec.name == "sophia":
            raise TypeError(f"{where}: complex params are not supported by Sophia")
        if kind != "float32":
            raise ValueError(f"{where}: complex params keep state_dtype='float32', not {kind!r}")
        if _is_dtensor(p):
            raise ValueError(f"{where}: complex DTensor params are not supported")

    def _new_state(self, p: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if value:  # complex: each part starts there (torch.optim.Adagrad's rule)
            out.fill_(complex(value, value) if out.is_complex() else value)
        return out

    def _param_state(
        self,
        where: str,
        p: torch.Tensor,
        group: Dict[str, Any],
        used: Tuple[bool, ...],
        pending: Optional[List[_Pending]] = None,
    ) -> Tuple[_Staged, bool, int]:
        """``self.state[p]`` as this step leaves it, staged (see _Staged): every state
        array ``used`` needs, made if missing and checked against ``p`` (shape, dtype,
        device; moved to ``p``'s strides, converted to the state type), and its step count
        checked. Also whether any state array was made now (SGD's fresh momentum buffer
        takes the first-step rule) and the steps taken so far (0 without a count). With
        ``pending``, a missing float state array is not made but queued there for
        ``_make_pending``. The group's options are checked before (_check_group_options)."""
        entry = self.state.get(p)
        if entry is not None and not isinstance(entry, dict):
            raise TypeError(f"state of {where}: expected a dict, got {type(entry).__name__}")
        staged = _Staged(p, entry)
        state = staged.view
        done = 0
        if self._tracks_step:
            if "step" in state:
                step = state["step"]
                done = _steps_taken(f"state of {where}: 'step'", step)
                if not isinstance(step, torch.Tensor):  # a number (torch < 1.12's checkpoints)
                    staged.set("step", torch.tensor(float(done), dtype=_step_dtype()))
            elif any(k != MASTER for k in state):
                # a damaged checkpoint: its other state would go on from step 0
                raise ValueError(
                    f"state of {where}: 'step' is missing beside {sorted(map(str, state))} "
                    "(torch.optim raises KeyError)"
                )
            else:
                staged.set("step", torch.tensor(0.0, dtype=_step_dtype()))
        for name, carried in self._spec.carried.items():  # NAdam's mu_product, ASGD's eta, mu
            value = state.get(name)
            if value is None:
                if done:
                    raise _missing(where, name, done)
                start = self._start(where, carried.initial, group)
                staged.set(name, torch.tensor(start, dtype=_step_dtype()))
                continue
            place = f"state of {where}: {name!r}"
            number = carried.held.validate(place, _state_number(place, value))
            if not (isinstance(value, torch.Tensor) and value.dtype in _CARRIED_DTYPES):
                # a number, or a 16-bit tensor: taken as a float32 tensor (torch's type)
                staged.set(name, torch.tensor(number, dtype=_step_dtype()))
        self._master_param(where, p, staged, group)
        fresh = False
        want = self._state_type(where, p, group)
        for r, (role, use) in enumerate(zip(self._spec.states, used)):
            key = STATE_KEYS[role.name]
            if not use:
                continue
            if want == torch.uint8 or state.get(key + ABSMAX) is not None:
                if p.is_complex():
                    raise ValueError(
                        f"state of {where}: '{key + ABSMAX}': 8-bit state is not for complex params"
                    )
                fresh = self._state8(where, p, staged, role, group, want) or fresh
                continue
            s = state.get(key)
            if s is None:
                # made fresh: at the first step, or for an option switched on since (amsgrad:
                # torch.optim raises KeyError there); not in place of one lost after steps
                if done and not role.optional:
                    raise _missing(where, key, done)
                value = self._start(where, role.initial, group)
                if pending is None:
                    staged.set(key, self._new_state(p, value, want))
                else:
                    pending.append(_Pending(r, staged, key, value, want))
                fresh = True
                continue
            if not (
                isinstance(s, torch.Tensor)
                and s.layout == torch.strided
                and (s.is_complex() if p.is_complex() else s.is_floating_point())
                and s.shape == p.shape
                and s.device == p.device
            ):
                raise ValueError(
                    f"state of {where}: '{key}' must be a {tuple(p.shape)} "
                    f"{want} tensor on {p.device} like its param, got {_described(s)}"
                )
            # Another float type (a checkpoint's, a changed state_dtype) is taken as its
            # values; other strides than the param's, a negative or conjugate view, copied.
            local = _local(s)
            if (
                s.dtype != want
                or local.is_neg()
                or local.is_conj()
                or local.stride() != _local(p).stride()
            ):
                moved = self._new_state(p, 0.0, want)
                moved.copy_(s)
                staged.set(key, moved)
        return staged, fresh, done

    def _make_pending(self, pending: List[_Pending]) -> None:
        """Makes the state arrays ``_param_state`` queued, state array by state array (all
        exp_avg, then all exp_avg_sq, ...): a step over many small params is ~15% faster
        over state allocated in that order than over state allocated param by param. Each
        is a tensor of its own, as torch.optim's (views of one buffer would share its
        version counter and be saved with all of it)."""
        for item in sorted(pending, key=operator.attrgetter("role")):
            item.staged.set(item.key, self._new_state(item.staged.param, item.value, item.dtype))

    @staticmethod
    def _master_param(where: str, p: torch.Tensor, staged: _Staged, group: Dict[str, Any]) -> None:
        """``group["master_weights"]``: a float16/bfloat16 param's float32 master copy,
        ``state["master_param"]``, made from the param when missing and checked otherwise;
        dropped when the group stops using it (the param holds the rounded values)."""
        if not (group.get("master_weights") and p.dtype in _HALF):
            staged.pop(MASTER)
            return
        if _is_dtensor(p):
            raise ValueError(f"{where}: master_weights is not available for DTensor params")
        m = staged.view.get(MASTER)
        if m is None:
            m = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            m.copy_(p.detach())
            staged.set(MASTER, m)
        elif not (
            isinstance(m, torch.Tensor)
            and m.layout == torch.strided
            and m.dtype == torch.float32
            and m.shape == p.shape
            and m.device == p.device
            and m.stride() == p.stride()
            and not m.is_neg()
        ):
            raise ValueError(
                f"state of {where}: '{MASTER}' must be a float32 tensor shaped, laid out and "
                f"placed like its param (not a negative view), got {_described(m)}"
            )

    def _state8(
        self,
        where: str,
        p: torch.Tensor,
        staged: _Staged,
        role: Any,
        group: Dict[str, Any],
        want: torch.dtype,
    ) -> bool:
        """State array ``role`` of ``p`` where it is or must become 8-bit (``want`` is
        torch.uint8), or must stop being so: made if missing (whether it was: fresh), 8-bit
        state checked, float state quantized and 8-bit state decoded (on the host) when
        ``want`` says the other kind, each checked first."""
        key = STATE_KEYS[role.name]
        absmax_key = key + ABSMAX
        s, top = staged.view.get(key), staged.view.get(absmax_key)
        signed = not role.nonnegative
        blocks = -(-p.numel() // 256)
        shape = tuple(p.shape)
        if top is not None and (s is None or _float_tensor(s)):
            raise ValueError(
                f"state of {where}: '{absmax_key}' (block maxima of 8-bit state) beside "
                + ("no" if s is None else "float")
                + f" state '{key}'; remove it or give '{key}' its 8-bit (uint8) codes"
            )
        if want != torch.uint8:  # 8-bit state, float wanted: decoded
            if not (_codes_like(s, p) and _absmax_of(top, blocks)):
                raise ValueError(
                    f"state of {where}: 8-bit state '{key}' (decoded to {want}) must be a "
                    f"{shape} uint8 tensor with '{absmax_key}' a ({blocks},) float32 tensor "
                    "(finite, >= 0), "
                    f"got {_described(s)} and {_described(top)}"
                )
            values = reference.dequantize_state8(_host_numpy(s), _host_numpy(top), signed)
            moved = self._new_state(p, 0.0, want)
            moved.copy_(torch.from_numpy(values))
            staged.set(key, moved)
            staged.pop(absmax_key)
            return False
        if s is None:  # every block holds the initial value
            value = self._start(where, role.initial, group)
            codes, first = reference.quantize_state8(_np_full(value), signed)
            staged.set(
                key,
                torch.full_like(
                    p, int(codes[0]), dtype=torch.uint8, memory_format=torch.preserve_format
                ),
            )
            staged.set(absmax_key, torch.full((blocks,), float(first[0]), device=p.device))
            return True
        if top is None:  # float state (a torch.optim checkpoint, a changed state_dtype)
            if not (_float_tensor(s) and s.shape == p.shape):
                raise ValueError(
                    f"state of {where}: '{key}' (quantized to 8-bit state) must be a {shape} "
                    f"float tensor like its param, got {_described(s)}"
                    + (f" without its block maxima '{absmax_key}'" if _is_codes(s) else "")
                )
            laid = self._new_state(p, 0.0, torch.float32)
            laid.copy_(s)
            codes, first = reference.quantize_state8(_host_numpy(laid), signed)
            staged.set(key, torch.from_numpy(codes).to(p.device))
            staged.set(absmax_key, torch.from_numpy(first).to(p.device))
            return False
        if not (
            _codes_like(s, p)
            and s.device == p.device
            and s.stride() == p.stride()
            and _absmax_of(top, blocks)
            and top.device == p.device
            and top.is_contiguous()
        ):
            raise ValueError(
                f"state of {where}: 8-bit state '{key}' must be a {shape} uint8 "
                f"tensor laid out like its param with '{absmax_key}' a ({blocks},) float32 "
                f"tensor (finite, >= 0), on {p.device}; got {_described(s)} and {_described(top)}"
            )
        return False

    # -- building the buckets ------------------------------------------------------------------
    def _build(
        self,
        index: int,
        group: Dict[str, Any],
        grads: List[Optional[torch.Tensor]],
        used: Tuple[bool, ...],
    ) -> _Rebuilt:
        """The group's buckets over its staged state (committed by _commit)."""
        where = f"param_groups[{index}]"
        _check_group_options(where, group)
        params = group["params"]
        keys: Dict[Tuple[Any, ...], List[int]] = defaultdict(list)
        taken: Dict[int, int] = {}  # steps taken so far, per param index
        staged: Dict[int, _Staged] = {}  # per param index
        pending: List[_Pending] = []  # the state arrays to make
        for i, (p, g) in enumerate(zip(params, grads)):  # refused before any state is made
            if g is not None:
                self._state_type(f"{where}['params'][{i}]", p, group)
        self._check_entries_apart(where, params, grads)
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            name = f"{where}['params'][{i}]"
            self._check_param(name, p, g)
            staged[i], fresh, done = self._param_state(name, p, group, used, pending)
            state = staged[i].view
            # SGD: the first step (buffer <- grad) when the buffer is new
            taken[i] = done if self._tracks_step else 0 if fresh else 1
            eight = any(
                isinstance(state.get(k + ABSMAX), torch.Tensor)
                for k in (STATE_KEYS[r.name] for r in self._spec.states)
            )
            keys[
                (
                    p.device,
                    p.dtype,
                    taken[i] if self._spec.takes_step else None,
                    p in self._masks,
                    eight,
                    MASTER in state,
                    # carried values (NAdam's mu_product...): a bucket shares them, as its count
                    tuple((float(state[n]), state[n].dtype) for n in self._spec.carried),
                    # a DTensor's mesh and placements: its shard's rounding bits (_shard_seed)
                    _placement(p),
                    # the step tensor's dtype: the packed one keeps it, and counts as it does
                    state["step"].dtype if isinstance(state.get("step"), torch.Tensor) else None,
                )
            ].append(i)
        self._make_pending(pending)
        state_keys = [
            STATE_KEYS[role.name] if use else None for role, use in zip(self._spec.states, used)
        ]
        buckets = []
        for (_, _, done, masked, eight, masters, values, *_), index_list in keys.items():
            bucket_params = [params[i] for i in index_list]
            carried = {
                name: (_packed(staged, index_list, name, [value] * len(index_list), dtype), value)
                for name, (value, dtype) in zip(self._spec.carried, values)
            }
            steps = None
            if self._tracks_step:
                counts = [float(taken[i]) for i in index_list]
                steps = _packed(staged, index_list, "step", counts)
            masks = [self._masks[p] for p in bucket_params] if masked else None
            buckets.append(
                _Bucket(
                    index_list,
                    bucket_params,
                    [staged[i].view for i in index_list],
                    state_keys,
                    steps,
                    done or 0,
                    masks,
                    {
                        role.name: STATE_KEYS[role.name] + ABSMAX
                        for role, use in zip(self._spec.states, used)
                        if use
                    }
                    if eight
                    else None,
                    masters,
                    carried,
                )
            )
        cache = _GroupCache(
            list(params),  # a copy: an entry replaced in the group's list is seen
            [g is not None for g in grads],
            self.state,
            used,
            buckets,
            self._masks_version,
            _state_options(group),
        )
        return _Rebuilt(index, cache, list(staged.values()))

    def _check_entries_apart(
        self, where: str, params: List[torch.Tensor], grads: List[Optional[torch.Tensor]]
    ) -> None:
        """At a rebuild, before anything is staged: the group's params with a grad, their
        grads, masks and every tensor of their state entries (step counts included) checked
        apart as one kernel call checks its arrays. The build copies a state tensor of
        other strides or dtype than its param's and packs the step counts into one tensor
        per bucket, which would hide (and silently break) a state tensor shared with
        another param or aliasing a param or a grad."""
        stepped = [i for i, g in enumerate(grads) if g is not None]
        entries = [self.state.get(params[i]) for i in stepped]
        held = [e for e in entries if isinstance(e, dict)]
        tensor_keys = {k for e in held for k, v in e.items() if isinstance(v, torch.Tensor)}
        keys = sorted(tensor_keys, key=str)
        masks = [self._masks.get(params[i]) for i in stepped]
        roles: List[Tuple[str, Optional[List[Any]], bool]] = [
            ("params", [_memory(params[i]) for i in stepped], True),
            ("grads", [_memory(grads[i]) for i in stepped], False),
            ("masks", list(map(_memory, masks)), False),
        ]
        for key in keys:
            tensors = [e.get(key) if isinstance(e, dict) else None for e in entries]
            roles.append((key, list(map(_memory, tensors)), True))

        _arrays.check_apart(roles, _kernel_style(where, stepped))

    def _commit(self, rebuilt: _Rebuilt) -> None:
        """A rebuilt group's staged state written into ``self.state``, its buckets moved
        onto the real entries (holding the same tensors), and kept for the next steps."""
        entries = {id(s.param): s.commit(self.state) for s in rebuilt.staged}
        for b in rebuilt.cache.buckets:
            b.entries = [entries[id(p)] for p in b.params]
            b.sizes = list(map(_entry_size, b.entries))
        self._caches[rebuilt.group_index] = rebuilt.cache
        self._changes.seen = None  # entries were added: the state is taken at the end

    @staticmethod
    def _check_param(name: str, p: torch.Tensor, g: torch.Tensor) -> None:
        if p.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: dtype {p.dtype} is not supported ({_DTYPES})")
        if g.layout != torch.strided:
            raise TypeError(
                f"{name}.grad: {g.layout} gradients are not supported (fastopt "
                "steps dense tensors; torch.optim.SparseAdam takes sparse ones)"
            )
        if not _dense(_local(p)):
            raise ValueError(_NOT_DENSE.format(name))
        if p.is_neg() or p.is_conj():  # (its values are not its memory's)
            view = "negative" if p.is_neg() else "conjugate"
            raise ValueError(f"{name}: is a {view} view; step the tensor it views")

    # -- stepping ------------------------------------------------------------------------------
    @torch.compiler.disable
    @_use_grad_for_differentiable
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step over every param with a grad; ``closure`` (re-evaluates the model and
        returns the loss) is called first with grad enabled, and its loss returned.

        Under ``torch.compile`` the step runs as it is, outside the graph (it is one
        compiled call per bucket already): a compiled training step breaks its graph once
        here, with no recompilations (dynamo does not trace into the step's Python)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = 1.0
        scaler: Optional[Dict[str, torch.Tensor]] = None
        if self._step_supports_amp_scaling:
            found_inf = getattr(self, "found_inf", None)
            scale = getattr(self, "grad_scale", None)
            scaler = self._device_scaler(found_inf, scale)
            if scaler is None:  # read on the host
                if found_inf is not None and float(found_inf) != 0.0:
                    return loss  # an inf/NaN in the scaled grads: no step (torch's fused rule)
                if scale is not None:
                    grad_scale = float(scale)
        with self._lock:
            self._settle()
            state, changes = self.state, self._changes
            if type(state) is _State and state._changes is changes and not changes.changed:
                look_up: Optional[bool] = None  # nothing changed: the buckets are current
            else:
                # Whether any state[p] was set since the last step (then the buckets look
                # their entries up again): the state's keys and values, compared by identity.
                changes.changed = False
                seen = changes.seen
                look_up = not (
                    seen is not None
                    and seen[0] is state
                    and len(seen[1]) == len(state)
                    and all(map(operator.is_, state, seen[1]))
                    and all(map(operator.is_, state.values(), seen[2]))
                )
            try:
                self._step_groups(grad_scale, look_up, scaler)
            except BaseException:  # the groups not stepped have not seen the changes yet
                changes.changed = True
                raise
            if look_up is not None:
                if look_up or changes.seen is None:
                    changes.seen = (state, list(state), list(state.values()))
                # a state that cannot note its changes: every step checks it
                changes.changed = changes.changed or not self._tracked()
        return loss

    def _device_scaler(self, found_inf: Any, scale: Any) -> Optional[Dict[str, torch.Tensor]]:
        """A GradScaler's ``found_inf`` and ``grad_scale`` for the CUDA kernels to read
        from device memory (no host synchronisation, as torch's fused optimizers), or None
        where they are read on the host: on the CPU, with ``max_grad_norm`` (clipping
        takes the scale on the host), or for tensors the kernels do not take (one-element
        float32 tensors on one device)."""

        def scalar(t: Any) -> bool:
            return (
                isinstance(t, torch.Tensor)
                and type(t) is torch.Tensor
                and t.is_cuda
                and t.dtype == torch.float32
                and t.numel() == 1
            )

        if not scalar(found_inf) or self.max_grad_norm is not None or _ext._cuda is None:
            return None
        if scale is None:
            return {"found_inf": found_inf}
        if not scalar(scale) or scale.device != found_inf.device:
            return None
        return {"found_inf": found_inf, "device_grad_scale": scale}

    def _settle(self) -> None:
        """The step counts of the last GPU step under a GradScaler, made exact: its
        kernels read found_inf on the device and skipped their writes if it was set, while
        the counts moved as for a step taken; the flag, copied to the host behind the
        kernels, is read now (the wait ends where that step ended on the GPU, not at the
        work queued since) and a skipped step's counts go back. Run before a step and
        before the state is saved or loaded."""
        unsettled, self._unsettled = self._unsettled, None
        if unsettled is None:
            return
        unsettled.done.synchronize()
        if float(unsettled.found_inf) != 0.0:
            for bucket in unsettled.buckets:
                bucket.done = bucket.done_before
                if bucket.steps is not None:
                    bucket.steps.sub_(1)  # (as torch's fused step takes its count back)
                    bucket.done = int(bucket.steps[0])
                for name, packed in bucket.carried.items():
                    bucket.carried_values[name] = bucket.carried_before[name]
                    packed.fill_(bucket.carried_before[name])
                bucket.note_counts()

    def _step_groups(
        self,
        grad_scale: float,
        look_up: Optional[bool],
        scaler: Optional[Dict[str, Any]] = None,
    ) -> None:
        """One step of every group, all checked before anything is written: each group's
        buckets (rebuilt over staged state where the group or its state changed), then
        every kernel call's checks (check_only) where the step is more than one call, has
        staged state or clips the grads, then the clipping, the staged state committed
        and the calls. ``look_up``: see _prepare_group; ``scaler``: a GradScaler's tensors
        for the CUDA kernels (see _device_scaler), read here on the host instead where a
        bucket cannot take them or buckets were rebuilt (a skipped step then makes no
        state, as on the CPU)."""
        runs: List[_Call] = []
        rebuilt: List[_Rebuilt] = []
        for index, group in enumerate(self.param_groups):
            self._prepare_group(index, group, look_up, runs, rebuilt)
        for gone in [i for i in self._caches if i >= len(self.param_groups)]:
            del self._caches[gone]  # a group deleted: its params and state are not kept
        if scaler is not None and (
            rebuilt or not all(_takes_device_scaler(r[1], scaler) for r in runs)
        ):
            found_inf, scale = scaler["found_inf"], scaler.get("device_grad_scale")
            scaler = None
            if float(found_inf) != 0.0:
                return  # an inf/NaN in the scaled grads: no step (torch's fused rule)
            if scale is not None:
                grad_scale = float(scale)
        if rebuilt:
            self._check_one_group_per_param()
        for where, group_runs in itertools.groupby(runs, key=operator.itemgetter(0)):
            calls = list(group_runs)
            if len(calls) > 1:
                _check_buckets_apart(where, calls)
        clip = self.max_grad_norm is not None
        # Every call but the first is checked before the first runs (the first checks
        # itself before it writes); all of them where state is committed or grads clipped
        # before any call.
        for run in runs[0 if rebuilt or clip else 1 :]:
            self._run(run, grad_scale, scaler, check_only=True)
        on_device = scaler  # what the CUDA kernels read from device memory
        if clip:  # (with clipping a GradScaler's scalars were read on the host)
            self.last_grad_norm, grad_scale, clipping = step_grad_scale(
                self.param_groups, self.max_grad_norm, grad_scale
            )
            on_device = clipping or None
        for group_rebuilt in rebuilt:
            self._commit(group_rebuilt)
        made = [run[1].calls for run in runs]
        try:
            for run in runs:
                self._run(run, grad_scale, on_device)
        finally:  # the buckets counted, also when an exception follows their call
            ran = [run for run, before in zip(runs, made) if run[1].calls != before]
            for run in ran:  # (a group's next rounding step, once one of its calls ran)
                if run[5] is not None:
                    self.param_groups[run[5][2]]["rounding_step"] = run[5][1]
            stepped = [run[1] for run in ran]
            if scaler is not None and stepped:
                self._unsettled = _Unsettled.behind(scaler["found_inf"], stepped)

    def _check_one_group_per_param(self) -> None:
        """A param in two groups (or twice in one) would be stepped from state staged twice:
        refused, as torch.optim refuses it when a group is added."""
        seen: Dict[int, str] = {}
        for index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                where = f"param_groups[{index}]['params'][{i}]"
                first = seen.setdefault(id(p), where)
                if first is not where:
                    raise ValueError(
                        f"{where}: is also {first} (a param belongs to one group, as "
                        "torch.optim requires)"
                    )

    def _track_state(self) -> None:
        """Replaces the state torch.optim made (a ``defaultdict(dict)``) by a _State holding
        the same items, which notes its changes in a new ``self._changes``."""
        self._changes = _Changes()
        made = self.__dict__["state"]
        self.state = _State(self._changes, made.items())

    def _tracked(self) -> bool:
        """Whether every change of the state the buckets step would be noted here (see
        _State): an entry of another optimizer's state (``new.state[p] = old.state[q]``)
        notes its changes there."""
        changes = self._changes
        state = self.state
        return (
            type(state) is _State
            and state._changes is changes
            and all(
                e is None or (type(e) is _StateEntry and e._changes is changes)
                for cache in self._caches.values()
                for b in cache.buckets
                for e in b.entries
            )
        )

    def _prepare_group(
        self,
        index: int,
        group: Dict[str, Any],
        look_up: Optional[bool],
        runs: List[_Call],
        rebuilt: List[_Rebuilt],
    ) -> None:
        """Appends the group's kernel calls to ``runs`` (where, bucket, its grads, the
        kernel's keywords, lr, the rounding seed), and to ``rebuilt`` the group if its
        buckets were rebuilt. ``look_up``: None when the state is known unchanged since
        the last step, else whether the buckets must look their entries up again (see
        _Bucket.current)."""
        where = f"param_groups[{index}]"
        kw, used = self._validate_group(where, group)
        lr = self._lr(where, group)
        params = group["params"]
        try:
            grads = list(map(_GRAD, params))
        except AttributeError:  # something else put in the list since it was checked
            for i, p in enumerate(params):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(
                        f"{where}['params'][{i}]: expected a torch tensor, got {type(p).__name__}"
                    ) from None
            raise
        has_grad = list(map(operator.is_not, grads, itertools.repeat(None)))
        cache = self._caches.get(index)
        if (
            cache is None
            or len(cache.params) != len(params)
            or not all(map(operator.is_, cache.params, params))
            or cache.state is not self.state
            or cache.has_grad != has_grad
            or cache.roles != used
            or cache.masks_version != self._masks_version
            or cache.state_dtype != _state_options(group)
            or (
                look_up is not None
                and not all(b.current(self.state, look_up) for b in cache.buckets)
            )
            or any(b.moved() for b in cache.buckets)
            # (after moved(): counts_edited reads NumPy views of the memory moved() checks)
            or any(b.counts_edited() for b in cache.buckets)
        ):
            rebuilt.append(self._build(index, group, grads, used))
            cache = rebuilt[-1].cache
        rounding: _Rounding = None
        if group.get("stochastic_rounding"):
            # the group counts its stochastically rounded steps itself ("rounding_step", a
            # group key as its seed): a rebuild, a copy or a checkpoint goes on with the
            # next key, whatever its buckets and their params' step counts
            taken = group.get("rounding_step", 0)
            if type(taken) is not int or not 0 <= taken < 2**63 - 1:
                taken = whole(f"{where}['rounding_step']", taken, 0, 2**63 - 1)
            rounding = (int(group["rounding_seed"]), taken + 1, index)
        for bucket in cache.buckets:
            runs.append(
                (
                    where,
                    bucket,
                    grads if cache.whole else [grads[i] for i in bucket.index],
                    kw,
                    lr,
                    rounding,
                )
            )

    def _run(
        self,
        run: _Call,
        grad_scale: float,
        on_device: Optional[Dict[str, Any]] = None,
        check_only: bool = False,
    ) -> None:
        """One kernel call (see _prepare_group); ``on_device``: the CUDA kernel's keywords
        of what it reads from device memory (a GradScaler's tensors, see _device_scaler,
        or a grad norm to clip by, see step_grad_scale); ``check_only``: its checks,
        nothing run."""
        where, bucket, grads, kw, lr, rounding = run
        if bucket.inference and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Inplace update to inference tensor outside InferenceMode is "
                "not allowed.You can make a clone to get a normal tensor before "
                "doing inplace update.See https://github.com/pytorch/rfcs/pull/17"
                " for more details."
            )
        params, states = bucket.kernel_lists()
        if bucket.distributed:
            grads = [_local(g) for g in grads]
        taken = _real_grads(grads) if bucket.complex else grads
        if bucket.host:  # the compiled CPU module, without extra arguments
            kernels, extra = _ext._cpu, functional.NO_KEYWORDS
        else:
            kernels, extra = _arrays.backend(params, None, bucket.plan)
        kernel = getattr(kernels, self._spec.kernel)
        if grad_scale != 1.0:
            extra = {**extra, "grad_scale": grad_scale}
        if on_device is not None:
            extra = {**extra, **on_device}
        if bucket.masks is not None:
            extra = {**extra, "masks": bucket.masks}
        if bucket.absmax is not None:
            extra = {**extra, "absmax": bucket.absmax}
        if bucket.masters is not None:  # stepped in the params' place, the params written rounded
            extra = {**extra, "master_params": bucket.masters}
        if rounding is not None and bucket.params[0].dtype == torch.bfloat16:
            # this step's and this bucket's seed (its group's place and its first param's
            # place in the group, and a DTensor's shard): the kernel adds each param's place
            # in the call
            seed, step, group_index = rounding
            key = functional.step_seed(seed, step, group_index << 32 | bucket.index[0])
            if bucket.distributed:  # (its params share mesh and placements: _placement)
                key = _shard_seed(key, bucket.params[0])
            extra = {**extra, "stochastic_seed": key}
        # this step's count, as torch's step tensor holds it once incremented
        count = bucket.done + 1
        if bucket.steps is not None:
            count = _counted(bucket.steps.dtype, count)
        if self._spec.takes_step:
            # (where torch keeps no count, SGD, the kernel tells only the first step from
            # the others: 2 for every later one, whatever a rebuild left in bucket.done, so
            # the stochastic rounding key, which mixes in the step, is the group's alone)
            step = count if self._tracks_step else min(count, 2)
            extra = {**extra, "step": step}
        # The carried hyper-parameters (NAdam's mu_product, ASGD's eta and mu): the values
        # this step takes, and what the state holds after it, as torch computes them.
        advanced: Dict[str, float] = {}
        for name, value in bucket.carried_values.items():
            rule, t = self._spec.carried[name], count
            after = rule.advance(value, t, {**kw, "lr": lr}, _stored(bucket.carried[name].dtype))
            advanced[name] = rule.held.validate(f"{where}: {name!r} after step {t}", after)
            used = after if rule.taken == "after" else value
            # (a product of NAdam's mu_t reaches 1 where beta1 rounds to 1 in float32)
            extra = {
                **extra,
                name: self._spec.hyper[name].validate(f"{where}: {name!r} of step {t}", used),
            }
        if check_only:
            extra = {**extra, "check_only": True}
            try:
                kernel(params, taken, *states, True, lr=lr, **kw, **extra)
            except (TypeError, ValueError) as exc:
                relaid = self._relayout_grads(run, grads)
                if relaid is None:
                    raise self._named(where, bucket, exc) from exc
                try:
                    kernel(params, relaid, *states, True, lr=lr, **kw, **extra)
                except (TypeError, ValueError) as again:
                    raise self._named(where, bucket, again) from again
            return
        # The step is counted once the kernel has run, whatever is raised after it (Ctrl-C's
        # KeyboardInterrupt arrives when the call returns): bucket.done moves before the
        # call (an attribute store, where no signal is handled), the step tensors and the
        # version counters in `finally`; only a call the kernel's checks refused (nothing
        # written then) is not counted.
        bucket.done_before, bucket.done = bucket.done, count
        bucket.calls += 1
        refused = False
        try:
            kernel(params, taken, *states, True, lr=lr, **kw, **extra)
        except (TypeError, ValueError) as exc:
            refused = True
            relaid = self._relayout_grads(run, grads)
            if relaid is None:
                raise self._named(where, bucket, exc) from exc
            refused = False
            try:
                kernel(params, relaid, *states, True, lr=lr, **kw, **extra)
            except (TypeError, ValueError) as again:
                refused = True
                raise self._named(where, bucket, again) from again
        finally:
            if refused:
                bucket.done = bucket.done_before
                bucket.calls -= 1
            else:
                if bucket.steps is not None:
                    bucket.steps.add_(1)
                for name, value in advanced.items():
                    bucket.carried_before[name] = bucket.carried_values[name]
                    bucket.carried_values[name] = value
                    bucket.carried[name].fill_(value)
                bucket.note_counts()
                torch.autograd.graph.increment_version(bucket.written)

    @staticmethod
    def _relayout_grads(run: _Call, grads: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """After the kernel refused a call (it writes nothing then): the bucket's grads with
        those whose strides differ from their param's, or that are negative or conjugate
        views (a zero-copy ``-x``, ``x.conj()``, which torch steps by value), copied to the
        param's strides, as the kernel takes them (_real_grads in a complex bucket), for a
        second try; None if there are none. A grad sharing memory with what the call
        writes is refused first, as the kernel refuses it (a copy would hide it)."""
        bucket = run[1]
        relaid = list(grads)
        changed = False
        for k, (p, g) in enumerate(zip(map(_local, bucket.params), grads)):
            if (
                g.layout == torch.strided
                and g.shape == p.shape
                and (g.stride() != p.stride() or g.is_neg() or g.is_conj())
                and _dense(p)  # (else the kernel's error about the param stands)
            ):
                relaid[k] = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device)
                relaid[k].copy_(g)
                changed = True
        if not changed:
            return None
        _check_buckets_apart(run[0], [run], keep=False)
        return _real_grads(relaid) if bucket.complex else relaid

    @staticmethod
    def _named(where: str, bucket: _Bucket, exc: Exception) -> Exception:
        """The kernel's error with its list positions ("grads[3]") as the group's params
        (for complex params, saying that it describes their real views)."""

        def name(role: str, k: int) -> str:
            if k >= len(bucket.index):
                return f"{role}[{k}]"
            place = f"{where}['params'][{bucket.index[k]}]"
            return place if role == "params" else f"{place} ({role})"

        out = renamed_entries(exc, name)
        if bucket.complex and type(out) in (TypeError, ValueError):
            out = type(out)(
                f"{out} (of the real views of complex tensors: a trailing dimension of 2, "
                "the real dtype)"
            )
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def __copy__(self) -> _FusedOptimizer:
        """``copy.copy``: as torch.optim's, a second object over the same state and groups
        (stepping either steps the one state) with hooks of its own (none), here with the
        same buckets, lock and masks."""
        with self._lock:
            self._settle()
            shared = {
                k: v
                for k, v in self.__dict__.items()
                if not (k.startswith("_optimizer_") and k.endswith("_hooks"))
                and k != "step"  # a scheduler's wrapper of this object's step
            }
        out = type(self).__new__(type(self))
        torch.optim.Optimizer.__setstate__(out, shared)  # fresh hooks, as torch's copy
        return out

    def __getstate__(self) -> Dict[str, Any]:
        """torch.optim's (a copy, a pickle) plus fastopt's own options that change the
        step (masks, ``max_grad_norm``), the step counts made exact first (_settle)."""
        with self._lock:
            self._settle()
            out = cast(Dict[str, Any], super().__getstate__())
            out["_masks"] = self._masks
            out["max_grad_norm"] = self.max_grad_norm
            return out

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._track_state()  # the entries are new (a load, an unpickled copy)
        self._caches = {}
        self._checked = {}
        self.__dict__.setdefault("_masks", {})
        self.__dict__.setdefault("_masks_version", 0)
        self.__dict__.setdefault("_lock", threading.RLock())  # unpickled: none yet
        self.__dict__.setdefault("_unsettled", None)
        for group in self.param_groups:  # a torch.optim checkpoint lacks fastopt's extras
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's ``state_dict``, its entries plain dicts (``torch.load`` with
        ``weights_only=True`` takes nothing else)."""
        with self._lock:
            self._settle()
            out = super().state_dict()
        out["state"] = {
            k: dict(v) if type(v) is _StateEntry else v for k, v in out["state"].items()
        }
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict`` (state moved to each param's device, the saved
        group options taken), keeping float32 state for float16/bfloat16 params: torch casts
        floating state to the param's dtype, which would round fastopt's float32 state.
        Atomic: everything is converted before anything is replaced; a malformed
        checkpoint raises TypeError/ValueError and changes nothing. As in torch.optim, the
        ``register_load_state_dict_pre_hook`` hooks run first, on a shallow copy (what they
        return is what is checked and loaded: a hook may migrate a foreign checkpoint), the
        post-hooks last, after the state is in place. Keys of a param's state that are not
        this optimizer's (a library's own entries) load as torch.optim loads them."""
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"state_dict: expected the dict of a state_dict(), got {type(state_dict).__name__}"
            )
        state_dict = state_dict.copy()
        for pre_hook in list(self._load_hooks("pre").values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"state_dict: a load_state_dict pre-hook returned {type(state_dict).__name__}, "
                "not a dict"
            )
        for key, kind in (("state", dict), ("param_groups", list)):
            if key not in state_dict:
                raise ValueError(f"state_dict: missing key {key!r}")
            if not isinstance(state_dict[key], kind):
                raise TypeError(
                    f"state_dict[{key!r}]: expected a {kind.__name__}, got "
                    f"{type(state_dict[key]).__name__}"
                )
        groups = state_dict["param_groups"]
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise TypeError("state_dict['param_groups']: expected dicts with a 'params' list")
        for key, entry in state_dict["state"].items():
            if not isinstance(entry, dict):
                raise TypeError(
                    f"state_dict['state'][{key!r}]: expected a dict of a param's state, got "
                    f"{type(entry).__name__}"
                )
        with self._lock:
            self._settle()  # the counts a pending GPU step left are made exact first
            # 16-bit params' float32 state, converted first (torch would round it).
            saved = [i for g in groups for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            kept: List[Tuple[torch.Tensor, str, torch.Tensor]] = []
            own = self._state_keys()
            for saved_id, p in zip(saved, params):
                entry = state_dict["state"].get(saved_id)
                if not isinstance(entry, dict):
                    continue
                for key, value in entry.items():
                    where = f"state_dict['state'][{saved_id!r}][{key!r}]"
                    if key == "step" and self._tracks_step:
                        taken = _steps_taken(where, value)
                        if not isinstance(value, torch.Tensor):  # torch < 1.12's: a number
                            kept.append((p, key, torch.tensor(float(taken), dtype=_step_dtype())))
                        continue
                    if key in self._spec.carried:  # NAdam's mu_product...: a 0-d host tensor
                        # of the param's dtype as torch.optim's load casts it (torch also
                        # moves it to the param's device), but float32 for 16-bit params
                        # (torch would round it) and complex ones (torch leaves their dtype)
                        number = _state_number(where, value)
                        dtype = _step_dtype()
                        if p.dtype in _CARRIED_DTYPES:
                            dtype = p.dtype
                        elif p.is_complex() and getattr(value, "dtype", None) in _CARRIED_DTYPES:
                            dtype = value.dtype
                        kept.append((p, key, torch.tensor(number, dtype=dtype)))
                        continue
                    if key not in own or not isinstance(value, torch.Tensor):
                        continue
                    _check_loaded_state8(where, entry, key, p)
                    if value.dtype == torch.uint8 or key.endswith(ABSMAX):  # 8-bit state
                        kept.append((p, key, _loaded(where, value, p.device, value.dtype)))
                    elif p.dtype in _HALF and value.is_floating_point():
                        kept.append((p, key, _loaded(where, value, p.device, torch.float32)))
            hooks = self._load_hooks("pre"), self._load_hooks("post")
            try:  # (the hooks run here, around it)
                self._set_load_hooks(OrderedDict(), OrderedDict())
                super().load_state_dict(state_dict)  # builds everything, then replaces
            except (KeyError, AttributeError, IndexError, RuntimeError, NotImplementedError) as e:
                raise TypeError(
                    f"state_dict: not a loadable checkpoint ({type(e).__name__}: {e})"
                ) from None
            finally:
                self._set_load_hooks(*hooks)
            for p, key, value in kept:
                self.state[p][key] = value
        for post_hook in list(hooks[1].values()):
            post_hook(self)

    def _state_keys(self) -> set[str]:
        """The keys of a param's state this optimizer makes (its state arrays, their 8-bit
        block maxima, the master copy)."""
        keys = {STATE_KEYS[role.name] for role in self._spec.states}
        return keys | {k + ABSMAX for k in keys} | {MASTER}

    def _load_hooks(self, when: str) -> Dict[Any, Any]:
        """torch.optim's load_state_dict pre- or post-hooks of this optimizer."""
        return cast(
            Dict[Any, Any], self.__dict__.get(f"_optimizer_load_state_dict_{when}_hooks", {})
        )

    def _set_load_hooks(self, pre: Dict[Any, Any], post: Dict[Any, Any]) -> None:
        self.__dict__["_optimizer_load_state_dict_pre_hooks"] = pre
        self.__dict__["_optimizer_load_state_dict_post_hooks"] = post


def _state_options(group: Dict[str, Any]) -> Tuple[Any, ...]:
    """The group options that decide the kind of its state: a change rebuilds the buckets
    (and checks them again: _check_group_options)."""
    return (
        group.get("state_dtype"),
        group.get("master_weights"),
        group.get("min_8bit_size"),
        group.get("stochastic_rounding"),
        group.get("rounding_seed"),
    )


# The kernels' name of the state array each state key holds (the inverse of STATE_KEYS).
_KERNEL_ROLES = {key: role for role, key in STATE_KEYS.items()}


def _kernel_style(where: str, index: List[int]) -> Callable[[str, int], str]:
    """Names entry k of a role as the kernels' errors do once renamed (_named): the param
    ``{where}['params'][index[k]]``, followed by its role for the others -- the kernel's
    name of a state key ("exp_avg_sqs"), or the key where the kernels take none ("step")."""

    def name(role: str, k: int) -> str:
        place = f"{where}['params'][{index[k]}]"
        if role == "params":
            return place
        if role.endswith(ABSMAX) and role[: -len(ABSMAX)] in _KERNEL_ROLES:
            role = f"absmax['{_KERNEL_ROLES[role[: -len(ABSMAX)]]}']"
        elif role == MASTER:
            role = "master_params"
        return f"{place} ({_KERNEL_ROLES.get(role, role)})"

    return name


def _check_buckets_apart(where: str, calls: List[_Call], keep: bool = True) -> None:
    """A group stepped in several kernel calls (buckets of other step counts, masks, 8-bit
    or master copies): each call checks its own arrays only, and the buckets do not run in
    the params' order, so the arrays of all of them are checked apart, as one call's. The
    params, state and masks are checked once per set of buckets (a rebuild makes new ones:
    their memory is what the buckets were built over, see _Bucket.moved), then each
    step's grads against them (``keep``: else the buckets keep nothing)."""
    first = calls[0][1]
    apart = first.apart if keep else None
    if apart is None:
        roles: List[Tuple[str, Optional[List[Any]], bool]] = []
        places: Dict[str, Tuple[_Bucket, str]] = {}  # each role's label: its bucket and key
        for n, (_, bucket, *_) in enumerate(calls):
            counts = ("step", *bucket.carried)
            kept: List[Tuple[str, Optional[List[Any]], bool]] = [
                ("params", [_local(p) for p in bucket.params], True),
                ("masks", bucket.mask_tensors, False),
                *(
                    (key, [_local(t) for t in held], True)
                    for key, held in zip(bucket.tracked, bucket.held)
                    if key not in counts
                ),
            ]
            for role, items, writes in kept + [("grads", None, False)]:
                places[f"{n}:{role}"] = (bucket, role)
                roles.append((f"{n}:{role}", items, writes))

        def name(label: str, k: int) -> str:
            bucket, role = places[label]
            return _kernel_style(where, bucket.index)(role, k)

        apart = _arrays.Apart(roles, name)
        if keep:
            first.apart = apart
    apart.check(
        [
            (f"{n}:grads", [_local(g) for g in grads] if bucket.distributed else grads)
            for n, (_, bucket, grads, *_) in enumerate(calls)
        ]
    )


def _packed(
    staged: Dict[int, _Staged],
    index_list: List[int],
    key: str,
    values: List[float],
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """One tensor of ``values`` (one per param of a bucket, ``index_list``; ``dtype``: that of
    the tensors it replaces by default) whose 0-d views become state ``key`` of the params'
    staged entries, so that a step writes a bucket's step counts (or carried values) at
    once. An inference tensor (no version counter, written only inside
    torch.inference_mode()) where one of the tensors it replaces is one."""
    held = [staged[i].view[key] for i in index_list]
    with torch.inference_mode(any(t.is_inference() for t in held)):
        packed = torch.tensor(values, dtype=held[0].dtype if dtype is None else dtype)
    for i, view in zip(index_list, packed.unbind()):
        staged[i].set(key, view)
    return packed


def _missing(where: str, key: str, done: int) -> ValueError:
    """A state entry that lost ``key`` after ``done`` steps (a damaged checkpoint): made
    fresh, it would restart from its start value under a step count that goes on."""
    return ValueError(
        f"state of {where}: {key!r} is missing after {done} steps (torch.optim raises "
        "KeyError; fastopt makes state at a param's first step, or for an option switched on)"
    )


def _check_group_options(where: str, group: Dict[str, Any]) -> None:
    """The group options the constructor checks, checked again where the group may have
    been edited since (``add_param_group``, a rebuild of its buckets), else a
    TypeError/ValueError naming ``where`` + the option (the bare option for the
    constructor's defaults, ``where`` ""). state_dtype is checked at every step."""

    def name(option: str) -> str:
        return f"{where}['{option}']" if where else option

    masters = flag(name("master_weights"), group.get("master_weights", False))
    rounding = flag(name("stochastic_rounding"), group.get("stochastic_rounding", False))
    if masters and rounding:
        raise ValueError(
            f"{name('master_weights')}: excludes stochastic_rounding (both are ways to keep "
            "the small updates of 16-bit params)"
        )
    if rounding:
        seed = group.get("rounding_seed")
        whole(name("rounding_seed"), seed, 0, 2**64, " (stochastic_rounding's seed)")
    whole(name("min_8bit_size"), group.get("min_8bit_size", STATE8_MIN_ELEMENTS), 1, what=" >= 1")


def _check_no_repeats(index: int, params: List[torch.Tensor]) -> None:
    """ValueError naming a param that group ``index`` holds twice (torch.optim only warns;
    a step would write it twice)."""
    seen: Dict[int, int] = {}
    for i, p in enumerate(params):
        j = seen.setdefault(id(p), i)
        if j != i:
            raise ValueError(
                f"param_groups[{index}]['params'][{i}]: is param {j} of the group again; a "
                "param may appear once"
            )


def _steps_taken(name: str, value: Any) -> int:
    """A step count (torch's 0-d tensor, or a number as in torch < 1.12's checkpoints) as
    the whole number it holds, else a TypeError/ValueError naming ``name``."""
    count = _state_number(name, value)
    if not (math.isfinite(count) and 0 <= count < 2**63 and count == int(count)):
        raise ValueError(f"{name}: must be a whole number in [0, 2**63), got {count}")
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        value = value.item()
    if isinstance(value, numbers.Integral) and int(value) > 2**53:
        # (counts are read and packed as floats: exact for a float's, not for an int's)
        raise ValueError(f"{name}: must be <= 2**53 unless held in a float tensor, got {value}")
    return int(count)


# The dtypes a carried value's tensor keeps (others are taken as float32): see _stored
_CARRIED_DTYPES = (torch.float32, torch.float64)


def _state_number(name: str, value: Any) -> float:
    """A state entry that holds one real number (a 0-d tensor, or a number as torch.optim
    takes it) as a float, else a TypeError naming ``name``."""
    if isinstance(value, torch.Tensor):
        if (
            value.numel() != 1
            or value.layout != torch.strided
            or value.is_complex()
            or value.dtype == torch.bool
            or value.device.type == "meta"
        ):
            raise TypeError(f"{name}: expected a 0-d real tensor, got {_described(value)}")
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int past the float range
            return math.inf
    raise TypeError(f"{name}: expected a 0-d tensor or a number, got {type(value).__name__}")


def _counted(dtype: torch.dtype, count: int) -> int:
    """Step ``count`` as a step tensor of ``dtype`` holds it once incremented to it, as torch
    counts (``step_t += 1``): a float32 one stays at 2**24, a float64 one at 2**53."""
    if count <= 256 or not dtype.is_floating_point:
        return count
    if dtype == torch.float64:
        return int(float(count))
    if dtype == torch.float32:
        return int(reference.float32_round(count))
    return int(torch.tensor(float(count), dtype=dtype).item())


def _stored(dtype: torch.dtype) -> Callable[[float], float]:
    """How a 0-d tensor of ``dtype`` (float32 or float64) keeps a number (see Carried)."""
    if dtype == torch.float64:
        return float
    return reference.float32_round


def _described(t: Any) -> str:
    """What a refused state value is, for messages."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    layout = "" if t.layout == torch.strided else f" {t.layout}"
    negative = " negative view" if t.layout == torch.strided and t.is_neg() else ""
    return f"a {tuple(t.shape)} {t.dtype}{layout}{negative} tensor on {t.device}"


def _float_tensor(t: Any) -> bool:
    """Whether ``t`` is a dense float tensor holding values (a meta tensor has none)."""
    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and t.is_floating_point()
        and t.device.type != "meta"
    )


def _is_codes(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.uint8


def _codes_like(s: Any, p: torch.Tensor) -> bool:
    """Whether ``s`` can be ``p``'s 8-bit codes: a dense uint8 tensor shaped like ``p``."""
    return (
        _is_codes(s)
        and s.layout == torch.strided
        and s.shape == p.shape
        and s.device.type != "meta"
        and not s.is_neg()
    )


def _absmax_of(top: Any, blocks: int) -> bool:
    """Whether ``top`` can be the block maxima of 8-bit state of ``blocks`` blocks: max |x|
    of each block, so finite and >= 0 (any other value decodes to NaN, inf or flipped
    signs)."""
    return (
        _float_tensor(top)
        and top.dtype == torch.float32
        and tuple(top.shape) == (blocks,)
        and not top.is_neg()
        and bool((torch.isfinite(top) & (top >= 0)).all())
    )


def _host_numpy(t: torch.Tensor) -> Any:
    """A NumPy array of state tensor ``t``'s values on the host, its strides kept (the 8-bit
    blocks follow the memory order), for conversions (which only read it)."""
    return t.detach().cpu().resolve_neg().numpy()


def _check_loaded_state8(where: str, entry: Dict[str, Any], key: str, p: torch.Tensor) -> None:
    """A checkpoint's 8-bit state (uint8 codes under ``key``, float32 block maxima under
    ``key + ABSMAX``) checked whole against its param ``p`` (``where``: ``entry[key]``)."""
    if key.endswith(ABSMAX):
        codes_key = key[: -len(ABSMAX)]
        blocks = -(-p.numel() // 256)
        codes, top = entry.get(codes_key), entry[key]
        if not (_codes_like(codes, p) and _absmax_of(top, blocks)):
            raise ValueError(
                f"{where}: block maxima of 8-bit state must be a ({blocks},) float32 tensor "
                "(finite, >= 0) "
                f"beside '{codes_key}', a {tuple(p.shape)} uint8 tensor like its param; got "
                f"{_described(top)} beside {_described(codes)}"
            )
    elif _is_codes(entry[key]) and not isinstance(entry.get(key + ABSMAX), torch.Tensor):
        raise ValueError(f"{where}: 8-bit (uint8) state without its block maxima '{key}{ABSMAX}'")


def _np_full(value: float) -> Any:
    import numpy as np

    return np.full(1, value, np.float32)


def _loaded(where: str, value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Any:
    """``value`` copied to ``device`` and ``dtype``, or a TypeError naming ``where`` (a meta,
    say, has no values to copy)."""
    try:
        return value.to(device=device, dtype=dtype, copy=True)
    except (RuntimeError, NotImplementedError) as exc:
        raise TypeError(f"{where}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def _rounding_seed(stochastic_rounding: Any, seed: Any) -> Optional[int]:
    """The "rounding_seed" group option: ``seed`` checked (drawn when None), or None without
    stochastic rounding."""
    if not flag("stochastic_rounding", stochastic_rounding):
        if seed is not None:
            raise ValueError("seed: only applies with stochastic_rounding=True")
        return None
    return functional.stochastic_rounding("stochastic", seed)["stochastic_seed"]


def _as_torch_reads(flag: Any) -> Any:
    """A flag as torch reads it, by truth, where that is unambiguous: None, 0 and 1 as
    bools (anything else is left to the flag's check)."""
    if flag is None or (type(flag) is int and flag in (0, 1)):
        return bool(flag)
    return flag


def _pair(name: str, pair: Any) -> Any:
    """``pair`` (betas, Rprop's etas and step_sizes) checked to be a pair: any sequence of
    two (a tuple, a list, a NumPy array, a config library's list), else a TypeError naming
    ``name``. A tuple or list is kept as given, as torch.optim keeps it in the group (a
    list of betas stays editable in place); another sequence becomes a tuple."""
    try:
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise TypeError
        return pair if type(pair) in (tuple, list) else (pair[0], pair[1])
    except (TypeError, KeyError, IndexError):
        raise TypeError(f"{name}: expected a pair of numbers, got {pair!r:.60}") from None


class SGD(_FusedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) on
    ``fastopt.sgd_``'s kernel; ``l1`` (keyword-only) adds fastopt's proximal L1 step. State:
    ``"momentum_buffer"`` when momentum > 0 (no step count, as torch). ``foreach``/``fused``
    are accepted no-ops (see the module docstring)."""

    _spec = OPTIMIZERS["sgd"]
    _tracks_step = False

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class Adagrad(_FusedOptimizer):
    """``torch.optim.Adagrad`` on ``fastopt.adagrad_``'s kernel. As torch, the state
    (``"step"``, ``"sum"`` filled with ``initial_accumulator_value``) is made at construction
    for every param (at the first step for groups added later). A group's own
    ``initial_accumulator_value`` fills its params' sums (torch.optim fills every group's from
    the constructor's value, ignoring a group's: the two differ only where a group sets its
    own). ``foreach``/``fused`` are accepted no-ops; ``l1`` is keyword-only."""

    _spec = OPTIMIZERS["adagrad"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        self._spec.options["initial_accumulator_value"].validate(
            "initial_accumulator_value",
            _host_float(initial_accumulator_value, "initial_accumulator_value"),
        )
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)
        self._make_state()

    def share_memory(self) -> None:
        """torch.optim.Adagrad's: the state tensors moved to shared memory (the next step
        sees the move), for Hogwild-style training in several processes."""
        with self._lock:
            for group in self.param_groups:
                for p in group["params"]:
                    for key, value in self.state[p].items():
                        if key != "step" and isinstance(value, torch.Tensor):
                            value.share_memory_()

    def _make_state(self) -> None:
        """torch.optim.Adagrad makes its state at construction: so does this."""
        staged = []
        for index, group in enumerate(self.param_groups):
            where = f"param_groups[{index}]"
            used = self._validate_group(where, group).used
            _check_group_options(where, group)
            for i, p in enumerate(group["params"]):
                staged.append(self._param_state(f"{where}['params'][{i}]", p, group, used)[0])
        for entry in staged:
            entry.commit(self.state)


class RMSprop(_FusedOptimizer):
    """``torch.optim.RMSprop`` (centered, momentum) on ``fastopt.rmsprop_``'s kernel. State:
    ``"step"``, ``"square_avg"``, ``"momentum_buffer"`` (momentum > 0), ``"grad_avg"``
    (centered). ``foreach`` is an accepted no-op, ``capturable=True`` is refused; ``l1`` is
    keyword-only."""

    _spec = OPTIMIZERS["rmsprop"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class Adam(_FusedOptimizer):
    """``torch.optim.Adam`` (amsgrad, maximize, coupled or ``decoupled_weight_decay``) on
    ``fastopt.adam_``'s kernel. State: ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``,
    ``"max_exp_avg_sq"`` (amsgrad). ``foreach``/``fused`` are accepted no-ops,
    ``capturable``/``differentiable`` are refused; ``l1`` is keyword-only."""

    _spec = OPTIMIZERS["adam"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        pair = tuple(_pair("betas", betas))
        if isinstance(pair[0], torch.Tensor) != isinstance(pair[1], torch.Tensor):
            raise ValueError("betas must be either both floats or both Tensors")  # (torch's)
        defaults = dict(
            lr=lr,
            betas=pair,  # as torch.optim.Adam
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2); as torch's,
    its groups always say ``decoupled_weight_decay=True``, loaded checkpoints included."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            masks=masks,
        )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Lion(_FusedOptimizer):
    """Lion (Chen et al. 2023) on ``fastopt.lion_``'s kernel; no torch.optim counterpart.
    Defaults are the paper's (lr 1e-4, betas (0.9, 0.99)). State: ``"exp_avg"`` (no step
    count). ``foreach``/``fused`` are accepted no-ops, ``capturable``/``differentiable`` refused."""

    _spec = OPTIMIZERS["lion"]
    _tracks_step = False

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-4,
        betas: Tuple[Any, Any] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            betas=_pair("betas", betas),
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class Adamax(_FusedOptimizer):
    """``torch.optim.Adamax`` (maximize) on ``fastopt.adamax_``'s kernel. State: ``"step"``,
    ``"exp_avg"``, ``"exp_inf"``. ``foreach`` is an accepted no-op,
    ``capturable``/``differentiable`` are refused; ``l1`` is keyword-only."""

    _spec = OPTIMIZERS["adamax"]

    def __init__(
        self,
        params: Any,
        lr: Any = 2e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            betas=_pair("betas", betas),
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class RAdam(_FusedOptimizer):
    """``torch.optim.RAdam`` (maximize, coupled or ``decoupled_weight_decay``) on
    ``fastopt.radam_``'s kernel. State: ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``.
    ``foreach`` is an accepted no-op, ``capturable``/``differentiable`` are refused; ``l1``
    is keyword-only."""

    _spec = OPTIMIZERS["radam"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            betas=_pair("betas", betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class NAdam(_FusedOptimizer):
    """``torch.optim.NAdam`` (maximize, coupled or ``decoupled_weight_decay``) on
    ``fastopt.nadam_``'s kernel. State: ``"step"``, ``"mu_product"`` (a float32 0-d tensor
    on the host, multiplied by mu_t at each step as torch does; a bucket's are 0-d views of
    one tensor, as its step counts), ``"exp_avg"``, ``"exp_avg_sq"``. ``foreach`` is an
    accepted no-op, ``capturable``/``differentiable`` are refused; ``l1`` is keyword-only.
    A ``mu_product`` must lie in [0, 1] (1 before a first step), and the product a step
    takes (times mu_t) below 1: beta1 that rounds to 1 in float32 (torch would divide by
    zero) is refused at the step, naming the group."""

    _spec = OPTIMIZERS["nadam"]

    def __init__(
        self,
        params: Any,
        lr: Any = 2e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            betas=_pair("betas", betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class ASGD(_FusedOptimizer):
    """``torch.optim.ASGD`` (maximize) on ``fastopt.asgd_``'s kernel. State: ``"step"``,
    ``"eta"`` (starts at lr), ``"mu"`` (starts at 1): float32 0-d tensors on the host, set
    after each step as torch sets them, a bucket's 0-d views of one tensor as its step
    counts; ``"ax"``, the average. ``foreach`` is an accepted no-op,
    ``capturable``/``differentiable`` are refused. ``t0`` must be finite (torch also takes
    inf: pass a t0 past the last step instead). No ``l1`` (its step size is eta)."""

    _spec = OPTIMIZERS["asgd"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            lambd=lambd,
            alpha=alpha,
            t0=t0,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class Adadelta(_FusedOptimizer):
    """``torch.optim.Adadelta`` (maximize) on ``fastopt.adadelta_``'s kernel. State:
    ``"step"``, ``"square_avg"``, ``"acc_delta"``. ``foreach`` is an accepted no-op,
    ``capturable``/``differentiable`` are refused; ``l1`` is keyword-only."""

    _spec = OPTIMIZERS["adadelta"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            capturable=capturable,
            maximize=maximize,
            differentiable=differentiable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class Rprop(_FusedOptimizer):
    """``torch.optim.Rprop`` (maximize) on ``fastopt.rprop_``'s kernel. State: ``"step"``,
    ``"prev"`` (zeros), ``"step_size"`` (filled with the group's lr at the param's first
    step, both parts of a complex one, as torch; lr is read only then, so a scheduler
    changes nothing after it, as with torch.optim.Rprop). ``foreach`` is an accepted no-op,
    ``capturable``/``differentiable`` are refused."""

    _spec = OPTIMIZERS["rprop"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        etas: Tuple[Any, Any] = (0.5, 1.2),
        step_sizes: Tuple[Any, Any] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            etas=_pair("etas", etas),
            step_sizes=_pair("step_sizes", step_sizes),
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        super().__init__(params, defaults, masks)


class Sophia(_FusedOptimizer):
    """Sophia (Liu et al. 2023) on ``fastopt.sophia_``'s kernel; no torch.optim counterpart.
    ``betas[0]`` is the gradient EMA's, ``betas[1]`` the Hessian EMA's (used by
    ``update_hessian``). State: ``"step"``, ``"exp_avg"``, ``"hessian"`` (starts at zero, so
    steps are clipped sign steps until ``update_hessian`` is called).
    ``foreach``/``fused`` are accepted no-ops, ``capturable``/``differentiable`` refused."""

    _spec = OPTIMIZERS["sophia"]

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-4,
        betas: Tuple[Any, Any] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        eps: float = 1e-15,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        l1: float = 0.0,
        state_dtype: str = "float32",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        masks: Any = None,
    ):
        defaults = dict(
            lr=lr,
            betas=_pair("betas", betas),
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            l1=l1,
            state_dtype=state_dtype,
            master_weights=flag("master_weights", master_weights),
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
        )
        self._hessian_beta("", defaults)
        super().__init__(params, defaults, masks)

    @staticmethod
    def _hessian_beta(where: str, group: Dict[str, Any]) -> float:
        """betas[1], the Hessian EMA's (not in fastopt's table: the step does not use it)."""
        name = f"{where}['betas']" if where else "betas"
        beta2 = _pair(name, group.get("betas"))[1]
        return real(
            name + "[1]",
            _host_float(beta2, name + "[1]"),
            lo=0.0,
            hi=1.0,
            hi_open=True,
        )

    @torch.no_grad()
    def update_hessian(self) -> None:
        """hessian <- betas[1]*hessian + (1 - betas[1])*grad*grad for every param with a
        grad (fastopt's EMA kernel over grad*grad in float32): SophiaG's Gauss-Newton-
        Bartlett estimate when the grads come from a loss on labels sampled from the model
        (Liu et al. 2023, Algorithm 2)."""
        with self._lock:  # the state a concurrent step reads
            staged: List[Tuple[float, List[_Staged]]] = []  # per group: beta2, its params'
            for index, group in enumerate(self.param_groups):  # all checked first
                used = self._validate_group(f"param_groups[{index}]", group).used
                _check_group_options(f"param_groups[{index}]", group)
                beta2 = self._hessian_beta(f"param_groups[{index}]", group)
                entries = []
                for i, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    where = f"param_groups[{index}]['params'][{i}]"
                    self._check_param(where, p, p.grad)
                    entries.append(self._param_state(where, p, group, used)[0])
                staged.append((beta2, entries))
            for beta2, entries in staged:
                hessians, squares = [], []
                for entry in entries:
                    hessians.append(
                        _local(cast(Dict[str, Any], entry.commit(self.state))["hessian"])
                    )
                    g = _local(cast(torch.Tensor, entry.param.grad)).to(hessians[-1].dtype)
                    squares.append(torch.empty_like(hessians[-1]).copy_(g).square_())
                if hessians:
                    functional.ema_(hessians, squares, beta=beta2)
                    torch.autograd.graph.increment_version(hessians)


# -- bitsandbytes-style 8-bit aliases -----------------------------------------------------------
class Adafactor(torch.optim.Optimizer):
    """``torch.optim.Adafactor`` on fastopt's Adafactor kernel (see ``fastopt.adafactor``):
    torch's signature and defaults, param groups, state keys (``"step"``, and ``"row_var"``
    (..., rows, 1) and ``"col_var"`` (..., 1, cols) for params of two or more dimensions,
    ``"variance"`` for the others) and state_dict, interchangeable with torch's both ways.
    ``foreach`` is an accepted no-op. CPU and CUDA params (float32, float64, float16,
    bfloat16; 16-bit params get float32 state and math, where torch keeps their dtype: a
    torch checkpoint's 16-bit state is converted at the next step).

    A step makes one kernel call per group, device and dtype (three passes over each
    matrix, two over each vector: ``fastopt.adafactor``; on the GPU queued on torch's
    current stream, nothing waiting). Everything a step needs is checked for every
    group before any param is written, so a refused step changes nothing. A param laid
    out otherwise than in C order (channels_last) is stepped through a C-order copy, and
    so is such a grad, since the factors follow the last two dimensions. The version
    counters of the params and state tensors written are bumped, as torch.optim's in-place
    writes do. ``stochastic_rounding=True`` (keyword-only, a group option, with ``seed=``
    as the other classes'): the group's bfloat16 params are rounded stochastically at
    every step, keyed by the group's ``"rounding_seed"``, the place in the group of the
    first bfloat16 param with a grad, and each param's step count and place among those
    stepped with it; its other params round to nearest. ``master_weights=True`` (keyword-
    only, a group option, excluding stochastic rounding): the group's float16/bfloat16
    params keep a float32 copy, ``state[p]["master_param"]`` (made from the param at its
    first step, or when missing; dropped when the param is stepped without), stepped in the
    param's place in the same pass, the param written as it rounded to nearest: edit the
    copy, not only the param, to change a param's value between steps.

    ``opt.max_grad_norm = 1.0`` (an attribute, default None, as on the other classes):
    each step first clips the grads of every group to that global 2-norm, as
    ``clip_grad_norm_`` before the step would, and leaves the norm before clipping in
    ``opt.last_grad_norm``. Unlike the other classes, whose kernels scale the grads as
    they load them, Adafactor's grads are scaled in place (its kernels read each grad in
    two passes), after every check of the step."""

    # clipping inside the step (see the docstring); each step leaves the norm before
    # clipping in last_grad_norm
    max_grad_norm: Optional[float] = None
    last_grad_norm: Optional[torch.Tensor] = None

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        beta2_decay: float = -0.8,
        eps: Tuple[Optional[float], float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        master_weights: bool = False,
    ):
        adafactor_hyper(
            _host_float(lr, "lr"), beta2_decay, eps, d, weight_decay, _as_torch_reads(maximize)
        )
        if foreach is not None:
            flag("foreach", foreach)
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=_rounding_seed(stochastic_rounding, seed),
            master_weights=flag("master_weights", master_weights),
        )
        _check_group_options("", defaults)
        super().__init__(params, defaults)

    def __getstate__(self) -> Dict[str, Any]:
        """torch.optim's (a copy, a pickle) plus ``max_grad_norm``."""
        out = cast(Dict[str, Any], super().__getstate__())
        out["max_grad_norm"] = self.max_grad_norm
        return out

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim checkpoint lacks fastopt's extras
            for key, value in self.defaults.items():
                if key != "differentiable":  # (torch's __setstate__ adds it to defaults only)
                    group.setdefault(key, value)
            for p in group["params"]:
                entry = self.state.get(p, {})
                step = entry.get("step") if isinstance(entry, dict) else None
                if step is not None and not torch.is_tensor(step):  # torch < 1.12's numbers
                    entry["step"] = torch.tensor(float(step), dtype=_step_dtype())

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch.optim's, with the group's rounding options checked as the constructor
        checks them, and a param repeated in the group refused (as by the other classes);
        a group they refuse is not added."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            _check_no_repeats(index, self.param_groups[index]["params"])
            _check_group_options(f"param_groups[{index}]", self.param_groups[index])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's, but the float32 state (and master copy) of a 16-bit param stays
        float32 (torch casts state to its param's dtype; fastopt keeps it float32)."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("state", {})
        ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            entry, theirs = self.state.get(p), saved.get(i)
            if p.dtype not in _HALF or not isinstance(entry, dict) or not isinstance(theirs, dict):
                continue
            for key in ("row_var", "col_var", "variance", MASTER):
                value = theirs.get(key)
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    entry[key] = value.detach().to(device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step over every param with a grad; ``closure`` (re-evaluates the model and
        returns the loss) is called first with grad enabled, and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        limit = (
            None if self.max_grad_norm is None else max_norm_of(self.max_grad_norm, "max_grad_norm")
        )
        calls: List[_AdafactorCall] = []
        staged: List[Tuple[torch.Tensor, Dict[str, Any]]] = []
        for index in range(len(self.param_groups)):
            calls.extend(self._calls(index, staged))
        for call in calls:  # the kernels' own checks, every call before any runs
            call.check()
        if limit is not None:
            with_grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.last_grad_norm = clip_grad_norm_(with_grads, limit)
        for p, made in staged:  # every call checked: the new state goes in
            entry = self.state[p]
            entry.update(made)
            if MASTER in made and made[MASTER] is None:  # a copy no longer stepped
                del entry[MASTER]
        for call in calls:
            call.run()
            if call.rounding is not None:
                index, taken = call.rounding
                self.param_groups[index]["rounding_step"] = taken
        return loss

    def _calls(
        self, index: int, staged: List[Tuple[torch.Tensor, Dict[str, Any]]]
    ) -> List[_AdafactorCall]:
        """Group ``index``'s kernel calls (one per device and dtype), checked in Python,
        with the state entries to set before they run added to ``staged``; nothing is
        written (no state entry made either)."""
        group = self.param_groups[index]
        where = f"param_groups[{index}]"
        hyper = adafactor_hyper(
            _host_float(group["lr"], f"{where}['lr']"),
            group["beta2_decay"],
            group["eps"],
            group["d"],
            group["weight_decay"],
            _as_torch_reads(group["maximize"]),
            lambda k: f"{where}['{k}']",
        )
        _check_group_options(where, group)
        seed = int(group["rounding_seed"]) if group.get("stochastic_rounding") else None
        rounding_step = 0
        if seed is not None:  # the group's count of rounded steps, as the other classes'
            taken = group.get("rounding_step", 0)
            if type(taken) is not int or not 0 <= taken < 2**63 - 1:
                taken = whole(f"{where}['rounding_step']", taken, 0, 2**63 - 1)
            rounding_step = taken + 1
        calls: Dict[Tuple[torch.device, torch.dtype], _AdafactorCall] = {}
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            name = f"{where}['params'][{i}]"
            _check_adafactor_param(name, p, g)
            if hyper[2] is None:  # eps1: torch's finfo(dtype).eps of the group's first param
                hyper = (*hyper[:2], machine_epsilon(_arrays.dtype_name(p), name), *hyper[3:])
            entry = self.state.get(p) or {}
            masters = bool(group.get("master_weights")) and p.dtype in _HALF
            made = _adafactor_state(name, p, entry, masters)
            staged.append((p, made))
            if (p.device, p.dtype) not in calls:
                # bfloat16: this step's, group's and call's seed (its first param's place);
                # the kernel mixes in each param's step and place in the call
                key = None
                if seed is not None and p.dtype == torch.bfloat16:
                    key = functional.step_seed(seed, rounding_step, index << 32 | i)
                call = _AdafactorCall(hyper, key, masters)
                call.rounding = None if seed is None else (index, rounding_step)
                calls[p.device, p.dtype] = call
            calls[p.device, p.dtype].add(name, p, g, {**entry, **made})
        return list(calls.values())


class _AdafactorCall:
    """The params of one group, device and dtype, as one kernel call: the tensors it writes
    (params or their C-order copies, state), their step counts, the copies to write back,
    and each param's name for messages."""

    def __init__(
        self,
        hyper: Tuple[float, float, Optional[float], float, float, float, bool],
        seed: Optional[int],
        masters: bool,
    ):
        self.hyper = hyper
        self.seed = seed  # stochastic rounding's (bfloat16 params), else None
        # (its group's index and rounded step: the group's "rounding_step" once it ran)
        self.rounding: Optional[Tuple[int, int]] = None
        self.masters: Optional[List[torch.Tensor]] = [] if masters else None
        self.lists: Tuple[List[Any], ...] = ([], [], [], [], [])  # params, grads, row, col, var
        self.counts: List[torch.Tensor] = []
        self.names: List[str] = []
        self.copies: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (param, its C-order copy)
        self.written: List[torch.Tensor] = []
        self.steps: List[int] = []
        # the params and grads as given, where lists hold C-order copies: checked apart
        self.given: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])

    def add(self, name: str, p: torch.Tensor, g: torch.Tensor, entry: Dict[str, Any]) -> None:
        if p.is_contiguous():
            target = p
            self.written.append(p)
        else:
            target = p.contiguous()
            self.copies.append((p, target))
        self.given[0].append(p)
        self.given[1].append(g)
        state = [entry.get(k) for k in ("row_var", "col_var", "variance")]
        # (a negative view of a grad is taken by value, as torch takes it)
        for out, x in zip(self.lists, [target, g.resolve_neg().contiguous(), *state]):
            out.append(x)
        self.written.extend(t for t in state if t is not None)
        if self.masters is not None:
            self.masters.append(entry[MASTER])
            self.written.append(entry[MASTER])
        self.counts.append(entry["step"])
        self.names.append(name)

    def _named(self, role: str, i: int) -> str:
        """A binding's "grads[3]" as the param it belongs to."""
        keys = {"row_vars": "row_var", "col_vars": "col_var", "variances": "variance"}
        if role == "params":
            return self.names[i]
        if role == "grads":
            return f"{self.names[i]}.grad"
        if role == "steps":
            return f"state of {self.names[i]}['step']"
        if role == "master_params":
            return f"state of {self.names[i]}['{MASTER}']"
        return f"state of {self.names[i]}['{keys.get(role, role)}']"

    def _kernel(self, check_only: bool) -> None:
        run_adafactor(
            self.lists,
            self.steps,
            self.hyper,
            True,
            check_only=check_only,
            seed=self.seed,
            masters=self.masters,
        )

    def check(self) -> None:
        """Every check of the kernel call (nothing written), named by the params; first the
        aliasing of the params and grads as given (the kernel sees the C-order copies of
        those laid out otherwise, which would hide it)."""
        # (as torch's step tensors count: a float32 one stays at 2**24)
        self.steps = [_counted(t.dtype, _steps_taken("step", t) + 1) for t in self.counts]
        if self.copies or any(g is not x for g, x in zip(self.given[1], self.lists[1])):
            names = ("row_vars", "col_vars", "variances")
            _arrays.check_apart(
                [
                    ("params", self.given[0], True),
                    ("grads", self.given[1], False),
                    *((n, x, True) for n, x in zip(names, self.lists[2:])),
                    ("master_params", self.masters, True),
                ],
                self._named,
            )
        try:
            self._kernel(check_only=True)
        except (TypeError, ValueError) as exc:
            raise renamed_entries(exc, self._named) from None

    def run(self) -> None:
        self._kernel(check_only=False)
        for p, copy in self.copies:
            p.copy_(copy)
        for t in self.counts:
            t.add_(1)
        bumped = [t for t in self.written if not t.is_inference()]
        if bumped:
            torch.autograd.graph.increment_version(bumped)


def _check_adafactor_param(name: str, p: torch.Tensor, g: torch.Tensor) -> None:
    """What an Adafactor step takes, else a TypeError/ValueError naming ``name``."""
    if _is_dtensor(p):
        raise TypeError(f"{name}: DTensor params are not supported by Adafactor in this version")
    if p.dtype not in (torch.float32, torch.float64) + _HALF:
        raise TypeError(
            f"{name}: dtype {p.dtype} is not supported by Adafactor (float32, float64, "
            "float16, bfloat16)"
        )
    if p.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{name}: is on device {p.device.type!r}; fastopt runs on CPU and CUDA")
    if g.layout != torch.strided:
        raise TypeError(f"{name}.grad: {g.layout} gradients are not supported")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(
            f"{name}.grad: expected {p.dtype} {tuple(p.shape)} on {p.device} like its param, "
            f"got {g.dtype} {tuple(g.shape)} on {g.device}"
        )
    _arrays.refuse_inference_write(name, p)
    if p.is_neg() or p.is_conj():
        raise ValueError(f"{name}: is a {'negative' if p.is_neg() else 'conjugate'} view")


def _adafactor_state(
    name: str, p: torch.Tensor, entry: Dict[str, Any], masters: bool
) -> Dict[str, Any]:
    """The state entries of ``p`` to set before its step: all of them for a fresh param;
    for a held entry (a torch checkpoint's), its tensors checked and those of another dtype
    (16-bit state of torch's) as float32 copies. ``masters``: the float32 master copy too
    (made from the param where missing); without, a copy held is dropped (None in the
    result), as it would go stale and put the param back to it once stepped again."""
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    shapes = state_shapes(tuple(p.shape))
    keys = {"row_vars": "row_var", "col_vars": "col_var", "variances": "variance"}
    made: Dict[str, Any] = {}
    if not masters and MASTER in entry:
        made[MASTER] = None
    if masters:
        master = entry.get(MASTER, p)
        if (
            not isinstance(master, torch.Tensor)
            or master.shape != p.shape
            or (not master.is_floating_point())
        ):
            raise ValueError(
                f"state of {name}['{MASTER}']: expected a float tensor of shape "
                f"{tuple(p.shape)}, got {_described(master)}"
            )
        if (
            master is p
            or master.dtype != torch.float32
            or master.device != p.device
            or (not master.is_contiguous())
        ):
            made[MASTER] = master.detach().to(
                device=p.device,
                dtype=torch.float32,
                memory_format=torch.contiguous_format,
                copy=True,
            )
    if not entry:
        made["step"] = torch.tensor(0.0, dtype=_step_dtype())
        for role, shape in shapes.items():
            made[keys[role]] = torch.zeros(shape, dtype=dtype, device=p.device)
        return made
    if "step" not in entry:
        raise ValueError(f"state of {name}: has no 'step'")
    _steps_taken(f"state of {name}['step']", entry["step"])
    if not torch.is_tensor(entry["step"]):
        made["step"] = torch.tensor(float(entry["step"]), dtype=_step_dtype())
    for role, shape in shapes.items():
        key = keys[role]
        t = entry.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.is_complex():
            raise ValueError(
                f"state of {name}['{key}']: expected a real tensor of shape {shape}, got "
                f"{_described(t)}"
            )
        if t.dtype != dtype or t.device != p.device or not t.is_contiguous():
            made[key] = t.detach().to(
                device=p.device, dtype=dtype, memory_format=torch.contiguous_format, copy=True
            )
    return made


def _bnb_options(
    args: Any, min_8bit_size: Any, percentile_clipping: Any, block_wise: Any, is_paged: Any
) -> int:
    """bitsandbytes' 8-bit optimizer options: what fastopt does (blockwise 8-bit state for
    params of ``min_8bit_size`` elements or more) or a ValueError naming what it does not."""
    if args is not None:
        raise ValueError("args: bitsandbytes' GlobalOptimManager overrides are not supported")
    if percentile_clipping != 100:
        raise ValueError(
            f"percentile_clipping: only 100 (off) is supported, got {percentile_clipping!r}; "
            "clip with opt.max_grad_norm or fastopt.torch.clip_grad_norm_"
        )
    if block_wise is not True:
        raise ValueError("block_wise: fastopt's 8-bit state is always blockwise (True)")
    if is_paged is not False:
        raise ValueError("is_paged: paged optimizer state is not supported (False)")
    return whole("min_8bit_size", min_8bit_size, 1, what=" >= 1")


def _eight_bit(opt: _FusedOptimizer, min_8bit_size: int) -> None:
    """Makes ``min_8bit_size`` a group option of ``opt`` (its groups, and the defaults that
    ``add_param_group`` and old checkpoints take)."""
    opt.defaults["min_8bit_size"] = min_8bit_size
    for group in opt.param_groups:
        group.setdefault("min_8bit_size", min_8bit_size)


class Adam8bit(Adam):
    """``bitsandbytes.optim.Adam8bit``'s constructor on fastopt's Adam with
    ``state_dtype="int8"``: blockwise 8-bit ``exp_avg``/``exp_avg_sq`` (signed and unsigned
    dynamic maps, a float32 absmax per 256 elements) for params of ``min_8bit_size``
    elements or more, float32 state for the others. ``optim_bits`` is ignored (as by
    bitsandbytes' 8-bit classes); ``percentile_clipping`` must be 100, ``block_wise`` True,
    ``is_paged`` False and ``args`` None."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
    ):
        least = _bnb_options(args, min_8bit_size, percentile_clipping, block_wise, is_paged)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_dtype="int8")
        _eight_bit(self, least)


class AdamW8bit(AdamW):
    """``bitsandbytes.optim.AdamW8bit``'s constructor on fastopt's AdamW with
    ``state_dtype="int8"`` (see ``Adam8bit``)."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
    ):
        least = _bnb_options(args, min_8bit_size, percentile_clipping, block_wise, is_paged)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_dtype="int8")
        _eight_bit(self, least)


class SGD8bit(SGD):
    """``bitsandbytes.optim.SGD8bit``'s constructor on fastopt's SGD with
    ``state_dtype="int8"``: a blockwise 8-bit ``momentum_buffer`` (see ``Adam8bit``)."""

    def __init__(
        self,
        params: Any,
        lr: Any,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        least = _bnb_options(args, min_8bit_size, percentile_clipping, block_wise, False)
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, state_dtype="int8"
        )
        _eight_bit(self, least)


class RMSprop8bit(RMSprop):
    """``bitsandbytes.optim.RMSprop8bit``'s constructor on fastopt's RMSprop with
    ``state_dtype="int8"`` (see ``Adam8bit``)."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        least = _bnb_options(args, min_8bit_size, percentile_clipping, block_wise, False)
        super().__init__(
            params, lr, alpha, eps, weight_decay, momentum, centered, state_dtype="int8"
        )
        _eight_bit(self, least)


class Lion8bit(Lion):
    """``bitsandbytes.optim.Lion8bit``'s constructor on fastopt's Lion with
    ``state_dtype="int8"`` (see ``Adam8bit``)."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-4,
        betas: Tuple[Any, Any] = (0.9, 0.99),
        weight_decay: float = 0.0,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
    ):
        least = _bnb_options(args, min_8bit_size, percentile_clipping, block_wise, is_paged)
        super().__init__(params, lr, betas, weight_decay, state_dtype="int8")
        _eight_bit(self, least)


class Adagrad8bit(Adagrad):
    """``bitsandbytes.optim.Adagrad8bit``'s constructor on fastopt's Adagrad with
    ``state_dtype="int8"``: a blockwise 8-bit ``sum`` (see ``Adam8bit``)."""

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        optim_bits: int = 8,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        least = _bnb_options(args, min_8bit_size, percentile_clipping, block_wise, False)
        super().__init__(
            params,
            lr,
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            state_dtype="int8",
        )
        _eight_bit(self, least)
        self.state.clear()  # made for the default min_8bit_size: made again for this one
        self._make_state()


# The class of each optimizer of fastopt's table, by its name there.
CLASSES: Dict[str, type] = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
    "lion": Lion,
    "sophia": Sophia,
    "adamax": Adamax,
    "radam": RAdam,
    "adadelta": Adadelta,
    "rprop": Rprop,
    "nadam": NAdam,
    "asgd": ASGD,
}
