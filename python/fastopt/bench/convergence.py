"""``python -m fastopt.bench.convergence``: does low-bit optimizer state, and bfloat16 params
with stochastic rounding, train as well as float32? (the target: a final loss within 2%).

Two tasks, each trained once per variant from the same initialization, with the same
mini-batches in the same order and the same hyper-parameters (AdamW, cosine schedule):

- ``digits``: the demo's MLP (64-256-10, ReLU, its He-uniform init) on scikit-learn's
  digits (the demo's split and standardization), cross-entropy, batch 64.
- ``charlm``: a character-level language model -- an embedding of the previous 24
  characters, a 512-unit ReLU layer, logits over the characters -- trained on the source
  text of six standard-library modules (``CORPUS``, read from the running Python's library:
  the same text for a given Python; the output names its size and hash).

Variants (all but the first are ``fastopt.torch.AdamW``):

- ``torch fp32``: ``torch.optim.AdamW``, float32 -- the reference of the float32 rows;
- ``fastopt fp32``, ``fastopt bf16 state`` (``state_dtype="bfloat16"``), ``fastopt int8
  state`` (``state_dtype="int8"``, target: within 2% of the reference);
- ``torch fp32 seed 1``: the reference from another seed (init and data order): the
  seed-to-seed spread, the scale against which 2% should be read;
- ``bitsandbytes AdamW8bit``, ``torchao AdamW8bit``: the peers' 8-bit AdamW (CPU paths),
  when installed: how far the same kind of 8-bit state lands from float32 elsewhere;
- bfloat16 model (params, activations, grads): ``bf16 fp32-master`` (the reference of the
  bfloat16 rows: a float32 copy of the params stepped by ``fastopt.torch.AdamW`` in float32
  and copied back rounded to nearest after each step, done here in the harness),
  ``bf16 stochastic rounding`` (``stochastic_rounding=True``, no master copy; target: within
  2% of the fp32-master row), ``bf16 nearest`` (no master copy, rounding to nearest: what
  stochastic rounding fixes), and ``bf16 master_weights=True`` / ``bf16 SR int8 state`` when
  ``fastopt.torch`` offers those options.

A variant whose option ``fastopt.torch`` refuses (a ValueError or TypeError at construction
or at a first step on a probe param) is listed as not available, with the reason.

The figure of merit is the training loss averaged over the last tenth of the steps (the
mini-batch losses, taken from the forward passes). The table gives it, its ratio to the
variant's reference, whether a target row is within 2%, the optimizer's state in bytes per
param (including a master copy) and the training time. ``--plot`` draws the loss curves.
Seeded and deterministic for a given thread count (``--threads``, torch's and fastopt's).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

SEED = 0
TARGET = 0.02  # a target row's final loss must be within 2% of its reference's
TAIL = 10  # the final loss is the mean over the last 1/TAIL of the steps
# Standard-library modules whose source is the LM's text (about 420,000 characters: a full
# run sees it about once, so the training loss measures learning more than memorization).
CORPUS = ("argparse", "collections", "dataclasses", "difflib", "pydoc", "textwrap")


@dataclass
class Task:
    """A model, its data and its hyper-parameters. ``model(dtype, seed)`` builds the model
    (seeded); ``batches(steps, seed)`` gives every step's (inputs, targets), in order."""

    name: str
    describe: str
    model: Callable[[Any, int], Any]
    batches: Callable[[int, int], List[Any]]  # (steps, seed) -> per-step (x, y)
    steps: int
    lr: float
    weight_decay: float


@dataclass
class Variant:
    name: str
    bf16: bool  # the model in bfloat16
    reference: Optional[str]  # the row it is compared with (None: it is a reference)
    target: bool  # held to within TARGET of the reference
    options: Dict[str, Any] = field(default_factory=dict)  # fastopt.torch.AdamW keywords
    torch_optim: bool = False  # torch.optim.AdamW instead
    master: bool = False  # float32 master copy kept by the harness
    seed: int = SEED
    peer: str = ""  # another library's AdamW8bit: "bitsandbytes" or "torchao"


VARIANTS = [
    Variant("torch fp32", False, None, False, torch_optim=True),
    Variant("fastopt fp32", False, "torch fp32", False),
    Variant("fastopt bf16 state", False, "torch fp32", False, {"state_dtype": "bfloat16"}),
    Variant("fastopt int8 state", False, "torch fp32", True, {"state_dtype": "int8"}),
    Variant("torch fp32 seed 1", False, "torch fp32", False, torch_optim=True, seed=SEED + 1),
    Variant("bitsandbytes AdamW8bit", False, "torch fp32", False, peer="bitsandbytes"),
    Variant("torchao AdamW8bit", False, "torch fp32", False, peer="torchao"),
    Variant("bf16 fp32-master", True, None, False, master=True),
    Variant(
        "bf16 stochastic rounding",
        True,
        "bf16 fp32-master",
        True,
        {"stochastic_rounding": True, "seed": SEED},
    ),
    Variant("bf16 nearest", True, "bf16 fp32-master", False),
    Variant("bf16 master_weights=True", True, "bf16 fp32-master", False, {"master_weights": True}),
    Variant(
        "bf16 SR int8 state",
        True,
        "bf16 fp32-master",
        False,
        {"stochastic_rounding": True, "seed": SEED, "state_dtype": "int8"},
    ),
]


@dataclass
class Result:
    task: str
    variant: Variant
    losses: List[float]  # per step; empty when not available
    seconds: float = 0.0
    state_bytes_per_param: float = 0.0
    unavailable: str = ""  # why the variant did not run

    @property
    def final(self) -> float:
        tail = max(1, len(self.losses) // TAIL)
        return float(np.mean(self.losses[-tail:]))


# -- tasks -------------------------------------------------------------------------------------


def digits_task(steps: Optional[int]) -> Task:
    """The demo's MLP and data (fastopt.demo), as a torch module."""
    import torch

    from ..demo import models
    from ..demo.common import Digits, batches
    from ..demo.stages import BATCH, TEACHER

    data = Digits.load()
    x = torch.from_numpy(data.x_train.astype(np.float32))
    y = torch.from_numpy(data.y_train)

    def model(dtype: Any, seed: int) -> Any:
        params = models.mlp_init(np.random.default_rng(seed), TEACHER, np.float32)
        layers: List[Any] = []
        for i in range(0, len(params), 2):
            linear = torch.nn.Linear(params[i].shape[1], params[i].shape[0])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(params[i]))
                linear.bias.copy_(torch.from_numpy(params[i + 1]))
            layers += [linear, torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1]).to(dtype)

    def make_batches(n: int, seed: int) -> List[Any]:
        order = batches(np.random.default_rng(seed + 100), len(y), BATCH, n)
        return [(x[torch.from_numpy(idx)], y[torch.from_numpy(idx)]) for idx in order]

    epochs = len(y) // BATCH
    return Task(
        "digits",
        f"MLP {'-'.join(map(str, TEACHER))} on digits ({len(y)} images), batch {BATCH}",
        model,
        make_batches,
        steps or 40 * epochs,
        lr=3e-3,
        weight_decay=0.1,
    )


def corpus() -> str:
    """The LM's text: the source of the CORPUS modules, concatenated."""
    parts = []
    for name in CORPUS:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the standard library's {name}.py is not found")
        with open(spec.origin, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def charlm_task(
    steps: Optional[int], context: int = 24, embed: int = 24, hidden: int = 512
) -> Task:
    """Next-character prediction from the previous ``context`` characters (Bengio et al.'s
    MLP language model)."""
    import torch

    from ..demo.common import batches

    text = corpus()
    chars = sorted(set(text))
    code = {c: i for i, c in enumerate(chars)}
    codes = torch.tensor([code[c] for c in text], dtype=torch.int64)
    offsets = torch.arange(context)
    batch = 128

    def model(dtype: Any, seed: int) -> Any:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Embedding(len(chars), embed),
            torch.nn.Flatten(),
            torch.nn.Linear(context * embed, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, len(chars)),
        ).to(dtype)

    def make_batches(n: int, seed: int) -> List[Any]:
        order = batches(np.random.default_rng(seed + 100), len(codes) - context, batch, n)
        out = []
        for idx in order:
            start = torch.from_numpy(idx)
            out.append((codes[start[:, None] + offsets], codes[start + context]))
        return out

    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Task(
        "charlm",
        f"char MLP LM, context {context}, embed {embed}, hidden {hidden}, batch {batch}, "
        f"on the source of {', '.join(CORPUS)} of Python {platform.python_version()} "
        f"({len(text)} chars, {len(chars)} symbols, sha256 {digest})",
        model,
        make_batches,
        steps or 3000,
        lr=2e-3,
        weight_decay=0.1,
    )


TASKS: Dict[str, Callable[[Optional[int]], Task]] = {"digits": digits_task, "charlm": charlm_task}


# -- optimizers ---------------------------------------------------------------------------------


class MasterWeights:
    """bfloat16 params stepped through a float32 copy: the grads are cast to float32, the
    copy takes a float32 ``fastopt.torch.AdamW`` step and is copied back rounded to nearest.
    ``param_groups`` are the inner optimizer's (for the schedule)."""

    def __init__(self, params: Sequence[Any], **hyper: Any):
        import fastopt.torch as ft

        self.params = list(params)
        self.master = [p.detach().float().requires_grad_() for p in self.params]
        self.inner = ft.AdamW(self.master, **hyper)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def step(self) -> None:
        import torch

        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float()
        self.inner.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)  # rounds to nearest even


def _optimizer(variant: Variant, params: List[Any], hyper: Dict[str, Any]) -> Any:
    import torch

    import fastopt.torch as ft

    if variant.torch_optim:
        return torch.optim.AdamW(params, **hyper)
    if variant.peer == "bitsandbytes":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **hyper)
    if variant.peer == "torchao":
        import torchao.optim

        return torchao.optim.AdamW8bit(params, **hyper)
    if variant.master:
        return MasterWeights(params, **hyper)
    return ft.AdamW(params, **hyper, **variant.options)


def unavailable(variant: Variant) -> str:
    """Why fastopt.torch cannot run ``variant`` ('' when it can): its options are tried on a
    probe param (one that int8 state would quantize), constructed and stepped once; a peer's,
    whether it is installed."""
    if variant.peer:
        found = importlib.util.find_spec(variant.peer) is not None
        return "" if found else f"{variant.peer} is not installed"
    if variant.torch_optim or variant.master or not variant.options:
        return ""
    import torch

    import fastopt.torch as ft

    dtype = torch.bfloat16 if variant.bf16 else torch.float32
    probe = torch.nn.Parameter(torch.linspace(-1, 1, 8192, dtype=dtype))
    try:
        opt = ft.AdamW([probe], **variant.options)
        probe.grad = torch.linspace(1, -1, 8192, dtype=dtype)
        opt.step()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def state_bytes(opt: Any, params: Sequence[Any]) -> float:
    """The optimizer's state in bytes per param: every tensor in its state (a master copy
    included) but the step counts, a tensor shared by several entries (bitsandbytes'
    quantization maps) once, a tensor subclass (torchao's 8-bit state) by its parts."""
    import torch

    seen = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
        elif t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for m in getattr(opt, "master", []):
        add(m)
    for per_param in opt.state.values():
        for key, value in per_param.items():
            if key != "step" and isinstance(value, torch.Tensor):
                add(value)
    return total / sum(p.numel() for p in params)


# -- training ----------------------------------------------------------------------------------


def forward(model: Any, x: Any) -> Any:
    """The logits, computed in float32 from the params whatever their dtype: a bfloat16
    model's params and grads are bfloat16, its arithmetic that of a bfloat16 matmul that
    accumulates in float32 (a CPU without bfloat16 units runs torch's bfloat16 matmul
    ten times slower)."""
    import torch

    if next(model.parameters()).dtype == torch.float32:
        return model(x)
    params = {name: p.float() for name, p in model.named_parameters()}
    return torch.func.functional_call(model, params, (x,))


def train(task: Task, variant: Variant, data: List[Any], progress: Any) -> Result:
    import torch

    why = unavailable(variant)
    if why:
        return Result(task.name, variant, [], unavailable=why)
    dtype = torch.bfloat16 if variant.bf16 else torch.float32
    model = task.model(dtype, variant.seed)
    params = list(model.parameters())
    opt = _optimizer(variant, params, {"lr": task.lr, "weight_decay": task.weight_decay})
    losses: List[float] = []
    progress.start(task.name, variant.name)
    started = time.perf_counter()
    for t, (x, y) in enumerate(data):
        lr = task.lr * 0.5 * (1 + math.cos(math.pi * t / task.steps))  # cosine to 0
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # torchao's: set in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        loss = torch.nn.functional.cross_entropy(forward(model, x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress.step(t + 1, task.steps)
    seconds = time.perf_counter() - started
    progress.done()
    return Result(task.name, variant, losses, seconds, state_bytes(opt, params))


def run_task(task: Task, variants: Sequence[Variant], progress: Any) -> List[Result]:
    data = {seed: task.batches(task.steps, seed) for seed in {v.seed for v in variants}}
    return [train(task, v, data[v.seed], progress) for v in variants]


# -- report ------------------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    """One row per (task, variant): final loss, its reference, ratio, target, state, time."""
    finals = {(r.task, r.variant.name): r.final for r in results if r.losses}
    header = ["task", "variant", "final loss", "vs", "ratio", "target", "state B/param", "time"]
    cells = []
    for r in results:
        v = r.variant
        if not r.losses:
            cells.append([r.task, v.name, "-", v.reference or "", "-", "not available", "-", "-"])
            continue
        ratio, verdict = "", "reference" if v.reference is None else ""
        if v.reference is not None:
            ref = finals.get((r.task, v.reference))
            if ref is not None:
                ratio = f"{r.final / ref:.4f}"
                within = abs(r.final / ref - 1) <= TARGET
                if v.target:
                    verdict = f"{'pass' if within else 'FAIL'} (2%)"
        cells.append(
            [
                r.task,
                v.name,
                f"{r.final:.4f}",
                v.reference or "",
                ratio,
                verdict,
                f"{r.state_bytes_per_param:.2f}",
                f"{r.seconds:.1f} s",
            ]
        )
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    right = {2, 4, 6, 7}

    def line(c: List[str]) -> str:
        parts = [
            f"{s:>{w}}" if i in right else f"{s:<{w}}" for i, (s, w) in enumerate(zip(c, widths))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells)])


def plot(results: Sequence[Result], path: str) -> None:
    """Each task's loss curves (moving average over 1/50 of the run), one panel per task."""
    from ..demo import plot as draw
    from ..demo.common import Panel

    panels: Dict[str, Any] = {}
    for r in results:
        if not r.losses:
            continue
        panel = panels.setdefault(
            r.task, Panel(f"{r.task}: training loss", "step", "loss (moving average)")
        )
        width = max(1, len(r.losses) // 50)
        smooth = np.convolve(r.losses, np.ones(width) / width, mode="valid")
        steps = np.arange(width, len(r.losses) + 1)
        every = max(1, len(smooth) // 400)  # a few hundred points per curve
        panel.series[r.variant.name] = (steps[::every].tolist(), smooth[::every].tolist())
        panel.logy = panel.logy or smooth.max() > 10 * smooth.min()  # digits: 1 down to 0.005
    draw(
        list(panels.values()),
        path,
        title="fastopt: low-bit state and bfloat16 rounding vs float32",
        cols=len(panels),
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastopt.bench.convergence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps")
    parser.add_argument("--steps", type=int, help="steps per task (overrides --quick)")
    parser.add_argument("--tasks", default="digits,charlm", help="comma-separated: digits,charlm")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch's and fastopt's threads (default 1)"
    )
    parser.add_argument("--plot", metavar="PNG", help="loss curves (needs matplotlib)")
    args = parser.parse_args(argv)
    names = args.tasks.split(",")
    if any(n not in TASKS for n in names):
        parser.error(f"--tasks: expected names from {', '.join(TASKS)}, got {args.tasks!r}")
    if args.steps is not None and args.steps < TAIL:
        parser.error(f"--steps: at least {TAIL}")
    import torch

    import fastopt

    from ..demo.common import Progress

    torch.set_num_threads(args.threads)
    fastopt.set_num_threads(args.threads)
    progress = Progress()
    started = time.perf_counter()
    results: List[Result] = []
    descriptions = []
    for name in names:
        task = TASKS[name](args.steps)
        if args.steps is None and args.quick:
            task.steps //= 10
        descriptions.append(
            f"{task.name}: {task.describe}; AdamW lr {task.lr:g} (cosine to 0), "
            f"weight decay {task.weight_decay:g}, {task.steps} steps"
        )
        results += run_task(task, VARIANTS, progress)
    print(table(results))
    print()
    print("\n".join(descriptions))
    print(
        f"final loss: mean training loss over the last {100 // TAIL}% of the steps; "
        f"'bf16 fp32-master': float32 master copy kept by this harness "
        f"(fastopt.torch.AdamW on the copy, copied back rounded to nearest)"
    )
    for r in results:
        if r.unavailable:
            print(f"not available: {r.task} / {r.variant.name}: {r.unavailable}")
    info = fastopt.info()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"fastopt {info['version']}, torch {torch.__version__}, {info['cpu_model']}, "
        f"{args.threads} threads, Python {platform.python_version()}; "
        f"{time.perf_counter() - started:.0f} s, {when}"
    )
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
