"""`python -m fastopt demo --quick` runs end to end and its results hold what the demo
claims: Newton reaches the optimum in a few steps and no optimizer passes it, decaying
schedules end below a constant rate, L1 zeroes weights and L2 does not, cross-validation
picks its best cell, distillation keeps the student's accuracy, int8 keeps float32's.
The models' gradients and Hessian are checked against finite differences."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastopt.demo import models
from fastopt.demo.common import Context, Digits, Progress
from fastopt.demo.stages import OPTIMIZERS, PRUNINGS, STAGES, stage_regularization


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out, png = tmp / "demo.json", tmp / "demo.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastopt",
            "demo",
            "--quick",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text()), png


def _rows(report, stage):
    rows = {r["method"]: r for r in report["rows"] if r["stage"] == stage}
    assert rows, f"no rows for stage {stage!r}"
    return rows


def test_report_table_plot_and_progress(quick_run):
    proc, report, png = quick_run
    assert report["quick"] is True and report["seconds"] > 0
    assert report["data"] == {"name": "digits", "train": 1437, "test": 360}
    assert "version" in report["machine"]
    assert list(report["stages"]) == [name for name, _ in STAGES]
    assert [r["stage"] for r in report["rows"]] == sorted(
        (r["stage"] for r in report["rows"]), key=list(report["stages"]).index
    )  # the table's stages are the table of stages, in order
    for row in report["rows"]:
        assert set(row) == {"stage", "method", "loss", "accuracy", "seconds", "notes", "extra"}
        assert np.isfinite(row["loss"]) and 0 <= row["accuracy"] <= 1 and row["seconds"] >= 0
        assert row["stage"] in proc.stdout and row["method"] in proc.stdout
    for stage in report["stages"].values():
        for panel in stage["panels"]:
            for xs, ys in panel["series"].values():
                assert len(xs) == len(ys) > 0
    assert "final loss" in proc.stdout and "accuracy" in proc.stdout
    assert "[optimizers] damped Newton" in proc.stderr  # progress: on stderr only
    assert "[optimizers]" not in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000


def test_newton_finds_the_optimum_no_optimizer_passes(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "optimizers")
    assert set(rows) == {*OPTIMIZERS, "damped Newton"}
    newton = rows.pop("damped Newton")
    assert newton["extra"]["newton_steps"] <= 12 and newton["extra"]["grad_norm"] < 1e-8
    assert abs(newton["extra"]["gap"]) < 1e-15  # it is the optimum the others are measured by
    assert newton["accuracy"] > 0.95
    for name, row in rows.items():
        assert row["extra"]["gap"] > 0, name  # first order in a few hundred steps: not there
        assert row["extra"]["gap"] < 0.1, name  # ... but close: every lr is sane
        assert row["accuracy"] > 0.9, name
    # Steps against loss: Newton's curve ends at the floor, in as many points as steps + 1.
    curve = report["stages"]["optimizers"]["panels"][0]["series"]["damped Newton"]
    assert len(curve[0]) == newton["extra"]["newton_steps"] + 1 and curve[1][-1] <= 1e-12


def test_schedules_decay_below_constant(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "schedules")
    assert set(rows) == {"constant", "step", "inverse-time", "cosine", "warmup + cosine"}
    for name in ("step", "cosine", "warmup + cosine"):  # to a small lr: the noise settles
        assert rows[name]["loss"] < rows["constant"]["loss"], name
    assert all(r["accuracy"] > 0.9 for r in rows.values())
    lr = report["stages"]["schedules"]["panels"][0]["series"]
    assert lr["constant"][1] == [2.0] * len(lr["constant"][1])
    assert lr["cosine"][1][0] == 2.0 and lr["cosine"][1][-1] < 0.01
    assert lr["warmup + cosine"][1][0] < 0.2


def test_l1_makes_zeros_l2_does_not(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "L1 vs L2")
    base = rows.pop("none")["extra"]["zero_fraction"]
    blank = report["stages"]["L1 vs L2"]["extra"]["blank_pixel_fraction"]
    assert base == pytest.approx(blank)  # only pixels never lit in training stay 0
    l1 = sorted((float(k.split()[1]), r) for k, r in rows.items() if k.startswith("L1"))
    l2 = [r for k, r in rows.items() if k.startswith("L2")]
    assert len(l1) >= 2 and l2
    assert all(r["extra"]["zero_fraction"] == base for r in l2)
    fractions = [r["extra"]["zero_fraction"] for _, r in l1]
    assert base < fractions[0] < fractions[-1] and fractions[-1] > 0.3
    assert all(r["accuracy"] > 0.9 for r in rows.values())


def test_cross_validation_picks_its_best_cell(quick_run):
    _, report, _ = quick_run
    (row,) = _rows(report, "cross-validation").values()
    cv = report["stages"]["cross-validation"]["extra"]
    grid = np.array(cv["cv_accuracy"])
    assert grid.shape == (len(cv["regularizers"]), len(cv["learning_rates"]))
    assert row["extra"]["cv_accuracy"] == grid.max()
    chosen = cv["chosen"]
    i, j = cv["regularizers"].index(chosen["regularizer"]), cv["learning_rates"].index(chosen["lr"])
    assert grid[i, j] == grid.max() and grid.max() > grid.min()
    assert row["accuracy"] > 0.9


def test_mlp_and_distillation(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "MLP")
    teacher, alone, distilled = (
        rows["teacher (AdamW)"],
        rows["student alone"],
        rows["student distilled"],
    )
    seeds = report["stages"]["MLP"]["extra"]["seeds"]
    assert len(seeds) >= 2
    for row in (alone, distilled):  # the mean over the seeds, each one in the JSON
        assert len(row["extra"]["accuracies"]) == len(seeds)
        assert row["accuracy"] == pytest.approx(np.mean(row["extra"]["accuracies"]))
    assert teacher["accuracy"] > 0.95
    assert teacher["accuracy"] > alone["accuracy"] > 0.85
    # On digits, distillation matches the student trained alone (within a few test images).
    assert distilled["accuracy"] >= alone["accuracy"] - 0.02


def test_int8_keeps_float32_accuracy_in_a_third_of_the_bytes(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "int8")
    base = rows.pop("float32")
    assert base["accuracy"] == _rows(report, "MLP")["teacher (AdamW)"]["accuracy"]
    assert len(rows) == 2
    for name, row in rows.items():
        assert abs(row["accuracy"] - base["accuracy"]) <= 0.01, name
        assert row["extra"]["bytes"] < base["extra"]["bytes"] / 3, name
        assert 0 < row["extra"]["max_abs_error"] < 0.01, name


def test_pruning_holds_zeros_and_fine_tuning_recovers(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "pruning")
    assert set(rows) == set(PRUNINGS)
    teacher = _rows(report, "MLP")["teacher (AdamW)"]["accuracy"]
    for name, row in rows.items():
        extra = row["extra"]
        assert extra["zeros_held"] is True, name  # masks= kept every pruned weight at 0
        assert row["accuracy"] >= extra["accuracy_pruned"], name
    for sparsity in (0.5, 0.7, 0.9):
        row = rows[f"per-tensor {sparsity:.0%}"]
        assert row["extra"]["kept_per_layer"] == pytest.approx([1 - sparsity] * 2, abs=1e-3)
        assert row["accuracy"] > 0.93
        extra = rows[f"global {sparsity:.0%}"]["extra"]
        assert extra["pruned"] == round(sparsity * extra["weights"])  # the count is exact
    assert rows["2:4"]["extra"]["kept_per_layer"] == [0.5, 0.5]
    assert rows["2:4"]["accuracy"] >= teacher - 0.02
    # One global threshold starves the output layer (its weights are smaller) at 90%.
    starved = rows["global 90%"]
    assert starved["extra"]["kept_per_layer"][1] < 0.02
    assert starved["accuracy"] < rows["per-tensor 90%"]["accuracy"]


def test_model_file_round_trip(quick_run):
    _, report, _ = quick_run
    rows = _rows(report, "model file")
    base = rows.pop("float32")
    assert base["accuracy"] == _rows(report, "MLP")["teacher (AdamW)"]["accuracy"]
    in_memory = _rows(report, "int8")
    assert set(rows) == set(in_memory) - {"float32"}
    for name, row in rows.items():
        assert row["extra"]["exact"] is True, name  # the file holds what quantize made
        assert row["accuracy"] == in_memory[name]["accuracy"], name
        assert row["extra"]["bytes"] < base["extra"]["bytes"] / 3, name


def test_stage_is_deterministic():
    ctx = Context(Digits.load(), quick=True, progress=Progress(io.StringIO()))
    first, second = stage_regularization(ctx), stage_regularization(ctx)
    for a, b in zip(first.rows, second.rows):
        assert (a.method, a.loss, a.accuracy, a.extra) == (b.method, b.loss, b.accuracy, b.extra)


def test_gradients_and_hessian_match_finite_differences():
    rng = np.random.default_rng(3)
    x = models.with_bias(rng.normal(size=(40, 5)))
    y = rng.integers(0, 4, 40)
    w = rng.normal(size=(4, 6)) * 0.5
    lam, eps = 0.05, 1e-6
    grad, hess = models.logreg_grad(w, x, y, lam), models.logreg_hessian(w, x, lam)
    for i in range(w.size):
        d = np.zeros(w.size)
        d[i] = eps
        d = d.reshape(w.shape)
        num = (
            (models.logreg_loss(w + d, x, y, lam) - models.logreg_loss(w - d, x, y, lam)) / eps / 2
        )
        assert grad.flat[i] == pytest.approx(num, abs=1e-7)
        col = (
            (models.logreg_grad(w + d, x, y, lam) - models.logreg_grad(w - d, x, y, lam)) / eps / 2
        )
        np.testing.assert_allclose(hess[:, i], col.ravel(), atol=1e-7)

    params = models.mlp_init(rng, [5, 7, 6, 4], np.float64)
    teacher = rng.normal(size=(40, 4))
    xs = x[:, :5]

    def loss(p):  # the distillation objective whose gradient distill_dlogits gives
        logits, _ = models.mlp_forward(p, xs)
        q = models.softmax(teacher / 3.0)
        log_p = np.log(models.softmax(logits / 3.0))
        kl = np.mean(np.sum(q * (np.log(q) - log_p), axis=1))
        return 0.4 * 9.0 * kl + 0.6 * models.cross_entropy(logits, y)

    logits, inputs = models.mlp_forward(params, xs)
    grads = models.mlp_backward(
        params, inputs, models.distill_dlogits(logits, teacher, y, 3.0, 0.4)
    )
    for p, g in zip(params, grads):
        for i in range(p.size):
            old = p.flat[i]
            p.flat[i] = old + eps
            up = loss(params)
            p.flat[i] = old - eps
            down = loss(params)
            p.flat[i] = old
            assert g.flat[i] == pytest.approx((up - down) / eps / 2, abs=1e-7)


def test_progress_rewrites_one_line_on_a_terminal_and_clears_it():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, log = Terminal(), io.StringIO()
    for stream in (term, log):
        progress = Progress(stream)
        progress.start("optimizers", "Adam")
        progress.step(300, 300)
        progress.done()
    assert "\n" not in term.getvalue() and term.getvalue().endswith("\r\x1b[2K")  # cleared
    assert "\r\x1b[2K[optimizers] Adam: step 300/300" in term.getvalue()
    assert log.getvalue() == "[optimizers] Adam\n"  # not a terminal: a line per method


def test_without_scikit_learn_says_what_to_install(monkeypatch, capsys):
    import argparse

    from fastopt import demo

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    args = argparse.Namespace(quick=True, plot=None, json=None)
    assert demo.run(args) == 1
    assert "pip install 'fastopt[demo]'" in capsys.readouterr().err
