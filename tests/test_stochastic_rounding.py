"""Stochastic rounding of bfloat16 params (``rounding="stochastic"`` on the steps,
``stochastic_rounding=True`` on the classes): bit for bit the float32 step followed by
``reference.bfloat16_stochastic`` with the same key, on every optimizer, the CPU's paths and
thread counts and the GPU; unbiased where round-to-nearest loses the update; reproducible
by seed; refused for other dtypes; and training in bfloat16 without master weights comes
within 2% of float32."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import assert_bits
from conftest import opt_cases, train_small_mlp, using_cpu_path, using_threads

torch = pytest.importorskip("torch")

SHAPES = [(7,), (33,), (1,), (0,), (4097,), (33, 3), (40_001,)]
CUDA_OK = torch.cuda.is_available() and fastopt.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and fastopt._cuda")])]


def _problem(opt, opts, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES]
    state = {n: [torch.from_numpy(opt.init[n](s, np.random.default_rng(seed)).astype(np.float32))
                 for s in SHAPES] for n in opt.states(opts)}
    grads = [[torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES] for _ in range(3)]
    return params, state, grads


def _step(opt, opts, params, state, grads, t, **extra):
    args = [params, grads] + [None if n is None else state[n] for n in opt.state_args(opts)]
    kwargs = dict(opt.hyper(opts))
    if opt.takes_step:
        kwargs["step"] = t
    opt.fn(*args, **kwargs, **extra)


def _bits(tensors):
    return [t.cpu().view(torch.int16).numpy().view(np.uint16) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_stochastic_rounding_is_the_float32_step_rounded(opt, opts, device):
    params, state, grads = _problem(opt, opts, 3)
    # the twin: float32 params through the same kernel, rounded by the reference's rule
    twin = [p.float() for p in params]
    twin_state = {k: [a.clone() for a in v] for k, v in state.items()}
    dev = [p.to(device) for p in params]
    dev_state = {k: [a.to(device) for a in v] for k, v in state.items()}
    for t, gs in enumerate(grads, start=1):
        seed = 1000 + t
        _step(opt, opts, dev, dev_state, [g.to(device) for g in gs], t,
              rounding="stochastic", seed=seed)
        _step(opt, opts, twin, twin_state, [g.float() for g in gs], t)
        key_step = t if opt.takes_step else 1
        for i, p in enumerate(twin):
            bits = reference.bfloat16_stochastic(p.numpy(), seed, key_step, i)
            p.copy_(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float())
    for i, (got, want) in enumerate(zip(_bits(dev), _bits([p.to(torch.bfloat16) for p in twin]))):
        assert_bits(got, want, f"params[{i}]", any_nan=True)
    for k in state:
        for i, (a, b) in enumerate(zip(dev_state[k], twin_state[k])):
            assert_bits(a.cpu().numpy(), b.numpy(), f"{k}[{i}]", any_nan=True)


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_stochastic_rounding_paths_and_threads_bit_identical(opt, opts):
    runs = []
    for path in ("scalar", "avx2"):
        for threads in (1, 2):
            with using_cpu_path(path), using_threads(threads):
                params, state, grads = _problem(opt, opts, 4)
                for t, gs in enumerate(grads, start=1):
                    _step(opt, opts, params, state, gs, t, rounding="stochastic", seed=77 + t)
                runs.append(_bits(params))
    for run in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert_bits(b, a, f"params[{i}]")


def test_stochastic_rounding_is_unbiased_where_nearest_stalls():
    # An update of a sixth of an ulp: round-to-nearest never moves the params, stochastic
    # rounding moves them by the update on average.
    n, steps = 20_000, 30
    start = torch.full((n,), 1.0, dtype=torch.bfloat16)  # ulp above 1: 2**-7
    grad = torch.full((n,), 2.0**-7 / 6, dtype=torch.bfloat16)
    nearest, stochastic = start.clone(), start.clone()
    for t in range(steps):
        fastopt.sgd_(nearest, grad, lr=1.0, maximize=True)  # p <- p + g
        fastopt.sgd_(stochastic, grad, lr=1.0, maximize=True, rounding="stochastic", seed=t)
    assert (nearest == start).all()
    drift = (stochastic.double() - 1.0).mean().item()
    want = steps * grad[0].double().item()
    assert abs(drift - want) < 0.05 * want, (drift, want)


def test_stochastic_rounding_reproducible_and_checked(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    p0 = rng.standard_normal(4097).astype(bf16)
    g = rng.standard_normal(4097).astype(bf16)
    runs = {}
    for seed in (1, 1, 2):
        p = p0.copy()
        fastopt.lion_(p, g, np.zeros(4097, np.float32), lr=1e-3, rounding="stochastic", seed=seed)
        runs.setdefault(seed, []).append(p.view(np.uint16))
    assert_bits(runs[1][0], runs[1][1], "the same seed")
    assert (runs[1][0] != runs[2][0]).any()
    f32 = rng.standard_normal(5).astype(np.float32)
    with pytest.raises(ValueError, match=r"rounding: 'stochastic' .* bfloat16 params"):
        fastopt.sgd_(f32, f32.copy(), lr=0.1, rounding="stochastic", seed=1)
    with pytest.raises(ValueError, match=r"rounding: expected 'nearest' or 'stochastic'"):
        fastopt.sgd_(p0.copy(), g, lr=0.1, rounding="down")
    with pytest.raises(ValueError, match=r"seed: only applies"):
        fastopt.sgd_(p0.copy(), g, lr=0.1, seed=3)
    with pytest.raises(ValueError, match=r"seed: must be in \[0, 2\*\*64\)"):
        fastopt.sgd_(p0.copy(), g, lr=0.1, rounding="stochastic", seed=-1)
    with pytest.raises(TypeError, match=r"seed: expected an integer"):
        fastopt.sgd_(p0.copy(), g, lr=0.1, rounding="stochastic", seed=1.5)


@pytest.mark.parametrize("name", sorted(fastopt.optim.CLASSES))
def test_class_stochastic_rounding(name, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cls = fastopt.optim.CLASSES[name]
    kwargs = {"lr": 1e-3} if name in ("sgd", "sophia") else {}
    p0 = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in [(33,), (4097,)]]
    runs = []
    for _ in range(2):
        o = cls([p.copy() for p in p0], stochastic_rounding=True, seed=9, **kwargs)
        r = np.random.default_rng(1)
        for _ in range(3):
            o.step([r.standard_normal(p.shape).astype(ml_dtypes.bfloat16) for p in p0])
        runs.append([p.view(np.uint16).copy() for p in o.params])
    for a, b in zip(*runs):
        assert_bits(b, a, "the same seed")
    with pytest.raises(ValueError, match=r"stochastic_rounding: applies to bfloat16 params"):
        cls([np.zeros(3, np.float32)], stochastic_rounding=True, **kwargs)
    with pytest.raises(ValueError, match=r"seed: only applies"):
        cls([p.copy() for p in p0], seed=3, **kwargs)


@pytest.mark.parametrize("name", [*sorted(fastopt.optim.CLASSES), "adafactor"])
def test_class_checkpoint_carries_the_rounding_seed(name, rng):
    """A restored optimizer rounds as the saved one would have, whatever seed it was made
    with (drawn here): its state_dict carries the seed."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cls = fastopt.Adafactor if name == "adafactor" else fastopt.optim.CLASSES[name]
    kwargs = {"lr": 1e-3} if name in ("sgd", "sophia", "adafactor") else {}
    p0 = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in [(33,), (40, 103)]]
    grads = [[rng.standard_normal(p.shape).astype(ml_dtypes.bfloat16) for p in p0]
             for _ in range(3)]
    saved = cls([p.copy() for p in p0], stochastic_rounding=True, **kwargs)
    saved.step(grads[0])
    restored = cls([p.copy() for p in saved.params], stochastic_rounding=True, **kwargs)
    restored.load_state_dict(saved.state_dict())
    for g in grads[1:]:
        saved.step(g)
        restored.step(g)
    for a, b in zip(saved.params, restored.params):
        assert_bits(b, a, "restored")
    checkpoint = saved.state_dict()
    for bad, error, match in (
        (-1, ValueError, r"^state_dict\['rounding_seed'\]: must be in \[0, 2\*\*64\)"),
        (1.5, TypeError, r"^state_dict\['rounding_seed'\]: expected an integer"),
    ):
        with pytest.raises(error, match=match):
            restored.load_state_dict({**checkpoint, "rounding_seed": bad})
    nearest = cls([p.copy() for p in p0], **kwargs)
    with pytest.raises(ValueError, match=r"^state_dict: has 'rounding_seed' but this optimizer"):
        nearest.load_state_dict(checkpoint)
    assert "rounding_seed" not in nearest.state_dict()
    del checkpoint["rounding_seed"]  # (an older checkpoint: the seed it was made with)
    restored.load_state_dict(checkpoint)


def _train(torch_device, dtype, stochastic):
    import fastopt.torch as fot

    return train_small_mlp(torch_device, dtype, lambda params: fot.AdamW(
        params, lr=3e-4, weight_decay=0.0, stochastic_rounding=stochastic,
        seed=0 if stochastic else None))


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_training_with_stochastic_rounding_tracks_float32(device):
    fp32, _ = _train(device, torch.float32, False)
    sr, opt = _train(device, torch.bfloat16, True)
    nearest, _ = _train(device, torch.bfloat16, False)
    assert opt.param_groups[0]["stochastic_rounding"] is True
    assert isinstance(opt.param_groups[0]["rounding_seed"], int)
    assert abs(sr - fp32) <= 0.02 * fp32, (sr, fp32, nearest)
    assert nearest > sr  # round-to-nearest loses the small late updates


# ---- fastopt.torch: the keys of a group's steps ----------------------------------------------

def _torch_class(name):
    import fastopt.torch as ft

    cls = ft.CLASSES[name]
    kwargs = {"lr": 1e-3} if name in ("sgd", "sophia", "lion") else {}
    if name == "sgd":
        kwargs["momentum"] = 0.9
    return cls, kwargs


def _torch_run(name, steps, between=None, seed=5):
    """bfloat16 params stepped with stochastic rounding; ``between(opt)`` before each step
    (returning the optimizer to go on with)."""
    cls, kwargs = _torch_class(name)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16))
              for s in [(33,), (4097,)]]
    grads = [[torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params]
             for _ in range(steps)]
    opt = cls(params, stochastic_rounding=True, seed=seed, **kwargs)
    for step in grads:
        if between is not None:
            opt = between(opt)
        for p, grad in zip(params, step):
            p.grad = grad.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "lion", "rprop", "adamw", "adagrad"])
def test_torch_rounding_goes_on_through_checkpoints_and_copies(name):
    """A step's keys are the group's (its seed and its count of steps, "rounding_step"), so
    a state_dict loaded back, a rebuild or a copy goes on with the same bits; they restarted
    at step 1 for the classes without a step count in their state (SGD, RMSprop, Lion...)."""
    import copy

    plain, opt = _torch_run(name, 6)
    assert opt.param_groups[0]["rounding_step"] == 6
    reloaded, _ = _torch_run(name, 6, lambda o: (o.load_state_dict(o.state_dict()), o)[1])
    for a, b in zip(plain, reloaded):
        assert torch.equal(a, b)
    params, opt = _torch_run(name, 3)
    copies, twin = copy.deepcopy((params, opt))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


def test_torch_rounding_differs_between_groups_and_never_sticks():
    """Two groups with the same seed round the same values differently (the group's place
    is in the key); a param whose neighbour has no grad every other step still gets new
    bits at every step: an update of 0.3 ulp moves about 30% of the elements per step,
    none stuck."""
    import fastopt.torch as ft

    a = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    other = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    opt = ft.SGD([{"params": [a, other]}, {"params": [b]}], lr=0.3 * 2**-7,
                 stochastic_rounding=True, seed=3)
    moved = torch.zeros(8192, dtype=torch.int32)
    for step in range(40):
        before = a.detach().clone()
        a.grad = torch.full_like(a, -1.0)  # +0.3 ulp of 1.0 (2**-7) per step
        b.grad = torch.full_like(b, -1.0)
        other.grad = torch.ones_like(other) if step % 2 else None
        opt.step()
        moved += (a != before).int()
        if step == 0:
            assert not torch.equal(a, b)
    assert (moved == 0).float().mean() < 0.01  # each element moved at some step
    assert 0.2 < moved.float().mean() / 40 < 0.4


def test_torch_adafactor_rounding_never_repeats_across_params_and_steps():
    """Adafactor keys a step by the group's rounded steps too ("rounding_step"): with
    params whose grads come and go, one param's bits at one step are not another's at an
    earlier one (the key was the first stepped param's place, the param's own count and its
    place in the call, which repeat), and a reloaded state_dict goes on with the same bits."""
    import fastopt.torch as ft

    n = 4096
    G = torch.linspace(-1, 1, n).bfloat16()

    def make():
        ps = [(1 + torch.linspace(0, 1, n)).bfloat16().requires_grad_() for _ in range(3)]
        return ps, ft.Adafactor(ps, lr=1e-2, stochastic_rounding=True, seed=123)

    (A, B, C), opt = make()
    A.grad, B.grad, C.grad = G.clone(), None, G.clone()
    opt.step()
    after_first = C.detach().clone()
    A.grad, B.grad, C.grad = G.clone(), G.clone(), None
    opt.step()
    assert opt.param_groups[0]["rounding_step"] == 2
    # independent bits agree on ~91% here (most elements round alike whatever the bits)
    assert (B.detach() == after_first).float().mean() < 0.97
    (A2, B2, C2), again = make()
    for step in range(2):
        if step:
            again.load_state_dict(again.state_dict())
        A2.grad, B2.grad, C2.grad = G.clone(), None if step == 0 else G.clone(), \
            G.clone() if step == 0 else None
        again.step()
    for x, y in ((A, A2), (B, B2), (C, C2)):
        assert torch.equal(x, y)


def test_torch_rounding_step_is_checked():
    import fastopt.torch as ft

    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = ft.SGD([p], lr=0.1, stochastic_rounding=True, seed=3)
    p.grad = torch.ones_like(p)
    opt.step()
    before = p.detach().clone()
    for bad, error in ((-1, ValueError), (2.5, TypeError), (2**63 - 1, ValueError)):
        opt.param_groups[0]["rounding_step"] = bad
        with pytest.raises(error, match=r"^param_groups\[0\]\['rounding_step'\]"):
            opt.step()
        assert torch.equal(p, before)
