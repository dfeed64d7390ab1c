"""What the demo's stages share: the data set, the run's settings, progress on stderr, and
the shape of a stage's result (table rows, plot panels, extra figures for the JSON)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

SEED = 0


@dataclass
class Digits:
    """scikit-learn's digits (8x8 images, 10 classes), split 80/20 stratified, features
    standardized with the training set's mean and deviation."""

    x_train: np.ndarray  # (n_train, 64) float64
    y_train: np.ndarray  # (n_train,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int = 10

    @staticmethod
    def load() -> Digits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            data.data, data.target, test_size=0.2, stratify=data.target, random_state=SEED
        )
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # pixels that are always blank in the training set
        return Digits(
            x_train=(x_train - mean) / std,
            y_train=y_train.astype(np.int64),
            x_test=(x_test - mean) / std,
            y_test=y_test.astype(np.int64),
        )


@dataclass
class Row:
    """One line of the printed table."""

    stage: str
    method: str
    loss: float  # the stage's objective at the end (named in the stage's notes)
    accuracy: float  # on the held-out test set
    seconds: float  # training time (evaluation for the curves excluded)
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)  # figures for the JSON


@dataclass
class Panel:
    """One plot: named series of (x, y) points drawn as lines, or ``bars`` (name -> value),
    or a heatmap ``grid`` (x labels, y labels, values[y][x])."""

    title: str
    xlabel: str
    ylabel: str
    series: Dict[str, Tuple[List[float], List[float]]] = field(default_factory=dict)
    logy: bool = False
    logx: bool = False
    bars: Optional[Dict[str, float]] = None
    grid: Optional[Tuple[List[str], List[str], List[List[float]]]] = None


@dataclass
class StageResult:
    rows: List[Row]
    panels: List[Panel] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)


class Progress:
    """Stage, method and step on stderr: rewritten in place on a terminal, one line per
    method (and every few seconds) otherwise."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = ""
        self._last = 0.0

    def start(self, stage: str, method: str) -> None:
        self.label = f"[{stage}] {method}"
        self._write(self.label, final=not self.tty)
        self._last = time.perf_counter()

    def step(self, step: int, total: int) -> None:
        now = time.perf_counter()
        if step != total and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        if self.tty or step != total:
            self._write(f"{self.label}: step {step}/{total}", final=not self.tty)

    def done(self) -> None:
        if self.tty:
            self._write("", final=True)

    def _write(self, text: str, *, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final and text else ""))
        elif text:
            self.stream.write(text + "\n")
        self.stream.flush()


class Context:
    """Everything a stage reads: the data, whether the run is --quick, progress, and models
    that several stages use (trained once, on first use)."""

    def __init__(self, data: Digits, quick: bool, progress: Progress):
        self.data = data
        self.quick = quick
        self.progress = progress
        self._shared: Dict[str, Any] = {}

    def pick(self, quick: Any, full: Any) -> Any:
        """The --quick setting or the full run's."""
        return quick if self.quick else full

    def shared(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()``'s result, made once per run."""
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]

    def rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng(SEED + offset)


class Timer:
    """Accumulates the time spent inside ``with timer:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0: Optional[float] = None

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._t0 is not None
        self.seconds += time.perf_counter() - self._t0
        self._t0 = None


def seconds_text(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def batches(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> List[np.ndarray]:
    """Index arrays of ``steps`` mini-batches, a fresh shuffle each epoch (a short last
    batch of an epoch is dropped, so every step sees ``batch_size`` samples)."""
    out: List[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            out.append(order[start : start + batch_size])
    return out[:steps]
