"""fastopt.torch: real torch.optim.Optimizer subclasses, checked against torch.optim itself.

Trajectories (params and every state tensor) against torch.optim's for-loop implementation
over a grid of options, with two param groups of different hyper-parameters, a frozen param,
a param whose grad comes and goes, a scheduler; checkpoints both ways through
torch.save/torch.load(weights_only=True); the schedulers; GradScaler with a skipped step;
hooks, closures, autograd's version counters, inference tensors, layouts, 16-bit params,
bad input; and a small training loop. Lion and Sophia have no torch.optim counterpart and
are checked against fastopt's array-list classes (the same kernels: bit for bit).
"""
from __future__ import annotations

import collections
import collections.abc
import copy
import io
import math
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from conftest import assert_close, torch_roundtrip  # noqa: E402

# The tolerances of test_torch_parity.py (see there): both sides round the same formulas in
# a different order.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
STEPS = 10
SHAPES = [(1,), (33,), (7, 5), (4097,)]

CUDA_OK = torch.cuda.is_available() and fastopt.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and fastopt._cuda")])]

# Options per optimizer; the second param group overrides some of them (GROUP2).
GRID: Dict[str, List[Dict[str, Any]]] = {
    "SGD": [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
            dict(momentum=0.9, dampening=0.1, maximize=True)],
    "Adagrad": [dict(), dict(lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
                dict(maximize=True, eps=1e-3)],
    "RMSprop": [dict(), dict(centered=True, momentum=0.9),
                dict(weight_decay=0.01, maximize=True, momentum=0.5)],
    "Adam": [dict(), dict(amsgrad=True, weight_decay=0.01),
             dict(decoupled_weight_decay=True, weight_decay=0.1, maximize=True)],
    "AdamW": [dict(), dict(amsgrad=True, maximize=True, weight_decay=0.1)],
    "Adamax": [dict(), dict(weight_decay=0.01, maximize=True, eps=1e-3)],
    "RAdam": [dict(), dict(weight_decay=0.01, maximize=True),
              dict(decoupled_weight_decay=True, weight_decay=0.1, betas=(0.8, 0.9))],
    "Adadelta": [dict(), dict(weight_decay=0.01, maximize=True, rho=0.5, eps=1e-3)],
    "Rprop": [dict(), dict(maximize=True, etas=(0.3, 1.5), step_sizes=(0.001, 0.02))],
    "NAdam": [dict(), dict(weight_decay=0.01, maximize=True, momentum_decay=0.1),
              dict(decoupled_weight_decay=True, weight_decay=0.1, betas=(0.8, 0.9))],
    "ASGD": [dict(), dict(weight_decay=0.01, maximize=True, t0=3.0),
             dict(lambd=0.01, alpha=0.5, t0=0.0)],
}
TORCH_NAMES = list(GRID)  # the classes with a torch.optim twin
ALL_NAMES = TORCH_NAMES + ["Lion", "Sophia"]
LR = {"SGD": 0.05, "Adagrad": 0.05, "RMSprop": 0.01, "Adam": 0.01, "AdamW": 0.01,
      "Adamax": 0.01, "RAdam": 0.01, "Adadelta": 0.5,
      "Rprop": 0.01, "NAdam": 0.01, "ASGD": 0.05}
GROUP2: Dict[str, Dict[str, Any]] = {
    "SGD": dict(weight_decay=0.05, momentum=0.5), "Adagrad": dict(weight_decay=0.05),
    "RMSprop": dict(weight_decay=0.05, alpha=0.9),
    "Adam": dict(weight_decay=0.05, betas=(0.8, 0.99)),
    "AdamW": dict(weight_decay=0.05, betas=(0.8, 0.99)),
    "Adamax": dict(weight_decay=0.05, betas=(0.8, 0.99)),
    "RAdam": dict(weight_decay=0.05, betas=(0.8, 0.99)),
    "Adadelta": dict(weight_decay=0.05, rho=0.8),
    "Rprop": dict(etas=(0.4, 1.1), step_sizes=(1e-4, 0.05)),
    "NAdam": dict(weight_decay=0.05, betas=(0.8, 0.99), momentum_decay=0.01),
    "ASGD": dict(weight_decay=0.05, t0=2.0, lambd=0.01)}
# The options under which each optimizer keeps all of its state (checkpoint tests).
FULL = {"SGD": dict(momentum=0.9), "Adagrad": dict(initial_accumulator_value=0.1),
        "RMSprop": dict(centered=True, momentum=0.9), "Adam": dict(amsgrad=True),
        "AdamW": dict(amsgrad=True), "Adamax": {}, "RAdam": {}, "Adadelta": {},
        "Rprop": {}, "NAdam": {}, "ASGD": dict(t0=2.0)}


def _cases():
    return [pytest.param(name, opts, id=f"{name}-{i}")
            for name, grid in GRID.items() for i, opts in enumerate(grid)]


def _params(dtype=torch.float32, device="cpu", seed=0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device)
            .requires_grad_() for s in SHAPES + [(3,), (6,)]]  # the last two: frozen, intermittent


def _groups(params: List[torch.Tensor], name: str, lr: float) -> List[Dict[str, Any]]:
    return [{"params": params[:2] + params[4:5]},
            {"params": params[2:4] + params[5:], "lr": lr * 0.3, **GROUP2[name]}]


def _draw_grads(params: List[torch.Tensor], gen: torch.Generator, t: int) -> List[Any]:
    """Fresh grads for every param but the frozen one (index 4); the last one gets a grad
    on even steps only."""
    out: List[Any] = []
    for i, p in enumerate(params):
        if i == 4 or (i == 5 and t % 2):
            out.append(None)
        else:
            out.append(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return out


def _set_grads(params: List[torch.Tensor], grads: List[Any]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.device).clone()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _assert_same_state(got: torch.optim.Optimizer, want: torch.optim.Optimizer,
                       got_params: List[torch.Tensor], want_params: List[torch.Tensor],
                       what: str) -> None:
    dtype = want_params[0].dtype
    assert_close([_np(p) for p in got_params], [_np(p) for p in want_params], dtype_np(dtype),
                 f"params ({what})", tol=TOL[dtype])
    for i, (gp, wp) in enumerate(zip(got_params, want_params)):
        gs, ws = got.state.get(gp, {}), want.state.get(wp, {})
        assert set(gs) == set(ws), f"{what}: param {i} state keys {sorted(gs)} != {sorted(ws)}"
        for key in ws:
            if key == "step":
                assert float(gs[key]) == float(ws[key]), f"{what}: param {i} step"
                assert gs[key].dtype == ws[key].dtype and gs[key].device == ws[key].device
                continue
            assert_close([_np(gs[key])], [_np(ws[key])], dtype_np(dtype),
                         f"{key} of param {i} ({what})", tol=TOL[dtype])


def dtype_np(dtype: torch.dtype) -> Any:
    return {torch.float32: np.float32, torch.float64: np.float64}[dtype]


def _pair(name: str, opts: Dict[str, Any], lr: float, dtype=torch.float32, device="cpu",
          scheduler: Callable[[Any], Any] = None):
    """(torch.optim params, optimizer, scheduler), (fastopt.torch ...) on equal params."""
    out = []
    for module in (torch.optim, ft):
        params = _params(dtype, device)
        kw = dict(foreach=False) if module is torch.optim else {}
        opt = getattr(module, name)(_groups(params, name, lr), lr=lr, **opts, **kw)
        out.append((params, opt, scheduler(opt) if scheduler else None))
    return out


# ---- trajectories ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,opts", _cases())
def test_matches_torch_optim(name, opts, dtype, device):
    lr = LR[name]
    (tp, topt, tsched), (fp, fopt, fsched) = _pair(
        name, opts, lr, dtype, device,
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))
    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        grads = _draw_grads(tp, gen, t)
        for params, opt, sched in ((tp, topt, tsched), (fp, fopt, fsched)):
            _set_grads(params, grads)
            opt.step()
            sched.step()
        _assert_same_state(fopt, topt, fp, tp, f"{name} {opts} step {t + 1}")
    assert 4 not in [i for i, p in enumerate(fp) if p in fopt.state] or name == "Adagrad"
    assert [g["lr"] for g in fopt.param_groups] == [g["lr"] for g in topt.param_groups]


@pytest.mark.parametrize("name", ["Lion", "Sophia"])
def test_lion_sophia_match_the_array_classes(name):
    """No torch.optim counterpart: the array-list class on the same arrays, bit for bit."""
    kw = dict(lr=1e-2, weight_decay=0.1, l1=1e-3)
    params = _params()[:4]
    arrays = [p.detach().numpy().copy() for p in params]
    fopt = getattr(ft, name)(params, **kw)
    aopt = getattr(fastopt, name)(arrays, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        if name == "Sophia":
            fopt.update_hessian()
            aopt.update_hessian([(g * g).numpy() for g in grads], beta2=0.99)
        fopt.step()
        aopt.step([g.numpy() for g in grads])
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    key = {"Lion": "exp_avg", "Sophia": "exp_avg"}[name]
    for p, a in zip(params, aopt.state["exp_avgs"]):
        np.testing.assert_array_equal(fopt.state[p][key].numpy(), a)
    if name == "Sophia":
        for p, a in zip(params, aopt.state["hessian_diags"]):
            np.testing.assert_allclose(fopt.state[p]["hessian"].numpy(), a, rtol=1e-6)
        assert float(fopt.state[params[0]]["step"]) == STEPS
    else:
        assert "step" not in fopt.state[params[0]]


def test_mixed_dtypes_in_one_group_and_changing_grad_sets():
    """float32 and float64 params in one group (two calls), and params dropping in and
    out: per-param step counts as torch's."""
    def make(module):
        g = torch.Generator().manual_seed(3)
        ps = [torch.randn(9, generator=g, dtype=dt).requires_grad_()
              for dt in (torch.float32, torch.float64, torch.float32, torch.float64)]
        kw = dict(foreach=False) if module is torch.optim else {}
        return ps, module.Adam(ps, lr=0.01, **kw)
    (tp, topt), (fp, fopt) = make(torch.optim), make(ft)
    for t in range(8):
        for params, opt in ((tp, topt), (fp, fopt)):
            g2 = torch.Generator().manual_seed(100 + t)
            for i, p in enumerate(params):
                p.grad = None if (i + t) % 3 == 0 else torch.randn(9, generator=g2, dtype=p.dtype)
            opt.step()
        for p, q in zip(fp, tp):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
            if q in topt.state:
                assert float(fopt.state[p]["step"]) == float(topt.state[q]["step"])


def test_buckets_are_rebuilt_only_when_the_grad_set_changes(monkeypatch):
    params = _params()[:4]
    opt = ft.Adam(params, lr=0.01)
    builds = []
    real_build = ft.Adam._build
    monkeypatch.setattr(ft.Adam, "_build",
                        lambda self, *a: builds.append(1) or real_build(self, *a))
    for t in range(6):
        for i, p in enumerate(params):
            p.grad = None if (t >= 3 and i == 0) else torch.randn(p.shape)
        opt.step()
    assert len(builds) == 2  # the first step, and when params[0] lost its grad
    steps = [float(opt.state[p]["step"]) for p in params]
    assert steps == [3.0, 6.0, 6.0, 6.0]


@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD"])
@pytest.mark.parametrize("source", ["fresh", "torch-checkpoint"])
def test_step_counts_and_carried_values_cost_no_rebuild(name, source, monkeypatch):
    # Each step compares the packed counts and carried values (NAdam's mu_product, ASGD's
    # eta and mu) with what the bucket wrote: those it wrote itself must compare equal, or
    # every step would rebuild its buckets.
    params = _params()[:3]
    opt = getattr(ft, name)(params, lr=0.01)
    if source == "torch-checkpoint":
        topt = getattr(torch.optim, name)(params, lr=0.01)
        for _ in range(3):
            _set_grads(params, [torch.randn(p.shape) for p in params])
            topt.step()
        opt.load_state_dict(topt.state_dict())
    builds = []
    real_build = ft._FusedOptimizer._build
    monkeypatch.setattr(ft._FusedOptimizer, "_build",
                        lambda self, *a: builds.append(1) or real_build(self, *a))
    for _ in range(8):
        _set_grads(params, [torch.randn(p.shape) for p in params])
        opt.step()
    assert len(builds) == 1


def test_replaced_state_entries_are_used_like_torch():
    """State tensors replaced between steps (as an offload loop does: state[k] = v.to(...))
    are the ones the next step updates, step counts included."""
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", dict(amsgrad=True), 0.01)
    gen = torch.Generator().manual_seed(16)
    for t in range(6):
        grads = _draw_grads(tp, gen, t)
        for params, opt in ((tp, topt), (fp, fopt)):
            _set_grads(params, grads)
            opt.step()
            if t == 2:
                for st in opt.state.values():
                    for k, v in st.items():
                        st[k] = v.clone()
            if t == 3:
                opt.state[params[0]]["step"] = torch.tensor(1.0)
            if t == 4:
                opt.state[params[1]] = {}
        _assert_same_state(fopt, topt, fp, tp, f"replaced state, step {t + 1}")


def _in_step(name: str, opts: Dict[str, Any], steps: int, seed: int, what: str,
             before: Callable[..., None] = None, after: Callable[..., None] = None):
    """torch.optim and fastopt.torch (see _pair) stepped alike on the same grads for
    ``steps`` steps, ``before(t, opt)`` ahead of each step and ``after(t, opt)`` behind it,
    and checked to agree after each; returns both optimizers."""
    (tp, topt, _), (fp, fopt, _) = _pair(name, opts, 0.01)
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = _draw_grads(tp, gen, t)
        for params, opt in ((tp, topt), (fp, fopt)):
            _set_grads(params, grads)
            if before:
                before(t, opt)
            opt.step()
            if after:
                after(t, opt)
        _assert_same_state(fopt, topt, fp, tp, f"{what}, step {t + 1}")
    return topt, fopt


@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("name,opts", [("Adam", dict(amsgrad=True)), ("SGD", dict(momentum=0.9))])
def test_state_storage_replaced_in_place_is_seen_like_torch(name, opts, how):
    """A state tensor whose memory is replaced in place between steps (``t.data = ...``, as
    the common "move the optimizer state" loop does, or ``t.set_(...)``): the next step
    updates the new memory, as torch.optim does, and never the old (freed) one."""
    def replace(t, opt):
        if t in (1, 3):
            for st in opt.state.values():
                for k, v in st.items():
                    if k != "step":
                        fresh = v.detach().clone()
                        if how == "data":
                            v.data = fresh
                        else:
                            v.set_(fresh)

    _in_step(name, opts, 6, 17, f"state memory replaced ({how})", after=replace)


def test_param_memory_relaid_in_place_is_seen_like_torch():
    """``p.data = p.data.t()`` on a square param keeps its data pointer and size but not the
    order of its elements (its grads follow the new strides): stepped as torch steps it."""
    outs = []
    for module in (torch.optim, ft):
        torch.manual_seed(3)
        p = torch.nn.Parameter(torch.randn(5, 5))
        kw = dict(foreach=False) if module is torch.optim else {}
        opt = module.Adam([p], lr=0.1, **kw)
        for t in range(4):
            p.grad = torch.arange(25.0).reshape(5, 5) / 25 + t
            opt.step()
            if t == 1:
                p.data = p.data.t()
                opt.state[p]["exp_avg"].data = opt.state[p]["exp_avg"].data.t()
                opt.state[p]["exp_avg_sq"].data = opt.state[p]["exp_avg_sq"].data.t()
        outs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-7)
    for k in outs[0][1]:
        torch.testing.assert_close(outs[1][1][k], outs[0][1][k], rtol=1e-6, atol=1e-7)


def test_state_memory_shrunk_in_place_is_refused_naming_it():
    """A state tensor resized in place to another size is refused at the next step, naming
    it, with nothing written (its old memory is never used)."""
    ps = [torch.nn.Parameter(torch.randn(300)) for _ in range(3)]
    opt = ft.AdamW(ps, lr=0.01)
    for p in ps:
        p.grad = torch.randn(300)
    opt.step()
    opt.state[ps[1]]["exp_avg_sq"].resize_(7)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)


def test_tensor_layouts_binding_refuses_what_is_not_a_list_of_tensors():
    from fastopt._ext import _cpu

    a = torch.randn(4, 3)
    words = np.frombuffer(_cpu.tensor_layouts([a, a.t()]), dtype=np.int64)
    # pointer, device, dtype, ndim, shape, strides: per tensor
    assert list(words[3:8]) == [2, 4, 3, 3, 1] and list(words[11:16]) == [2, 3, 4, 1, 3]
    assert words[0] == words[8] == a.data_ptr()
    assert _cpu.tensor_layouts([]) == b""
    with pytest.raises(TypeError, match=r"^tensors: expected a list of torch tensors, got tuple"):
        _cpu.tensor_layouts((a,))
    with pytest.raises(TypeError, match=r"^tensors\[1\]: expected a torch tensor, got numpy"):
        _cpu.tensor_layouts([a, np.ones(3)])


@pytest.mark.parametrize("name,opts", [("SGD", dict(momentum=0.9)), ("Adagrad", {}),
                                       ("RMSprop", dict(centered=True)), ("Adam", {}),
                                       ("AdamW", dict(amsgrad=True))])
def test_steps_inside_inference_mode_like_torch(name, opts):
    """torch.optim steps inside torch.inference_mode() (its state then made of inference
    tensors, which have no version counter); so does fastopt.torch, to the same values,
    and a later step outside it fails or runs as torch's does (Adagrad makes its state at
    construction, outside the mode)."""
    (tp, topt, _), (fp, fopt, _) = _pair(name, opts, 0.01)
    gen = torch.Generator().manual_seed(5)
    for t in range(3):
        grads = _draw_grads(tp, gen, t)
        for params, opt in ((tp, topt), (fp, fopt)):
            _set_grads(params, grads)
            with torch.inference_mode():
                opt.step()
        _assert_same_state(fopt, topt, fp, tp, f"inference mode, step {t + 1}")
    outcomes = []
    for opt in (topt, fopt):
        try:
            opt.step()
            outcomes.append("stepped")
        except RuntimeError as exc:
            assert "Inplace update to inference tensor" in str(exc)
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]
    if outcomes[0] == "stepped":  # (a refused torch.optim step may have written some params)
        _assert_same_state(fopt, topt, fp, tp, "outside inference mode")


def test_sgd_without_momentum_keeps_no_state_like_torch():
    """SGD with momentum 0 makes no state entries (torch.optim's state_dict()['state'] is
    {} then; the second group here has momentum); turning momentum on later makes the
    buffers as torch.optim does."""
    def momentum_on(t, opt):
        if t == 2:
            for group in opt.param_groups:
                group["momentum"] = 0.9

    def no_entries(t, opt):  # none in the group without momentum, until it has some
        first = opt.param_groups[0]["params"]
        assert not any(p in opt.state for p in first) if t < 2 else all(opt.state.values()), t

    topt, fopt = _in_step("SGD", {}, 4, 9, "SGD momentum 0 then 0.9", momentum_on, no_entries)
    assert fopt.state_dict()["state"].keys() == topt.state_dict()["state"].keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_load_state_dict_hooks_run_around_the_load_like_torch(dtype):
    """The pre-hooks see (and may replace) the checkpoint before it is read; the post-hooks
    run after the state is in place: their edits stay, for 16-bit params too (whose
    float32 state fastopt writes back after torch's load)."""
    got = []
    for module in (torch.optim, ft):
        p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        opt = module.Adam([p], lr=0.1)
        p.grad = torch.ones(4, dtype=dtype)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())

        def pre(o, sd):
            sd = copy.deepcopy(sd)
            for entry in sd["state"].values():
                entry["exp_avg"] = torch.full_like(entry["exp_avg"], 7.0)
            return sd

        def post(o):
            for entry in o.state.values():
                entry["exp_avg_sq"] = torch.zeros_like(entry["exp_avg_sq"])

        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(saved)
        got.append({k: v.float().tolist() for k, v in opt.state[p].items()})
    assert got[1] == got[0]
    assert got[1]["exp_avg"] == [7.0] * 4 and got[1]["exp_avg_sq"] == [0.0] * 4


def test_a_pre_hook_may_migrate_a_foreign_8bit_checkpoint():
    """bitsandbytes names its 8-bit state state1/absmax1...: a pre-hook renaming the keys
    makes such a checkpoint loadable, as torch.optim's hook protocol intends."""
    p = torch.nn.Parameter(torch.randn(4096))
    opt = ft.Adam8bit([p], lr=1e-3)
    p.grad = torch.randn(4096)
    opt.step()
    st = opt.state_dict()["state"][0]
    names = {"state1": "exp_avg", "absmax1": "exp_avg_absmax", "state2": "exp_avg_sq",
             "absmax2": "exp_avg_sq_absmax"}
    foreign = {"state": {0: {"step": st["step"],
                             **{bnb: st[ours] for bnb, ours in names.items()}}},
               "param_groups": opt.state_dict()["param_groups"]}
    other = ft.Adam8bit([p], lr=1e-3)
    other.register_load_state_dict_pre_hook(
        lambda o, sd: {"state": {k: {names.get(n, n): v for n, v in e.items()}
                                 for k, e in sd["state"].items()},
                       "param_groups": sd["param_groups"]})
    other.load_state_dict(foreign)
    for key in names.values():
        assert torch.equal(other.state[p][key], st[key]), key


def test_a_librarys_own_uint8_state_entry_loads_like_torch():
    """A key of a param's state that is not the optimizer's (here a library's uint8 mask)
    is saved and loaded as torch.optim does (cast to the param's dtype), not taken for
    8-bit state."""
    loaded = []
    for module in (torch.optim, ft):
        p = torch.nn.Parameter(torch.ones(3))
        opt = module.Adam([p], lr=0.1)
        for _ in range(2):
            p.grad = torch.ones(3)
            opt.step()
            opt.state[p]["keep_mask"] = torch.ones(3, dtype=torch.uint8)
        other = module.Adam([p], lr=0.1)
        other.load_state_dict(opt.state_dict())
        loaded.append(other.state[p]["keep_mask"])
        p.grad = torch.ones(3)
        other.step()
    assert loaded[1].dtype == loaded[0].dtype and torch.equal(loaded[1], loaded[0])


class _ListLike(collections.abc.Sequence):
    """A config library's list (OmegaConf's ListConfig is a Sequence, not a list)."""

    def __init__(self, *items):
        self.items = items

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)


TORCH_ACCEPTS = {
    "Adam eps 0": ("Adam", dict(eps=0.0)),
    "Adagrad eps 0": ("Adagrad", dict(eps=0.0)),
    "RMSprop eps 0": ("RMSprop", dict(eps=0.0)),
    "RMSprop alpha 1.5": ("RMSprop", dict(alpha=1.5)),
    "Adam amsgrad 0": ("Adam", dict(amsgrad=0)),
    "AdamW amsgrad 1": ("AdamW", dict(amsgrad=1)),
    "Adam maximize None": ("Adam", dict(maximize=None)),
    "SGD dampening 1.5": ("SGD", dict(momentum=0.9, dampening=1.5)),
    "SGD nesterov 1": ("SGD", dict(momentum=0.9, nesterov=1)),
    "Adam betas ndarray": ("Adam", dict(betas=np.array([0.8, 0.95]))),
    "AdamW betas sequence": ("AdamW", dict(betas=_ListLike(0.8, 0.95))),
}


@pytest.mark.parametrize("case", sorted(TORCH_ACCEPTS))
def test_hyper_parameters_torch_accepts_are_accepted(case):
    """What torch.optim takes (eps 0, any dampening, 0/1/None for a bool option, betas as
    any pair) fastopt.torch takes, to the same trajectory."""
    name, opts = TORCH_ACCEPTS[case]
    _in_step(name, opts, 3, 4, case)


@pytest.mark.parametrize("opts,kind,match", [
    (dict(amsgrad="no"), TypeError, "amsgrad: expected a bool, got str"),
    (dict(amsgrad=2), TypeError, "amsgrad: expected a bool, got int"),
    (dict(betas="ab"), TypeError, r"betas: expected a pair"),
    (dict(betas=np.array([0.9, 0.99, 0.999])), TypeError, r"betas: expected a pair"),
    (dict(eps=-1e-8), ValueError, "eps: must be in"),
    (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
])
def test_hyper_parameters_torch_refuses_are_refused(opts, kind, match):
    with pytest.raises(kind, match=match):
        ft.Adam([torch.nn.Parameter(torch.ones(2))], **opts)


def test_adagrad_share_memory_like_torch():
    """torch.optim.Adagrad.share_memory() moves the state to shared memory in place; the
    next step steps the moved state (the old memory is freed)."""
    def share(t, opt):
        if t == 1:
            opt.share_memory()

    _, fopt = _in_step("Adagrad", {}, 4, 6, "shared memory", after=share)
    assert all(s["sum"].is_shared() for s in fopt.state.values())


def test_shallow_copy_shares_the_state_like_torch():
    """copy.copy(opt) is a second optimizer over the same state: stepping the two in turn
    is one trajectory, as with torch.optim."""
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", dict(amsgrad=True), 0.01)
    copies = [copy.copy(topt), copy.copy(fopt)]
    assert copies[1].state is fopt.state
    gen = torch.Generator().manual_seed(8)
    for t in range(5):
        grads = _draw_grads(tp, gen, t)
        for params, opt in ((tp, (topt, copies[0])[t % 2]), (fp, (fopt, copies[1])[t % 2])):
            _set_grads(params, grads)
            opt.step()
        _assert_same_state(fopt, topt, fp, tp, f"shallow copies in turn, step {t + 1}")


def test_state_edits_between_steps_are_seen_like_torch():
    """The buckets keep the state entries and tensors between steps; every kind of edit of
    the state between steps is seen as torch.optim sees it: a whole entry replaced (same
    values, other values, a new step count), an entry removed and put back, a tensor of an
    entry replaced, a state_dict round trip, a param without a grad and back."""
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", dict(amsgrad=True), 0.01)
    gen = torch.Generator().manual_seed(21)
    for t in range(10):
        grads = _draw_grads(tp, gen, t)
        if t in (3, 4):
            grads[1] = None  # skipped twice, then stepped again with its state
        for params, opt in ((tp, topt), (fp, fopt)):
            _set_grads(params, grads)
            if t == 1:  # a whole entry, the same values
                opt.state[params[0]] = {k: v.clone() for k, v in opt.state[params[0]].items()}
            if t == 2:  # a whole entry, other values and step count
                entry = opt.state[params[2]]
                opt.state[params[2]] = {k: v * 0.5 if k != "step" else torch.tensor(1.0)
                                        for k, v in entry.items()}
            if t == 5:  # one tensor of an entry
                opt.state[params[3]]["exp_avg"] = opt.state[params[3]]["exp_avg"] * -1.0
            if t == 6:  # removed and put back (the same dict, another place in the state)
                entry = opt.state.pop(params[0])
                opt.state[params[0]] = entry
            if t == 7:
                opt.load_state_dict(torch_roundtrip(opt.state_dict()))
            opt.step()
        _assert_same_state(fopt, topt, fp, tp, f"state edits, step {t + 1}")


def test_cached_buckets_are_reused_without_state_edits(monkeypatch):
    """Steps that change nothing reuse the buckets and their state lists: no lookups of
    ``state[p]`` (Tensor.__hash__ is not called) and no rebuild."""
    params = _params()[:4]
    opt = ft.AdamW(params, lr=0.01)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    opt.step()  # the state dict as the buckets saw it is taken at the end of a step
    hashes = []
    real_hash = torch.Tensor.__hash__
    monkeypatch.setattr(torch.Tensor, "__hash__", lambda t: hashes.append(1) or real_hash(t))
    before = [p.detach().clone() for p in params]
    opt.step()
    assert hashes == []
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.state[params[1]] = {k: v.clone() for k, v in opt.state[params[1]].items()}
    hashes.clear()
    opt.step()
    assert hashes  # an entry replaced: looked up again
    assert float(opt.state[params[1]]["step"]) == 4.0


# ---- checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name", list(FULL))
def test_checkpoints_interchange_with_torch_optim(name, direction):
    """A checkpoint (optimizer and scheduler) saved by one side, loaded by the other, which
    continues on the trajectory the saving side keeps following."""
    lr = LR[name]
    first, second = (torch.optim, ft) if direction == "torch->fastopt" else (ft, torch.optim)

    def make(module, params):
        kw = dict(foreach=False) if module is torch.optim else {}
        opt = getattr(module, name)(_groups(params, name, lr), lr=lr, **FULL[name], **kw)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)

    params = _params()
    opt, sched = make(first, params)
    gen = torch.Generator().manual_seed(5)
    for t in range(4):
        _set_grads(params, _draw_grads(params, gen, t))
        opt.step()
        sched.step()
    saved = torch_roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2, sched2 = make(second, resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for t in range(4, 9):
        grads = _draw_grads(params, gen, t)
        for ps, o, s in ((params, opt, sched), (resumed, opt2, sched2)):
            _set_grads(ps, grads)
            o.step()
            s.step()
        got, want = (opt2, opt)
        _assert_same_state(got, want, resumed, params, f"{direction} {name} step {t + 1}")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_own_checkpoint_resumes_bit_for_bit(name):
    params = _params()[:4]
    opt = getattr(ft, name)(params, lr=0.01, **FULL.get(name, {}))
    gen = torch.Generator().manual_seed(6)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(6)]
    for t in range(3):
        _set_grads(params, grads[t])
        opt.step()
    saved = torch_roundtrip(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = getattr(ft, name)(resumed, lr=0.5)  # options come from the checkpoint
    opt2.load_state_dict(saved)
    for t in range(3, 6):
        for ps, o in ((params, opt), (resumed, opt2)):
            _set_grads(ps, grads[t])
            o.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == 0.01


def test_state_layout_is_torchs():
    params = _params()[:4]
    for module in (torch.optim, ft):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = module.Adam(ps, amsgrad=True)
        _set_grads(ps, [torch.ones(p.shape) for p in ps])
        opt.step()
        sd = opt.state_dict()
        st = sd["state"][1]
        assert sorted(st) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
        assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"
        assert st["step"].dim() == 0 and float(st["step"]) == 1.0
        assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]


# ---- schedulers ------------------------------------------------------------------------------

SCHEDULERS: Dict[str, Callable[[Any], Any]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0,
                                                                            factor=0.5),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6)], milestones=[3]),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
}


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_schedulers(sched, name):
    opts = dict(momentum=0.9) if name == "SGD" else {}
    (tp, topt, ts), (fp, fopt, fs) = _pair(name, opts, LR[name], scheduler=SCHEDULERS[sched])
    gen = torch.Generator().manual_seed(7)
    for t in range(STEPS):
        grads = _draw_grads(tp, gen, t)
        for params, opt, s in ((tp, topt, ts), (fp, fopt, fs)):
            _set_grads(params, grads)
            opt.step()
            s.step(float(t % 3)) if sched == "ReduceLROnPlateau" else s.step()
        assert [g["lr"] for g in fopt.param_groups] == [g["lr"] for g in topt.param_groups]
        _assert_same_state(fopt, topt, fp, tp, f"{sched} step {t + 1}")


def test_tensor_lr_is_read_at_each_step():
    params = _params()[:3]
    lr = torch.tensor(0.1)
    (tp, topt), (fp, fopt) = [
        (ps, module.SGD(ps, lr=lr.clone() if module is ft else lr, momentum=0.9,
                        **({} if module is ft else dict(foreach=False))))
        for module, ps in ((torch.optim, params), (ft, [p.detach().clone().requires_grad_()
                                                          for p in params]))]
    for t in range(4):
        for ps, o in ((tp, topt), (fp, fopt)):
            _set_grads(ps, [torch.full(p.shape, 1.0 + t) for p in ps])
            o.param_groups[0]["lr"].fill_(0.1 / (t + 1))
            o.step()
    for p, q in zip(fp, tp):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---- GradScaler ------------------------------------------------------------------------------

def _scaled_loop(module, steps: int, inf_at: int, clip: bool, device: str = "cpu"):
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.to(device)
    kw = dict(foreach=False) if module is torch.optim else {}
    opt = module.AdamW(model.parameters(), lr=0.01, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=3)
    gen = torch.Generator().manual_seed(9)
    scales = []
    for t in range(steps):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if t == inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        if clip:  # the grads unscaled in place before the step
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("clip", [False, True], ids=["scaled", "unscale_-clip"])
def test_grad_scaler_matches_torch_optim_with_a_skipped_step(clip):
    fm, fopt, fscales = _scaled_loop(ft, 8, inf_at=3, clip=clip)
    tm, topt, tscales = _scaled_loop(torch.optim, 8, inf_at=3, clip=clip)
    assert fscales == tscales and fscales[3] < fscales[2]  # the inf halved the scale
    for p, q in zip(fm.parameters(), tm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert float(fopt.state[p]["step"]) == float(topt.state[q]["step"]) == 7.0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and fastopt._cuda")
@pytest.mark.parametrize("inf_at", [3, 7], ids=["skip-inside", "skip-last"])
def test_grad_scaler_on_the_gpu_reads_found_inf_on_the_device(inf_at):
    """On the GPU the kernels read the scale and found_inf from device memory (no host
    read in the step); the counts of a skipped step go back when the flag is read (the next
    step, state_dict()): the trajectory and the counts are torch.optim's."""
    fm, fopt, fscales = _scaled_loop(ft, 8, inf_at=inf_at, clip=False, device="cuda")
    tm, topt, tscales = _scaled_loop(torch.optim, 8, inf_at=inf_at, clip=False, device="cuda")
    assert fscales == tscales
    saved = fopt.state_dict()  # settles the last step
    for k, (p, q) in enumerate(zip(fm.parameters(), tm.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert float(saved["state"][k]["step"]) == float(topt.state[q]["step"]) == 7.0
        assert float(fopt.state[p]["step"]) == 7.0


@pytest.mark.parametrize("how", ["next step", "state_dict", "deepcopy", "load_state_dict"])
def test_a_skipped_gpu_step_is_settled_before_its_counts_are_used(how):
    """The bookkeeping of a GPU step under a GradScaler (whose kernels read found_inf on
    the device), run on the CPU with the record such a step leaves: counted, not applied,
    found_inf set. Its counts go back before a step, a save, a copy or a load uses them."""
    import copy

    p = torch.nn.Parameter(torch.randn(4))
    opt = ft.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    opt.step()
    bucket = opt._caches[0].buckets[0]
    bucket.done += 1  # what the skipped step counted
    bucket.steps.add_(1)
    bucket.steps_version = bucket.steps._version

    class Done:  # the event after the copy of found_inf: complete
        def synchronize(self):
            pass

    opt._unsettled = ft._Unsettled(torch.tensor(1.0), Done(), [bucket])
    if how == "next step":
        opt.step()
        assert float(opt.state[p]["step"]) == 3.0
    elif how == "state_dict":
        assert float(opt.state_dict()["state"][0]["step"]) == 2.0
    elif how == "deepcopy":
        copied = copy.deepcopy(opt)
        assert [float(e["step"]) for e in copied.state.values()] == [2.0]
    else:
        saved = ft.AdamW([torch.nn.Parameter(torch.randn(4))], lr=0.1).state_dict()
        opt.load_state_dict(saved)  # settles first: nothing pending is left to undo later
        assert opt._unsettled is None
    assert opt._unsettled is None and float(bucket.steps[0]) == 2.0 + (how == "next step")


def test_grad_scaler_unscales_inside_the_kernel():
    """The scaler hands its scale to the step: the grads are divided inside the fused call,
    not rewritten; found_inf skips the step."""
    opt_cls = ft.AdamW
    assert opt_cls._step_supports_amp_scaling
    p = torch.randn(5, requires_grad=True)
    opt = opt_cls([p], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale((p * p).sum()).backward()
    scaled = p.grad.clone()
    want = p.detach().clone().requires_grad_()
    want.grad = scaled / 256.0
    torch.optim.AdamW([want], lr=0.01, foreach=False).step()
    scaler.step(opt)
    assert torch.equal(p.grad, scaled)  # not written
    torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    # found_inf set: the step is skipped, step count included
    p.grad[0] = float("nan")
    scaler.update()
    before = p.detach().clone()
    scaler.step(opt)
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 1.0


# ---- torch.optim behaviour ---------------------------------------------------------------------

def test_hooks_closure_zero_grad():
    p = torch.randn(4, requires_grad=True)
    opt = ft.Adam([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    handle = register_optimizer_step_post_hook(
        lambda o, a, k: calls.append("global"))
    try:
        def closure():
            opt.zero_grad()
            loss = (p * p).sum()
            loss.backward()
            return loss
        loss = opt.step(closure)
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global"]
    assert float(loss.detach()) > 0 and p.grad is not None
    opt.zero_grad()
    assert p.grad is None
    assert isinstance(opt, torch.optim.Optimizer)


def test_compiled_training_step_runs_the_step_outside_the_graph():
    """Under torch.compile the step and clip_grad_norm_ are skipped by dynamo whole (no
    graphs traced in them, no recompilations): a compiled training step keeps one graph,
    the forward, and steps as torch.optim does eagerly."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fopt = ft.AdamW(models[0].parameters(), lr=0.01)
    topt = torch.optim.AdamW(models[1].parameters(), lr=0.01, foreach=False)

    def train_step(model, opt, x):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        clip = ft.clip_grad_norm_ if isinstance(opt, ft.AdamW) else torch.nn.utils.clip_grad_norm_
        clip(model.parameters(), 0.5)
        opt.step()

    counter = CompileCounter()
    compiled = torch.compile(train_step, backend=counter)
    for _ in range(4):
        x = torch.randn(32, 8, generator=gen)
        compiled(models[0], fopt, x)
        train_step(models[1], topt, x)
    assert counter.frame_count == 1  # the forward; nothing inside fastopt's step
    assert_close([_np(p) for p in models[0].parameters()],
                 [_np(p) for p in models[1].parameters()], np.float32, "compiled loop",
                 tol=TOL[torch.float32])
    step_alone = CompileCounter()
    torch.compile(fopt.step, backend=step_alone)()
    assert step_alone.frame_count == 0
    torch._dynamo.reset()


def test_step_between_forward_and_backward_raises_like_torch():
    for module in (torch.optim, ft):
        w = torch.randn(3, requires_grad=True)
        opt = module.SGD([w], lr=0.1)
        w.grad = torch.ones(3)
        loss = (w * w).sum()  # saves w for the backward
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_state_versions_are_bumped():
    p = torch.randn(4, requires_grad=True)
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    versions = [p._version, opt.state[p]["exp_avg"]._version, opt.state[p]["exp_avg_sq"]._version]
    opt.step()
    assert [p._version, opt.state[p]["exp_avg"]._version,
            opt.state[p]["exp_avg_sq"]._version] > versions
    assert all(a > b for a, b in zip([p._version, opt.state[p]["exp_avg"]._version,
                                      opt.state[p]["exp_avg_sq"]._version], versions))


def test_state_tensors_are_their_own_and_every_one_is_bumped():
    """The state a step makes: one tensor per param and key, as torch.optim's (no views of
    a shared buffer: one param's state saved alone is that state's size, and autograd sees
    the versions torch.optim gives), laid out like its param; each step bumps the version
    of every state tensor it updates, and only those."""
    params = [torch.randn(*shape, requires_grad=True) for shape in [(3, 5), (7,), (2, 2, 2)]]
    params.append(torch.randn(4, 6).t().requires_grad_())  # not contiguous
    opt = ft.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            t = opt.state[p][key]
            assert t._base is None and t.untyped_storage().nbytes() == 4 * p.numel()
            assert t.stride() == p.stride()

    def versions(ps):
        return [opt.state[p][k]._version for p in ps for k in ("exp_avg", "exp_avg_sq")]

    before = versions(params)
    opt.step()
    assert all(a > b for a, b in zip(versions(params), before))
    # a param without a grad: its state is neither stepped nor bumped, so a graph that
    # saved it still backpropagates (as with torch.optim)
    x = torch.randn(7, requires_grad=True)
    y = (x * opt.state[params[1]]["exp_avg"]).sum()
    params[1].grad = None
    before = versions(params)
    opt.step()
    after = versions(params)
    assert after[2:4] == before[2:4] and all(a > b for a, b in zip(after[:2], before[:2]))
    y.backward()
    buf = io.BytesIO()
    torch.save(opt.state_dict()["state"][0], buf)
    assert buf.tell() < 2 * 4 * 2 * params[0].numel() + 4096  # two (3, 5) float32 tensors


def test_a_refused_step_loses_no_state_edit():
    """A state edit before a step that a group refuses is still seen by the next step of
    every group."""
    pairs = []
    for cls in (torch.optim.AdamW, ft.AdamW):
        a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        pairs.append(([a, b], cls([{"params": [a]}, {"params": [b]}], lr=0.1)))
    for t in range(5):
        for (a, b), opt in pairs:
            a.grad, b.grad = torch.full((4,), 1.0 + t), torch.full((4,), 2.0 - t)
            if t == 1:
                opt.state[b]["exp_avg"] = torch.zeros(4)
                if isinstance(opt, ft.AdamW):  # refused by fastopt only: torch takes it
                    opt.param_groups[0]["betas"] = (2.0, 0.999)
                    with pytest.raises(ValueError, match="beta"):
                        opt.step()
                    opt.param_groups[0]["betas"] = (0.9, 0.999)
                    continue
            if t == 1:
                continue
            opt.step()
    (tp, topt), (fp, fopt) = pairs
    _assert_same_state(fopt, topt, fp, tp, "after a refused step")


def test_state_entries_carried_from_another_optimizer_are_checked():
    """new.state[p] = old.state[q]: the entry notes its changes in the old optimizer's
    state, so the new one checks it at every step."""
    results = []
    for cls in (torch.optim.AdamW, ft.AdamW):
        q, p = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        old = cls([q], lr=0.1)
        q.grad = torch.ones(4)
        old.step()
        new = cls([p], lr=0.1)
        new.state[p] = old.state[q]
        p.grad = torch.ones(4)
        new.step()
        new.state[p]["exp_avg"] = torch.zeros(4)
        new.step()
        new.step()
        results.append((p.detach().clone(), new.state[p]["exp_avg"].clone()))
    for got, want in zip(results[1], results[0]):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_state_copies_are_shallow_like_torch():
    import copy

    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    assert opt.state.default_factory is dict
    for copied in (opt.state.copy(), copy.copy(opt.state)):
        assert isinstance(copied, collections.defaultdict)
        assert list(copied) == [p] and copied[p] is opt.state[p]
    opt.state = opt.state.copy()  # a state of its own: still stepped right
    opt.state[p]["exp_avg"] = torch.zeros(4)
    opt.step()
    assert opt.state[p]["exp_avg"].abs().sum() > 0


def _halve_exp_avg(opt, p):
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"] * 0.5


STATE_EDITS = {  # an edit of the state between steps: t == 1 and t == 3
    "tensor replaced in an entry": (_halve_exp_avg, _halve_exp_avg),
    "entry set as a plain dict, then edited": (
        lambda opt, p: opt.state.__setitem__(p, dict(opt.state[p])), _halve_exp_avg),
    "entry removed": (lambda opt, p: opt.state.pop(p), lambda opt, p: opt.state[p].clear()),
    "entry updated": (lambda opt, p: opt.state[p].update(exp_avg=opt.state[p]["exp_avg"] * 2),
                      lambda opt, p: opt.state[p].setdefault("exp_avg", None)),
    "state cleared": (lambda opt, p: opt.state.clear(), _halve_exp_avg),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
def test_state_edits_without_a_rebuild_are_seen_like_torch(edit):
    """Edits of the state between steps when nothing else changes (every param has a grad
    at every step, so no bucket is rebuilt): the state notes them (an entry set as a plain
    dict cannot, so it is checked at every step), and the steps go on as torch.optim's."""
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen) for s in [(5, 3), (7,)]]
    pairs = []
    for cls in (torch.optim.Adam, ft.Adam):
        params = [x.clone().requires_grad_() for x in start]
        pairs.append((params, cls(params, lr=0.01)))
    (tp, topt), (fp, fopt) = pairs
    for t in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in tp]
        for params, opt in pairs:
            _set_grads(params, grads)
            opt.step()
            if t in (1, 3):
                STATE_EDITS[edit][t // 2](opt, params[0])
        _assert_same_state(fopt, topt, fp, tp, f"{edit}, step {t + 1}")


def test_optimizer_copies_keep_stepping_on_their_own_state():
    import copy

    (tp, topt, _), (fp, fopt, _) = _pair("Adam", {}, 0.01)
    gen = torch.Generator().manual_seed(9)
    for t in range(5):
        grads = _draw_grads(tp, gen, t)
        for params, opt in ((tp, topt), (fp, fopt)):
            _set_grads(params, grads)
            opt.step()
        if t == 1:  # a deep copy holds copies of the params: step those from now on
            fp, fopt = copy.deepcopy((fp, fopt))
            assert type(next(iter(fopt.state.values()))) is not dict  # tracked again
        _assert_same_state(fopt, topt, fp, tp, f"deep-copied optimizer, step {t + 1}")


def test_inference_tensors_are_refused_like_torch():
    with torch.inference_mode():
        p = torch.randn(3)
        g = torch.randn(3)
    for module in (torch.optim, ft):
        opt = module.SGD([p], lr=0.1)
        p.grad = g
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            opt.step()
    before = p.clone()
    with torch.inference_mode():
        ft.SGD([p], lr=0.1).step()  # allowed inside inference mode, as torch
    assert not torch.equal(p, before)


def test_sparse_grads_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ft.Adam(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]\.grad: .*sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_are_refused(flag):
    with pytest.raises(ValueError, match=flag):
        ft.Adam([torch.randn(2, requires_grad=True)], **{flag: True})
    # from a checkpoint whose group sets it
    p = torch.randn(2, requires_grad=True)
    opt = ft.Adam([p])
    opt.param_groups[0][flag] = True
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{flag}'\]"):
        opt.step()


def test_foreach_and_fused_are_accepted_no_ops():
    a = torch.randn(5, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    for p, kw in ((a, dict(foreach=True)), (b, dict(fused=True))):
        p.grad = torch.ones(5)
        ft.Adam([p], lr=0.1, **kw).step()
    assert torch.equal(a, b)


def test_every_optimizer_of_the_table_has_a_class():
    from fastopt._specs import OPTIMIZERS as SPECS

    assert set(ft.CLASSES) == set(SPECS)
    assert sorted(ft.CLASSES[n].__name__ for n in SPECS if SPECS[n].torch_name) == sorted(
        TORCH_NAMES)


def test_signatures_and_defaults_are_torchs():
    import inspect
    for name in TORCH_NAMES:
        want = inspect.signature(getattr(torch.optim, name).__init__).parameters
        got = inspect.signature(getattr(ft, name).__init__).parameters
        for arg, param in want.items():
            assert arg in got, f"{name}: {arg}"
            assert got[arg].default == param.default, f"{name}.{arg}"
            assert got[arg].kind == param.kind, f"{name}.{arg} kind"
        extras = ("l1", "state_dtype", "master_weights", "stochastic_rounding", "seed",
                  "masks")  # fastopt's own
        for arg in extras:
            if arg == "l1" and "l1" not in getattr(ft, name)._spec.hyper:  # Rprop, ASGD
                # (a proximal L1 step needs the step's size: Rprop's are per element, ASGD's eta)
                assert arg not in got
                continue
            assert got[arg].kind == inspect.Parameter.KEYWORD_ONLY
        p = torch.randn(2, requires_grad=True)
        tdef = getattr(torch.optim, name)([p]).defaults
        fdef = getattr(ft, name)([p]).defaults
        own = ("l1", "state_dtype", "master_weights", "stochastic_rounding",
               "rounding_seed")  # group options
        assert {k: v for k, v in fdef.items() if k not in own} == tdef


def test_bad_hyper_parameters_name_the_group_and_change_nothing():
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        ft.Adam([torch.randn(2, requires_grad=True)], betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="lr"):
        ft.SGD([torch.randn(2, requires_grad=True)], lr=-1.0)
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = ft.Adam([{"params": [a]}, {"params": [b], "betas": (0.9, 1.0)}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    before = a.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['betas'\]\[1\]"):
        opt.step()
    # every group is checked before any is stepped: group 0 is untouched too
    assert torch.equal(a.detach(), before) and not opt.state
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    opt.param_groups[1]["weight_decay"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['weight_decay'\]"):
        opt.step()
    with pytest.raises(TypeError, match="dtype"):
        x = torch.zeros(2, dtype=torch.complex32, requires_grad=True)
        x.grad = torch.ones(2, dtype=torch.complex32)
        ft.Adam([x]).step()


def test_a_non_tensor_put_in_a_group_is_named():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.AdamW([p])
    for bad in (3.0, None):
        opt.param_groups[0]["params"].append(bad)
        p.grad = torch.ones(3)
        with pytest.raises(TypeError, match=r"^param_groups\[0\]\['params'\]\[1\]: expected a "
                                            r"torch tensor, got"):
            opt.step()
        assert torch.equal(p.detach(), torch.ones(3))
        opt.param_groups[0]["params"].pop()


def test_add_param_group_midway():
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", {}, 0.01)
    extra = [torch.randn(5, dtype=torch.float32, requires_grad=True) for _ in range(2)]
    extra[1] = extra[0].detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(10)
    for t in range(6):
        if t == 3:
            topt.add_param_group({"params": [extra[0]], "lr": 0.02})
            fopt.add_param_group({"params": [extra[1]], "lr": 0.02})
        grads = _draw_grads(tp, gen, t)
        g_extra = torch.randn(5, generator=gen)
        for params, opt, e in ((tp, topt, extra[0]), (fp, fopt, extra[1])):
            _set_grads(params, grads)
            e.grad = g_extra.clone()
            opt.step()
    _assert_same_state(fopt, topt, fp + extra[1:], tp + extra[:1], "add_param_group")


# ---- layouts and dtypes ------------------------------------------------------------------------

def test_grad_with_other_strides_than_its_param():
    """torch allows a grad laid out differently from its param: stepped through a copy in
    the param's layout; the grad itself is not written."""
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", {}, 0.01)
    gen = torch.Generator().manual_seed(11)
    for t in range(3):
        grads = _draw_grads(tp, gen, t)
        grads[2] = grads[2].t().contiguous().t()  # (7, 5) with strides (1, 7)
        for params, opt in ((tp, topt), (fp, fopt)):
            _set_grads(params, grads)
            params[2].grad = grads[2].clone().t().contiguous().t()
            kept = params[2].grad.clone()
            opt.step()
            assert torch.equal(params[2].grad, kept)
    _assert_same_state(fopt, topt, fp, tp, "grad strides")


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 0.0], ids=["plain", "clipped", "zeroed"])
def test_negative_view_grads_are_stepped_by_value(max_grad_norm):
    """A grad that is a negative view (a zero-copy -x) is stepped by value as torch.optim
    steps it, also with ``max_grad_norm`` (a coefficient of 0 scales it in place, as it
    does any grad); torch.optim's side is clipped by clip_grad_norm_ on plain grads."""
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", {}, 0.01)
    fopt.max_grad_norm = max_grad_norm
    gen = torch.Generator().manual_seed(12)
    for t in range(3):
        grads = _draw_grads(tp, gen, t)
        _set_grads(tp, grads)
        for p, g in zip(fp, grads):
            p.grad = None if g is None else (-g).clone()._neg_view()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(tp, max_grad_norm, foreach=False)
        topt.step()
        fopt.step()
        for p, q in zip(fp, tp):
            if p.grad is not None:
                assert p.grad.is_neg() and torch.equal(p.grad, q.grad) == (max_grad_norm != 1e-3)
    _assert_same_state(fopt, topt, fp, tp, "negative view grads")


def _complex_case(dtype: torch.dtype, seed: int) -> List[torch.Tensor]:
    """Complex params of odd sizes beside a real one of the matching float dtype."""
    g = torch.Generator().manual_seed(seed)
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}[dtype]
    return [torch.randn(s, generator=g, dtype=dtype) for s in [(1,), (7, 5), (33,), (4097,)]] + [
        torch.randn(6, generator=g, dtype=real)]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("name,opts", _cases())
def test_complex_params_match_torch_optim(name, opts, dtype):
    """Complex params are stepped as torch.optim steps them (their real and imaginary parts
    as real numbers; Adagrad's initial_accumulator_value in both), complex state of torch's
    keys; a grad given as a conjugate view is taken by value; checkpoints go both ways."""
    start = _complex_case(dtype, 4)
    runs = []
    for module in (torch.optim, ft):
        ps = [p.clone().requires_grad_() for p in start]
        kw = dict(foreach=False) if module is torch.optim else {}
        runs.append((ps, getattr(module, name)(ps, lr=LR[name], **opts, **kw)))
    (tp, topt), (fp, fopt) = runs
    gen = torch.Generator().manual_seed(5)
    for t in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in start]
        for p, g in zip(tp, grads):
            p.grad = g.clone()
        for p, g in zip(fp, grads):  # step 1: conjugate views holding the same values
            p.grad = g.conj().resolve_conj().conj() if t == 1 and g.is_complex() else g.clone()
        topt.step()
        fopt.step()
        if t == 1:
            assert fp[1].grad.is_conj()
            fopt.load_state_dict(torch_roundtrip(topt.state_dict()))  # a torch.optim checkpoint
            topt.load_state_dict(torch_roundtrip(fopt.state_dict()))  # and back
    tol = 1e-5 if dtype == torch.complex64 else 1e-10
    for i, (a, b) in enumerate(zip(fp, tp)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"param {i}")
        got, want = fopt.state[a], topt.state[b]
        assert set(got) == set(want), f"param {i}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert got[key].dtype == want[key].dtype, f"param {i} {key}"
            torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol,
                                       msg=f"param {i} {key}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "Sophia"])
def test_complex_params_step_as_their_real_parts(name, device):
    """Bit for bit: a complex param's step is the step of the float tensor of its parts,
    state included (Lion has no torch.optim peer; this is its check)."""
    start = [p.to(device) for p in _complex_case(torch.complex64, 6)]
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device) for p in start]
             for _ in range(3)]
    kw = {"SGD": dict(momentum=0.9, weight_decay=0.1), "Rprop": dict(etas=(0.4, 1.3))}.get(
        name, dict(weight_decay=0.1))
    cplx = [p.clone().requires_grad_() for p in start]
    real = [torch.view_as_real(p).clone().requires_grad_() if p.is_complex()
            else p.clone().requires_grad_() for p in start]
    copt, ropt = getattr(ft, name)(cplx, lr=0.01, **kw), getattr(ft, name)(real, lr=0.01, **kw)
    for step in grads:
        for c, r, g in zip(cplx, real, step):
            c.grad = g.clone()
            r.grad = torch.view_as_real(g).clone() if g.is_complex() else g.clone()
        copt.step()
        ropt.step()
    for c, r in zip(cplx, real):
        assert torch.equal(torch.view_as_real(c.detach()) if c.is_complex() else c, r.detach())
        for key, value in ropt.state[r].items():
            got = copt.state[c][key]
            assert torch.equal(torch.view_as_real(got) if got.is_complex() else got, value)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")], ids=["2", "1", "3", "inf"])
@pytest.mark.parametrize("max_norm", [1e-2, 0.0, 100.0], ids=["clipped", "zeroed", "kept"])
def test_complex_grads_clipped_like_torch(max_norm, norm_type):
    """fastopt.torch.clip_grad_norm_ on complex grads (a conjugate view among them, taken
    by value) as torch's clip_grad_norm_: the same norm (of the moduli, in the real dtype)
    and the same grads; with max_grad_norm (the 2-norm) the same step too."""
    start = _complex_case(torch.complex64, 8)
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in start]
    tp, fp, sp = ([p.clone().requires_grad_() for p in start] for _ in range(3))
    for p, q, r, g in zip(tp, fp, sp, grads):
        p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
    fp[1].grad = grads[1].conj().resolve_conj().conj()
    want = torch.nn.utils.clip_grad_norm_(tp, max_norm, norm_type)
    got = ft.clip_grad_norm_(fp, max_norm, norm_type)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    for p, q in zip(fp, tp):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    if norm_type != 2.0:
        return
    topt = torch.optim.Adam(tp, lr=0.01, foreach=False)
    sopt = ft.Adam(sp, lr=0.01)
    sopt.max_grad_norm = max_norm
    topt.step()
    sopt.step()
    torch.testing.assert_close(sopt.last_grad_norm, want)
    for p, q in zip(sp, tp):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_complex_kernel_errors_say_they_describe_real_views():
    p = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.zeros(4, dtype=torch.complex64)
    opt = ft.Adam([p])
    opt.step()
    p.grad.data = torch.ones(4, dtype=torch.complex128)  # .data skips autograd's dtype check
    before = p.detach().clone()
    with pytest.raises(TypeError, match=r"^param_groups\[0\]\['params'\]\[0\] \(grads\): "
                       r"dtype float64 .* \(of the real views of complex tensors: a trailing "
                       r"dimension of 2, the real dtype\)$"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_complex_grad_of_infinite_modulus_and_nan_part_clips_like_torch():
    """|inf + nan*j| is inf, as torch's norm says (its parts' squares sum to NaN): the
    2-norm is inf, so the coefficient is 0 and the other grads become 0, not NaN."""
    bad = torch.tensor([complex(math.inf, math.nan), 1 + 1j, 2])
    want_ps, got_ps, step_ps = ([torch.randn(3, dtype=torch.complex64, generator=g),
                                 torch.randn(2, generator=g)]
                                for g in [torch.Generator().manual_seed(3) for _ in range(3)])
    for ps in (want_ps, got_ps, step_ps):
        for p, grad in zip(ps, [bad, torch.tensor([1.0, 2.0])]):
            p.requires_grad_()
            p.grad = grad.clone()
    want = torch.nn.utils.clip_grad_norm_(want_ps, 1.0)
    got = ft.clip_grad_norm_(got_ps, 1.0)
    assert math.isinf(float(want)) and math.isinf(float(got))
    assert torch.equal(got_ps[1].grad, want_ps[1].grad)  # zeros
    opt = ft.SGD(step_ps, lr=0.1)
    opt.max_grad_norm = 1.0
    before = step_ps[1].detach().clone()
    opt.step()
    assert math.isinf(float(opt.last_grad_norm))
    assert torch.equal(step_ps[1].detach(), before)  # stepped by a zero grad


def test_complex_params_refused_where_not_supported():
    """Sophia, 16-bit or 8-bit state and masks are refused for complex params, and params
    that are conjugate or negative views (complex or not) for all, naming them; nothing is
    written."""
    p = torch.randn(5000, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.randn(5000, dtype=torch.complex64)
    before = p.detach().clone()
    cases = [
        (lambda: ft.Sophia([p]), TypeError, "complex params are not supported by Sophia"),
        (lambda: ft.AdamW([p], state_dtype="int8"), ValueError, "state_dtype='float32'"),
        (lambda: ft.AdamW([p], state_dtype="bfloat16"), ValueError, "state_dtype='float32'"),
        (lambda: ft.AdamW8bit([p]), ValueError, "state_dtype='float32'"),
    ]
    for make, kind, match in cases:
        opt = make()
        with pytest.raises(kind, match=r"param_groups\[0\]\['params'\]\[0\]: .*" + match):
            opt.step()
        assert torch.equal(p.detach(), before) and not opt.state.get(p)
    with pytest.raises(ValueError, match=r"masks\[0\]: masks are for real params"):
        ft.AdamW([p], masks=[torch.ones(5000, dtype=torch.bool)])
    for q, view in [(torch.randn(4, dtype=torch.complex64).conj(), "conjugate"),
                    (torch._neg_view(torch.randn(4, dtype=torch.complex64)), "negative"),
                    (torch._neg_view(torch.randn(4)), "negative")]:
        q.requires_grad_()
        q.grad = torch.randn(4, dtype=q.dtype)
        kept = q.detach().clone()
        opt = ft.Adam([q])
        with pytest.raises(ValueError, match=rf"\]\[0\]: is a {view} view"):
            opt.step()
        assert torch.equal(q.detach(), kept) and not opt.state.get(q)


@pytest.mark.parametrize("name,opts", [("Adam", {}), ("RAdam", {}), ("RMSprop", {}),
                                       ("RMSprop", dict(alpha=1.0)), ("Adadelta", {}),
                                       ("Adadelta", dict(rho=1.0))])
def test_squared_grads_are_scaled_before_they_overflow(name, opts):
    """(1-b)*g*g is evaluated as torch's addcmul_ does, ((1-b)*g)*g: with a float32 grad of
    3e19 the second moment stays finite (g*g alone overflows), and with b = 1 it is 0, not
    0*inf = NaN."""
    runs = []
    for module in (torch.optim, ft):
        p = torch.ones(3, requires_grad=True)
        opt = getattr(module, name)([p], lr=0.01, **opts,
                                    **(dict(foreach=False) if module is torch.optim else {}))
        for g in (3e19, 1.0, -2e19):
            p.grad = torch.full((3,), g)
            opt.step()
        runs.append((p, opt))
    (tp, topt), (fp, fopt) = runs
    assert torch.isfinite(fp).all()
    torch.testing.assert_close(fp, tp, rtol=1e-6, atol=0)
    for key, value in topt.state[tp].items():
        torch.testing.assert_close(fopt.state[fp][key], value, rtol=1e-6, atol=0, msg=key)


def test_params_with_gaps_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 8)[:, ::2])  # a leaf viewing every other column
    p.grad = torch.ones(4, 4)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: must be dense"):
        ft.Adam([p]).step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_transposed_params(device):
    """Dense params in any stride order are stepped over their storage (needs the compiled
    strided-tensor support); the state has the param's strides, as torch's."""
    def make(module):
        torch.manual_seed(12)
        conv = torch.nn.Conv2d(3, 4, 3).to(device).to(memory_format=torch.channels_last)
        t = torch.nn.Parameter(torch.randn(6, 4, device=device).t())  # strides (1, 4)
        ps = [conv.weight, conv.bias, t]
        kw = dict(foreach=False) if module is torch.optim else {}
        return conv, ps, module.AdamW(ps, lr=0.01, amsgrad=True, **kw)
    (tc, tp, topt), (fc, fp, fopt) = make(torch.optim), make(ft)
    gen = torch.Generator().manual_seed(13)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6, generator=gen).to(device).to(memory_format=torch.channels_last)
        gt = torch.randn(4, 6, generator=gen).to(device)
        for conv, ps, opt in ((tc, tp, topt), (fc, fp, fopt)):
            opt.zero_grad()
            conv(x).square().mean().backward()
            ps[2].grad = gt.clone()  # strides (6, 1): not the param's
            opt.step()
    assert fp[0].is_contiguous(memory_format=torch.channels_last)
    assert fopt.state[fp[0]]["exp_avg"].stride() == fp[0].stride()
    assert fopt.state[fp[2]]["exp_avg_sq"].stride() == fp[2].stride()
    for p, q in zip(fp, tp):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16bit_params(dtype, device):
    """float16/bfloat16 params and grads, float32 state and math (on the CPU this needs the
    compiled 16-bit host path): torch.optim on float32 copies of the params, rounded back
    to 16 bits after every step, is the reference."""
    gen = torch.Generator().manual_seed(14)
    params = [torch.randn(s, generator=gen).to(dtype).to(device).requires_grad_()
              for s in SHAPES]
    shadow = [p.detach().float().requires_grad_() for p in params]
    fopt = ft.AdamW(params, lr=0.01)
    topt = torch.optim.AdamW(shadow, lr=0.01, foreach=False)
    for _ in range(5):
        for p, s in zip(params, shadow):
            g = torch.randn(p.shape, generator=gen).to(dtype).to(device)
            p.grad = g
            s.grad = g.float()
            with torch.no_grad():
                s.copy_(p.float())
        fopt.step()
        topt.step()
        for p, s in zip(params, shadow):
            want = s.detach().to(dtype)
            # one 16-bit rounding apart at most: the float32 math agrees to ~1e-6
            torch.testing.assert_close(p.detach().float(), want.float(), rtol=2 ** -7, atol=1e-6)
    st = fopt.state[params[0]]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    # a checkpoint keeps the float32 state (torch.optim's load would cast it to 16 bits)
    opt2 = ft.AdamW([p.detach().clone().requires_grad_() for p in params], lr=0.01)
    opt2.load_state_dict(torch_roundtrip(fopt.state_dict()))
    s2 = opt2.state[opt2.param_groups[0]["params"][0]]
    assert s2["exp_avg"].dtype == torch.float32 and torch.equal(s2["exp_avg"], st["exp_avg"])


# ---- a training loop ---------------------------------------------------------------------------

def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 8x8 images of 10 classes; the data ships with the
    package), standardised per pixel."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = (d.data - d.data.mean(0)) / (d.data.std(0) + 1e-6)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(d.target)


def _train(module, x, y, inf_at: int):
    torch.manual_seed(15)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    kw = dict(foreach=False) if module is torch.optim else {}
    opt = module.AdamW([{"params": decay, "weight_decay": 0.05},
                        {"params": no_decay, "weight_decay": 0.0, "lr": 4e-3}], lr=2e-3, **kw)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]
    total = 3 * len(batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 2e-2], total_steps=total)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = []
    step = 0
    for _ in range(3):
        for xb, yb in batches:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            scaler.scale(loss).backward()
            if step == inf_at:
                no_decay[0].grad[3] = float("inf")
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
    acc = float((model(x).argmax(1) == y).float().mean())
    return losses, acc


def test_training_loop_matches_torch_optim():
    # param groups, OneCycleLR and GradScaler (with one injected inf: a skipped step)
    x, y = _digits()
    f_losses, f_acc = _train(ft, x, y, inf_at=5)
    t_losses, t_acc = _train(torch.optim, x, y, inf_at=5)
    np.testing.assert_allclose(f_losses, t_losses, rtol=1e-4, atol=1e-5)
    assert f_acc == pytest.approx(t_acc, abs=2e-3) and f_acc > 0.9
    assert f_losses[-1] < 0.3 * f_losses[0]


def test_importing_fastopt_does_not_import_fastopt_torch():
    import subprocess
    import sys
    code = "import sys, fastopt; assert 'fastopt.torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_param_groups_options_round_trip_through_pickle():
    import pickle
    p = torch.randn(3, requires_grad=True)
    opt = ft.AdamW([p], lr=0.1, l1=0.01)
    p.grad = torch.ones(3)
    opt.step()
    opt2 = pickle.loads(pickle.dumps(opt))
    q = opt2.param_groups[0]["params"][0]
    q.grad = torch.ones(3)
    opt2.step()
    assert float(opt2.state[q]["step"]) == 2.0 and opt2.param_groups[0]["l1"] == 0.01



def test_shallow_copy_has_hooks_of_its_own_and_follows_state_edits():
    """As torch's copy.copy, the copy starts without hooks (the original's do not fire for
    it, nor its for the original); both see an entry replaced through either."""
    (tp, topt, _), (fp, fopt, _) = _pair("Adam", {}, 0.01)
    calls: List[str] = []
    fopt.register_step_pre_hook(lambda opt, args, kwargs: calls.append("original"))
    copies = [copy.copy(topt), copy.copy(fopt)]
    copies[1].register_step_pre_hook(lambda opt, args, kwargs: calls.append("copy"))
    gen = torch.Generator().manual_seed(31)
    first = {}
    for t in range(6):
        grads = _draw_grads(tp, gen, t)
        which = t % 2
        if t == 1:  # entries copied (the same values), put back one step later
            first = {k: {n: v.clone() for n, v in e.items()} for k, e in fopt.state.items()}
            for opt, params in ((topt, tp), (fopt, fp)):
                for p in params:
                    opt.state[p] = {n: v.clone() for n, v in opt.state[p].items()}
        for params, opt in ((tp, (topt, copies[0])[which]), (fp, (fopt, copies[1])[which])):
            _set_grads(params, grads)
            opt.step()
        _assert_same_state(fopt, topt, fp, tp, f"copies in turn with state edits, step {t + 1}")
    assert first
    assert calls == ["original", "copy"] * 3


def test_deleted_group_is_not_kept():
    """Deleting a param group (and its params' state) lets their memory go, as in torch."""
    import gc
    import weakref

    small = torch.nn.Parameter(torch.ones(3))
    big = torch.nn.Parameter(torch.ones(4097))
    opt = ft.Adam([{"params": [small]}, {"params": [big]}])
    small.grad, big.grad = torch.ones(3), torch.ones(4097)
    opt.step()
    refs = weakref.ref(big), weakref.ref(opt.state[big]["exp_avg"])
    del opt.param_groups[1]
    del opt.state[big]
    big = None
    small.grad = torch.ones(3)
    opt.step()
    gc.collect()
    assert [r() for r in refs] == [None, None]


@pytest.mark.parametrize("how", ["data", "share_memory"])
def test_masks_and_step_counts_replaced_in_place_are_followed(how):
    """A mask or a step count whose memory is replaced in place (``t.data = ...``, a
    model's share_memory() on its mask buffers) is read from its new memory."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 4097))
    mask = torch.ones(4097, dtype=torch.bool)
    opt = ft.Adam([p], lr=0.1, masks={p: mask})
    p.grad = torch.ones(4097)
    opt.step()
    if how == "data":
        mask.data = torch.zeros(4097, dtype=torch.bool)
        opt.state[p]["step"].data = torch.tensor(0.0)
    else:
        mask.zero_()
        mask.share_memory_()
        opt.state[p]["step"].share_memory_()
    for _ in range(3):  # reuse of the old memory, if it were still read
        torch.ones(4097, dtype=torch.bool)
    opt.step()
    assert int(torch.count_nonzero(p.detach())) == 0  # every element masked off (zeroed) now
    assert float(opt.state[p]["step"]) == (2.0 if how == "share_memory" else 1.0)


@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("name, key, value", [("Adam", "step", 0.0), ("NAdam", "step", 1.0),
                                              ("NAdam", "mu_product", 0.5), ("ASGD", "eta", 0.5)])
def test_counts_written_where_autograd_does_not_see_are_followed(name, key, value, how):
    """A step count or carried value written through ``.data`` or a NumPy view (no version
    bump) is read at the next step, as torch.optim reads it: the same trajectory."""
    runs = []
    for cls in (getattr(torch.optim, name), getattr(ft, name)):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, n)) for n in (5, 7)]
        opt = cls(params, lr=0.1)
        for t in range(4):
            for p in params:
                p.grad = torch.cos(p.detach() * (t + 1))
            opt.step()
            if t == 1:
                for p in params:
                    held = opt.state[p][key]
                    if how == "data":
                        held.data.fill_(value)
                    else:
                        held.numpy()[...] = value
        runs.append((params, opt))
    (want, topt), (got, fopt) = runs
    for p, q in zip(got, want):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert float(fopt.state[p][key]) == pytest.approx(float(topt.state[q][key]), rel=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_masks_and_clipping(how):
    """copy.deepcopy and pickle carry fastopt's own step options (masks, max_grad_norm)."""
    import pickle

    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.Adam([p], lr=0.1, masks={p: torch.tensor([True, False, True, False])})
    opt.max_grad_norm = 0.5
    p.grad = torch.ones(4)
    opt.step()
    pc, oc = copy.deepcopy((p, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    assert oc.max_grad_norm == 0.5
    assert list(oc.masks) == [pc] and torch.equal(oc.masks[pc], opt.masks[p])
    for params, o in ((p, opt), (pc, oc)):
        params.grad = torch.ones(4)
        o.step()
    assert torch.equal(pc.detach(), p.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rprop_special_grads_as_torch(cpu_path, dtype):
    """Every pair of grads (g1, g2) from {±0, ±1, NaN, ±inf, ±1e-30}, then ones: params and
    state bit for bit as torch.optim.Rprop's, whose sign is 0 for NaN (a NaN product g*prev
    leaves the step size, a NaN grad the param, as they were); the float64 reference too."""
    values = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, -1e-30]
    pairs = [(a, b) for a in values for b in values]
    grads = [torch.tensor([p[k] for p in pairs], dtype=dtype) for k in (0, 1)]
    grads.append(torch.ones(len(pairs), dtype=dtype))
    start = torch.linspace(-1.0, 1.0, len(pairs), dtype=dtype)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    kw = dict(lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50))
    fopt, topt = ft.Rprop([ours], **kw), torch.optim.Rprop([theirs], foreach=False, **kw)
    ref = [start.double().numpy().copy(), np.zeros(len(pairs)), np.full(len(pairs), 0.01)]
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        fopt.step()
        topt.step()
        fastopt.reference.rprop(*ref[:1], g.double().numpy(), *ref[1:])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    for key in ("prev", "step_size"):
        torch.testing.assert_close(fopt.state[ours][key], topt.state[theirs][key], rtol=0,
                                   atol=0, equal_nan=True, msg=key)
    if dtype == torch.float64:
        for got, want in zip([ours, fopt.state[ours]["prev"], fopt.state[ours]["step_size"]],
                             ref):
            np.testing.assert_array_equal(got.detach().numpy(), want)


@pytest.mark.parametrize("name,key,bad,error", [
    ("Rprop", "lr", -1.0, ValueError), ("Rprop", "lr", "x", TypeError),
    ("Adagrad", "initial_accumulator_value", -0.5, ValueError),
    ("Adagrad", "initial_accumulator_value", None, TypeError)])
def test_state_start_values_are_checked_in_their_group(name, key, bad, error):
    """State that starts at a group's value (Rprop's step sizes at lr, Adagrad's sums at
    initial_accumulator_value: the table's ArrayRole.initial) is made from the group's
    value when a param of an added group first steps; a bad one is named by its place and
    nothing is made or stepped."""
    first, second = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    opt = getattr(ft, name)([first], lr=0.01)
    opt.add_param_group({"params": [second]})
    opt.param_groups[1][key] = bad
    for p in (first, second):
        p.grad = torch.randn(p.shape)
    before = [p.detach().clone() for p in (first, second)]
    with pytest.raises(error, match=rf"^param_groups\[1\]\['{key}'\]"):
        opt.step()
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
    assert not opt.state.get(second)
    opt.param_groups[1][key] = torch.tensor(0.25)  # (a 0-d tensor, as torch.optim takes)
    opt.step()
    if name == "Rprop":  # (a first step keeps the sizes: prev is 0)
        assert torch.equal(opt.state[second]["step_size"], torch.full((3,), 0.25))
    else:
        assert torch.equal(opt.state[second]["sum"], 0.25 + second.grad * second.grad)


def test_array_classes_start_state_from_the_table():
    """fastopt.Rprop (made from the table) starts its step sizes at lr, fastopt.Adagrad its
    sums at initial_accumulator_value; zero_state goes back there."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(9).astype(np.float32)
    rprop = fastopt.Rprop([p.copy()], lr=0.05)
    adagrad = fastopt.Adagrad([p.copy()], initial_accumulator_value=0.5)
    assert np.array_equal(rprop.state["step_sizes"][0], np.full(9, 0.05, np.float32))
    assert np.array_equal(adagrad.state["state_sums"][0], np.full(9, 0.5, np.float32))
    for opt in (rprop, adagrad):
        opt.step([rng.standard_normal(9).astype(np.float32)])
        opt.zero_state()
    assert np.array_equal(rprop.state["step_sizes"][0], np.full(9, 0.05, np.float32))
    assert np.array_equal(adagrad.state["state_sums"][0], np.full(9, 0.5, np.float32))
    with pytest.raises(ValueError, match="^initial_accumulator_value:"):
        fastopt.Adagrad([p.copy()], initial_accumulator_value=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'initial_accumulator_value'"):
        fastopt.Rprop([p.copy()], initial_accumulator_value=0.5)
    with pytest.raises(TypeError, match="^lr: expected a real number, got NoneType"):
        fastopt.Rprop([p.copy()], lr=None)
    assert ft.Adagrad([torch.ones(2)], initial_accumulator_value=torch.tensor(0.5)).state


# ---- from a new user's review: damaged checkpoints, list hyper-parameters, lazy modules ------

def _trained(cls, steps=3, **kw):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    opt = cls([p], **kw)
    for i in range(steps):
        p.grad = torch.full((5,), i + 1.0)
        opt.step()
    return p, opt


@pytest.mark.parametrize("name,key", [("Adam", "exp_avg_sq"), ("Adam", "step"),
                                      ("RMSprop", "square_avg"), ("NAdam", "mu_product"),
                                      ("ASGD", "eta"), ("Adagrad", "sum")])
def test_state_lost_after_steps_is_refused(name, key):
    # torch.optim raises KeyError; fastopt names the entry and changes nothing (made fresh,
    # the state would restart from zero under a step count that goes on).
    p, opt = _trained(getattr(ft, name))
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0][key]
    q = torch.nn.Parameter(p.detach().clone())
    other = getattr(ft, name)([q])
    other.load_state_dict(saved)
    q.grad = torch.ones(5)
    before = q.detach().clone()
    with pytest.raises(ValueError, match=rf"^state of param_groups\[0\]\['params'\]\[0\]: '{key}' is missing"):
        other.step()
    assert torch.equal(q.detach(), before)
    with pytest.raises(KeyError):  # (what torch.optim does)
        tq = torch.nn.Parameter(p.detach().clone())
        topt = getattr(torch.optim, name)([tq])
        topt.load_state_dict(saved)
        tq.grad = torch.ones(5)
        topt.step()


def test_state_for_an_option_switched_on_is_still_made():
    p, opt = _trained(ft.Adam)
    opt.param_groups[0]["amsgrad"] = True
    p.grad = torch.ones(5)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


@pytest.mark.parametrize("name,key", [("NAdam", "betas"), ("RAdam", "betas"), ("Adamax", "betas"),
                                      ("Rprop", "etas"), ("Adam", "betas"), ("AdamW", "betas")])
def test_pair_hyper_parameters_are_kept_as_torch_keeps_them(name, key):
    # A list stays the group's list (editable in place, as in torch.optim) where torch keeps
    # it; Adam(W) makes a tuple, as torch.optim.Adam does.
    value = [0.9, 0.99] if key == "betas" else [0.5, 1.2]
    mine = getattr(ft, name)([torch.nn.Parameter(torch.ones(2))], **{key: value})
    theirs = getattr(torch.optim, name)([torch.nn.Parameter(torch.ones(2))], **{key: value})
    assert type(mine.param_groups[0][key]) is type(theirs.param_groups[0][key])


@pytest.mark.parametrize("name", ["AdamW", "SGD", "NAdam", "Adafactor"])
def test_lazy_modules_before_their_first_forward(name):
    # Uninitialized params are taken at construction and stepped once materialized, as by
    # torch.optim (torch's documented dry-run forward is then not needed).
    results = []
    for lib in (torch.optim, ft):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.LazyLinear(5), torch.nn.Linear(5, 1))
        opt = getattr(lib, name)(model.parameters(), lr=0.01)
        x = torch.randn(4, 3)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        results.append([t.detach().clone() for t in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,options", [
    ("ASGD", dict(lr=0.1, t0=2**24)), ("Adam", dict(lr=0.1, betas=(0.9, 1 - 2**-40))),
    ("Adagrad", dict(lr=0.1, lr_decay=1.0)), ("RAdam", dict(lr=0.1, betas=(0.9, 1 - 2**-30))),
    ("NAdam", dict(lr=0.1)), ("Adamax", dict(lr=0.1))])
def test_step_counts_past_float32_stay_as_torch_counts_them(name, options):
    """torch.optim counts in a float32 tensor, which stays at 2**24 once there: the steps
    after a checkpoint at 2**24 - 2 take the counts torch's tensor holds (2**24 - 1, 2**24,
    2**24...), so the trajectory is torch's, and a checkpoint reloaded at every step goes
    on with the same one (fastopt counted on past 2**24 while its tensor stayed)."""
    import fastopt.torch as ft

    def run(module, reload):
        p = torch.nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
        opt = getattr(module, name)([p], **options)
        p.grad = torch.full_like(p, 0.5)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0]["step"] = torch.tensor(float(2**24 - 2))
        opt.load_state_dict(saved)
        for k in range(4):
            if reload:
                opt.load_state_dict(opt.state_dict())
            p.grad = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64) * (k + 1)
            opt.step()
        return p.detach(), {k: v for k, v in opt.state[p].items() if v.dim() == 0}

    want, want_counts = run(torch.optim, False)
    for reload in (False, True):
        got, counts = run(ft, reload)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
        assert float(counts["step"]) == float(want_counts["step"]) == 2**24
        for key in counts:
            torch.testing.assert_close(counts[key], want_counts[key], rtol=1e-7, atol=0)


def test_step_counts_past_2_pow_53_load():
    import fastopt.torch as ft

    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(float(2**60))
    opt.load_state_dict(saved)
    twin = torch.optim.Adam([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    twin.load_state_dict(copy.deepcopy(saved))  # (its own tensors: torch loads them as given)
    for o in (opt, twin):
        o.param_groups[0]["params"][0].grad = torch.ones(3)
        o.step()
    assert float(opt.state[p]["step"]) == 2.0**60
    torch.testing.assert_close(p.detach(), twin.param_groups[0]["params"][0].detach())


def test_constructor_arguments_as_torch_reads_them():
    """Adam's betas mixing a tensor and a float are refused with torch's message; Adafactor
    reads maximize=1 as True as the other classes (and torch) do; a reloaded or copied
    Adafactor's groups do not gain the "differentiable" key torch puts in its defaults."""
    import fastopt.torch as ft

    p = torch.nn.Parameter(torch.ones(3))
    for cls in (ft.Adam, ft.AdamW):
        for betas in ((torch.tensor(0.9), 0.999), (0.9, torch.tensor(0.999))):
            with pytest.raises(ValueError, match="^betas must be either both floats or both "
                                                 "Tensors$"):
                cls([p], betas=betas)
            with pytest.raises(ValueError):
                getattr(torch.optim, cls.__name__)([p], betas=betas)
    opt = ft.Adafactor([p], maximize=1)
    p.grad = torch.ones(3)
    opt.step()
    twin = torch.optim.Adafactor([torch.nn.Parameter(torch.ones(3))], maximize=1)
    twin.param_groups[0]["params"][0].grad = torch.ones(3)
    twin.step()
    torch.testing.assert_close(p.detach(), twin.param_groups[0]["params"][0].detach())
    opt.load_state_dict(opt.state_dict())
    assert "differentiable" not in opt.param_groups[0]
    assert "differentiable" not in copy.deepcopy(opt).param_groups[0]


def test_step_tensors_of_other_dtypes_count_as_their_own():
    """Params whose step tensors have other dtypes (float32 beside float64, loaded from a
    checkpoint) are not packed into one tensor: each keeps its dtype and counts as torch's
    does (the float32 one stays at 2**24, the float64 one goes on); an int count past 2**53
    (read through a float) is refused."""
    import fastopt.torch as ft

    def run(module):
        ps = [torch.nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
              for _ in range(2)]
        opt = getattr(module, "Adam")(ps, lr=0.1, betas=(0.9, 1 - 2**-40),
                                      **({"foreach": False} if module is torch.optim else {}))
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0]["step"] = torch.tensor(float(2**24 - 1), dtype=torch.float32)
        saved["state"][1]["step"] = torch.tensor(float(2**24 - 1), dtype=torch.float64)
        opt.load_state_dict(saved)
        for _ in range(3):
            for p in ps:
                p.grad = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
            opt.step()
        return ps, [opt.state[p]["step"] for p in ps]

    want, want_steps = run(torch.optim)
    got, steps = run(ft)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=0)
    assert [(s.dtype, float(s)) for s in steps] == [(s.dtype, float(s)) for s in want_steps] \
        == [(torch.float32, 2.0**24), (torch.float64, 2.0**24 + 2)]
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(2**53 + 1)
    with pytest.raises(ValueError, match=r"'step'\]: must be <= 2\*\*53 unless held in a float"):
        opt.load_state_dict(saved)
