"""The demo's stages: each a function ``stage(ctx) -> StageResult``, listed in ``STAGES``.

Every parameter update goes through fastopt: the functional steps (``fastopt.sgd_``), the
array-list optimizer classes (``fastopt.Adam(params).step(grads)``), ``fastopt.newton_``
for Newton, ``fastopt.schedules`` for learning-rate schedules, fastopt's int8 quantizers,
``fastopt.prune_magnitude`` with the optimizers' ``masks=``, and ``save_quantized`` /
``load_quantized``. The forward and backward passes are NumPy (``models``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import fastopt
from fastopt import schedules

from . import models
from .common import Context, Panel, Row, StageResult, Timer, batches, seconds_text

Stepper = Callable[[np.ndarray], None]  # gradient -> W updated in place

# Logistic regression: the objective every optimizer of stage 1 minimizes is the mean
# cross-entropy + LAMBDA/2 ||W||^2 (strictly convex: one optimum, which Newton finds).
LAMBDA = 1e-3
BATCH = 64
GAP_FLOOR = 1e-12  # gaps to the optimum are plotted on a log axis: 0 is drawn here


def _logreg_data(ctx: Context) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = ctx.data
    return models.with_bias(d.x_train), d.y_train, models.with_bias(d.x_test), d.y_test


def _logreg_zeros(ctx: Context) -> np.ndarray:
    return np.zeros((ctx.data.classes, ctx.data.x_train.shape[1] + 1))


def _newton(
    w: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    lam: float,
    max_steps: int,
    *,
    tol: float = 1e-10,
    on_step: Optional[Callable[[int, Timer], None]] = None,
) -> Tuple[int, Timer]:
    """Damped Newton with ``fastopt.newton_`` (Levenberg-Marquardt damping: lowered after a
    step that decreases the loss, raised and the step undone after one that does not),
    until the gradient's norm is below ``tol``; returns (steps taken, time)."""
    timer = Timer()
    flat = w.reshape(-1)  # a view: newton_ updates w in place
    damping = 1e-3
    loss = models.logreg_loss(w, x, y, lam)
    steps = 0
    for step in range(1, max_steps + 1):
        with timer:
            grad = models.logreg_grad(w, x, y, lam)
            if np.linalg.norm(grad) < tol:
                break
            before = flat.copy()
            fastopt.newton_(
                flat, grad.reshape(-1), models.logreg_hessian(w, x, lam), damping=damping
            )
            new_loss = models.logreg_loss(w, x, y, lam)
            if new_loss <= loss:
                loss, damping = new_loss, damping / 10
            else:
                flat[:] = before
                damping *= 10
        steps = step
        if on_step is not None:
            on_step(step, timer)
    return steps, timer


def _class_stepper(make: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Stepper]:
    """A stepper from an optimizer class (``make(W)`` builds it; it owns its state)."""

    def build(w: np.ndarray) -> Stepper:
        opt = make(w)
        return lambda grad: opt.step(grad)

    return build


def _lion(w: np.ndarray, lr: float) -> Stepper:
    """The functional step with state the caller owns (its momentum, zero at the start)."""
    exp_avg = np.zeros_like(w)
    return lambda grad: fastopt.lion_(w, grad, exp_avg, lr=lr)


# name -> (full batch?, how to build its stepper, notes): the functional steps for plain SGD
# (no state) and Lion (state held here), the classes for the rest. Learning rates: at or
# near the best of a sweep in steps of about 3x; momentum's lr / (1 - momentum) is plain
# SGD's.
OPTIMIZERS: Dict[str, Tuple[bool, Callable[[np.ndarray], Stepper], str]] = {
    "batch GD": (True, lambda w: lambda g: fastopt.sgd_(w, g, lr=2.0), "sgd_ lr=2, full batch"),
    "mini-batch SGD": (
        False,
        lambda w: lambda g: fastopt.sgd_(w, g, lr=1.0),
        "sgd_ lr=1, batch 64",
    ),
    "SGD momentum": (
        False,
        _class_stepper(lambda w: fastopt.SGD(w, lr=0.1, momentum=0.9)),
        "SGD lr=0.1 momentum=0.9",
    ),
    "SGD Nesterov": (
        False,
        _class_stepper(lambda w: fastopt.SGD(w, lr=0.1, momentum=0.9, nesterov=True)),
        "SGD lr=0.1 momentum=0.9 nesterov",
    ),
    "Adagrad": (False, _class_stepper(lambda w: fastopt.Adagrad(w, lr=0.3)), "Adagrad lr=0.3"),
    "RMSprop": (False, _class_stepper(lambda w: fastopt.RMSprop(w, lr=0.01)), "RMSprop lr=0.01"),
    "Adam": (False, _class_stepper(lambda w: fastopt.Adam(w, lr=0.01)), "Adam lr=0.01"),
    "AdamW": (
        False,
        _class_stepper(lambda w: fastopt.AdamW(w, lr=0.01, weight_decay=1e-2)),
        "AdamW lr=0.01 wd=1e-2 (decoupled)",
    ),
    "Lion": (False, lambda w: _lion(w, lr=3e-3), "lion_ lr=3e-3"),
}


def _newton_run(ctx: Context) -> Dict[str, Any]:
    """Damped Newton from W = 0 to a gradient norm of 1e-10: the optimum every other method
    is measured against (run once)."""
    x, y, _, _ = _logreg_data(ctx)
    w = _logreg_zeros(ctx)
    losses = [models.logreg_loss(w, x, y, LAMBDA)]
    times = [0.0]

    def on_step(step: int, timer: Timer) -> None:
        losses.append(models.logreg_loss(w, x, y, LAMBDA))
        times.append(timer.seconds)
        ctx.progress.step(step, step)

    ctx.progress.start("optimizers", "damped Newton")
    steps, timer = _newton(w, x, y, LAMBDA, 30, on_step=on_step)
    return {"w": w, "steps": steps, "seconds": timer.seconds, "losses": losses, "times": times}


def stage_optimizers(ctx: Context) -> StageResult:
    """Every optimizer on the same strictly convex objective from W = 0: the gap to the
    optimum (found by Newton) against steps and against training time, and test accuracy."""
    stage = "optimizers"
    x, y, _, _ = _logreg_data(ctx)
    newton = ctx.shared("newton", lambda: _newton_run(ctx))
    best = newton["losses"][-1]
    steps = ctx.pick(300, 1000)
    every = 10
    order = batches(ctx.rng(1), len(y), BATCH, steps)
    rows: List[Row] = []
    by_step: Dict[str, Tuple[List[float], List[float]]] = {}
    by_time: Dict[str, Tuple[List[float], List[float]]] = {}

    def curve(name: str, ts: List[float], seconds: List[float], losses: List[float]) -> None:
        gaps = [max(loss - best, GAP_FLOOR) for loss in losses]  # log axis: 0 is off it
        by_step[name] = (ts, gaps)
        by_time[name] = (seconds[1:], gaps[1:])  # log time axis: from the first step on

    for name, (full_batch, build, notes) in OPTIMIZERS.items():
        ctx.progress.start(stage, name)
        w = _logreg_zeros(ctx)
        stepper = build(w)
        timer = Timer()
        ts, seconds, losses = [0.0], [0.0], [models.logreg_loss(w, x, y, LAMBDA)]
        for t in range(1, steps + 1):
            with timer:
                idx = slice(None) if full_batch else order[t - 1]
                stepper(models.logreg_grad(w, x[idx], y[idx], LAMBDA))
            if t % every == 0 or t == steps:
                ts.append(t)
                seconds.append(timer.seconds)
                losses.append(models.logreg_loss(w, x, y, LAMBDA))
                ctx.progress.step(t, steps)
        curve(name, ts, seconds, losses)
        rows.append(_logreg_row(stage, name, w, ctx, timer.seconds, notes, best))

    name = "damped Newton"
    w = newton["w"]
    curve(name, list(map(float, range(len(newton["losses"])))), newton["times"], newton["losses"])
    grad_norm = float(np.linalg.norm(models.logreg_grad(w, x, y, LAMBDA)))
    n = w.size
    notes = f"newton_ ({n}x{n} Cholesky): {newton['steps']} steps to |grad| {grad_norm:.0e}"
    rows.append(
        _logreg_row(
            stage,
            name,
            w,
            ctx,
            newton["seconds"],
            notes,
            best,
            newton_steps=newton["steps"],
            grad_norm=grad_norm,
        )
    )
    ctx.progress.done()
    return StageResult(
        rows,
        [
            Panel(
                "Logistic regression: loss against steps", "step", "loss - optimum", by_step, True
            ),
            Panel(
                "Logistic regression: loss against time",
                "seconds",
                "loss - optimum",
                by_time,
                logy=True,
                logx=True,
            ),
        ],
        {"optimum_loss": best, "lambda": LAMBDA, "steps": steps, "batch_size": BATCH},
    )


def _logreg_row(
    stage: str,
    name: str,
    w: np.ndarray,
    ctx: Context,
    seconds: float,
    notes: str,
    best: Optional[float] = None,
    lam: float = LAMBDA,
    **extra: Any,
) -> Row:
    """A row for logistic regression weights ``w``: the training objective (with ``lam``),
    test accuracy, and in the JSON the gap to ``best`` and the training accuracy."""
    x, y, x_test, y_test = _logreg_data(ctx)
    loss = models.logreg_loss(w, x, y, lam)
    if best is not None:
        extra["gap"] = loss - best
    extra["train_accuracy"] = models.accuracy(x @ w.T, y)
    return Row(stage, name, loss, models.accuracy(x_test @ w.T, y_test), seconds, notes, extra)


# -- schedules, L1 vs L2 ------------------------------------------------------------------


def _sgd_logreg(
    ctx: Context,
    steps: int,
    lam: float,
    rows_of: Optional[np.ndarray] = None,
    *,
    every: int = 0,
    **hyper: Any,
) -> Tuple[np.ndarray, float, List[float], List[float]]:
    """Mini-batch ``fastopt.SGD(W, **hyper)`` on logistic regression (objective with
    ``lam``) over the training rows ``rows_of`` (all by default): (W, training time, and
    every ``every`` steps the step and the full objective)."""
    x, y, _, _ = _logreg_data(ctx)
    if rows_of is not None:
        x, y = x[rows_of], y[rows_of]
    w = _logreg_zeros(ctx)
    opt = fastopt.SGD(w, **hyper)
    timer = Timer()
    ts: List[float] = []
    losses: List[float] = []
    for t, idx in enumerate(batches(ctx.rng(2), len(y), BATCH, steps), start=1):
        with timer:
            opt.step(models.logreg_grad(w, x[idx], y[idx], lam))
        if every and (t % every == 0 or t == 1):
            ts.append(t)
            losses.append(models.logreg_loss(w, x, y, lam))
            ctx.progress.step(t, steps)
    return w, timer.seconds, ts, losses


def stage_schedules(ctx: Context) -> StageResult:
    """Mini-batch SGD at a base lr of 2 (too high to settle at a constant rate) under each
    ``fastopt.schedules`` schedule, passed as the optimizer's ``schedule=``."""
    stage = "schedules"
    steps = ctx.pick(300, 1000)
    best = ctx.shared("newton", lambda: _newton_run(ctx))["losses"][-1]
    warmup = steps // 10
    chosen: Dict[str, Tuple[Optional[schedules.Schedule], str]] = {
        "constant": (None, "lr=2"),
        "step": (schedules.StepDecay(steps // 3, gamma=0.3), f"x0.3 every {steps // 3} steps"),
        "inverse-time": (schedules.InverseTime(9.0, steps), "lr/(1 + 9 t/T)"),
        "cosine": (schedules.Cosine(steps), "to 0 at T"),
        "warmup + cosine": (
            schedules.LinearWarmup(warmup, schedules.Cosine(steps - warmup)),
            f"{warmup} warmup steps",
        ),
    }
    rows: List[Row] = []
    lr_curves: Dict[str, Tuple[List[float], List[float]]] = {}
    gap_curves: Dict[str, Tuple[List[float], List[float]]] = {}
    for name, (schedule, notes) in chosen.items():
        ctx.progress.start(stage, name)
        lr_curves[name] = (
            list(map(float, range(steps))),
            [2.0 if schedule is None else schedule(t, 2.0) for t in range(steps)],
        )
        w, seconds, ts, losses = _sgd_logreg(
            ctx, steps, LAMBDA, every=10, lr=2.0, schedule=schedule
        )
        gap_curves[name] = (ts, [max(loss - best, GAP_FLOOR) for loss in losses])
        rows.append(_logreg_row(stage, name, w, ctx, seconds, "SGD, " + notes, best))
    ctx.progress.done()
    return StageResult(
        rows,
        [
            Panel("Learning-rate schedules (fastopt.schedules)", "step", "lr", lr_curves),
            Panel("SGD under each schedule", "step", "loss - optimum", gap_curves, True),
        ],
    )


def stage_regularization(ctx: Context) -> StageResult:
    """L2 (``weight_decay``) against L1 (``l1``: fastopt's proximal soft-threshold after each
    step, which sets weights to exactly 0) on unregularized cross-entropy."""
    stage = "L1 vs L2"
    steps = ctx.pick(300, 1000)
    strengths = ctx.pick([1e-3, 1e-2], [1e-4, 1e-3, 3e-3, 1e-2])
    runs: List[Tuple[str, Dict[str, Any]]] = [("none", {})]
    runs += [(f"L2 {s:g}", {"weight_decay": s}) for s in strengths]
    runs += [(f"L1 {s:g}", {"l1": s}) for s in strengths]
    rows: List[Row] = []
    zeros_by: Dict[str, Tuple[List[float], List[float]]] = {"L2": ([], []), "L1": ([], [])}
    accuracy_by: Dict[str, Tuple[List[float], List[float]]] = {"L2": ([], []), "L1": ([], [])}
    for name, hyper in runs:
        ctx.progress.start(stage, name)
        w, seconds, _, _ = _sgd_logreg(ctx, steps, 0.0, lr=0.5, **hyper)
        zeros = float(np.mean(w[:, :-1] == 0))  # weights, not biases
        row = _logreg_row(
            stage, name, w, ctx, seconds, f"SGD lr=0.5; {zeros:.0%} of weights are 0", lam=0.0
        )
        row.extra["zero_fraction"] = zeros
        row.extra["l1_norm"] = float(np.abs(w[:, :-1]).sum())
        rows.append(row)
        if hyper:
            kind, strength = name.split()
            zeros_by[kind][0].append(float(strength))
            zeros_by[kind][1].append(zeros)
            accuracy_by[kind][0].append(float(strength))
            accuracy_by[kind][1].append(row.accuracy)
    ctx.progress.done()
    blank = float(np.mean(ctx.data.x_train.std(axis=0) == 0))
    return StageResult(
        rows,
        [
            Panel("L1 vs L2: sparsity", "strength", "fraction of weights = 0", zeros_by, logx=True),
            Panel("L1 vs L2: accuracy", "strength", "test accuracy", accuracy_by, logx=True),
        ],
        {"blank_pixel_fraction": blank, "note": "loss is the unregularized cross-entropy"},
    )


# -- cross-validation -----------------------------------------------------------------------


def stage_cross_validation(ctx: Context) -> StageResult:
    """5-fold stratified cross-validation on the training set over a grid of learning rates
    and regularizers (mini-batch SGD, momentum 0.9); the best mean validation accuracy
    (ties: lower validation loss) is refitted on the whole training set and tested."""
    from sklearn.model_selection import StratifiedKFold

    stage = "cross-validation"
    steps = ctx.pick(150, 400)
    lrs = ctx.pick([0.01, 0.03, 0.1], [0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    regs: Dict[str, Dict[str, Any]] = ctx.pick(
        {"none": {}, "L2 1e-2": {"weight_decay": 1e-2}, "L1 1e-3": {"l1": 1e-3}},
        {
            "none": {},
            "L2 1e-3": {"weight_decay": 1e-3},
            "L2 1e-2": {"weight_decay": 1e-2},
            "L1 1e-4": {"l1": 1e-4},
            "L1 1e-3": {"l1": 1e-3},
        },
    )
    x, y, _, _ = _logreg_data(ctx)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
    accuracy = np.zeros((len(regs), len(lrs)))
    loss = np.zeros_like(accuracy)
    timer = Timer()
    for i, (reg, hyper) in enumerate(regs.items()):
        for j, lr in enumerate(lrs):
            ctx.progress.start(stage, f"lr={lr:g} {reg}")
            for train, valid in folds:
                with timer:
                    w, _, _, _ = _sgd_logreg(ctx, steps, 0.0, train, lr=lr, momentum=0.9, **hyper)
                accuracy[i, j] += models.accuracy(x[valid] @ w.T, y[valid]) / len(folds)
                loss[i, j] += models.cross_entropy(x[valid] @ w.T, y[valid]) / len(folds)
    i, j = min(np.ndindex(*accuracy.shape), key=lambda ij: (-accuracy[ij], loss[ij]))
    reg, lr = list(regs)[i], lrs[j]
    ctx.progress.start(stage, f"refit lr={lr:g} {reg}")
    w, seconds, _, _ = _sgd_logreg(ctx, steps, 0.0, lr=lr, momentum=0.9, **regs[reg])
    ctx.progress.done()
    notes = (
        f"best of {accuracy.size} by 5-fold CV (accuracy {accuracy[i, j]:.4f}), "
        f"refit; CV took {seconds_text(timer.seconds)}"
    )
    row = _logreg_row(stage, f"lr={lr:g}, {reg}", w, ctx, seconds, notes, lam=0.0)
    row.extra.update(cv_accuracy=float(accuracy[i, j]), cv_loss=float(loss[i, j]))
    worst = np.unravel_index(int(np.argmin(accuracy)), accuracy.shape)
    return StageResult(
        [row],
        [
            Panel(
                "5-fold CV: mean validation accuracy",
                "learning rate",
                "regularization",
                grid=([f"{v:g}" for v in lrs], list(regs), accuracy.tolist()),
            )
        ],
        {
            "learning_rates": lrs,
            "regularizers": list(regs),
            "cv_accuracy": accuracy.tolist(),
            "cv_loss": loss.tolist(),
            "chosen": {"lr": lr, "regularizer": reg},
            "worst": {"lr": lrs[worst[1]], "regularizer": list(regs)[worst[0]]},
            "cv_seconds": timer.seconds,
        },
    )


# -- MLP, distillation -----------------------------------------------------------------------

TEACHER = (64, 256, 10)
STUDENT = (64, 16, 10)


def _train_mlp(
    ctx: Context,
    label: Tuple[str, str],
    params: List[np.ndarray],
    epochs: int,
    seed: int,
    dlogits: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    lr: float = 3e-3,
    masks: Optional[List[np.ndarray]] = None,
) -> Tuple[List[np.ndarray], float, List[float]]:
    """Trains the float32 MLP ``params`` in place with ``fastopt.AdamW`` (weight decay 0.1,
    cosine schedule, ``masks=`` passed on) on mini-batches; ``dlogits(logits, batch
    indices)`` is the loss's gradient. Returns (params, training time, test accuracy after
    each epoch)."""
    x = ctx.data.x_train.astype(np.float32)
    per_epoch = len(x) // BATCH
    steps = epochs * per_epoch
    opt = fastopt.AdamW(
        params, lr=lr, weight_decay=0.1, schedule=schedules.Cosine(steps), masks=masks
    )
    timer = Timer()
    curve: List[float] = []
    ctx.progress.start(*label)
    for t, idx in enumerate(batches(ctx.rng(seed + 100), len(x), BATCH, steps), start=1):
        with timer:
            logits, inputs = models.mlp_forward(params, x[idx])
            grads = models.mlp_backward(params, inputs, dlogits(logits, idx).astype(np.float32))
            opt.step(grads)
        if t % per_epoch == 0:
            curve.append(_mlp_eval(ctx, params)[1])
            ctx.progress.step(t, steps)
    return params, timer.seconds, curve


def _mlp(ctx: Context, sizes: Sequence[int], seed: int) -> List[np.ndarray]:
    """Fresh float32 MLP params (seeded)."""
    return models.mlp_init(ctx.rng(seed), sizes, np.float32)


def _mlp_eval(ctx: Context, params: Sequence[np.ndarray]) -> Tuple[float, float]:
    """(test cross-entropy, test accuracy)."""
    logits, _ = models.mlp_forward(params, ctx.data.x_test.astype(np.float32))
    return models.cross_entropy(logits, ctx.data.y_test), models.accuracy(logits, ctx.data.y_test)


def _teacher(ctx: Context) -> Tuple[List[np.ndarray], float, List[float]]:
    y = ctx.data.y_train
    return _train_mlp(
        ctx,
        ("MLP", "teacher"),
        _mlp(ctx, TEACHER, 10),
        ctx.pick(30, 60),
        10,
        lambda logits, idx: models.ce_dlogits(logits, y[idx]),
    )


def stage_mlp(ctx: Context) -> StageResult:
    """An MLP trained with AdamW (the teacher), and a smaller student trained on the labels
    alone or distilled from the teacher's soft targets (temperature 4, half the loss), from
    the same initializations: several seeds, since the difference is a few test images."""
    stage = "MLP"
    y = ctx.data.y_train
    epochs = ctx.pick(30, 60)
    seeds = range(20, 20 + ctx.pick(2, 5))
    temperature, alpha = 4.0, 0.5
    teacher, teacher_seconds, teacher_curve = ctx.shared("teacher", lambda: _teacher(ctx))
    soft, _ = models.mlp_forward(teacher, ctx.data.x_train.astype(np.float32))
    losses: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "student alone": lambda logits, idx: models.ce_dlogits(logits, y[idx]),
        "student distilled": lambda logits, idx: models.distill_dlogits(
            logits, soft[idx], y[idx], temperature, alpha
        ),
    }
    rows = [
        _mlp_row(
            ctx,
            stage,
            "teacher (AdamW)",
            [teacher],
            teacher_seconds,
            f"{TEACHER}, {_count(teacher)} params",
        )
    ]
    xs = list(map(float, range(1, epochs + 1)))
    curves = {"teacher": (xs, teacher_curve)}
    for name, dlogits in losses.items():
        students: List[List[np.ndarray]] = []
        seconds = 0.0
        for seed in seeds:
            params, spent, curve = _train_mlp(
                ctx,
                (stage, f"{name}, seed {seed}"),
                _mlp(ctx, STUDENT, seed),
                epochs,
                seed,
                dlogits,
            )
            students.append(params)
            seconds += spent
            if seed == seeds[0]:
                curves[f"{name} (seed {seed})"] = (xs, curve)
        notes = (
            f"{STUDENT}, {_count(students[0])} params"
            if name == "student alone"
            else f"soft targets T={temperature:g}, alpha={alpha:g}"
        )
        rows.append(_mlp_row(ctx, stage, name, students, seconds / len(seeds), notes))
    ctx.progress.done()
    return StageResult(
        rows,
        [Panel("MLP (AdamW): test accuracy per epoch", "epoch", "test accuracy", curves)],
        {
            "epochs": epochs,
            "seeds": list(seeds),
            "temperature": temperature,
            "alpha": alpha,
            "params": {"teacher": _count(teacher), "student": _count(students[0])},
        },
    )


def _count(params: Sequence[np.ndarray]) -> int:
    return sum(int(p.size) for p in params)


def _mlp_row(
    ctx: Context,
    stage: str,
    name: str,
    models_: Sequence[Sequence[np.ndarray]],
    seconds: float,
    notes: str,
) -> Row:
    """A row for one model, or for several trained alike (mean test loss and accuracy; the
    spread in the notes and every accuracy in the JSON)."""
    results = np.array([_mlp_eval(ctx, params) for params in models_])
    loss, acc = results.mean(axis=0)
    extra: Dict[str, Any] = {}
    if len(models_) > 1:
        notes += f"; mean of {len(models_)} seeds, accuracy sd {results[:, 1].std():.4f}"
        extra["accuracies"] = results[:, 1].tolist()
    return Row(stage, name, float(loss), float(acc), seconds, notes, extra)


# -- int8 ------------------------------------------------------------------------------------


BLOCK = 64
Quantizer = Callable[[np.ndarray], Tuple[np.ndarray, int]]  # w -> (w through int8, bytes)


def _int8_per_channel(w: np.ndarray) -> Tuple[np.ndarray, int]:
    """(w through int8 and back, the bytes int8 takes: values, a scale and zero point per
    output row)."""
    scales, zero_points = fastopt.choose_qparams(w, symmetric=True, axis=0)
    q = fastopt.quantize_per_channel(w, scales, zero_points, 0)
    restored = fastopt.dequantize(q, scales, zero_points, axis=0)
    return restored, q.nbytes + scales.nbytes + zero_points.nbytes


def _int8_blockwise(w: np.ndarray) -> Tuple[np.ndarray, int]:
    """(w through int8 and back, the bytes: values and a float32 absmax per BLOCK)."""
    q, absmax = fastopt.quantize_blockwise(w, block_size=BLOCK)
    return fastopt.dequantize_blockwise(q, absmax, block_size=BLOCK), q.nbytes + absmax.nbytes


QUANTIZERS: Dict[str, Tuple[Quantizer, str]] = {
    "int8 per-channel": (_int8_per_channel, "a scale and zero point per row"),
    f"int8 blockwise {BLOCK}": (_int8_blockwise, f"an absmax per {BLOCK} weights"),
}


def stage_int8(ctx: Context) -> StageResult:
    """The teacher's weight matrices in int8 (``QUANTIZERS``; biases stay float32): test
    accuracy of the model with the weights dequantized, and the bytes it takes."""
    stage = "int8"
    teacher, _, _ = ctx.shared("teacher", lambda: _teacher(ctx))
    float_bytes = sum(p.nbytes for p in teacher)
    loss, acc = _mlp_eval(ctx, teacher)
    rows = [
        Row(
            stage, "float32", loss, acc, 0.0, f"{float_bytes / 1024:.1f} KB", {"bytes": float_bytes}
        )
    ]
    sizes = {f"float32\nacc {acc:.4f}": float_bytes / 1024}
    for name, (quantize, how) in QUANTIZERS.items():
        params = list(teacher)
        nbytes = sum(b.nbytes for b in teacher[1::2])
        timer = Timer()
        with timer:
            for i in range(0, len(params), 2):
                params[i], weight_bytes = quantize(teacher[i])
                nbytes += weight_bytes
        error = max(float(np.max(np.abs(params[i] - teacher[i]))) for i in range(0, len(params), 2))
        loss, acc = _mlp_eval(ctx, params)
        notes = f"{nbytes / 1024:.1f} KB, {float_bytes / nbytes:.2f}x smaller; {how}; "
        notes += f"max |error| {error:.1e}"
        rows.append(
            Row(
                stage,
                name,
                loss,
                acc,
                timer.seconds,
                notes,
                {"bytes": nbytes, "max_abs_error": error},
            )
        )
        sizes[f"{name}\nacc {acc:.4f}"] = nbytes / 1024
    return StageResult(rows, [Panel("Teacher MLP weights: float32 vs int8", "", "KB", bars=sizes)])


# -- pruning -----------------------------------------------------------------------------------

# name -> prune_magnitude's keywords. Per tensor, each matrix loses the same fraction;
# with one global threshold the output layer (smaller weights) loses far more.
PRUNINGS: Dict[str, Dict[str, Any]] = {
    **{f"per-tensor {s:.0%}": {"sparsity": s, "scope": "per_tensor"} for s in (0.5, 0.7, 0.9)},
    **{f"global {s:.0%}": {"sparsity": s, "scope": "global"} for s in (0.5, 0.7, 0.9)},
    "2:4": {"pattern": "2:4"},
}


def stage_pruning(ctx: Context) -> StageResult:
    """The teacher's weight matrices pruned by magnitude with ``fastopt.prune_magnitude``
    (``PRUNINGS``; biases are kept), then fine-tuned by AdamW with ``masks=``, which holds
    the pruned weights at exactly 0."""
    stage = "pruning"
    teacher, _, _ = ctx.shared("teacher", lambda: _teacher(ctx))
    y = ctx.data.y_train
    epochs = ctx.pick(5, 10)
    rows: List[Row] = []
    curves: Dict[str, Tuple[List[float], List[float]]] = {}
    for name, how in PRUNINGS.items():
        timer = Timer()
        with timer:
            weight_masks = fastopt.prune_magnitude(teacher[0::2], **how)
        masks = [np.ones(p.shape, dtype=bool) for p in teacher]
        masks[0::2] = weight_masks
        params = [p * m for p, m in zip(teacher, masks)]
        _, pruned_accuracy = _mlp_eval(ctx, params)
        params, seconds, _ = _train_mlp(
            ctx,
            (stage, name),
            params,
            epochs,
            30,
            lambda logits, idx: models.ce_dlogits(logits, y[idx]),
            lr=1e-2,
            masks=masks,
        )
        kept = [float(m.mean()) for m in weight_masks]
        weights = sum(m.size for m in weight_masks)
        pruned = weights - sum(int(m.sum()) for m in weight_masks)
        sparsity = pruned / weights
        held = all(bool(np.all(p[~m] == 0)) for p, m in zip(params, masks))
        loss, accuracy = _mlp_eval(ctx, params)
        notes = (
            f"{pruned_accuracy:.4f} before fine-tuning; layers keep "
            + " / ".join(f"{k:.1%}" for k in kept)
            + f"; zeros held: {held}"
        )
        extra = {
            "sparsity": sparsity,
            "pruned": pruned,
            "weights": weights,
            "kept_per_layer": kept,
            "zeros_held": held,
            "accuracy_pruned": pruned_accuracy,
            "mask_seconds": timer.seconds,
        }
        rows.append(Row(stage, name, loss, accuracy, seconds, notes, extra))
        kind = name.rsplit(" ", 1)[0] if "sparsity" in how else name
        for series, value in (
            (f"{kind}, pruned", pruned_accuracy),
            (f"{kind}, fine-tuned", accuracy),
        ):
            curves.setdefault(series, ([], []))
            curves[series][0].append(sparsity)
            curves[series][1].append(value)
    ctx.progress.done()
    return StageResult(
        rows,
        [
            Panel(
                f"Pruning, then {epochs} epochs of masked AdamW",
                "sparsity",
                "test accuracy",
                curves,
            )
        ],
        {"epochs": epochs, "fine_tune_lr": 1e-2},
    )


# -- the quantized model file -------------------------------------------------------------------


def stage_model_file(ctx: Context) -> StageResult:
    """The teacher written with ``fastopt.save_quantized`` (a safetensors file: int8 weight
    matrices with their scales; the biases, under 1024 elements, as they are) and read back
    with ``fastopt.load_quantized``: test accuracy and file size against the float32 file
    (the same call storing every tensor as it is). The loaded weights must be the int8
    stage's in-memory round trip, bit for bit."""
    stage = "model file"
    teacher, _, _ = ctx.shared("teacher", lambda: _teacher(ctx))
    names = [f"{i // 2}.{'bias' if i % 2 else 'weight'}" for i in range(len(teacher))]
    tensors = dict(zip(names, teacher))
    files: Dict[str, Tuple[Dict[str, Any], Optional[Quantizer]]] = {
        "float32": ({"skip": names}, None),
        "int8 per-channel": ({"scheme": "per_channel"}, _int8_per_channel),
        f"int8 blockwise {BLOCK}": ({"scheme": "blockwise", "block_size": BLOCK}, _int8_blockwise),
    }
    rows: List[Row] = []
    sizes: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (options, in_memory) in files.items():
            path = os.path.join(tmp, name.replace(" ", "_") + ".safetensors")
            timer = Timer()
            with timer:
                fastopt.save_quantized(path, tensors, **options)
                loaded = fastopt.load_quantized(path, out_dtype="float32")
            params = [loaded[n] for n in names]
            size = os.path.getsize(path)
            exact = in_memory is None or all(
                np.array_equal(params[i], in_memory(teacher[i])[0])
                for i in range(0, len(params), 2)
            )
            loss, accuracy = _mlp_eval(ctx, params)
            notes = f"{size / 1024:.1f} KB file"
            if in_memory is not None:
                notes += (
                    f", {sizes['float32'] * 1024 / size:.2f}x smaller; same as in memory: {exact}"
                )
            rows.append(
                Row(
                    stage,
                    name,
                    loss,
                    accuracy,
                    timer.seconds,
                    notes,
                    {"bytes": size, "exact": exact},
                )
            )
            sizes[name] = size / 1024
    return StageResult(
        rows,
        [
            Panel(
                "save_quantized -> load_quantized: file size",
                "",
                "KB",
                bars={f"{r.method}\nacc {r.accuracy:.4f}": sizes[r.method] for r in rows},
            )
        ],
    )


# The stages in the order they run (named as in the table's first column); a stage is a
# function of the run's context.
STAGES: List[Tuple[str, Callable[[Context], StageResult]]] = [
    ("optimizers", stage_optimizers),
    ("schedules", stage_schedules),
    ("L1 vs L2", stage_regularization),
    ("cross-validation", stage_cross_validation),
    ("MLP", stage_mlp),
    ("int8", stage_int8),
    ("pruning", stage_pruning),
    ("model file", stage_model_file),
]
