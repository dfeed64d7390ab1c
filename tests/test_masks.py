"""Masked steps (``masks=``), one test body per behaviour on every backend: pruned elements
(mask False / 0) hold param 0 and their state as it was, over 20 steps, for every optimizer,
option combination and dtype; kept elements step as the reference does, and bit for bit as
an unmasked step; the CPU paths and thread counts agree bit for bit; 16-bit params; the
classes (``masks=`` and ``opt.masks``) and ``fastopt.torch``; bad masks are refused before
anything is written."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt

from backends import assert_bits
from conftest import (DTYPES, OPTIMIZERS, STEPS, Problem, class_step, opt_cases,
                      using_cpu_path, using_threads)

DTYPE_IDS = ["f32", "f64"]
# Every size of the contract, multi-dimensional ones, a zero-size one in the middle, and
# 16390 elements (four GPU chunks and a ragged tail).
SHAPES = [(7,), (33,), (1,), (0,), (4097,), (33, 3), (5, 1, 7), (2, 8195)]


def random_masks(rng, shapes, dtype=np.bool_, keep=0.5):
    """One mask per shape keeping about ``keep`` of the elements; uint8 masks hold any
    nonzero byte where they keep (every nonzero byte keeps)."""
    masks = [rng.random(s) < keep for s in shapes]
    if dtype == np.uint8:
        return [np.where(m, rng.integers(1, 256, m.shape), 0).astype(np.uint8) for m in masks]
    return masks


def assert_pruned_held(pr: Problem, initial, what: str) -> None:
    """Where the masks prune: params exactly +0.0, every state array as it started."""
    got = pr.host()
    for i, m in enumerate(pr.masks):
        pruned = ~m.astype(bool)
        p = got["params"][i][pruned]
        assert_bits(p, np.zeros_like(p), f"pruned params[{i}] ({what})")
        for name in pr.state:
            assert_bits(got[name][i][pruned], initial[name][i][pruned],
                        f"pruned {name}[{i}] ({what})")


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.uint8], ids=["bool", "uint8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_masked_trajectory_matches_reference(backend, opt, opts, dtype, mask_dtype, rng):
    masks = random_masks(rng, SHAPES, mask_dtype)
    pr = Problem(opt, opts, SHAPES, dtype, rng, backend=backend, masks=masks)
    initial = pr.snapshot()
    for _ in range(STEPS):
        pr.step(pr.draw_grads(rng))
        pr.check()  # against the masked reference (and on a GPU the CPU, bit for bit)
        assert_pruned_held(pr, initial, f"{opt.name} after step {pr.t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("grid"))
def test_masked_first_step_every_option(backend, opt, opts, dtype, rng):
    # One step for every option combination, with SGD's fresh momentum buffers poisoned:
    # a masked call reads them (pruned elements keep them), a kept element never sees them.
    init = dict(opt.init)
    if opt.name == "sgd":
        init["momentum_buffers"] = lambda shape, rng: np.full(shape, np.nan)
    masks = random_masks(rng, SHAPES)
    pr = Problem(opt, opts, SHAPES, dtype, rng, backend=backend, init=init, masks=masks)
    initial = pr.snapshot()
    pr.step(pr.draw_grads(rng))
    pr.check()
    assert_pruned_held(pr, initial, opt.name)
    got = pr.host()
    for role, arrays in got.items():
        for i, a in enumerate(arrays):
            assert not np.isnan(a[masks[i]]).any(), f"{role}[{i}]: NaN where kept"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_all_kept_is_the_unmasked_step(backend, opt, opts, dtype, rng):
    # A mask that keeps everything changes nothing: bit for bit the unmasked trajectory.
    seed = int(rng.integers(2**32))
    runs = []
    for masks in (None, [np.ones(s, bool) for s in SHAPES]):
        r = np.random.default_rng(seed)
        pr = Problem(opt, opts, SHAPES, dtype, r, backend=backend, masks=masks)
        for _ in range(3):
            pr.step(pr.draw_grads(r))
        runs.append(pr.host())
    for role in runs[0]:
        for i, (a, b) in enumerate(zip(runs[0][role], runs[1][role])):
            assert_bits(b, a, f"{role}[{i}]", any_nan=True)


def _masked_run(opt, opts, dtype, seed, shapes):
    r = np.random.default_rng(seed)
    pr = Problem(opt, opts, shapes, dtype, r, masks=random_masks(r, shapes))
    for _ in range(3):
        pr.step(pr.draw_grads(r))
    return pr.host()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_masked_paths_and_threads_bit_identical(opt, opts, dtype):
    # 40_001 elements cross the threading threshold; odd sizes exercise the scalar heads
    # and tails around the vector body (whose mask loads are 8 or 4 bytes at a time).
    shapes = SHAPES + [(40_001,)]
    runs = {}
    for path in ("scalar", "avx2"):
        for threads in (1, 2):
            with using_cpu_path(path), using_threads(threads):
                runs[path, threads] = _masked_run(opt, opts, dtype, 7, shapes)
    first = runs["scalar", 1]
    for key, run in runs.items():
        for role in first:
            for i, (a, b) in enumerate(zip(first[role], run[role])):
                assert_bits(b, a, f"{key} {role}[{i}]", any_nan=True)


@pytest.mark.parametrize("param_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_masked_16_bit_params_on_the_cpu(opt, param_dtype, rng):
    # 16-bit params (torch CPU tensors, float32 state): kept elements equal the unmasked
    # step bit for bit, pruned ones are 0 with their state untouched.
    torch = pytest.importorskip("torch")
    dt = getattr(torch, param_dtype)
    opts = opt.representative[-1]
    n = 4097
    p0 = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dt)
    g = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dt)
    mask = rng.random(n) < 0.5
    state0 = {name: torch.from_numpy(opt.init[name]((n,), rng).astype(np.float32))
              for name in opt.states(opts)}
    results = []
    for masks in (None, torch.from_numpy(mask)):
        p = p0.clone()
        state = {k: v.clone() for k, v in state0.items()}
        args = [p, g] + [None if n_ is None else state[n_] for n_ in opt.state_args(opts)]
        kwargs = dict(opt.hyper(opts))
        if opt.takes_step:
            kwargs["step"] = 2
        opt.fn(*args, **kwargs, **({} if masks is None else {"masks": masks}))
        results.append((p.float().numpy(), {k: v.numpy() for k, v in state.items()}))
    (p_plain, s_plain), (p_masked, s_masked) = results
    assert_bits(p_masked[mask], p_plain[mask], "kept params", any_nan=True)
    assert_bits(p_masked[~mask], np.zeros((~mask).sum(), np.float32), "pruned params")
    for name in state0:
        assert_bits(s_masked[name][mask], s_plain[name][mask], f"kept {name}", any_nan=True)
        assert_bits(s_masked[name][~mask], state0[name].numpy()[~mask], f"pruned {name}")


# ---- the classes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(fastopt.optim.CLASSES))
def test_class_masks_keep_pruned_params_at_zero(array_backend, name, rng):
    cls = fastopt.optim.CLASSES[name]
    shapes = [(33,), (4097,), (5, 7)]
    params = [array_backend.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    masks_np = random_masks(rng, shapes)
    masks = [array_backend.asarray(m) for m in masks_np]
    kwargs = {"lr": 1e-2} if name in ("sgd", "sophia") else {}
    o = cls(params, masks=masks, **kwargs)
    twin = cls([array_backend.asarray(array_backend.to_numpy(p)) for p in params], **kwargs)
    assert o.masks == masks
    for _ in range(STEPS):
        grads = [array_backend.asarray(rng.standard_normal(s).astype(np.float32))
                 for s in shapes]
        estimates = [array_backend.asarray(np.abs(rng.standard_normal(s)).astype(np.float32))
                     for s in shapes]
        class_step(o, grads, estimates)
        class_step(twin, grads, estimates)
    for i, m in enumerate(masks_np):
        p = array_backend.to_numpy(params[i])
        assert (p[~m] == 0).all(), f"params[{i}]: a pruned element moved"
        assert np.isfinite(p).all() and (p[m] != 0).any()
    # Lifting the masks: the next steps are unmasked ones.
    o.masks = None
    assert o.masks is None
    grads = [array_backend.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    o.step(grads)
    assert any((array_backend.to_numpy(p)[~m] != 0).any() for p, m in zip(params, masks_np))


def test_class_masks_checked_at_construction(rng):
    params = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    with pytest.raises(ValueError, match=r"masks: expected 2 arrays"):
        fastopt.Adam(params, masks=[np.ones(5, bool)])
    with pytest.raises(TypeError, match=r"masks: params is a list"):
        fastopt.Adam(params, masks=np.ones(5, bool))
    o = fastopt.Adam(params)
    with pytest.raises(ValueError, match=r"masks: expected 2 arrays"):
        o.masks = [np.ones(5, bool)] * 3
    assert o.masks is None


# ---- bad masks --------------------------------------------------------------------------------

def _bad_masks(backend, rng):
    """(masks, the error it raises, its message) for an Adam call on shapes (5,), (3, 4)."""
    ok = [np.ones(5, bool), np.ones((3, 4), bool)]
    dev = backend.asarray
    return [
        ([dev(ok[0]), dev(np.ones((3, 4), np.float32))], TypeError, r"masks\[1\]: dtype float32"),
        ([dev(ok[0]), dev(np.ones((3, 4), np.int8))], TypeError, r"masks\[1\]: dtype int8"),
        ([dev(ok[0])], ValueError, r"masks: expected 2 arrays"),
        ([dev(ok[0]), dev(np.ones((4, 3), bool))], ValueError, r"masks\[1\]: shape \(4, 3\)"),
        ([dev(ok[0]), dev(np.ones((4, 3), bool)).T], ValueError, r"masks\[1\]: its strides"),
        (dev(ok[0]), TypeError, r"masks: params is a list"),
        ([dev(ok[0]), None], TypeError, r"masks\[1\]"),
    ]


def test_bad_masks_raise_and_change_nothing(array_backend, rng):
    b = array_backend
    shapes = [(5,), (3, 4)]
    for masks, error, message in _bad_masks(b, rng):
        p = [b.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        g = [b.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        m = [b.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        v = [b.asarray(np.abs(rng.standard_normal(s)).astype(np.float32)) for s in shapes]
        before = [b.to_numpy(a) for a in p + m + v]
        with pytest.raises(error, match=message):
            fastopt.adam_(p, g, m, v, step=1, lr=1e-2, masks=masks)
        for a, old in zip(p + m + v, before):
            assert_bits(b.to_numpy(a), old, "an array of the refused call")


def test_mask_overlapping_a_param_is_refused(rng):
    p = rng.standard_normal(8).astype(np.float32)
    g, m, v = (rng.standard_normal(8).astype(np.float32) for _ in range(3))
    before = p.copy()
    with pytest.raises(ValueError, match=r"overlaps"):
        fastopt.adam_(p, g, m, np.abs(v), step=1, lr=1e-2, masks=p.view(np.uint8)[:8])
    assert_bits(p, before, "params")


def test_single_array_masks(array_backend, rng):
    b = array_backend
    p = b.asarray(rng.standard_normal(4097).astype(np.float32))
    g = b.asarray(rng.standard_normal(4097).astype(np.float32))
    keep = rng.random(4097) < 0.3
    fastopt.sgd_(p, g, lr=0.1, masks=b.asarray(keep))
    host = b.to_numpy(p)
    assert (host[~keep] == 0).all() and (host[keep] != 0).all()
    with pytest.raises(TypeError, match=r"masks: params is a single array"):
        fastopt.sgd_(p, g, lr=0.1, masks=[b.asarray(keep)])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_size_masked_step_is_a_no_op(array_backend, name, rng):
    opt = OPTIMIZERS[name]
    opts = opt.representative[-1]
    b = array_backend
    args = [b.asarray(np.zeros(0, np.float32)) for _ in range(2)]
    args += [None if n is None else b.asarray(np.zeros(0, np.float32))
             for n in opt.state_args(opts)]
    kwargs = dict(opt.hyper(opts))
    if opt.takes_step:
        kwargs["step"] = 1
    opt.fn(*args, **kwargs, masks=b.asarray(np.zeros(0, bool)))


# ---- fastopt.torch ---------------------------------------------------------------------------

@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def torch_device(request):
    torch = pytest.importorskip("torch")
    if request.param == "cuda" and not (torch.cuda.is_available() and fastopt.cuda_available()):
        pytest.skip("needs a CUDA GPU and fastopt._cuda")
    return request.param


def _torch_model(torch, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Tanh(),
                               torch.nn.Linear(17, 5)).to(device)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "RAdam",
                                  "Adadelta", "Rprop", "NAdam", "ASGD", "Lion", "Sophia"])
def test_torch_optimizer_masks(torch_device, name):
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    model = _torch_model(torch, torch_device)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    masks = [(torch.rand(p.shape, generator=gen) < 0.5).to(torch_device) for p in params]
    masks[1] = None  # the first bias stays unmasked
    kwargs = {"lr": 1e-2} if name in ("SGD", "Sophia") else {}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    opt = getattr(fot, name)(params, masks=masks, **kwargs)
    assert set(map(id, opt.masks)) == {id(p) for p, m in zip(params, masks) if m is not None}
    x = torch.randn(64, 33, generator=gen).to(torch_device)
    for _ in range(STEPS):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for p, m in zip(params, masks):
        if m is not None:
            assert (p.detach()[~m] == 0).all(), "a pruned element moved"
            for key, s in opt.state[p].items():
                if key not in ("step", "hessian", "mu_product", "eta", "mu"):
                    # as made: zeros, Rprop's step sizes its lr
                    made = opt.defaults["lr"] if key == "step_size" else 0
                    assert (s[~m] == made).all(), f"{key}: pruned state changed"
    assert (params[1].detach() != 0).all()
    # Lifted: the next step moves pruned elements again.
    opt.set_masks(None)
    assert opt.masks == {}
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert any((p.detach()[~m] != 0).any() for p, m in zip(params, masks) if m is not None)


def test_torch_masks_are_checked(torch_device):
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    model = _torch_model(torch, torch_device)
    params = list(model.parameters())
    ones = [torch.ones(p.shape, dtype=torch.bool, device=torch_device) for p in params]
    with pytest.raises(ValueError, match=r"masks: expected 4 masks"):
        fot.AdamW(params, masks=ones[:3])
    bad = list(ones)
    bad[2] = torch.ones(params[2].shape, device=torch_device)
    with pytest.raises(TypeError, match=r"masks\[2\]: dtype torch.float32"):
        fot.AdamW(params, masks=bad)
    bad[2] = torch.ones(3, dtype=torch.bool, device=torch_device)
    with pytest.raises(ValueError, match=r"masks\[2\]: a \(3,\) mask"):
        fot.AdamW(params, masks=bad)
    with pytest.raises(ValueError, match=r"masks: key 0 is not a param"):
        fot.AdamW(params, masks={torch.zeros(3): ones[0]})
    opt = fot.AdamW(params, masks={params[0]: ones[0]})
    with pytest.raises(TypeError, match=r"masks: expected None, a dict"):
        opt.set_masks(ones[0])
    assert set(map(id, opt.masks)) == {id(params[0])}  # a refused call changes nothing
