"""Issue 16, items 3 and 5-9: atomic state loads, step counts that match the updates
applied (Ctrl-C, threads), only TypeError/ValueError naming the argument, no silent
accepts, params checked at construction. Each test failed before its fix."""

import copy
import signal
import threading

import numpy as np
import pytest

import fastopt
from fastopt import _cpu

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

F32 = np.float32


def fresh(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


def adam_state_dict(rng, n=2, size=9):
    params = [fresh(rng, (size,)) for _ in range(n)]
    opt = fastopt.Adam(params, lr=0.01)
    opt.step([fresh(rng, (size,)) for _ in range(n)])
    return opt, params


def snapshot(opt):
    return {k: [a.copy() for a in v] for k, v in opt.state.items()}, opt.step_count, opt.lr


def assert_unchanged(opt, snap):
    state, step, lr = snap
    assert opt.step_count == step and opt.lr == lr
    for k, arrays in state.items():
        for own, before in zip(opt.state[k], arrays):
            np.testing.assert_array_equal(own, before, err_msg=k)


# ---- item 3: load_state_dict is atomic ----------------------------------------------------


@pytest.mark.parametrize("bad", ["meta", "sparse", "masked", "ragged"])
def test_array_class_load_is_atomic(bad, rng):
    """The last entry fails to convert: nothing before it may have been overwritten."""
    opt, _ = adam_state_dict(rng)
    other, _ = adam_state_dict(rng)
    other.step([fresh(rng, (9,)) for _ in range(2)])
    sd = other.state_dict()
    last = sd["state"]["exp_avg_sqs"]
    last[1] = {
        "meta": torch.ones(9, device="meta"),
        "sparse": torch.ones(9).to_sparse(),
        "masked": np.ma.masked_array(np.ones(9, F32), mask=[1] + [0] * 8),
        "ragged": [[1.0], [1.0, 2.0]],
    }[bad]
    snap = snapshot(opt)
    with pytest.raises(
        (TypeError, ValueError), match=r"state_dict\['state'\]\['exp_avg_sqs'\]\[1\]"
    ):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


def test_array_class_loads_torch_negative_views_by_value(rng):
    opt, _ = adam_state_dict(rng)
    sd = opt.state_dict()
    values = sd["state"]["exp_avgs"][0].copy()
    sd["state"]["exp_avgs"][0] = torch._neg_view(torch.from_numpy(-values))
    sd["step"] = 5
    opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state["exp_avgs"][0], values)
    assert opt.step_count == 5


def test_loaded_state_is_a_copy_of_the_checkpoint(rng):
    opt, _ = adam_state_dict(rng)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    sd["state"]["exp_avgs"][0][:] = 123.0
    assert not (opt.state["exp_avgs"][0] == 123.0).any()


def test_torch_class_load_is_atomic_and_typed():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    opt = ft.Adam(ps, lr=0.01)
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    sd = opt.state_dict()
    bad = {
        "state": {0: dict(sd["state"][0]), 1: dict(sd["state"][1])},
        "param_groups": sd["param_groups"],
    }
    bad["state"][1]["exp_avg"] = torch.ones(5, device="meta")
    for state_dict, match in (
        (bad, "state_dict"),
        (None, "state_dict"),
        ({}, "missing key"),
        ({"state": {}, "param_groups": None}, "param_groups"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            opt.load_state_dict(state_dict)
        for k, v in opt.state[ps[0]].items():
            assert torch.equal(v, before[k]), k


def test_torch_class_load_16bit_params_is_atomic():
    """fastopt's float32 state of a bfloat16 param is converted before torch's load commits."""
    p = torch.nn.Parameter(torch.randn(6).to(torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(6).to(torch.bfloat16))
    opt = ft.AdamW([p, q], lr=0.01)
    p.grad, q.grad = torch.randn(6).to(torch.bfloat16), torch.randn(6).to(torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    before = opt.state[p]["exp_avg"].clone()
    sd["state"][1]["exp_avg_sq"] = torch.ones(6, device="meta")
    with pytest.raises(TypeError, match="exp_avg_sq"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["exp_avg"], before)
    assert opt.state[p]["exp_avg"].dtype == torch.float32


# ---- item 5: the step count matches the updates applied ----------------------------------


def _raise_after_kernel(monkeypatch, name):
    """The compiled kernel ``name`` runs, then a KeyboardInterrupt is raised (as Ctrl-C's
    would be, when the call returns); check_only calls (which run nothing) return."""
    real = getattr(_cpu, name)

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        if not kwargs.get("check_only"):
            raise KeyboardInterrupt

    monkeypatch.setattr(_cpu, name, interrupted)
    # the host step of the classes calls the bound kernel it keeps
    monkeypatch.setattr(fastopt.functional.STEPS[name], "cpu_kernel", interrupted)


def test_interrupt_after_the_kernel_counts_the_step(monkeypatch, rng):
    p = fresh(rng, (33,))
    opt = fastopt.Adam(p, lr=0.1)
    _raise_after_kernel(monkeypatch, "adam")
    before = p.copy()
    with pytest.raises(KeyboardInterrupt):
        opt.step(fresh(rng, (33,)))
    assert not np.array_equal(p, before)  # the update was applied...
    assert opt.step_count == 1  # ...and counted


def test_refused_step_is_not_counted(rng):
    opt = fastopt.Adam(fresh(rng, (33,)), lr=0.1)
    with pytest.raises(ValueError, match="grads"):
        opt.step(fresh(rng, (32,)))
    assert opt.step_count == 0


def test_torch_interrupt_after_the_kernel_counts_the_step(monkeypatch):
    p = torch.nn.Parameter(torch.randn(7))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.randn(7)
    _raise_after_kernel(monkeypatch, "adam")
    before = p.detach().clone()
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert not torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 1.0
    monkeypatch.undo()
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_ctrl_c_from_a_signal_handler_keeps_the_count_exact():
    """Interrupts from a real signal handler land anywhere in step(); with SGD(lr=1) on
    grads of ones, p = -(updates applied) exactly, which the count must equal."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread")
    p = np.zeros(1 << 17)
    g = np.ones_like(p)
    opt = fastopt.SGD(p, lr=1.0)
    armed = [False]

    def handler(signum, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    interrupted = 0
    try:
        signal.setitimer(signal.ITIMER_REAL, 2e-4, 2e-4)
        for _ in range(4000):
            try:
                armed[0] = True
                opt.step(g)
                armed[0] = False
            except KeyboardInterrupt:
                interrupted += 1
            if interrupted >= 40:
                break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert interrupted > 0
    assert (p == p[0]).all()
    assert opt.step_count == -p[0], (opt.step_count, -p[0], interrupted)


# ---- item 9: a shared optimizer stepped from several threads --------------------------------


@pytest.mark.parametrize("cls", [fastopt.SGD, ft.SGD])
def test_concurrent_steps_are_all_applied_and_counted(cls):
    n = 1 << 16
    if cls is fastopt.SGD:
        p = np.zeros(n)
        opt = fastopt.SGD(p, lr=1.0)
        g = np.ones(n)
        step = lambda: opt.step(g)  # noqa: E731
        count = lambda: opt.step_count  # noqa: E731
        value = lambda: p  # noqa: E731
    else:
        t = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        t.grad = torch.ones(n, dtype=torch.float64)
        opt = ft.SGD([t], lr=1.0)
        step = opt.step
        count = None
        value = lambda: t.detach().numpy()  # noqa: E731
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(300):
            step()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if count is not None:
        assert count() == 1200
    np.testing.assert_array_equal(value(), np.full(n, -1200.0))


def test_concurrent_torch_adam_step_counts():
    ps = [torch.nn.Parameter(torch.randn(1 << 14)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = ft.Adam(ps, lr=1e-3)
    threads = [threading.Thread(target=lambda: [opt.step() for _ in range(300)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [float(opt.state[p]["step"]) for p in ps] == [1200.0, 1200.0]


# ---- item 6: only TypeError/ValueError, naming the argument ----------------------------------

P, G = np.ones(8, F32), np.ones(8, F32)
H = np.tile(np.eye(2), (3, 1, 1))


def _adam_(**kw):
    args = dict(step=1)
    args.update(kw)
    return fastopt.adam_(P.copy(), args.pop("grads", G), np.zeros(8, F32), np.zeros(8, F32), **args)


BAD_CALLS = {
    "lr=10**400": (lambda: fastopt.Adam(P.copy(), lr=10**400), ValueError, "^lr:"),
    "adam_ lr=10**400": (lambda: _adam_(lr=10**400), ValueError, "^lr:"),
    "scale=10**400": (lambda: fastopt.quantize_per_tensor(P, 10**400, 0), ValueError, "^scale:"),
    "damping=10**400": (
        lambda: fastopt.newton_(np.ones((3, 2)), np.ones((3, 2)), H.copy(), damping=10**400),
        ValueError,
        "^damping:",
    ),
    "newton lr=-10**400": (
        lambda: fastopt.newton_(np.ones((3, 2)), np.ones((3, 2)), H.copy(), lr=-(10**400)),
        ValueError,
        "^lr:",
    ),
    "schedule returns 10**400": (
        lambda: fastopt.SGD(P.copy(), lr=0.1, schedule=lambda t, lr: 10**400).step(G),
        ValueError,
        r"^schedule\(t, lr\):",
    ),
    "torch.Size as x": (
        lambda: fastopt.quantize_per_tensor(torch.Size([3]), 0.1, 0),
        TypeError,
        "^x:",
    ),
    "torch.float32 as x": (lambda: fastopt.choose_qparams(torch.float32), TypeError, "^x:"),
    "torch.Size as q": (lambda: fastopt.dequantize(torch.Size([3]), 0.1, 0), TypeError, "^q:"),
    "torch.float32 as params": (lambda: fastopt.Adam(torch.float32), TypeError, "^params"),
    "torch.Size as blockwise x": (
        lambda: fastopt.quantize_blockwise(torch.Size([3])),
        TypeError,
        "^x:",
    ),
    "torch.Size as newton params": (
        lambda: fastopt.newton_(torch.Size([3]), G, G),
        TypeError,
        "^params:",
    ),
    "load_state_dict(None)": (
        lambda: fastopt.Adam(P.copy()).load_state_dict(None),
        TypeError,
        "^state_dict:",
    ),
    "grads=None": (lambda: _adam_(grads=None), TypeError, "^grads:"),
    "step=2**63": (lambda: _adam_(step=2**63), ValueError, "^step:"),
    "step=2**64": (lambda: _adam_(step=2**64), ValueError, "^step:"),
    "set_num_threads(2**70)": (lambda: fastopt.set_num_threads(2**70), ValueError, "^n:"),
    "meta tensor x": (
        lambda: fastopt.quantize_per_tensor(torch.ones(3, device="meta"), 0.1, 0),
        TypeError,
        "^x: is a meta tensor",
    ),
    "meta tensor param": (
        lambda: fastopt.Adam(torch.ones(3, device="meta")),
        TypeError,
        r"^params\[0\]: is a meta tensor",
    ),
    "meta tensor grads": (
        lambda: _adam_(grads=torch.ones(8, device="meta")),
        TypeError,
        "^grads: is a meta tensor",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls_raise_type_or_value_error_naming_the_argument(case):
    call, kind, match = BAD_CALLS[case]
    with pytest.raises(kind, match=match) as info:
        call()
    assert type(info.value) in (TypeError, ValueError)
    assert len(str(info.value)) < 300  # no repr of every array (pybind11's generic message)


@pytest.mark.parametrize("missing", ["optimizer", "step", "lr", "hyper", "state"])
def test_missing_state_dict_key_is_a_value_error(missing, rng):
    opt, _ = adam_state_dict(rng)
    sd = opt.state_dict()
    del sd[missing]
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=f"missing key '{missing}'"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


X8, Q8, A1 = np.ones(8, F32), np.empty(8, np.int8), np.empty(1, F32)
PRIVATE_CALLS = {
    "step=2**64": (
        lambda: _cpu.adam(
            [P.copy()],
            [G],
            [np.zeros(8, F32)],
            [np.zeros(8, F32)],
            None,
            True,
            step=2**64,
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            decoupled_weight_decay=False,
            amsgrad=False,
            maximize=False,
            l1=0.0,
        ),
        "step",
    ),
    "set_num_threads(2**70)": (lambda: _cpu.set_num_threads(2**70), "n"),
    "set_num_threads(None)": (lambda: _cpu.set_num_threads(None), "n"),
    "set_cpu_path(3)": (lambda: _cpu.set_cpu_path(3), "path"),
    "quantize_blockwise block=2**64": (
        lambda: _cpu.quantize_blockwise(X8, Q8, A1, 2**64, False, 0, True),
        "block",
    ),
    "quantize_blockwise block=None": (
        lambda: _cpu.quantize_blockwise(X8, Q8, A1, None, False, 0, True),
        "block",
    ),
    "quantize_blockwise seed=2**70": (
        lambda: _cpu.quantize_blockwise(X8, Q8, A1, 8, True, 2**70, True),
        "seed",
    ),
    "quantize_blockwise stochastic='x'": (
        lambda: _cpu.quantize_blockwise(X8, Q8, A1, 8, "x", 0, True),
        "stochastic",
    ),
    "dequantize_blockwise block=2**64": (
        lambda: _cpu.dequantize_blockwise(Q8.copy(), A1, np.empty(8, F32), 2**64),
        "block",
    ),
    "quantize_affine axis=2**64": (
        lambda: _cpu.quantize_affine(X8, Q8, A1, A1, 2**64, True),
        "axis",
    ),
    "quantize_affine check_finite=1.0": (
        lambda: _cpu.quantize_affine(X8, Q8, A1, A1, None, 1.0),
        "check_finite",
    ),
    "minmax axis=-2**64": (lambda: _cpu.minmax(X8, -(2**64)), "axis"),
    "newton_solve damping=10**400": (
        lambda: _cpu.newton_solve(H, np.ones((3, 2)), np.empty((3, 2)), np.empty(3, bool), 10**400),
        "damping",
    ),
    "newton_apply lr=None": (
        lambda: _cpu.newton_apply(np.ones((3, 2)), np.ones((3, 2)), None, None),
        "lr",
    ),
    "add_inplace([1], x)": (lambda: _cpu.add_inplace([1.0], X8.copy()), "dst"),
    "check_params listed=None": (lambda: _cpu.check_params([P.copy()], None), "listed"),
}


@pytest.mark.parametrize("case", sorted(PRIVATE_CALLS))
def test_private_bindings_name_bad_scalars(case):
    call, name = PRIVATE_CALLS[case]
    with pytest.raises((TypeError, ValueError), match=f"^{name}:") as info:
        call()
    assert "incompatible function arguments" not in str(info.value)


# ---- item 7: no silent accepts ---------------------------------------------------------------


@pytest.mark.parametrize("step", [2**70, 2**63, -1])
def test_load_state_dict_refuses_steps_out_of_range(step, rng):
    opt, _ = adam_state_dict(rng)
    sd = opt.state_dict()
    sd["step"] = step
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"state_dict\['step'\]"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    sd["step"] = 2**63 - 1  # the most a class counts: loaded, and no step after it
    opt.load_state_dict(sd)
    assert opt.step_count == 2**63 - 1
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"^step_count: "):
        opt.step([fresh(rng, (9,)) for _ in range(2)])
    assert_unchanged(opt, snap)


def test_every_count_a_class_reaches_loads_again(rng):
    """A class whose kernel takes no step count counts to the loader's limit, no further."""
    opt = fastopt.RMSprop([fresh(rng, (5,))])
    sd = opt.state_dict()
    sd["step"] = 2**63 - 2
    opt.load_state_dict(sd)
    opt.step([np.ones(5, np.float32)])
    with pytest.raises(ValueError, match=r"^step_count: "):
        opt.step([np.ones(5, np.float32)])
    opt.load_state_dict(opt.state_dict())
    assert opt.step_count == 2**63 - 1


@pytest.mark.parametrize(
    "scales", [np.array([0.1 + 1j, 0.2]), np.array([True, True]), [0.1 + 0j, 0.2]]
)
def test_quantize_per_channel_refuses_complex_and_bool_scales(scales, rng):
    x = fresh(rng, (2, 3))
    with pytest.raises(TypeError, match="^scales:"):
        fastopt.quantize_per_channel(x, scales, np.zeros(2, np.int64), 0)


def _masked(a):
    return np.ma.masked_array(a, mask=np.arange(a.size).reshape(a.shape) % 2 == 0)


ARRAY_TAKERS = {
    "sgd_ params": lambda wrap: fastopt.sgd_(
        wrap(np.ones((2, 4), F32)), np.ones((2, 4), F32), lr=0.1
    ),
    "sgd_ grads": lambda wrap: fastopt.sgd_(
        np.ones((2, 4), F32), wrap(np.ones((2, 4), F32)), lr=0.1
    ),
    "Adam params": lambda wrap: fastopt.Adam(wrap(np.ones((2, 4), F32))),
    "Adam.step grads": lambda wrap: fastopt.Adam(np.ones((2, 4), F32)).step(
        wrap(np.ones((2, 4), F32))
    ),
    "quantize_per_tensor": lambda wrap: fastopt.quantize_per_tensor(
        wrap(np.ones((2, 4), F32)), 0.1, 0
    ),
    "quantize_per_channel scales": lambda wrap: fastopt.quantize_per_channel(
        np.ones((2, 4), F32), wrap(np.full((1, 2), 0.1)), [0, 0], 0
    ),
    "quantize_blockwise": lambda wrap: fastopt.quantize_blockwise(wrap(np.ones((2, 4), F32)), 8),
    "dequantize": lambda wrap: fastopt.dequantize(wrap(np.ones((2, 4), np.int8)), 0.1, 0),
    "dequantize_blockwise": lambda wrap: fastopt.dequantize_blockwise(
        wrap(np.ones((2, 4), np.int8)), np.ones(1, F32), 8
    ),
    "choose_qparams": lambda wrap: fastopt.choose_qparams(wrap(np.ones((2, 4), F32))),
    "newton_": lambda wrap: fastopt.newton_(
        wrap(np.ones((2, 2))), np.ones((2, 2)), np.tile(np.eye(2), (2, 1, 1))
    ),
    "private quantize_affine": lambda wrap: _cpu.quantize_affine(
        wrap(np.ones((2, 4), F32)), np.empty((2, 4), np.int8), A1, np.zeros(1, F32), None, True
    ),
}


@pytest.mark.filterwarnings("ignore:the matrix subclass")
@pytest.mark.parametrize("wrap", [_masked, np.asmatrix], ids=["masked", "matrix"])
@pytest.mark.parametrize("case", sorted(ARRAY_TAKERS))
def test_masked_arrays_and_matrices_are_refused(case, wrap):
    with pytest.raises(TypeError, match="masked|matrix|MaskedArray"):
        ARRAY_TAKERS[case](wrap)


def test_other_ndarray_subclasses_still_work(tmp_path):
    """np.memmap (a subclass whose values are its memory) is stepped in place."""
    p = np.memmap(tmp_path / "p.bin", dtype=F32, mode="w+", shape=(8,))
    p[:] = 1.0
    fastopt.sgd_(p, np.ones(8, F32), lr=0.5)
    np.testing.assert_array_equal(np.asarray(p), np.full(8, 0.5, F32))


# ---- item 8: constructors check the params ---------------------------------------------------


def _readonly(a):
    a.setflags(write=False)
    return a


BAD_PARAMS = {
    "int dtype": (lambda: np.ones(8, np.int32), TypeError, "dtype int32"),
    "read-only": (lambda: _readonly(np.ones(8, F32)), ValueError, "read-only"),
    "gaps": (lambda: np.ones(16, F32)[::2], ValueError, "dense"),
    "big-endian": (lambda: np.ones(8, ">f4"), TypeError, "big-endian"),
}


@pytest.mark.parametrize("cls", sorted(fastopt.optim.CLASSES))
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_array_classes_check_params_at_construction(cls, case):
    make, kind, match = BAD_PARAMS[case]
    with pytest.raises(kind, match=rf"^params\[1\]: .*{match}"):
        fastopt.optim.CLASSES[cls]([np.ones(8, F32), make()], lr=0.1)


@pytest.mark.parametrize("cls", sorted(fastopt.optim.CLASSES))
def test_array_classes_refuse_a_param_twice_or_overlapping(cls):
    a = np.ones(16, F32)
    with pytest.raises(ValueError, match=r"^params\[1\]: is params\[0\] again"):
        fastopt.optim.CLASSES[cls]([a, a], lr=0.1)
    with pytest.raises(ValueError, match=r"^params\[1\]:? overlaps params\[0\]"):
        fastopt.optim.CLASSES[cls]([a[:8], a[4:12]], lr=0.1)


TORCH_BAD_PARAMS = {
    "int dtype": (lambda: torch.ones(8, dtype=torch.int32), TypeError, "dtype torch.int32"),
    "gaps": (lambda: torch.ones(16)[::2], ValueError, "must be dense .* a slice with gaps"),
    "expanded": (lambda: torch.ones(4).expand(3, 4), ValueError, "must be dense .* expanded"),
    "meta": (lambda: torch.ones(8, device="meta"), TypeError, "meta tensor"),
    "sparse": (lambda: torch.ones(8).to_sparse(), TypeError, "sparse"),
}


@pytest.mark.parametrize("cls", sorted(ft.CLASSES))
@pytest.mark.parametrize("case", sorted(TORCH_BAD_PARAMS))
def test_torch_classes_check_params_at_construction(cls, case):
    make, kind, match = TORCH_BAD_PARAMS[case]
    with pytest.raises(kind, match=rf"^param_groups\[0\]\['params'\]\[1\]: .*{match}"):
        ft.CLASSES[cls]([torch.ones(8), make()])


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
def test_torch_classes_refuse_a_param_twice_and_bad_groups_are_not_added():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: is param 0 of the group again"):
        ft.Adam([p, p])
    opt = ft.Adam([p])
    with pytest.raises(TypeError, match=r"^param_groups\[1\]\['params'\]\[0\]: dtype"):
        opt.add_param_group({"params": [torch.ones(3, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1


# ---- fastopt.torch: a refused step writes, converts and makes nothing ------------------------


def tparams(rng, sizes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.from_numpy(fresh(rng, (n,))).to(dtype)) for n in sizes]


def tgrads(rng, params):
    for p in params:
        p.grad = torch.from_numpy(fresh(rng, tuple(p.shape))).to(p.dtype)


def _bits(t):
    """A copy of ``t``'s bytes (none for a meta tensor)."""
    if t.device.type == "meta":
        return torch.empty(0, dtype=torch.uint8)
    return t.detach().to_dense().cpu().reshape(-1).clone().view(torch.uint8)


def torch_snapshot(opt):
    """Params, grads, and every state entry: its keys, tensors (objects, dtypes, bits)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    tensors = [(p, _bits(p), None if p.grad is None else _bits(p.grad)) for p in params]
    state = {
        p: {k: (v, v.dtype, _bits(v)) if isinstance(v, torch.Tensor) else v for k, v in e.items()}
        for p, e in opt.state.items()
    }
    return tensors, state, [dict(g) for g in opt.param_groups]


def assert_torch_unchanged(opt, snap):
    tensors, state, groups = snap
    for p, bits, grad in tensors:
        assert torch.equal(_bits(p), bits)
        assert (p.grad is None) == (grad is None) and (
            grad is None or torch.equal(_bits(p.grad), grad)
        )
    assert list(opt.state) == list(state)
    for p, entry in opt.state.items():
        assert sorted(entry) == sorted(state[p])
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                was, dtype, bits = state[p][k]
                assert v is was and v.dtype == dtype and torch.equal(_bits(v), bits), k
            else:
                assert v is state[p][k], k
    assert [dict(g) for g in opt.param_groups] == groups


def _alias_state(opt, ps):
    opt.state[ps[1]]["exp_avg_sq"] = opt.state[ps[1]]["exp_avg"]


def _grad_is_its_param(opt, ps):
    ps[1].grad = ps[1].detach()


def _bad_master(opt, ps):
    opt.state[ps[1]]["master_param"] = torch.zeros(ps[1].numel() - 1)


# A step of several kernel calls whose last is refused: (options, param sizes and dtypes
# per group, the edit that has it refused, the message).
SEVERAL_CALLS = {
    "int8: aliased state of the float bucket": (
        dict(state_dtype="int8"),
        [[(5000, torch.float32), (300, torch.float32)]],
        _alias_state,
        r"param_groups\[0\]\['params'\]\[1\] \(exp_avg_sqs\) overlaps",
    ),
    "int8: grad of the float bucket is its param": (
        dict(state_dtype="int8"),
        [[(5000, torch.float32), (300, torch.float32)]],
        _grad_is_its_param,
        r"param_groups\[0\]\['params'\]\[1\]",
    ),
    "master: bad master of the bfloat16 bucket": (
        dict(master_weights=True),
        [[(500, torch.float32), (500, torch.bfloat16)]],
        _bad_master,
        r"state of param_groups\[0\]\['params'\]\[1\]: 'master_param'",
    ),
    "two dtypes: grad of the float64 bucket is its param": (
        {},
        [[(50, torch.float32), (50, torch.float64)]],
        _grad_is_its_param,
        r"param_groups\[0\]\['params'\]\[1\]",
    ),
    "two groups: aliased state of the second": (
        {},
        [[(50, torch.float32)], [(40, torch.float32), (30, torch.float32)]],
        lambda opt, ps: _alias_state(opt, ps[1:]),
        r"param_groups\[1\]\['params'\]\[1\] ",
    ),
}


@pytest.mark.parametrize("first_step", [True, False], ids=["first step", "later step"])
@pytest.mark.parametrize("case", sorted(SEVERAL_CALLS))
def test_torch_step_of_several_calls_checks_them_all_first(case, first_step, rng):
    """Every call of a step (buckets by dtype, 8-bit or float state, master or not; every
    group) is checked before the first runs: a refused step writes, counts, makes nothing
    (a first step: no state at all)."""
    options, groups, edit, match = SEVERAL_CALLS[case]
    made = [[tparams(rng, [n], dtype)[0] for n, dtype in g] for g in groups]
    ps = [p for g in made for p in g]
    opt = ft.AdamW([{"params": g} for g in made], lr=0.01, **options)
    if not first_step:
        tgrads(rng, ps)
        opt.step()
    tgrads(rng, ps)
    if edit is _grad_is_its_param or not first_step:
        edit(opt, ps)
    else:  # no state to edit yet: the last call refused for its grad
        ps[-1].grad = ps[-1].detach()
    snap = torch_snapshot(opt)
    with pytest.raises(ValueError, match=match if not first_step else r"\['params'\]\[\d\]"):
        opt.step()
    assert_torch_unchanged(opt, snap)
    assert first_step is not bool(opt.state)


def _stepped(rng, sizes=(5000, 5000), dtype=torch.float32, steps=1, **options):
    ps = tparams(rng, sizes, dtype)
    opt = ft.AdamW(ps, lr=0.01, **options)
    for _ in range(steps):
        tgrads(rng, ps)
        opt.step()
    tgrads(rng, ps)
    return opt, ps


def _torch_checkpoint_into_int8(rng):
    ps = tparams(rng, (5000, 5000))
    ref = torch.optim.AdamW(ps, lr=0.01)
    tgrads(rng, ps)
    ref.step()
    opt = ft.AdamW(ps, lr=0.01, state_dtype="int8")
    opt.load_state_dict(ref.state_dict())  # float state, quantized at the next step
    tgrads(rng, ps)
    return opt, ps


def _edited_group(edit, **stepped_with):
    """An optimizer stepped once with ``stepped_with``, then its group's options edited."""

    def make(rng):
        opt, ps = _stepped(rng, **stepped_with)
        opt.param_groups[0].update(edit)
        return opt, ps

    return make


def _other_strides(opt, ps):
    exp_avg = opt.state[ps[0]]["exp_avg"].reshape(50, 100)
    opt.state[ps[0]]["exp_avg"] = exp_avg.t().contiguous().t().reshape(5000)


# A step whose params[0] has state to convert, make or move, refused for params[1]:
# (the optimizer and its params, ready to step).
CONVERSIONS = {
    "float state quantized (a torch.optim checkpoint)": _torch_checkpoint_into_int8,
    "8-bit state decoded": _edited_group(dict(state_dtype="float32"), state_dtype="int8"),
    "bfloat16 state converted to float32": _edited_group(
        dict(state_dtype="float32"), state_dtype="bfloat16"
    ),
    "master copy made": _edited_group(dict(master_weights=True), dtype=torch.bfloat16),
    "master copy dropped": _edited_group(
        dict(master_weights=False), dtype=torch.bfloat16, master_weights=True
    ),
    "first step: state made": lambda rng: _stepped(rng, steps=0),
}


@pytest.mark.parametrize("case", sorted(CONVERSIONS))
def test_torch_refused_step_converts_and_makes_no_state(case, rng):
    """State is converted (float <-> 8-bit, another float type, moved to the param's
    strides), made or dropped only once every param of the step passed its checks."""
    opt, ps = CONVERSIONS[case](rng)
    tgrads(rng, ps)
    if ps[0] in opt.state and "exp_avg" in opt.state[ps[0]] and "8-bit" not in case:
        _other_strides(opt, ps)
    opt.state[ps[1]]["exp_avg"] = torch.zeros(7)
    snap = torch_snapshot(opt)
    with pytest.raises(
        ValueError, match=r"^state of param_groups\[0\]\['params'\]\[1\]: .*'exp_avg'"
    ):
        opt.step()
    assert_torch_unchanged(opt, snap)


def _set(key, value):
    def edit(entry):
        entry[key] = value(entry)

    return edit


_DECODING = _edited_group(dict(state_dtype="float32"), sizes=(5000,), state_dtype="int8")
_DECODE_MATCH = r"8-bit state 'exp_avg' \(decoded to torch.float32\) must be a \(5000,\) uint8"
_STRAY_MATCH = r"'exp_avg_absmax' \(block maxima of 8-bit state\) beside float state 'exp_avg'"
_QUANTIZE_MATCH = r"'exp_avg' \(quantized to 8-bit state\) must be a \(5000,\) float tensor"

# 8-bit state decoded (state_dtype "int8" -> "float32"), float state quantized (a torch.optim
# checkpoint into state_dtype="int8"), each checked first: (the optimizer, an edit of
# state[params[0]], the message).
STATE8_CONVERSIONS = {
    "decode: absmax one block short": (
        _DECODING,
        _set("exp_avg_absmax", lambda e: e["exp_avg_absmax"][:-1]),
        _DECODE_MATCH,
    ),
    "decode: absmax one block more": (
        _DECODING,
        _set("exp_avg_absmax", lambda e: torch.cat([e["exp_avg_absmax"], torch.ones(1)])),
        _DECODE_MATCH,
    ),
    "decode: absmax float64": (
        _DECODING,
        _set("exp_avg_absmax", lambda e: e["exp_avg_absmax"].double()),
        _DECODE_MATCH,
    ),
    "decode: absmax 2-d": (
        _DECODING,
        _set("exp_avg_absmax", lambda e: e["exp_avg_absmax"].reshape(4, 5)),
        _DECODE_MATCH,
    ),
    **{
        f"decode: absmax {what}": (
            _DECODING,
            _set("exp_avg_absmax", lambda e, v=value: e["exp_avg_absmax"].index_fill(0, torch.tensor([3]), v)),
            _DECODE_MATCH + r".*\(finite, >= 0\)",
        )
        for what, value in (("NaN", float("nan")), ("inf", float("inf")), ("negative", -0.5))
    },
    **{
        f"8-bit kept: absmax {what} in a new tensor": (
            lambda rng: _stepped(rng, sizes=(5000,), state_dtype="int8"),
            _set("exp_avg_absmax", lambda e, v=value: e["exp_avg_absmax"].index_fill(0, torch.tensor([3]), v)),
            r"8-bit state 'exp_avg' must be a \(5000,\) uint8 tensor .*\(finite, >= 0\)",
        )
        for what, value in (("NaN", float("nan")), ("negative", -0.5))
    },
    "decode: codes of another shape": (
        _DECODING,
        _set("exp_avg", lambda e: e["exp_avg"][:100]),
        _DECODE_MATCH,
    ),
    "decode: codes int64": (
        _DECODING,
        _set("exp_avg", lambda e: e["exp_avg"].long()),
        _DECODE_MATCH,
    ),
    "decode: codes meta": (
        _DECODING,
        _set("exp_avg", lambda e: torch.empty(5000, dtype=torch.uint8, device="meta")),
        _DECODE_MATCH,
    ),
    "decode: codes float32 (a stray absmax)": (
        _DECODING,
        _set("exp_avg", lambda e: e["exp_avg"].float() * 0.37),
        _STRAY_MATCH,
    ),
    "float state with a stray absmax": (
        lambda rng: _stepped(rng, sizes=(300,)),
        _set("exp_avg_absmax", lambda e: torch.ones(2)),
        _STRAY_MATCH,
    ),
    "float state with a stray absmax, int8 group": (
        lambda rng: _stepped(rng, sizes=(300,), state_dtype="int8"),
        _set("exp_avg_absmax", lambda e: torch.ones(2)),
        _STRAY_MATCH,
    ),
    "quantize: float state misshapen": (
        _torch_checkpoint_into_int8,
        _set("exp_avg", lambda e: e["exp_avg"][:4999]),
        _QUANTIZE_MATCH,
    ),
    "quantize: float state meta": (
        _torch_checkpoint_into_int8,
        _set("exp_avg", lambda e: torch.empty(5000, device="meta")),
        _QUANTIZE_MATCH,
    ),
    "quantize: float state sparse": (
        _torch_checkpoint_into_int8,
        _set("exp_avg", lambda e: e["exp_avg"].to_sparse()),
        _QUANTIZE_MATCH,
    ),
    "quantize: int64 state": (
        _torch_checkpoint_into_int8,
        _set("exp_avg", lambda e: e["exp_avg"].long()),
        _QUANTIZE_MATCH,
    ),
    "quantize: codes without their absmax": (
        _torch_checkpoint_into_int8,
        _set("exp_avg", lambda e: e["exp_avg"].to(torch.uint8)),
        r"without its block maxima 'exp_avg_absmax'",
    ),
}


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), -0.5])
def test_torch_load_of_impossible_block_maxima_is_refused(value, rng):
    """Block maxima are max |x| of a block: a checkpoint's NaN, inf or negative ones would
    decode to NaN, inf or flipped signs."""
    opt, ps = _stepped(rng, sizes=(5000,), state_dtype="int8")
    saved = opt.state_dict()
    top = saved["state"][0]["exp_avg_absmax"]
    saved["state"][0]["exp_avg_absmax"] = top.index_fill(0, torch.tensor([3]), value)
    snap = torch_snapshot(opt)
    with pytest.raises(ValueError, match=r"block maxima of 8-bit state must be .*\(finite, >= 0\)"):
        opt.load_state_dict(saved)
    assert_torch_unchanged(opt, snap)


@pytest.mark.parametrize("case", sorted(STATE8_CONVERSIONS))
def test_torch_8bit_conversions_check_the_state_first(case, rng):
    """Codes must be uint8 shaped like the param, absmax float32 of ceil(n/256) elements;
    float state beside a "<key>_absmax" is refused rather than decoded as codes; float
    state to quantize must be a float tensor shaped like the param."""
    make, edit, match = STATE8_CONVERSIONS[case]
    opt, ps = make(rng)
    edit(opt.state[ps[0]])
    snap = torch_snapshot(opt)
    with pytest.raises(
        ValueError, match=r"^state of param_groups\[0\]\['params'\]\[0\]: .*" + match
    ):
        opt.step()
    assert_torch_unchanged(opt, snap)


# A state entry replaced between steps (the buckets cached): (options, param dtype, key,
# the new value from the old, the exception, the message).
REPLACED_STATE = {
    "master_param: a NumPy array": (
        dict(master_weights=True),
        torch.bfloat16,
        "master_param",
        lambda old: old.numpy().copy(),
        ValueError,
        r"'master_param' must be a float32 tensor",
    ),
    "master_param: a negative view": (
        dict(master_weights=True),
        torch.bfloat16,
        "master_param",
        lambda old: (-old)._neg_view(),
        ValueError,
        r"'master_param' must be a float32 tensor",
    ),
    "exp_avg_absmax: a string": (
        dict(state_dtype="int8"),
        torch.float32,
        "exp_avg_absmax",
        lambda old: "x",
        ValueError,
        r"8-bit state 'exp_avg' must be",
    ),
    "exp_avg_absmax: one block short": (
        dict(state_dtype="int8"),
        torch.float32,
        "exp_avg_absmax",
        lambda old: old[:-1],
        ValueError,
        r"8-bit state 'exp_avg' must be",
    ),
    "exp_avg: meta": (
        {},
        torch.float32,
        "exp_avg",
        lambda old: torch.empty_like(old, device="meta"),
        ValueError,
        r"'exp_avg' must be a \(5000,\) torch.float32 tensor on cpu",
    ),
    "exp_avg: sparse": (
        {},
        torch.float32,
        "exp_avg",
        lambda old: old.to_sparse(),
        ValueError,
        r"'exp_avg' must be a \(5000,\) torch.float32 tensor on cpu",
    ),
    "exp_avg_sq: a list": (
        {},
        torch.float32,
        "exp_avg_sq",
        lambda old: old.tolist(),
        ValueError,
        r"'exp_avg_sq' must be",
    ),
    "step: a string": ({}, torch.float32, "step", lambda old: "3", TypeError, r"'step'"),
    "step: NaN": ({}, torch.float32, "step", lambda old: old * float("nan"), ValueError, r"'step'"),
    "step: negative": ({}, torch.float32, "step", lambda old: -old, ValueError, r"'step'"),
    "step: 2.5": ({}, torch.float32, "step", lambda old: old + 0.5, ValueError, r"'step'"),
}


@pytest.mark.parametrize("case", sorted(REPLACED_STATE))
def test_torch_state_replaced_between_steps_is_checked_as_at_the_first(case, rng):
    """The buckets are kept between steps; a state entry replaced goes through every check
    a first step makes (named, nothing written) instead of reaching the kernel."""
    options, dtype, key, new, kind, match = REPLACED_STATE[case]
    opt, ps = _stepped(rng, dtype=dtype, steps=2, **options)
    opt.state[ps[1]][key] = new(opt.state[ps[1]][key])
    snap = torch_snapshot(opt)
    with pytest.raises(kind, match=r"^state of param_groups\[0\]\['params'\]\[1\]: .*" + match):
        opt.step()
    assert_torch_unchanged(opt, snap)


def test_torch_negative_view_state_is_stepped_by_value(rng):
    """A state tensor replaced by a negative view (a zero-copy -x) is taken as its values,
    as state of other strides is (the step has it copied)."""
    opts = [_stepped(np.random.default_rng(7), sizes=(300, 200)) for _ in range(2)]
    (opt, ps), (twin, twin_ps) = opts
    flipped = -opt.state[ps[1]]["exp_avg"]
    opt.state[ps[1]]["exp_avg"] = flipped._neg_view()  # the same values, negated twice
    twin.state[twin_ps[1]]["exp_avg"] = flipped.neg()
    for o in (opt, twin):
        o.step()
    for p, q in zip(ps, twin_ps):
        assert torch.equal(_bits(p), _bits(q))
    assert torch.equal(opt.state[ps[1]]["exp_avg"], twin.state[twin_ps[1]]["exp_avg"])


@pytest.mark.parametrize("step", [3, 3.0, np.int64(3)], ids=["int", "float", "numpy int"])
def test_torch_steps_as_numbers_continue_like_torch(step, rng):
    """torch < 1.12's checkpoints hold 'step' as a number, which torch.optim takes: so does
    fastopt.torch (also set between steps), as torch's 0-d tensor from then on."""
    start = tparams(rng, (5000, 300))
    pairs = []
    for module in (torch.optim, ft):
        ps = [p.detach().clone().requires_grad_() for p in start]
        pairs.append((ps, module.AdamW(ps, lr=0.01)))
    saved = pairs[0][1].state_dict()
    for i, p in enumerate(start):
        saved["state"][i] = {
            "step": step,
            "exp_avg": torch.from_numpy(fresh(rng, (p.numel(),))),
            "exp_avg_sq": torch.from_numpy(np.abs(fresh(rng, (p.numel(),)))),
        }
    for _, opt in pairs:
        opt.load_state_dict(copy.deepcopy(saved))
    for t in range(3):
        grads = [torch.from_numpy(fresh(rng, (p.numel(),))) for p in start]
        for ps, opt in pairs:
            if t == 2 and isinstance(opt, ft.AdamW):  # torch.optim takes numbers at loads only
                opt.state[ps[1]]["step"] = type(step)(opt.state[ps[1]]["step"].item())
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        (tp, topt), (fp, fopt) = pairs
        for p, q in zip(fp, tp):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert fopt.state[p]["step"].dtype == torch.float32
            assert float(fopt.state[p]["step"]) == float(topt.state[q]["step"])


@pytest.mark.parametrize(
    "step,kind",
    [
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (-1, ValueError),
        (2.5, ValueError),
        (2**63, ValueError),
        (torch.tensor(float("nan")), ValueError),
        (torch.tensor([1.0, 2.0]), TypeError),
        ("3", TypeError),
        (True, TypeError),
    ],
    ids=["inf", "nan", "negative", "2.5", "2**63", "tensor nan", "two elements", "str", "bool"],
)
def test_torch_bad_checkpoint_steps_are_refused_at_the_load(step, kind, rng):
    opt, ps = _stepped(rng, sizes=(300, 200))
    saved = opt.state_dict()
    saved["state"][1]["step"] = step
    snap = torch_snapshot(opt)
    with pytest.raises(kind, match=r"^state_dict\['state'\]\[1\]\['step'\]: "):
        opt.load_state_dict(saved)
    assert_torch_unchanged(opt, snap)


# A group option edited after construction: (the edit, the exception, the message).
GROUP_OPTIONS = {
    "master_weights 'yes'": (
        dict(master_weights="yes"),
        TypeError,
        r"\['master_weights'\]: expected a bool",
    ),
    "stochastic_rounding 1": (
        dict(stochastic_rounding=1),
        TypeError,
        r"\['stochastic_rounding'\]: expected a bool",
    ),
    "min_8bit_size 2.5": (
        dict(state_dtype="int8", min_8bit_size=2.5),
        TypeError,
        r"\['min_8bit_size'\]: expected an integer >= 1",
    ),
    "min_8bit_size 0": (
        dict(state_dtype="int8", min_8bit_size=0),
        ValueError,
        r"\['min_8bit_size'\]: must be >= 1",
    ),
    "master_weights with stochastic_rounding": (
        dict(master_weights=True, stochastic_rounding=True, rounding_seed=1),
        ValueError,
        r"\['master_weights'\]: excludes stochastic_rounding",
    ),
    "stochastic_rounding without a seed": (
        dict(stochastic_rounding=True, rounding_seed=None),
        TypeError,
        r"\['rounding_seed'\]: expected an integer",
    ),
    "rounding_seed negative": (
        dict(stochastic_rounding=True, rounding_seed=-1),
        ValueError,
        r"\['rounding_seed'\]: must be in",
    ),
}


@pytest.mark.parametrize("first_step", [True, False], ids=["first step", "later step"])
@pytest.mark.parametrize("case", sorted(GROUP_OPTIONS))
def test_torch_group_options_edited_are_checked_as_the_constructor_does(case, first_step, rng):
    edit, kind, match = GROUP_OPTIONS[case]
    opt, ps = _stepped(rng, dtype=torch.bfloat16, steps=0 if first_step else 1)
    opt.param_groups[0].update(edit)
    snap = torch_snapshot(opt)
    with pytest.raises(kind, match=r"^param_groups\[0\]" + match):
        opt.step()
    assert_torch_unchanged(opt, snap)
    assert first_step is not bool(opt.state)


def test_torch_master_weights_and_stochastic_rounding_are_refused_when_a_group_is_made(rng):
    ps = tparams(rng, (64,), torch.bfloat16)
    with pytest.raises(ValueError, match=r"^master_weights: excludes stochastic_rounding"):
        ft.AdamW(ps, master_weights=True, stochastic_rounding=True)
    with pytest.raises(TypeError, match=r"^param_groups\[0\]\['min_8bit_size'\]: "):
        ft.AdamW([{"params": ps, "min_8bit_size": 2.5}], state_dtype="int8")
    opt = ft.AdamW(ps)
    for group, kind, match in [
        (
            dict(master_weights=True, stochastic_rounding=True, rounding_seed=1),
            ValueError,
            "excludes stochastic_rounding",
        ),
        (dict(master_weights="yes"), TypeError, "expected a bool"),
    ]:
        with pytest.raises(kind, match=r"^param_groups\[1\]\['master_weights'\]: " + match):
            opt.add_param_group({"params": tparams(rng, (8,), torch.bfloat16), **group})
        assert len(opt.param_groups) == 1


def _entry_set(key, value):
    def edit(saved):
        saved["state"][0][key] = value(saved["state"][0])

    return edit


# A checkpoint's malformed 8-bit state: (the edit of state_dict()["state"][0], the key named).
BAD_8BIT_LOADS = {
    "absmax one block short": (
        _entry_set("exp_avg_absmax", lambda e: e["exp_avg_absmax"][:-1]),
        "exp_avg_absmax",
    ),
    "absmax float64": (
        _entry_set("exp_avg_absmax", lambda e: e["exp_avg_absmax"].double()),
        "exp_avg_absmax",
    ),
    "absmax a list": (
        _entry_set("exp_avg_sq_absmax", lambda e: e["exp_avg_sq_absmax"].tolist()),
        "exp_avg_sq",
    ),
    "absmax missing": (lambda saved: saved["state"][0].pop("exp_avg_absmax"), "exp_avg"),
    "codes misshapen": (_entry_set("exp_avg", lambda e: e["exp_avg"][:4000]), "exp_avg_absmax"),
    "absmax beside float state": (
        _entry_set("exp_avg", lambda e: e["exp_avg"].float()),
        "exp_avg_absmax",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_8BIT_LOADS))
def test_torch_load_refuses_malformed_8bit_state(case, rng):
    """Checked at the load (which changes nothing then), not at the next step."""
    edit, key = BAD_8BIT_LOADS[case]
    saved = _stepped(rng, sizes=(5000,), state_dtype="int8")[0].state_dict()
    edit(saved)
    opt, _ = _stepped(rng, sizes=(5000,), state_dtype="int8")
    snap = torch_snapshot(opt)
    with pytest.raises(ValueError, match=rf"^state_dict\['state'\]\[0\]\['{key}'\]: "):
        opt.load_state_dict(saved)
    assert_torch_unchanged(opt, snap)


def test_torch_8bit_conversions_keep_the_param_layout(rng):
    """Float state of a channels_last param quantized (and decoded back) in the param's
    memory order, as the kernels lay out 8-bit state: the step takes it."""
    start = torch.from_numpy(fresh(rng, (4, 8, 16, 16))).to(memory_format=torch.channels_last)
    p = torch.nn.Parameter(start.clone())
    exp_avg = torch.from_numpy(fresh(rng, (4, 8, 16, 16))).to(memory_format=torch.channels_last)
    opt = ft.AdamW([p], lr=0.01, state_dtype="int8")
    opt.load_state_dict(
        {
            "state": {
                0: {"step": torch.tensor(1.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg.square()}
            },
            "param_groups": opt.state_dict()["param_groups"],
        }
    )
    p.grad = torch.zeros_like(p)
    opt.step()
    codes = opt.state[p]["exp_avg"]
    assert codes.dtype == torch.uint8 and codes.stride() == p.stride()
    values = fastopt.reference.dequantize_state8(
        codes.numpy(), opt.state[p]["exp_avg_absmax"].numpy(), True
    )
    np.testing.assert_allclose(
        values, 0.9 * exp_avg.numpy(), atol=0.02 * np.abs(exp_avg.numpy()).max()
    )
    opt.param_groups[0]["state_dtype"] = "float32"
    opt.step()
    decoded = opt.state[p]["exp_avg"]
    assert decoded.dtype == torch.float32 and decoded.stride() == p.stride()
    np.testing.assert_allclose(
        decoded.numpy(), 0.81 * exp_avg.numpy(), atol=0.02 * np.abs(exp_avg.numpy()).max()
    )


# ---- the second adversarial pass ------------------------------------------------------------


def test_torch_param_in_two_groups_is_refused_at_the_step():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = ft.AdamW([{"params": [p]}, {"params": [q]}], lr=0.1)
    p.grad, q.grad = torch.ones(4), torch.ones(4)
    opt.step()
    opt.param_groups[1]["params"].append(p)  # past add_param_group's check
    before = torch_snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\]: is also "
                                         r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    assert_torch_unchanged(opt, before)


def test_torch_param_replaced_in_its_group_is_the_one_stepped():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = ft.SGD([p], lr=0.5)
    p.grad = q.grad = torch.ones(4)
    opt.step()
    kept, start = p.detach().clone(), q.detach().clone()
    opt.param_groups[0]["params"][0] = q  # the same list, another param
    opt.step()
    assert torch.equal(p.detach(), kept) and torch.equal(q.detach(), start - 0.5)


@pytest.mark.parametrize("entry", [[1], "abc", None, 5, torch.ones(2)],
                         ids=["list", "str", "None", "int", "tensor"])
def test_torch_load_of_a_state_entry_that_is_no_dict_is_refused(entry):
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(torch.randn(5))
    opt = ft.AdamW([p, q], lr=0.01, state_dtype="int8")
    p.grad, q.grad = torch.randn(5000), torch.randn(5)
    opt.step()
    saved = opt.state_dict()
    saved["state"][1] = entry
    before = torch_snapshot(opt)
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[1\]: expected a dict"):
        opt.load_state_dict(saved)
    assert_torch_unchanged(opt, before)
    opt.step()  # still steps


@pytest.mark.parametrize("edit,error,match", [
    (dict(betas=(0.9,)), TypeError, r"\['betas'\]: expected a pair"),
    (dict(betas=0.9), TypeError, r"\['betas'\]: expected a pair"),
    (dict(betas=(torch.tensor([0.9, 0.8]), 0.99)), ValueError, r"\['betas'\]\[0\]: a tensor"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"\['lr'\]: a tensor hyper-parameter"),
    (dict(lr=torch.tensor([])), ValueError, r"\['lr'\]: a tensor hyper-parameter"),
    ("eps", ValueError, r"\['eps'\]: missing"),
], ids=["betas-1", "betas-float", "betas-tensor", "lr-2", "lr-0", "no-eps"])
def test_torch_malformed_group_hyper_parameters_are_named(edit, error, match):
    p = torch.nn.Parameter(torch.randn(4))
    opt = ft.AdamW([p], lr=0.01)
    p.grad = torch.ones(4)
    if isinstance(edit, str):
        del opt.param_groups[0][edit]
    else:
        opt.param_groups[0].update(edit)
    before = p.detach().clone()
    with pytest.raises(error, match=r"param_groups\[0\]" + match):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


def test_torch_step_count_edited_in_place_is_the_one_used():
    init = torch.randn(4)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opts = [ft.AdamW([ours], lr=0.1), torch.optim.AdamW([theirs], lr=0.1, foreach=False)]
    for t in range(3):
        for p, o in zip((ours, theirs), opts):
            p.grad = torch.full((4,), 1.0 + t)
            o.step()
            if t == 0:
                o.state[p]["step"].fill_(100.0)
    assert float(opts[0].state[ours]["step"]) == float(opts[1].state[theirs]["step"]) == 102.0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_torch_overlapping_param_is_named_not_relaid():
    p, q = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    opt = ft.SGD([p, q], lr=0.1)
    p.grad, q.grad = torch.ones(3, 4), torch.ones(3, 4)
    opt.step()
    q.data = torch.zeros(4).expand(3, 4)  # stride 0: not dense
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: must be dense"):
        opt.step()


def test_torch_8bit_block_maxima_errors_name_the_param():
    ps = [torch.nn.Parameter(torch.randn(5000)) for _ in range(3)]
    opt = ft.AdamW(ps, lr=0.01, state_dtype="int8")
    for p in ps:
        p.grad = torch.randn(5000)
    opt.step()
    opt.state[ps[2]]["exp_avg_absmax"] = opt.state[ps[2]]["exp_avg_sq_absmax"]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] \(absmax"):
        opt.step()
