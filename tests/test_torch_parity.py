"""fastopt against torch.optim on the CPU: the same trajectories (params and state) for SGD,
Adagrad, RMSprop, Adam, AdamW, Adamax, RAdam, Adadelta, Rprop, NAdam and ASGD, float32 and float64, with torch's default (for-loop on
CPU), foreach and fused implementations."""
from __future__ import annotations

import itertools
from typing import Any, Dict, List

import numpy as np
import pytest


from conftest import DTYPES, OPTIMIZERS, Problem, assert_close, opts_id

torch = pytest.importorskip("torch")

STEPS = 25
SHAPES = [(1,), (33,), (4097,)]

# float64: both sides evaluate the same formulas in double precision; torch associates a
# few of them differently (lerp for exp_avg and grad_avg, addcmul/addcdiv, possibly FMA in
# its vectorized kernels), which costs a few ulp per step: 1e-10 (scale-relative, see
# conftest.assert_close) is four orders above that and far below one update.
# float32: the same differences at float32 precision, now on both sides (each rounds ~10
# operations per step to float32, eps 6e-8, in different orders, and torch may contract
# to FMA): measured maxima over this grid are ~3e-7 (scale-relative); 1e-5 leaves a 30x
# margin and is far below one step's change of the params (lr*|update| ~ 1e-3..5e-2).
TORCH_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}

# fastopt state name -> torch.optim state key
STATE_KEYS = {"momentum_buffers": "momentum_buffer", "state_sums": "sum",
              "square_avgs": "square_avg", "grad_avgs": "grad_avg", "exp_avgs": "exp_avg",
              "exp_avg_sqs": "exp_avg_sq", "max_exp_avg_sqs": "max_exp_avg_sq",
              "exp_infs": "exp_inf", "acc_deltas": "acc_delta",
              "prevs": "prev", "step_sizes": "step_size", "axs": "ax"}


def _grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, v)) for v in itertools.product(*axes.values())]


def _sgd_grid():
    out = []
    for m, d, n in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.1, False)]:
        for rest in _grid(weight_decay=[0.0, 0.01], maximize=[False, True]):
            out.append(dict(momentum=m, dampening=d, nesterov=n, **rest))
    return out


GRIDS = {
    "sgd": _sgd_grid(),
    "adagrad": _grid(lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.01], eps=[1e-10, 1e-3],
                     maximize=[False, True], initial_accumulator_value=[0.0, 0.1]),
    "rmsprop": _grid(centered=[False, True], momentum=[0.0, 0.9], weight_decay=[0.0, 0.01],
                     maximize=[False, True]),
    "adam": [o for o in _grid(amsgrad=[False, True], maximize=[False, True],
                              weight_decay=[0.0, 0.01], decoupled_weight_decay=[False, True])
             if o["weight_decay"] or not o["decoupled_weight_decay"]],
    "adamw": _grid(amsgrad=[False, True], maximize=[False, True], weight_decay=[0.01, 0.1]),
    "adamax": _grid(maximize=[False, True], weight_decay=[0.0, 0.01], eps=[1e-8, 1e-3]),
    "radam": [o for o in _grid(maximize=[False, True], weight_decay=[0.0, 0.01],
                               decoupled_weight_decay=[False, True])
              if o["weight_decay"] or not o["decoupled_weight_decay"]],
    "adadelta": _grid(maximize=[False, True], weight_decay=[0.0, 0.01], rho=[0.9, 0.5]),
    "rprop": _grid(maximize=[False, True])
    + [dict(etaminus=0.3, etaplus=1.5, step_size_min=0.001, step_size_max=0.02)],
    "nadam": [o for o in _grid(maximize=[False, True], weight_decay=[0.0, 0.01],
                               decoupled_weight_decay=[False, True])
              if o["weight_decay"] or not o["decoupled_weight_decay"]]
    + [dict(momentum_decay=0.1)],
    "asgd": _grid(maximize=[False, True], weight_decay=[0.0, 0.01], t0=[1e6, 5.0])
    + [dict(lambd=0.01, alpha=0.5, t0=0.0)],
}
FUSED = {"sgd", "adagrad", "adam", "adamw"}  # torch has fused CPU kernels for these


# fastopt's array classes take the table's names where torch takes pairs
_TORCH_PAIRS = {"etas": ("etaminus", "etaplus"), "step_sizes": ("step_size_min", "step_size_max")}


def _torch_optimizer(name: str, params: List[Any], lr: float, opts: Dict[str, Any], impl: str):
    opts = dict(opts)
    for pair, (first, second) in _TORCH_PAIRS.items():
        if first in opts:
            opts[pair] = (opts.pop(first), opts.pop(second))
    kw: Dict[str, Any] = {}
    if impl == "foreach":
        kw["foreach"] = True
    elif impl == "fused":
        kw["fused"] = True
    return getattr(torch.optim, OPTIMIZERS[name].spec.torch_name)(params, lr=lr, **opts, **kw)


def _cases():
    cases = []
    for name, grid in GRIDS.items():
        impls = ["default", "foreach"] + (["fused"] if name in FUSED else [])
        for opts, impl in itertools.product(grid, impls):
            cases.append(pytest.param(name, opts, impl, id=f"{name}-{opts_id(opts)}-{impl}"))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,opts,impl", _cases())
def test_matches_torch_optim(name, opts, impl, dtype, rng):
    opt = OPTIMIZERS[name]
    lr = opt.base["lr"]
    fo_opts = dict(opts)
    # fastopt.Adagrad takes initial_accumulator_value like torch; the Problem's own state is
    # unused here (the class owns its state), it only supplies params and gradients.
    pr = Problem(opt, {k: v for k, v in opts.items() if k != "initial_accumulator_value"},
                 SHAPES, dtype, rng)
    t_params = [torch.tensor(p) for p in pr.params]
    try:
        t_opt = _torch_optimizer(name, t_params, lr, opts, impl)
        for p in t_params:
            p.grad = torch.zeros_like(p)
        if impl == "fused":  # fused support is checked at the first step on some versions
            probe = [torch.zeros(3, dtype=t_params[0].dtype)]
            probe[0].grad = torch.zeros(3, dtype=t_params[0].dtype)
            _torch_optimizer(name, probe, lr, opts, impl).step()
    except (RuntimeError, ValueError, TypeError) as exc:
        pytest.skip(f"torch.optim.{name} {impl} not supported here: {exc}")
    f_opt = opt.cls(pr.params, lr=lr, **fo_opts)
    tol = TORCH_TOL[np.dtype(dtype)]
    if name == "asgd" and impl == "foreach":  # torch's foreach ASGD computes its next eta from
        tol = max(tol, 1e-6)  # the float32 step tensor, in float32 (its default: in float64)
    for t in range(STEPS):
        grads = pr.draw_grads(rng)
        for p, g in zip(t_params, grads):
            p.grad = torch.tensor(g)
        t_opt.step()
        f_opt.step(grads)
        if t in (0, 9) or t == STEPS - 1:
            where = f"{name} {opts_id(opts)} {impl} {np.dtype(dtype)} step {t + 1}"
            assert_close(pr.params, [p.detach().numpy() for p in t_params], dtype,
                         f"params ({where})", tol=tol)
            for state_name, arrays in f_opt.state.items():
                key = STATE_KEYS[state_name]
                want = [t_opt.state[p][key].numpy() for p in t_params]
                assert_close(arrays, want, dtype, f"{state_name} ({where})", tol=tol)
    assert f_opt.step_count == STEPS
    if "step" in t_opt.state[t_params[0]]:
        assert int(float(t_opt.state[t_params[0]]["step"])) == STEPS
