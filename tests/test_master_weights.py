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
    opt = ft.AdamW(a, master_weights=True, stochastic_rounding=True)
    before = [p.detach().clone() for p in a]
    for p, g in zip(a, _grads(torch.bfloat16, 1)[0]):
        p.grad = g
    with pytest.raises(ValueError, match="master_weights and stochastic_rounding"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(a, before))


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
