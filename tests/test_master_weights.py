"""master_weights=True in fastopt.torch: float16/bfloat16 params keep a float32 copy in
``state[p]["master_param"]``, stepped exactly as fastopt steps float32 params with the
16-bit grads in float32, and the params are the copy rounded to nearest; checkpoints carry
it; it excludes stochastic rounding; float32 params are unaffected."""
from __future__ import annotations

import copy

import pytest

from backends import assert_bits

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

SHAPES = [(7,), (4097,), (33, 3), (1,)]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(dtype, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kw", [("AdamW", {}), ("SGD", dict(lr=0.01, momentum=0.9)),
                                    ("Lion", {}), ("RMSprop", {})])
def test_master_is_the_float32_step_and_params_are_it_rounded(cls, kw, dtype, state_dtype):
    half = _params(dtype)
    full = [torch.nn.Parameter(p.detach().float()) for p in half]
    grads = _grads(dtype, 5)
    opt = getattr(ft, cls)(half, master_weights=True, state_dtype=state_dtype, **kw)
    twin = getattr(ft, cls)(full, state_dtype=state_dtype, **kw)
    _run(opt, half, grads)
    _run(twin, full, [[g.float() for g in gs] for gs in grads])
    for i, (h, f) in enumerate(zip(half, full)):
        master = opt.state[h]["master_param"]
        assert_bits(master.numpy(), f.detach().numpy(), f"master_param[{i}]")
        assert_bits(h.detach().float().numpy(), f.detach().to(dtype).float().numpy(),
                    f"params[{i}] rounded")


def test_master_weights_checkpoint_round_trip():
    a = _params(torch.bfloat16)
    grads = _grads(torch.bfloat16, 4)
    opt = ft.AdamW(a, master_weights=True)
    _run(opt, a, grads[:2])
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = ft.AdamW(b, master_weights=True)
    # a copy, as a checkpoint file gives (torch.optim shares the tensors of a live state_dict)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, a, grads[2:])
    _run(resumed, b, grads[2:])
    for x, y in zip(a, b):
        assert_bits(opt.state[x]["master_param"].numpy(), resumed.state[y]["master_param"].numpy(),
                    "master after resuming")
        assert torch.equal(x.detach(), y.detach())


def test_master_weights_excludes_stochastic_rounding_and_changes_nothing():
    a = _params(torch.bfloat16)
    with pytest.raises(ValueError, match="master_weights: excludes stochastic_rounding"):
        ft.AdamW(a, master_weights=True, stochastic_rounding=True)
    opt = ft.AdamW(a, master_weights=True)  # both set on the group later: refused at the step
    opt.param_groups[0]["stochastic_rounding"] = True
    before = [p.detach().clone() for p in a]
    for p, g in zip(a, _grads(torch.bfloat16, 1)[0]):
        p.grad = g
    with pytest.raises(ValueError,
                       match=r"param_groups\[0\]\['master_weights'\]: excludes stochastic"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(a, before))
    assert not opt.state


def test_master_weights_leaves_float32_params_alone_and_is_dropped_when_off():
    a = _params(torch.float32) + _params(torch.bfloat16, seed=3)
    opt = ft.AdamW(a, master_weights=True)
    for p in a:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(("master_param" in opt.state[p]) == (p.dtype == torch.bfloat16) for p in a)
    opt.param_groups[0]["master_weights"] = False
    opt.step()
    assert not any("master_param" in opt.state[p] for p in a)


# ---- the array-list classes (fastopt.AdamW(list_of_arrays, master_weights=True)) ---------

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import fastopt  # noqa: E402
from fastopt._specs import OPTIMIZERS  # noqa: E402

HALF = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _arrays(dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES]


def _class_kw(name):
    spec = OPTIMIZERS[name]
    return {k: v for k, v in spec.example.items()}


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name,state_dtype,options", [
    *((name, "float32", {}) for name in sorted(OPTIMIZERS)),
    *((name, "int8", {}) for name in sorted(OPTIMIZERS) if name != "sophia"),  # no 8-bit
    ("adamw", "float32", {"max_grad_norm": 0.5}),
    ("adamw", "float32", {"masks": True}),
])
def test_class_master_is_the_float32_step_and_params_are_it_rounded(
        name, state_dtype, options, half):
    """The array class with master_weights on 16-bit params: its masters are, bit for bit,
    the float32 class's params stepped with the grads in float32 (also clipped, masked),
    and its params are the masters rounded to nearest."""
    cls = fastopt.optim.CLASSES[name]
    params = _arrays(HALF[half], 0)
    ref_params = [p.astype(np.float32) for p in params]
    masks = None
    if options.get("masks"):
        masks = [np.random.default_rng(7).random(p.shape) < 0.7 for p in params]
    opt = cls(params, **_class_kw(name), master_weights=True, state_dtype=state_dtype,
              masks=masks)
    ref = cls(ref_params, **_class_kw(name), state_dtype=state_dtype, masks=masks)
    clip = options.get("max_grad_norm")
    for step in range(3):
        grads = _arrays(HALF[half], 10 + step)
        norm = opt.step(grads, max_grad_norm=clip)
        assert norm == ref.step([g.astype(np.float32) for g in grads], max_grad_norm=clip)
        for i, (p, m, want) in enumerate(zip(params, opt.master_params, ref_params)):
            assert_bits(m, want, f"masters[{i}], step {step + 1}")
            assert_bits(p, want.astype(HALF[half]), f"params[{i}], step {step + 1}")
    for key, arrays in ref.state.items():
        for i, (got, want) in enumerate(zip(opt.state[key], arrays)):
            assert_bits(got, want, f"state[{key!r}][{i}]")


def test_class_master_weights_on_torch_cpu_tensors():
    """float16 torch CPU tensors (the array classes take those through NumPy views)."""
    params = [torch.randn(s, generator=torch.Generator().manual_seed(3)).to(torch.float16)
              for s in SHAPES]
    ref_params = [p.float().numpy() for p in params]
    opt = fastopt.AdamW(params, lr=1e-2, master_weights=True)
    ref = fastopt.AdamW(ref_params, lr=1e-2)
    for _ in range(2):
        grads = [torch.randn(s).to(torch.float16) for s in SHAPES]
        opt.step(grads)
        ref.step([g.float().numpy() for g in grads])
    for p, m, want in zip(params, opt.master_params, ref_params):
        assert_bits(np.asarray(m), want)
        assert_bits(p.numpy(), want.astype(np.float16))


def test_class_master_weights_checkpoint_and_zero_state():
    params = _arrays(ml_dtypes.bfloat16, 0)
    opt = fastopt.Adam(params, lr=1e-2, master_weights=True)
    grads = [_arrays(ml_dtypes.bfloat16, 20 + t) for t in range(4)]
    for g in grads[:2]:
        opt.step(g)
    ckpt = opt.state_dict()
    saved_params = [p.copy() for p in params]
    for g in grads[2:]:
        opt.step(g)
    want = [m.copy() for m in opt.master_params]
    for p, s in zip(params, saved_params):  # the model restored beside the optimizer
        p[...] = s
    again = fastopt.Adam(params, lr=1e-2, master_weights=True)
    again.load_state_dict(ckpt)
    for g in grads[2:]:
        again.step(g)
    for got, w in zip(again.master_params, want):
        assert_bits(got, w)
    again.zero_state()
    for p, m in zip(params, again.master_params):
        assert_bits(m, p.astype(np.float32))
    with pytest.raises(ValueError, match="has 'master_params' but this optimizer keeps no"):
        fastopt.Adam([p.astype(np.float32) for p in params], lr=1e-2).load_state_dict(ckpt)
    plain = fastopt.Adam(_arrays(ml_dtypes.bfloat16, 0), lr=1e-2).state_dict()
    with pytest.raises(ValueError, match="has no 'master_params' but this optimizer keeps"):
        again.load_state_dict(plain)


def test_class_master_weights_bad_input_changes_nothing():
    with pytest.raises(ValueError, match="master_weights: applies to float16/bfloat16"):
        fastopt.Adam(_arrays(np.float32, 0), lr=1e-2, master_weights=True)
    with pytest.raises(ValueError, match="master_weights: excludes stochastic_rounding"):
        fastopt.Adam(_arrays(ml_dtypes.bfloat16, 0), lr=1e-2, master_weights=True,
                     stochastic_rounding=True)
    with pytest.raises(TypeError, match="master_weights"):
        fastopt.Adam(_arrays(ml_dtypes.bfloat16, 0), lr=1e-2, master_weights="yes")
    params = _arrays(ml_dtypes.bfloat16, 0)
    opt = fastopt.Adam(params, lr=1e-2, master_weights=True)
    before = [p.copy() for p in params] + [m.copy() for m in opt.master_params]
    bad = _arrays(ml_dtypes.bfloat16, 1)
    bad[2] = bad[2].astype(np.float32)
    with pytest.raises(TypeError, match=r"grads\[2\]: dtype float32 differs from params"):
        opt.step(bad)
    with pytest.raises(ValueError, match="grads: expected 4 arrays"):
        opt.step(bad[:3])
    for got, want in zip(list(params) + opt.master_params, before):
        assert_bits(got, want)
    assert opt.step_count == 0
