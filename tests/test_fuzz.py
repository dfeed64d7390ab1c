"""Bad-input fuzzing of every public function and class (issue 16, "from now on").

Hypothesis draws each call's arguments: mostly the good value, else a bad one -- wrong
types, dtypes, shapes, layouts (strided, read-only, misaligned, big-endian, masked,
np.matrix, 0-d, empty), aliasing (one array passed as two arguments), non-finite and
out-of-range hyper-parameters, huge integers. Every call must either succeed or raise
TypeError/ValueError, and a call that raised must have left every array it was given
unchanged (byte for byte). Deterministic (derandomized) and bounded: the normal run tries
FASTOPT_FUZZ_EXAMPLES (default 60) examples per target; FASTOPT_FUZZ_REPORT=path appends
each target's figures (cases, successes, clean errors, crashes, modifications on error)
as JSON lines.
"""

import inspect
import json
import math
import os
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import schedules
from fastopt._specs import EMA, OPTIMIZERS

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

EXAMPLES = int(os.environ.get("FASTOPT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
F32 = np.float32
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix


# ---- bad values ------------------------------------------------------------------------------


def _misaligned(a: np.ndarray) -> np.ndarray:
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _readonly(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b.setflags(write=False)
    return b


def _strided(a: np.ndarray) -> np.ndarray:
    return np.repeat(a.reshape(-1), 2)[::2].reshape(a.shape) if a.size else a.copy()


def _filled(a: np.ndarray, value: float) -> np.ndarray:
    b = a.copy()
    if b.size and b.dtype.kind == "f":
        b.reshape(-1)[b.size // 2] = value
    return b


BAD_ARRAYS: List[Callable[[np.ndarray], Any]] = [
    lambda a: a.astype(np.int32),
    lambda a: a.astype(np.float16),
    lambda a: a.astype(np.float64) if a.dtype != np.float64 else a.astype(F32),
    lambda a: a.astype(np.complex64),
    lambda a: a.astype(bool),
    lambda a: a.astype(object),
    lambda a: a.astype(np.int8),
    lambda a: np.resize(a, a.size + 1),
    lambda a: a.reshape(-1)[:-1].copy() if a.size else np.ones(1, a.dtype),
    lambda a: a.reshape(1, *a.shape),
    lambda a: np.asarray(a.reshape(-1)[:1].reshape(())),
    lambda a: np.zeros((0,) + a.shape[1:], a.dtype),
    _strided,
    _readonly,
    _misaligned,
    lambda a: a.astype(a.dtype.newbyteorder(">")),
    lambda a: np.ma.masked_array(a.copy(), mask=np.zeros(a.shape, bool)),
    lambda a: np.asmatrix(a.reshape(1, -1)) if a.ndim <= 2 else a.copy(),
    lambda a: _filled(a, math.nan),
    lambda a: _filled(a, math.inf),
    lambda a: np.full_like(a, 1e30) if a.dtype.kind == "f" else a.copy(),
    lambda a: None,
    lambda a: [],
    lambda a: [a.copy(), a.copy()],
    lambda a: 1.0,
    lambda a: "x",
    lambda a: a.tolist(),
    lambda a: torch.Size(a.shape) if torch else (),
    lambda a: torch.float32 if torch else None,
    lambda a: torch.from_numpy(a.copy()) if torch and a.dtype != object else a.copy(),
    lambda a: torch.ones(a.shape, device="meta") if torch else None,
]

BAD_SCALARS: List[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    -1.0,
    0.0,
    1.0,
    2.0,
    0.5,
    1e-300,
    1e300,
    10**400,
    -(10**400),
    2**64,
    2**63,
    -(2**63),
    -1,
    0,
    3,
    True,
    False,
    "x",
    None,
    1j,
    [],
    (0.9,),
    np.float32(0.5),
    np.int64(3),
    np.float64(math.nan),
    np.bool_(True),
    257,
    -129,
]


class Figures:
    def __init__(self, name: str):
        self.name = name
        self.cases = self.ok = self.clean = 0
        self.crashes: List[str] = []
        self.modified: List[str] = []

    def report(self) -> None:
        line = {
            "target": self.name,
            "cases": self.cases,
            "succeeded": self.ok,
            "clean_errors": self.clean,
            "crashes": len(self.crashes),
            "modified_on_error": len(self.modified),
        }
        print(json.dumps(line))
        path = os.environ.get("FASTOPT_FUZZ_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        assert not self.crashes, self.crashes[:5]
        assert not self.modified, self.modified[:5]


def _bytes(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np.asarray(a).tobytes()
    if torch is not None and isinstance(a, torch.Tensor) and a.device.type == "cpu":
        if a.layout != torch.strided:
            return None
        return a.detach().clone().contiguous().view(torch.uint8).numpy().tobytes()
    if isinstance(a, (list, tuple)):
        return [_bytes(x) for x in a]
    return None


def run_case(fig: Figures, what: str, call: Callable[[], Any], watched: List[Any]) -> bool:
    """Calls ``call``; on TypeError/ValueError checks that nothing in ``watched`` changed."""
    fig.cases += 1
    before = [_bytes(a) for a in watched]
    try:
        call()
    except (TypeError, ValueError):
        fig.clean += 1
        if [_bytes(a) for a in watched] != before:
            fig.modified.append(what)
        return False
    except Exception as exc:  # anything else is a defect
        fig.crashes.append(f"{type(exc).__name__}: {str(exc)[:200]} <- {what[:300]}")
        return False
    fig.ok += 1
    return True


def draw_array(data: Any, name: str, good: np.ndarray, others: Dict[str, Any]) -> Any:
    """The good array (fresh) most of the time, else a bad variant or another argument."""
    k = data.draw(st.integers(0, 3 * len(BAD_ARRAYS) + 3), label=f"{name} choice")
    if k < 2 * len(BAD_ARRAYS):
        return good.copy()
    k -= 2 * len(BAD_ARRAYS)
    if k < len(BAD_ARRAYS):
        return BAD_ARRAYS[k](good.copy())
    if others:  # aliasing: an array already passed as another argument
        return others[sorted(others)[k % len(others)]]
    return good.copy()


def draw_scalar(data: Any, name: str, good: Any) -> Any:
    k = data.draw(st.integers(0, 2 * len(BAD_SCALARS) - 1), label=f"{name} choice")
    return good if k < len(BAD_SCALARS) else BAD_SCALARS[k - len(BAD_SCALARS)]


def draw_args(data: Any, arrays: Dict[str, np.ndarray], scalars: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, good in arrays.items():
        out[name] = draw_array(data, name, good, {k: v for k, v in out.items() if k in arrays})
    for name, good in scalars.items():
        out[name] = draw_scalar(data, name, good)
    return out


def _fresh(shape: Any, dtype: Any = F32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---- optimizer steps -------------------------------------------------------------------------

STEP_SPECS = {**OPTIMIZERS, "ema": EMA}


def _hyper_defaults(spec: Any) -> Dict[str, Any]:
    out = {}
    for name, h in spec.hyper.items():
        out[name] = h.default if h.default is not None else (0.9 if name == "beta" else 0.01)
    return out


@pytest.mark.parametrize("name", sorted(STEP_SPECS))
def test_fuzz_functional_steps(name):
    spec = STEP_SPECS[name]
    fn = getattr(fastopt, f"{name}_")
    fig = Figures(f"{name}_")

    @FUZZ
    @given(st.data())
    def check(data):
        arrays = {a.name: np.abs(_fresh((7,), seed=i)) for i, a in enumerate(spec.arrays)}
        scalars = _hyper_defaults(spec)
        if spec.takes_step:
            scalars["step"] = 1
        args = draw_args(data, arrays, scalars)
        if data.draw(st.booleans(), label="listed"):
            args.update({k: [v] for k, v in args.items() if k in arrays})
        positional = [args.pop(a.name) for a in spec.arrays]
        run_case(
            fig, f"{name}_ {positional!r:.120} {args}", lambda: fn(*positional, **args), positional
        )

    check()
    fig.report()


@pytest.mark.parametrize("name", sorted(fastopt.optim.CLASSES))
def test_fuzz_optimizer_classes(name):
    cls = fastopt.optim.CLASSES[name]
    spec = OPTIMIZERS[name]
    fig = Figures(f"{cls.__name__} construct+step")

    @FUZZ
    @given(st.data())
    def check(data):
        hyper = _hyper_defaults(spec)
        names = set(inspect.signature(cls).parameters)
        scalars = {k: v for k, v in hyper.items() if k in names}
        args = draw_args(data, {"params": _fresh((7,)), "grads": _fresh((7,), seed=1)}, scalars)
        params, grads = args.pop("params"), args.pop("grads")

        def call():
            opt = cls(params, **args)
            opt.step(grads)

        run_case(
            fig,
            f"{cls.__name__}({params!r:.80}, {args}).step({grads!r:.80})",
            call,
            [params, grads],
        )

    check()
    fig.report()


@pytest.mark.parametrize("name", sorted(fastopt.optim.CLASSES))
def test_fuzz_load_state_dict(name):
    """A checkpoint with one entry replaced or removed: loaded whole, or refused with the
    optimizer unchanged."""
    cls = fastopt.optim.CLASSES[name]
    fig = Figures(f"{cls.__name__}.load_state_dict")

    @FUZZ
    @given(st.data())
    def check(data):
        opt = cls([_fresh((5,)), _fresh((3,), seed=1)], lr=0.01)
        opt.step([_fresh((5,), seed=2), _fresh((3,), seed=3)])
        sd = opt.state_dict()
        entries = (
            ["optimizer", "step", "lr", "hyper", "state"]
            + [f"state/{k}/{i}" for k in sd["state"] for i in range(2)]
            + [f"hyper/{k}" for k in sd["hyper"]]
        )
        entry = data.draw(st.sampled_from(entries), label="entry")
        how = data.draw(st.integers(0, len(BAD_SCALARS) + len(BAD_ARRAYS)), label="how")
        parts = entry.split("/")
        holder: Any
        if len(parts) == 1:
            holder, key = sd, parts[0]
        elif parts[0] == "hyper":
            holder, key = sd["hyper"], parts[1]
        else:
            holder, key = sd["state"][parts[1]], int(parts[2])
        if how == 0:
            del holder[key]
        elif how <= len(BAD_SCALARS):
            holder[key] = BAD_SCALARS[how - 1]
        else:
            good = holder[key] if isinstance(holder[key], np.ndarray) else _fresh((5,))
            holder[key] = BAD_ARRAYS[how - 1 - len(BAD_SCALARS)](good.copy())
        state = {k: [a.copy() for a in v] for k, v in opt.state.items()}
        marks = (opt.step_count, opt.lr, opt.hyper)

        fig.cases += 1
        try:
            opt.load_state_dict(sd)
        except (TypeError, ValueError):
            fig.clean += 1
            same = (opt.step_count, opt.lr, opt.hyper) == marks and all(
                np.array_equal(a, b, equal_nan=True)
                for k in state
                for a, b in zip(opt.state[k], state[k])
            )
            if not same:
                fig.modified.append(f"{entry} <- {how}")
            return
        except Exception as exc:
            fig.crashes.append(f"{type(exc).__name__}: {str(exc)[:200]} <- {entry} {how}")
            return
        fig.ok += 1

    check()
    fig.report()


# ---- quantization, Newton, schedules, runtime --------------------------------------------------

QUANT_TARGETS: Dict[str, Any] = {
    "quantize_per_tensor": (
        lambda a: fastopt.quantize_per_tensor(
            a["x"], a["scale"], a["zero_point"], check_finite=a["check_finite"]
        ),
        {"x": _fresh((4, 6))},
        {"scale": 0.05, "zero_point": 3, "check_finite": True},
    ),
    "quantize_per_tensor out=": (
        lambda a: fastopt.quantize_per_tensor(a["x"], 0.05, 0, out=a["out"]),
        {"x": _fresh((4, 6)), "out": np.zeros((4, 6), np.int8)},
        {},
    ),
    "quantize_per_channel": (
        lambda a: fastopt.quantize_per_channel(a["x"], a["scales"], a["zero_points"], a["axis"]),
        {"x": _fresh((4, 6)), "scales": np.full(4, 0.05), "zero_points": np.zeros(4, np.int64)},
        {"axis": 0},
    ),
    "dequantize": (
        lambda a: fastopt.dequantize(a["q"], a["scale"], a["zero_point"]),
        {"q": np.arange(24, dtype=np.int8).reshape(4, 6)},
        {"scale": 0.1, "zero_point": 0},
    ),
    "dequantize per channel out=": (
        lambda a: fastopt.dequantize(a["q"], a["scales"], a["zps"], 0, out=a["out"]),
        {
            "q": np.arange(24, dtype=np.int8).reshape(4, 6),
            "scales": np.full(4, 0.1, F32),
            "zps": np.zeros(4, np.int64),
            "out": np.zeros((4, 6), F32),
        },
        {},
    ),
    "choose_qparams": (
        lambda a: fastopt.choose_qparams(a["x"], symmetric=a["symmetric"], axis=a["axis"]),
        {"x": _fresh((4, 6))},
        {"symmetric": True, "axis": None},
    ),
    "quantize_blockwise": (
        lambda a: fastopt.quantize_blockwise(
            a["x"], a["block_size"], rounding=a["rounding"], seed=a["seed"]
        ),
        {"x": _fresh((4, 6))},
        {"block_size": 8, "rounding": "nearest", "seed": None},
    ),
    "quantize_blockwise out=": (
        lambda a: fastopt.quantize_blockwise(a["x"], 8, out=(a["q"], a["absmax"])),
        {"x": _fresh((4, 6)), "q": np.zeros((4, 6), np.int8), "absmax": np.zeros(3, F32)},
        {},
    ),
    "dequantize_blockwise": (
        lambda a: fastopt.dequantize_blockwise(a["q"], a["absmax"], a["block_size"], out=a["out"]),
        {
            "q": np.arange(24, dtype=np.int8).reshape(4, 6),
            "absmax": np.ones(3, F32),
            "out": np.zeros((4, 6), F32),
        },
        {"block_size": 8},
    ),
    "newton_": (
        lambda a: fastopt.newton_(
            a["params"],
            a["grads"],
            a["hessians"],
            lr=a["lr"],
            damping=a["damping"],
            on_failure=a["on_failure"],
        ),
        {
            "params": _fresh((3, 2), np.float64),
            "grads": _fresh((3, 2), np.float64, 1),
            "hessians": np.tile(np.eye(2) * 2.0, (3, 1, 1)),
        },
        {"lr": 1.0, "damping": 0.0, "on_failure": "raise"},
    ),
    "cholesky_solve": (
        lambda a: fastopt.cholesky_solve(a["hessians"], a["grads"], damping=a["damping"]),
        {"hessians": np.tile(np.eye(2, dtype=F32) * 2, (3, 1, 1)), "grads": _fresh((3, 2))},
        {"damping": 0.0},
    ),
}


_FILES = None  # a temporary folder for the model-file targets, made on first use


def _file(name: str) -> str:
    global _FILES
    if _FILES is None:
        import tempfile

        _FILES = tempfile.mkdtemp(prefix="fastopt-fuzz-")
    return os.path.join(_FILES, name)


# Pruning, clipping, masked / stochastically rounded steps and the model file.
OTHER_TARGETS: Dict[str, Any] = {
    "prune_magnitude": (
        lambda a: fastopt.prune_magnitude(
            [a["x"], a["y"]], a["sparsity"], scope=a["scope"], pattern=a["pattern"]
        ),
        {"x": _fresh((4, 8)), "y": _fresh((8,), seed=1)},
        {"sparsity": 0.5, "scope": "global", "pattern": None},
    ),
    "prune_magnitude out=": (
        lambda a: fastopt.prune_magnitude([a["x"]], 0.5, out=[a["out"]]),
        {"x": _fresh((4, 8)), "out": np.zeros((4, 8), bool)},
        {},
    ),
    "clip_grad_norm_": (
        lambda a: fastopt.clip_grad_norm_(
            [a["g1"], a["g2"]], a["max_norm"], a["norm_type"], a["error_if_nonfinite"]
        ),
        {"g1": _fresh((4, 6)), "g2": _fresh((7,), seed=1)},
        {"max_norm": 1.0, "norm_type": 2.0, "error_if_nonfinite": False},
    ),
    "adam_ masks= max_grad_norm=": (
        lambda a: fastopt.adam_(
            a["p"], a["g"], a["m"], a["v"], step=1, masks=a["mask"], max_grad_norm=a["max"]
        ),
        {
            "p": _fresh((9,)),
            "g": _fresh((9,), seed=1),
            "m": np.zeros(9, F32),
            "v": np.zeros(9, F32),
            "mask": np.arange(9) % 2 == 0,
        },
        {"max": 1.0},
    ),
    "sgd_ rounding=": (
        lambda a: fastopt.sgd_(a["p"], a["g"], lr=0.1, rounding=a["rounding"], seed=a["seed"]),
        {"p": _fresh((9,)), "g": _fresh((9,), seed=1)},
        {"rounding": "nearest", "seed": None},
    ),
    "adafactor_": (
        lambda a: fastopt.adafactor_(
            [a["p"], a["b"]], [a["g"], a["gb"]], [a["row"], None], [a["col"], None],
            [None, a["v"]], step=a["step"], lr=a["lr"], beta2_decay=a["beta2_decay"],
            eps=(a["eps1"], a["eps2"]), d=a["d"], weight_decay=a["weight_decay"],
        ),
        {
            "p": _fresh((5, 7)),
            "g": _fresh((5, 7), seed=1),
            "row": np.zeros((5, 1), F32),
            "col": np.zeros((1, 7), F32),
            "b": _fresh((7,), seed=2),
            "gb": _fresh((7,), seed=3),
            "v": np.zeros(7, F32),
        },
        {"step": 1, "lr": 1e-2, "beta2_decay": -0.8, "eps1": None, "eps2": 1e-3, "d": 1.0,
         "weight_decay": 0.0},
    ),
    "Adafactor": (
        lambda a: fastopt.Adafactor([a["p"], a["b"]], lr=a["lr"], d=a["d"]).step(
            [a["g"], a["gb"]]
        ),
        {"p": _fresh((5, 7)), "g": _fresh((5, 7), seed=1), "b": _fresh((7,), seed=2),
         "gb": _fresh((7,), seed=3)},
        {"lr": 1e-2, "d": 1.0},
    ),
    "save_quantized": (
        lambda a: fastopt.save_quantized(
            _file("save.safetensors"),
            {"w": a["w"], "b": a["b"]},
            scheme=a["scheme"],
            dtype=a["dtype"],
            axis=a["axis"],
            block_size=a["block_size"],
        ),
        {"w": _fresh((32, 64)), "b": _fresh((32,), seed=1)},
        {"scheme": "per_channel", "dtype": "int8", "axis": 0, "block_size": 256},
    ),
}


@pytest.mark.parametrize("target", sorted(QUANT_TARGETS) + sorted(OTHER_TARGETS))
def test_fuzz_array_functions(target):
    fn, arrays, scalars = {**QUANT_TARGETS, **OTHER_TARGETS}[target]
    fig = Figures(target)

    @FUZZ
    @given(st.data())
    def check(data):
        args = draw_args(data, arrays, scalars)
        run_case(fig, f"{target} {args!r:.200}", lambda: fn(args), [args[k] for k in arrays])

    check()
    fig.report()


def test_fuzz_load_quantized_bytes():
    # Random edits of a valid file: each load either succeeds or raises ValueError.
    path = _file("load.safetensors")
    fastopt.save_quantized(path, {"w": _fresh((32, 64)), "b": _fresh((32,), seed=1)})
    good = open(path, "rb").read()
    fig = Figures("load_quantized")

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=4),
           st.integers(0, len(good)))
    def check(edits, cut):
        data = bytearray(good[:cut] if cut < len(good) // 2 else good)
        for at, value in edits:
            if at < len(data):
                data[at] = value
        with open(path, "wb") as f:
            f.write(bytes(data))
        run_case(fig, f"load_quantized edits={edits} cut={cut}",
                 lambda: fastopt.load_quantized(path), [])

    check()
    fig.report()


SCHEDULES = {
    "StepDecay": ({"step_size": 3, "gamma": 0.5}),
    "InverseTime": ({"alpha": 0.5, "T": 10.0}),
    "Cosine": ({"total_steps": 10, "min_lr": 0.0}),
    "LinearWarmup": ({"warmup_steps": 3}),
    "Constant": ({}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_fuzz_schedules(name):
    fig = Figures(f"schedules.{name}")

    @FUZZ
    @given(st.data())
    def check(data):
        args = draw_args(data, {}, {**SCHEDULES[name], "t": 4, "lr": 0.1})
        t, lr = args.pop("t"), args.pop("lr")

        def call():
            s = getattr(schedules, name)(**args)
            value = fastopt.SGD(np.ones(3, F32), lr=lr, schedule=s).current_lr()
            if not (math.isfinite(value) and value >= 0):
                raise AssertionError(f"schedule gave {value}")
            s(t, 0.1)

        run_case(fig, f"{name}({args}) at t={t!r}, lr={lr!r}", call, [])

    check()
    fig.report()


def test_fuzz_runtime_settings():
    fig = Figures("set_num_threads/set_cpu_path")
    threads, path = fastopt.get_num_threads(), fastopt.get_cpu_path()

    @FUZZ
    @given(st.sampled_from(BAD_SCALARS + ["auto", "scalar", "avx2", "AVX3", ""]))
    def check(value):
        run_case(fig, f"set_num_threads({value!r})", lambda: fastopt.set_num_threads(value), [])
        run_case(fig, f"set_cpu_path({value!r})", lambda: fastopt.set_cpu_path(value), [])

    try:
        check()
    finally:
        fastopt.set_num_threads(threads)
        fastopt.set_cpu_path(path)
    fig.report()


# ---- fastopt.torch -------------------------------------------------------------------------------


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize(
    "name", ["SGD", "Adam", "Adagrad", "RMSprop", "Adamax", "RAdam", "Adadelta", "Rprop", "NAdam",
             "ASGD", "Lion", "Sophia"])
def test_fuzz_torch_classes(name):
    import fastopt.torch as ft

    cls = getattr(ft, name)
    fig = Figures(f"fastopt.torch.{name}")
    bad_hyper = {"lr": 0.01, "weight_decay": 0.0, "maximize": False}

    @FUZZ
    @given(st.data())
    def check(data):
        args = draw_args(data, {"param": _fresh((5,)), "grad": _fresh((5,), seed=1)}, bad_hyper)
        param, grad = args.pop("param"), args.pop("grad")

        def call():
            p = torch.from_numpy(param) if isinstance(param, np.ndarray) else param
            if (
                isinstance(p, torch.Tensor)
                and p.dtype.is_floating_point
                and p.device.type != "meta"
            ):
                p = torch.nn.Parameter(p, requires_grad=True)
            opt = cls([p], **args)
            if isinstance(p, torch.Tensor):
                g = (
                    torch.from_numpy(grad)
                    if isinstance(grad, np.ndarray) and grad.dtype != object
                    else grad
                )
                if isinstance(g, torch.Tensor) or g is None:
                    try:
                        p.grad = g
                    except (RuntimeError, TypeError):
                        raise TypeError("torch refused the grad itself") from None
                opt.step()

        run_case(fig, f"{name}({param!r:.80}, {args}) grad={grad!r:.80}", call, [param, grad])

    check()
    fig.report()
