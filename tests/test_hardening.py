"""Issue 16, items 3 and 5-9: atomic state loads, step counts that match the updates
applied (Ctrl-C, threads), only TypeError/ValueError naming the argument, no silent
accepts, params checked at construction. Each test failed before its fix."""

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
    would be, when the call returns)."""
    real = getattr(_cpu, name)

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
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


@pytest.mark.parametrize("step", [2**70, 2**63 - 1, -1])
def test_load_state_dict_refuses_steps_out_of_range(step, rng):
    opt, _ = adam_state_dict(rng)
    sd = opt.state_dict()
    sd["step"] = step
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"state_dict\['step'\]"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    sd["step"] = 2**63 - 2  # the last count a next step can follow
    opt.load_state_dict(sd)
    assert opt.step_count == 2**63 - 2


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
    "gaps": (lambda: torch.ones(16)[::2], ValueError, "has gaps"),
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
