"""bfloat16 optimizer state (``state_dtype="bfloat16"``; the functional steps take bfloat16
state arrays as they are): every optimizer, float32 and 16-bit params, on the CPU's paths and
thread counts and on the GPU, equals the float32-state step with the state rounded to
bfloat16 (nearest even) after every step, bit for bit; tracks the float64 reference to
bfloat16's precision; the classes allocate it, round-trip it and convert other float state;
mixed or float64 combinations are refused."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt

from backends import assert_bits
from conftest import (OPTIMIZERS, STEPS, normal_nonzero, opt_cases, using_cpu_path,
                      using_threads)

torch = pytest.importorskip("torch")

SHAPES = [(7,), (33,), (1,), (0,), (4097,), (33, 3), (40_001,)]
CUDA_OK = torch.cuda.is_available() and fastopt.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and fastopt._cuda")])]
PARAM_DTYPES = ["float32", "float16", "bfloat16"]


def _round_bf16(t):
    """float32 tensor t rounded to bfloat16 and back (nearest even), in place."""
    t.copy_(t.to(torch.bfloat16).float())


def _run(opt, opts, param_dtype, state_dtype, seed, device, steps=4):
    """``steps`` functional steps on SHAPES with torch tensors; the state in ``state_dtype``
    ("bfloat16", or "emulated": float32 state rounded to bfloat16 after every step)."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, param_dtype)
    params = [torch.randn(s, generator=g).to(dt).to(device) for s in SHAPES]
    st = torch.bfloat16 if state_dtype == "bfloat16" else torch.float32
    state = {name: [(opt.init[name](s, np.random.default_rng(seed)).astype(np.float32))
                    for s in SHAPES] for name in opt.states(opts)}
    state = {k: [torch.from_numpy(a).to(torch.bfloat16).to(st).to(device) for a in v]
             for k, v in state.items()}
    for t in range(1, steps + 1):
        grads = [torch.randn(s, generator=g).to(dt).to(device) for s in SHAPES]
        args = [params, grads] + [None if n is None else state[n] for n in opt.state_args(opts)]
        kwargs = dict(opt.hyper(opts))
        if opt.takes_step:
            kwargs["step"] = t
        opt.fn(*args, **kwargs)
        if state_dtype == "emulated":
            for arrays in state.values():
                for a in arrays:
                    _round_bf16(a)
    return [p.float().cpu() for p in params], {k: [a.float().cpu() for a in v]
                                                for k, v in state.items()}


def _assert_same(a, b, what):
    (pa, sa), (pb, sb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_bits(x.numpy(), y.numpy(), f"{what} params[{i}]", any_nan=True)
    for k in sa:
        for i, (x, y) in enumerate(zip(sa[k], sb[k])):
            assert_bits(x.numpy(), y.numpy(), f"{what} {k}[{i}]", any_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_bfloat16_state_is_float32_state_rounded(opt, opts, param_dtype, device):
    paths = ["scalar", "avx2"] if device == "cpu" else ["auto"]
    want = None
    for path in paths:
        with using_cpu_path(path):
            got = _run(opt, opts, param_dtype, "bfloat16", 11, device)
            emulated = _run(opt, opts, param_dtype, "emulated", 11, device)
        _assert_same(got, emulated, f"{path}: bfloat16 state against float32 state rounded")
        if want is not None:
            _assert_same(got, want, f"{path} against scalar")
        want = got
    if device == "cuda":  # the GPU equals the CPU
        with using_cpu_path("auto"):
            _assert_same(want, _run(opt, opts, param_dtype, "bfloat16", 11, "cpu"), "cuda/cpu")


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_bfloat16_state_threads_bit_identical(opt, opts):
    runs = []
    for threads in (1, 2):
        with using_threads(threads):
            runs.append(_run(opt, opts, "float32", "bfloat16", 5, "cpu", steps=2))
    _assert_same(runs[0], runs[1], "1 vs 2 threads")


@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_bfloat16_state_tracks_the_reference(opt, opts, rng):
    # NumPy params (float32) with ml_dtypes bfloat16 state, against the float64 reference
    # whose state is rounded to bfloat16 after every step: within a few bfloat16 ulps.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    shape = (4097,)
    p = normal_nonzero(rng, shape).astype(np.float32)
    state0 = {n: opt.init[n](shape, rng).astype(bf16) for n in opt.states(opts)}
    state = {k: v.copy() for k, v in state0.items()}
    ref_p = p.astype(np.float64)
    ref_state = {k: v.astype(np.float64) for k, v in state0.items()}
    for t in range(1, STEPS + 1):
        g = normal_nonzero(rng, shape).astype(np.float32)
        kwargs = dict(opt.hyper(opts))
        if opt.takes_step:
            kwargs["step"] = t
        opt.fn(p, g, *[None if n is None else state[n] for n in opt.state_args(opts)], **kwargs)
        opt.ref(ref_p, g.astype(np.float64),
                *[None if n is None else ref_state[n] for n in opt.state_args(opts)],
                **kwargs, **opt.ref_extra)
        for k, a in ref_state.items():
            a[...] = a.astype(bf16).astype(np.float64)
    scale = max(1.0, float(np.abs(ref_p).max()))
    err = np.abs(p.astype(np.float64) - ref_p).max() / scale
    assert err < 2e-2, f"params drifted {err:.3g} from the bfloat16-state reference"
    for k, a in state.items():
        s = max(1e-30, float(np.abs(ref_state[k]).max()))
        e = np.abs(a.astype(np.float64) - ref_state[k]).max() / s
        assert e < 5e-2, f"{k} drifted {e:.3g}"


# ---- the classes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(fastopt.optim.CLASSES))
def test_class_state_dtype(name, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cls = fastopt.optim.CLASSES[name]
    kwargs = {"lr": 1e-2} if name in ("sgd", "sophia") else {}
    if name == "sgd":
        kwargs["momentum"] = 0.9
    params = [rng.standard_normal(s).astype(np.float32) for s in [(33,), (4097,)]]
    o = cls([p.copy() for p in params], state_dtype="bfloat16", **kwargs)
    assert o.state and all(a.dtype == ml_dtypes.bfloat16 for v in o.state.values() for a in v)
    for _ in range(3):
        o.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    sd = o.state_dict()
    twin = cls([p.copy() for p in o.params], state_dtype="bfloat16", **kwargs)
    twin.load_state_dict(sd)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    o.step(grads)
    twin.step(grads)
    for a, b in zip(o.params, twin.params):
        assert_bits(b, a, "params after a restored step")
    for k in o.state:
        for a, b in zip(o.state[k], twin.state[k]):
            assert_bits(b, a, f"{k} after a restored step")
    # torch CPU params (held as NumPy views by the array-list classes): bfloat16 state too
    t = cls([torch.randn(5, 3)], state_dtype="bfloat16", **kwargs)
    assert all(fastopt._arrays.dtype_name(a) == "bfloat16" for v in t.state.values() for a in v)
    t.step([torch.randn(5, 3)])


def test_class_state_dtype_refused():
    with pytest.raises(ValueError, match=r"state_dtype: expected one of 'float32', 'bfloat16'"):
        fastopt.Adam([np.zeros(3, np.float32)], state_dtype="int4")
    with pytest.raises(ValueError, match=r"state_dtype: bfloat16 state is for float32"):
        fastopt.Adam([np.zeros(3)], state_dtype="bfloat16")


def test_functional_state_types_must_agree(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    p = rng.standard_normal(9).astype(np.float32)
    g = rng.standard_normal(9).astype(np.float32)
    before = p.copy()
    with pytest.raises(TypeError, match=r"exp_avg_sqs: dtype float32 differs from the state type "
                                        r"bfloat16"):
        fastopt.adam_(p, g, np.zeros(9, bf16), np.zeros(9, np.float32), step=1)
    with pytest.raises(TypeError, match=r"exp_avgs: dtype bfloat16 differs from the state type "
                                        r"float64"):
        fastopt.adam_(p.astype(np.float64), g.astype(np.float64), np.zeros(9, bf16),
                      np.zeros(9, bf16), step=1)
    assert_bits(p, before, "params")


# ---- fastopt.torch -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "RAdam",
                                  "Adadelta", "Rprop", "NAdam", "ASGD",
                                  "Lion", "Sophia"])
def test_torch_optimizer_state_dtype(name, device):
    import fastopt.torch as fot

    def train(state_dtype, checkpoint=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).to(device)
        kwargs = {"lr": 1e-2}
        if name == "SGD":
            kwargs["momentum"] = 0.9
        opt = getattr(fot, name)(model.parameters(), state_dtype=state_dtype, **kwargs)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).to(device)
        y = torch.randn(64, 4, generator=torch.Generator().manual_seed(2)).to(device)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return opt, model, losses

    opt, model, bf16 = train("bfloat16")
    _, _, fp32 = train("float32")
    for p in model.parameters():
        assert all(v.dtype == torch.bfloat16 for k, v in opt.state[p].items()
                   if k not in ("step", "mu_product", "eta", "mu"))
    assert bf16[-1] < bf16[0]
    assert abs(bf16[-1] - fp32[-1]) <= 0.05 * abs(fp32[-1]) + 1e-3
    # A group switched to float32 converts its state at the next step.
    opt.param_groups[0]["state_dtype"] = "float32"
    opt.zero_grad()
    model(torch.randn(3, 16, device=device)).sum().backward()
    opt.step()
    p = next(model.parameters())
    assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step")
    opt.param_groups[0]["state_dtype"] = "int4"
    with pytest.raises(ValueError,
                       match=r"param_groups\[0\]\['state_dtype'\]: expected one of 'float32', "
                             r"'bfloat16', 'int8'"):
        opt.step()


@pytest.mark.parametrize("bad,error", [("int4", ValueError), ("Float32", ValueError),
                                       (3, TypeError), (None, TypeError),
                                       (torch.bfloat16, TypeError)])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "RAdam",
                                  "Adadelta", "Rprop", "NAdam", "ASGD",
                                  "Lion", "Sophia"])
def test_torch_state_dtype_refused_everywhere(name, bad, error):
    """A bad state_dtype is refused, naming it, in the constructor, in add_param_group and
    at the step after a group was edited, and nothing is changed."""
    import fastopt.torch as fot
    cls = getattr(fot, name)
    with pytest.raises(error, match=r"^state_dtype: expected one of 'float32', 'bfloat16'"):
        cls([torch.randn(3, requires_grad=True)], state_dtype=bad)
    with pytest.raises(error, match=r"param_groups\[1\]\['state_dtype'\]: expected one of"):
        cls([{"params": [torch.randn(3, requires_grad=True)]},
             {"params": [torch.randn(3, requires_grad=True)], "state_dtype": bad}])
    p, q = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = cls([p])
    with pytest.raises(error, match=r"param_groups\[1\]\['state_dtype'\]: expected one of"):
        opt.add_param_group({"params": [q], "state_dtype": bad})
    assert len(opt.param_groups) == 1
    p.grad = torch.randn(4)
    opt.step()
    snapshot = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.param_groups[0]["state_dtype"] = bad
    with pytest.raises(error, match=r"param_groups\[0\]\['state_dtype'\]: expected one of"):
        opt.step()
    assert torch.equal(p.detach(), snapshot[0])
    assert opt.state[p].keys() == snapshot[1].keys()
    assert all(torch.equal(opt.state[p][k], v) for k, v in snapshot[1].items())
    opt.param_groups[0]["state_dtype"] = "float32"
    opt.step()  # and the optimizer goes on
    assert not torch.equal(p.detach(), snapshot[0])


def test_torch_bfloat16_state_for_float64_params_changes_nothing():
    """bfloat16 state for a float64 param is refused before any state of the group is made."""
    import fastopt.torch as fot
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = fot.Adam([a, b], state_dtype="bfloat16")
    a.grad, b.grad = torch.randn(3), torch.randn(3, dtype=torch.float64)
    before = a.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: state_dtype="):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(a.detach(), before)


def test_array_class_state_dtype_type():
    with pytest.raises(TypeError, match=r"state_dtype: expected one of 'float32', 'bfloat16'"):
        fastopt.Adam([np.ones(3, np.float32)], state_dtype=3)
