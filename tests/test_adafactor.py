"""Adafactor: the step function, the array class and fastopt.torch.Adafactor against the
float64 reference and torch.optim.Adafactor; bit identity across the CPU paths and thread
counts; state_dict interchange with torch; bad input refused with nothing written."""
import copy

import numpy as np
import pytest

import fastopt
from fastopt import _ext, reference

from backends import assert_bits
from conftest import (assert_close, ft, needs_torch, normal_nonzero, torch, torch_roundtrip,
                      train_small_mlp, using_cpu_path, using_threads)

# (900, 3, 3) on: units of several small matrices, narrow ones (fewer than 16 columns) and
# wider ones, one row or one column each
SHAPES = [(1,), (7,), (), (33, 17), (3, 5, 1030), (2, 3, 3, 3), (4097,), (1, 4097), (40, 1),
          (900, 3, 3), (1500, 1, 1), (300, 1, 5), (200, 6, 1), (90, 2, 20)]
OPTIONS = [
    {},
    {"weight_decay": 0.1, "maximize": True},
    {"beta2_decay": -0.5, "eps": (1e-30, 1e-3), "d": float("inf"), "lr": 0.05},
    {"lr": 0.5, "eps": (None, 0.0), "d": 1.5, "weight_decay": 0.01},
]
STEPS = 10
EPS = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def state_for(p, dtype=None):
    """Zeroed (row_var, col_var, variance) for param p, None where it keeps no such state."""
    dtype = dtype or (np.float64 if p.dtype == np.float64 else np.float32)
    if p.ndim >= 2:
        return (np.zeros(p.shape[:-1] + (1,), dtype),
                np.zeros(p.shape[:-2] + (1, p.shape[-1]), dtype), None)
    return None, None, np.zeros(p.shape, dtype)


def reference_kw(opts, dtype_name):
    kw = {k: v for k, v in opts.items() if k != "eps"}
    eps1, eps2 = opts.get("eps", (None, 1e-3))
    return {**kw, "eps1": EPS[dtype_name] if eps1 is None else eps1, "eps2": eps2}


def run(shapes, dtype, opts, rng, steps=STEPS):
    """params stepped by fastopt.adafactor_ and float64 copies by the reference."""
    params = [normal_nonzero(rng, s).astype(dtype) for s in shapes]
    states = [state_for(p) for p in params]
    want = [p.astype(np.float64) for p in params]
    want_states = [tuple(None if a is None else a.astype(np.float64) for a in s) for s in states]
    for t in range(1, steps + 1):
        grads = [normal_nonzero(rng, s).astype(dtype) for s in shapes]
        fastopt.adafactor_(params, grads, *map(list, zip(*states)), step=t, **opts)
        for p, g, s in zip(want, grads, want_states):
            reference.adafactor(p, g.astype(np.float64), *s, step=t,
                                **reference_kw(opts, np.dtype(dtype).name))
    return params, states, want, want_states


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_reference(cpu_path, dtype, shape, opts, rng):
    params, states, want, want_states = run([shape], dtype, opts, rng)
    assert_close(params, want, dtype, "params")
    for k in range(3):
        got = [s[k] for s in states if s[k] is not None]
        assert_close(got, [s[k] for s in want_states if s[k] is not None], dtype, f"state {k}")


@pytest.mark.parametrize("shapes", [[(70001,)], [(3, 40, 1030)], [(7,), (300, 300), (5, 2, 9000)],
                                    [(20000, 3, 3), (40000, 1, 1), (9, 5, 33), (5000, 1, 7),
                                     (3000, 6, 1), (700, 2, 20)]],
                         ids=["vector", "matrices", "list", "small matrices"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_paths_and_threads_agree_bit_for_bit(shapes, dtype):
    # Sizes past the threading threshold: every sum is taken in one fixed order.
    results = []
    for path, threads in [("scalar", 1), ("avx2", 1), ("avx2", 2), ("scalar", 3)]:
        with using_cpu_path(path), using_threads(threads):
            params, states, _, _ = run(shapes, dtype, {"weight_decay": 0.1}, np.random.default_rng(5),
                                       steps=3)
        results.append([p.tobytes() for p in params] + [a.tobytes() for s in states for a in s
                                                         if a is not None])
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_params(cpu_path, dtype, rng):
    # float32 math and state, params rounded to their dtype at each step: within a few of
    # their ulps of the float64 reference run on the same rounded values.
    np_dtype = np.float16 if dtype == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    shapes = [(33, 17), (7,), (2, 3, 1030), (500, 3, 3), (1000, 1, 1)]
    params = [normal_nonzero(rng, s).astype(np_dtype) for s in shapes]
    states = [state_for(p, np.float32) for p in params]
    for t in range(1, 4):
        grads = [normal_nonzero(rng, s).astype(np_dtype) for s in shapes]
        want = [p.astype(np.float64) for p in params]
        want_states = [tuple(None if a is None else a.astype(np.float64) for a in s) for s in states]
        for p, g, s in zip(want, grads, want_states):
            reference.adafactor(p, g.astype(np.float64), *s, step=t, eps1=EPS[dtype], eps2=1e-3)
        fastopt.adafactor_(params, grads, *map(list, zip(*states)), step=t)
        ulp = EPS[dtype]
        assert_close([p.astype(np.float64) for p in params], want, np.float32, "params", tol=ulp)
        for k in range(3):
            assert_close([s[k] for s in states if s[k] is not None],
                         [s[k] for s in want_states if s[k] is not None], np.float32, "state",
                         tol=1e-5)


def test_per_param_steps_and_zero_size(rng):
    # step as a list (params of different ages); zero-size params and an empty list are no-ops.
    p = [normal_nonzero(rng, (5, 3)).astype(np.float32), np.zeros((0, 4), np.float32),
         normal_nonzero(rng, (4,)).astype(np.float32)]
    g = [normal_nonzero(rng, a.shape).astype(np.float32) for a in p]
    states = [state_for(a) for a in p]
    want = [a.astype(np.float64) for a in p]
    want_states = [tuple(None if x is None else x.astype(np.float64) for x in s) for s in states]
    fastopt.adafactor_(p, g, *map(list, zip(*states)), step=[3, 1, 7])
    for a, b, s, t in zip(want, g, want_states, [3, 1, 7]):
        reference.adafactor(a, b.astype(np.float64), *s, step=t, eps1=EPS["float32"])
    assert_close(p, want, np.float32, "params")
    fastopt.adafactor_([], [], [], [], [], step=1)


@needs_torch
def test_zero_size_torch_arrays_of_any_strides_are_no_ops():
    # torch.from_numpy of a zero-size array has strides of 0: C order all the same (as torch
    # and NumPy say), so nothing to refuse
    p = torch.from_numpy(np.zeros((0, 4), np.float32))
    row, col = torch.from_numpy(np.zeros((0, 1), np.float32)), torch.zeros(1, 4)
    assert p.stride() == (0, 0) and row.stride() == (0, 0) and row.is_contiguous()
    fastopt.adafactor_([p], [p.clone()], [row], [col], [None], step=1)
    assert torch.equal(col, torch.zeros(1, 4))


@needs_torch
def test_reference_is_torch_in_float64(rng):
    # The oracle itself against torch.optim.Adafactor on float64 tensors.
    shapes = [(6, 5), (4,), (2, 3, 7), ()]
    params = [normal_nonzero(rng, s) for s in shapes]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = torch.optim.Adafactor(tparams, lr=0.03, weight_decay=0.2, maximize=True)
    states = [state_for(p) for p in params]
    for t in range(1, 6):
        grads = [normal_nonzero(rng, s) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        for p, g, s in zip(params, grads, states):
            reference.adafactor(p, g, *s, step=t, lr=0.03, weight_decay=0.2, maximize=True,
                                eps1=EPS["float64"])
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-13, atol=1e-14)


# ---- bad input ------------------------------------------------------------------------------

def _call(rng):
    p = [normal_nonzero(rng, (6, 5)).astype(np.float32), normal_nonzero(rng, (4,)).astype(np.float32)]
    args = {"params": p, "grads": [normal_nonzero(rng, a.shape).astype(np.float32) for a in p],
            "row_vars": [np.ones((6, 1), np.float32), None],
            "col_vars": [np.ones((1, 5), np.float32), None],
            "variances": [None, np.ones(4, np.float32)]}
    return args


def _set(name, i, value):
    def edit(args):
        args[name][i] = value(args) if callable(value) else value
    return edit


BAD = [
    ("row shape", _set("row_vars", 0, np.ones((5, 1), np.float32)), ValueError,
     r"row_vars\[0\]: expected shape \(6, 1\)"),
    ("col shape", _set("col_vars", 0, np.ones((5,), np.float32)), ValueError,
     r"col_vars\[0\]: expected shape \(1, 5\)"),
    ("variance shape", _set("variances", 1, np.ones((4, 1), np.float32)), ValueError,
     r"variances\[1\]: expected shape \(4,\)"),
    ("row missing", _set("row_vars", 0, None), ValueError, r"row_vars\[0\]: required"),
    ("variance for a matrix", _set("variances", 0, np.ones((6, 5), np.float32)), ValueError,
     r"variances\[0\]: must be None"),
    ("row for a vector", _set("row_vars", 1, np.ones((4, 1), np.float32)), ValueError,
     r"row_vars\[1\]: must be None"),
    ("state dtype", _set("variances", 1, np.ones(4, np.float64)), TypeError,
     r"variances\[1\]: dtype float64 is not the state type float32"),
    ("grad dtype", _set("grads", 1, np.ones(4, np.float64)), TypeError, r"grads\[1\]: dtype"),
    ("grad shape", _set("grads", 0, np.ones((5, 6), np.float32)), ValueError, r"grads\[0\]: shape"),
    ("transposed param", lambda a: a.update(params=[np.ascontiguousarray(a["params"][0].T).T,
                                                    a["params"][1]],
                                            grads=[np.ascontiguousarray(a["grads"][0].T).T,
                                                   a["grads"][1]]),
     ValueError, r"params\[0\]: must be C-contiguous"),
    ("state aliases a grad", _set("variances", 1, lambda a: a["grads"][1].view()), ValueError,
     r"overlaps"),
    ("row aliases the col", _set("col_vars", 0, lambda a: a["row_vars"][0][:5].reshape(1, 5)),
     ValueError, r"overlaps"),
    ("read-only state", _set("row_vars", 0, np.broadcast_to(np.float32(1), (6, 1))), ValueError,
     r"row_vars\[0\]: .*(read-only|dense)"),
    ("int params", lambda a: a.update(params=[a["params"][0].astype(np.int32), a["params"][1]]),
     TypeError, r"params\[0\]"),
]


@pytest.mark.parametrize("edit,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arrays_are_refused_before_anything_is_written(edit, error, match, rng):
    args = _call(rng)
    edit(args)
    before = {k: [None if a is None else np.array(a) for a in v] for k, v in args.items()}
    with pytest.raises(error, match=match):
        fastopt.adafactor_(*args.values(), step=2)
    for name, arrays in args.items():
        for a, b in zip(arrays, before[name]):
            if a is not None:
                assert np.array_equal(a, b), name


def test_a_wrong_state_dtype_is_named_where_it_is_first(rng):
    """The first state array of a list in the wrong dtype is named as such, not the second
    one as differing from it (the CPU binding builds one table per state list)."""
    p = [normal_nonzero(rng, s).astype(np.float32) for s in ((3, 4), (2, 5))]
    g = [normal_nonzero(rng, a.shape).astype(np.float32) for a in p]
    rows = [np.ones((3, 1), np.float64), np.ones((2, 1), np.float32)]
    cols = [np.ones((1, 4), np.float32), np.ones((1, 5), np.float32)]
    before = [a.copy() for a in p]
    with pytest.raises(TypeError, match=r"^row_vars\[0\]: dtype float64 is not the state type"):
        fastopt.adafactor_(p, g, rows, cols, [None, None], step=1)
    rows = [np.ones((3, 1), np.float32), np.ones((2, 1), np.float64)]  # the second wrong
    with pytest.raises(TypeError, match=r"^row_vars\[1\]: dtype float64 differs"):
        fastopt.adafactor_(p, g, rows, cols, [None, None], step=1)
    assert all(np.array_equal(a, b) for a, b in zip(p, before))


@pytest.mark.parametrize("kw,error,match", [
    ({"lr": -1.0}, ValueError, r"^lr: must be in"),
    ({"beta2_decay": 0.5}, ValueError, r"^beta2_decay: must be in"),
    ({"eps": (None, -1.0)}, ValueError, r"^eps\[1\]: must be in"),
    ({"eps": 1e-3}, TypeError, r"^eps: expected a pair"),
    ({"d": 0.5}, ValueError, r"^d: must be in"),
    ({"weight_decay": float("nan")}, ValueError, r"^weight_decay: must be finite"),
    ({"maximize": 1}, TypeError, r"^maximize: expected a bool"),
    ({"step": 0}, ValueError, r"^step: must be >= 1"),
    ({"step": [1]}, ValueError, r"^step: expected 2 step counts"),
    ({"step": [1, 2.5]}, TypeError, r"^step\[1\]: expected an integer"),
    ({"step": 2**53 + 1}, ValueError, r"^step: must be <= 2\*\*53"),
])
def test_bad_hyper_parameters_are_refused(kw, error, match, rng):
    args = _call(rng)
    before = [a.copy() for a in args["params"]]
    with pytest.raises(error, match=match):
        fastopt.adafactor_(*args.values(), **{"step": 1, **kw})
    assert all(np.array_equal(a, b) for a, b in zip(args["params"], before))


@pytest.mark.parametrize("name,value,error,match", [
    ("lr", float("inf"), ValueError, r"^lr: must be finite"),
    ("beta2_decay", 0.1, ValueError, r"^beta2_decay: must be finite and <= 0"),
    ("eps1", -1.0, ValueError, r"^eps1: must be finite and >= 0"),
    ("eps2", float("inf"), ValueError, r"^eps2: must be finite and >= 0"),
    ("d", float("nan"), ValueError, r"^d: must be >= 1"),
    ("maximize", None, TypeError, r"^maximize: expected a bool"),
    ("steps", [1, 0], ValueError, r"^steps\[1\]: must be a whole number"),
    ("steps", [1], TypeError, r"^steps: expected a list of 2"),
    ("row_vars", (None, None), TypeError, r"^row_vars: expected a list"),
    ("variances", [None], ValueError, r"^variances: expected 2 entries"),
])
def test_the_binding_checks_its_arguments(name, value, error, match, rng):
    # The private binding, called directly, refuses what the Python layer would, unchanged.
    args = _call(rng)
    kw = {**args, "steps": [1, 1], "lr": 0.01, "beta2_decay": -0.8, "eps1": 1e-30, "eps2": 1e-3,
          "d": 1.0, "weight_decay": 0.0, "maximize": False, "listed": True, name: value}
    before = [a.copy() for a in args["params"]]
    with pytest.raises(error, match=match):
        _ext._cpu.adafactor_step(**kw)
    assert all(np.array_equal(a, b) for a, b in zip(args["params"], before))


# ---- the array class --------------------------------------------------------------------------

def test_array_class_matches_the_step_function_and_round_trips(rng):
    shapes = [(9, 4), (6,), (2, 3, 5)]
    params = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    twins = [p.copy() for p in params]
    states = [state_for(p) for p in twins]
    opt = fastopt.Adafactor(params, lr=0.02, weight_decay=0.1, schedule=lambda t, lr: lr / (1 + t))
    grads = [[normal_nonzero(rng, s).astype(np.float32) for s in shapes] for _ in range(8)]
    for t in range(4):
        opt.step(grads[t])
        fastopt.adafactor_(twins, grads[t], *map(list, zip(*states)), step=t + 1,
                           lr=0.02 / (1 + t), weight_decay=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(params, twins))
    saved = opt.state_dict()
    other = fastopt.Adafactor([p.copy() for p in params], schedule=lambda t, lr: lr / (1 + t))
    other.load_state_dict(saved)
    for t in range(4, 8):
        opt.step(grads[t])
        other.step(grads[t])
    assert all(np.array_equal(a, b) for a, b in zip(params, other.params))
    assert opt.step_count == other.step_count == 8
    opt.zero_state()
    assert opt.step_count == 0 and not any(
        np.any(a) for arrays in opt.state.values() for a in arrays if a is not None)


def test_array_class_refuses_at_construction_what_every_step_would(rng):
    a = normal_nonzero(rng, (4, 3)).astype(np.float32)
    with pytest.raises(TypeError, match=r"^params\[1\]: dtype float64 differs"):
        fastopt.Adafactor([a, a.astype(np.float64)])
    with pytest.raises(ValueError, match=r"^params\[1\] overlaps params\[0\]"):
        fastopt.Adafactor([a, a[1:]])
    with pytest.raises(ValueError, match=r"^params\[0\]: must be C-contiguous"):
        fastopt.Adafactor([np.asfortranarray(a)])


def test_array_class_refuses_a_bad_state_dict_whole(rng):
    params = [normal_nonzero(rng, (4, 3)).astype(np.float32)]
    opt = fastopt.Adafactor(params)
    opt.step([normal_nonzero(rng, (4, 3)).astype(np.float32)])
    saved = opt.state_dict()
    bad = copy.deepcopy(saved)
    bad["state"]["col_vars"][0] = np.ones((1, 4), np.float32)
    bad["lr"] = 0.5
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\['col_vars'\]\[0\]: expected shape"):
        opt.load_state_dict(bad)
    assert opt.lr == saved["lr"] and np.array_equal(opt.state["col_vars"][0],
                                                    saved["state"]["col_vars"][0])
    with pytest.raises(ValueError, match=r"^state_dict\['hyper'\]\['d'\]: must be in"):
        opt.load_state_dict({**saved, "hyper": {**saved["hyper"], "d": 0.0}})


# ---- fastopt.torch.Adafactor ------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 10), torch.nn.LayerNorm(10))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def _train(opt, model, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _groups(model):
    return [{"params": list(model[0].parameters()), "lr": 0.05, "weight_decay": 0.1},
            {"params": list(model[2].parameters()) + list(model[3].parameters())}]


@needs_torch
@pytest.mark.parametrize("kw", [{}, {"maximize": True, "beta2_decay": -0.6, "d": 2.0},
                                {"eps": (1e-20, 1e-2), "lr": "tensor"}],
                         ids=["defaults", "maximize", "eps-tensor-lr"])
def test_torch_trajectory_matches_torch(kw):
    # Two groups, a scheduler, a channels_last conv weight: the same trajectory as torch's.
    runs = {}
    for name, cls in [("torch", torch.optim.Adafactor), ("fastopt", ft.Adafactor)]:
        model = _model()
        model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)
        # a 0-d tensor lr of each run's own (the scheduler edits it in place)
        opt = cls(_groups(model), **{**kw, **({"lr": torch.tensor(0.02)} if "lr" in kw else {})})
        _train(opt, model, _batches(12), torch.optim.lr_scheduler.StepLR(opt, 4, 0.5))
        runs[name] = (model, opt)
    for a, b in zip(runs["torch"][0].parameters(), runs["fastopt"][0].parameters()):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6)
    want, got = runs["torch"][1].state_dict(), runs["fastopt"][1].state_dict()
    for group, mine in zip(want["param_groups"], got["param_groups"]):
        assert set(mine) == set(group) | {"stochastic_rounding", "rounding_seed", "master_weights"}
        assert all(group[k] == mine[k] for k in group if not torch.is_tensor(group[k]))
    for i, entry in want["state"].items():
        assert set(entry) == set(got["state"][i])
        for key, t in entry.items():
            assert t.dtype == got["state"][i][key].dtype and t.shape == got["state"][i][key].shape
            np.testing.assert_allclose(got["state"][i][key].numpy(), t.numpy(), rtol=1e-4,
                                       atol=1e-9)


@needs_torch
@pytest.mark.parametrize("direction", ["torch-to-fastopt", "fastopt-to-torch"])
def test_torch_checkpoints_interchange(direction):
    # Train 5 steps with one, save (through torch.save/load weights_only), continue 5 steps
    # with the other: torch's own 10 steps.
    first, second = ((torch.optim.Adafactor, ft.Adafactor) if direction == "torch-to-fastopt"
                     else (ft.Adafactor, torch.optim.Adafactor))
    batches = _batches(10)
    reference_model = _model()
    _train(torch.optim.Adafactor(_groups(reference_model)), reference_model, batches)
    model = _model()
    opt = first(_groups(model))
    _train(opt, model, batches[:5])
    resumed = second(_groups(model))
    resumed.load_state_dict(torch_roundtrip(opt.state_dict()))
    _train(resumed, model, batches[5:])
    for a, b in zip(reference_model.parameters(), model.parameters()):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("limit", [1e-2, 0.0, 1e9], ids=["clipped", "zeroed", "kept"])
def test_torch_max_grad_norm_clips_as_torch_clip_then_step(limit):
    # opt.max_grad_norm: torch's clip_grad_norm_ then torch's step, the same params; the
    # norm before clipping in last_grad_norm; the setting survives a copy.
    models = [_model(), _model()]
    topt = torch.optim.Adafactor(_groups(models[0]))
    fopt = ft.Adafactor(_groups(models[1]))
    fopt.max_grad_norm = limit
    for x, y in _batches(3):
        for model in models:
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        want = torch.nn.utils.clip_grad_norm_(models[0].parameters(), limit)
        topt.step()
        fopt.step()
        torch.testing.assert_close(fopt.last_grad_norm, want, rtol=1e-6, atol=0)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert copy.deepcopy(fopt).max_grad_norm == limit


@needs_torch
def test_torch_bad_max_grad_norm_changes_nothing():
    model = _model()
    opt = ft.Adafactor(_groups(model))
    _train(opt, model, _batches(1))
    opt.max_grad_norm = -1.0
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^max_grad_norm: "):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@needs_torch
def test_torch_negative_view_grads_are_taken_by_value():
    # torch steps a grad that is a negative view (x._neg_view()) by its value; so does fastopt.
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4)) for _ in range(3)]
    grad = torch.linspace(0.5, 2, 12).reshape(3, 4)
    opts = [torch.optim.Adafactor([params[0]]), ft.Adafactor([params[1]]), ft.Adafactor([params[2]])]
    for p, opt, g in zip(params, opts, [grad._neg_view(), grad._neg_view(), -grad]):
        p.grad = g
        opt.step()
    assert params[1].grad.is_neg()
    assert torch.equal(params[1].detach(), params[2].detach())
    torch.testing.assert_close(params[1].detach(), params[0].detach(), rtol=1e-6, atol=1e-7)


@needs_torch
@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
def test_torch_a_param_twice_in_a_group_is_refused():
    p, q = torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[1\]: is param 0 "):
        ft.Adafactor([p, p])
    opt = ft.Adafactor([p])
    with pytest.raises(ValueError, match=r"^param_groups\[1\]\['params'\]\[2\]: is param 0 "):
        opt.add_param_group({"params": [q, torch.nn.Parameter(torch.ones(1)), q]})
    assert len(opt.param_groups) == 1


@needs_torch
def test_torch_version_counter_is_bumped():
    # A step between forward and backward: torch.optim's in-place writes make backward
    # raise; fastopt's writes do too.
    for cls in (torch.optim.Adafactor, ft.Adafactor):
        w = torch.nn.Parameter(torch.randn(4, 3))
        opt = cls([w])
        w.grad = torch.randn(4, 3)
        loss = (w * w).sum()
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@needs_torch
def test_torch_refused_step_changes_nothing():
    model = _model()
    opt = ft.Adafactor(_groups(model))
    _train(opt, model, _batches(1))
    opt.param_groups[1]["beta2_decay"] = 0.5
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = _batches(1)[0]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"^param_groups\[1\]\['beta2_decay'\]: must be in"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()
    assert all(torch.equal(t, after["state"][i][k]) for i, e in state["state"].items()
               for k, t in e.items())
    opt.param_groups[1]["beta2_decay"] = -0.8
    model[2].weight.grad = model[2].weight.grad.to_sparse()
    with pytest.raises(TypeError, match=r"^param_groups\[1\]\['params'\]\[0\]\.grad: "):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_16_bit_params_keep_float32_state(dtype):
    # float32 state and math; a torch checkpoint's 16-bit state is taken as float32.
    w = torch.nn.Parameter(torch.randn(8, 5).to(getattr(torch, dtype)))
    b = torch.nn.Parameter(torch.randn(5).to(getattr(torch, dtype)))
    topt = torch.optim.Adafactor([w, b])
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    start = (w.detach().clone(), b.detach().clone())
    topt.step()
    opt = ft.Adafactor([w, b])
    opt.load_state_dict(torch_roundtrip(topt.state_dict()))
    opt.step()
    assert {t.dtype for e in opt.state.values() for k, t in e.items() if k != "step"} == {
        torch.float32}
    assert not torch.equal(w.detach(), start[0]) and not torch.equal(b.detach(), start[1])
    assert [float(e["step"]) for e in opt.state.values()] == [2.0, 2.0]


@needs_torch
@pytest.mark.parametrize("case", ["inf", "nan", "zero rows and columns", "square overflows"])
def test_torch_non_finite_and_extreme_grads(case):
    # inf/NaN grads make the param NaN where torch's does; zero rows and columns take the
    # eps1 clamp as torch; a grad whose square overflows float32 stays finite here (float64
    # sums, the reference's step) where torch's float32 norms overflow and make the whole
    # param NaN (see fastopt.adafactor's docstring for the other case, |g| above ~4e9).
    torch.manual_seed(0)
    start, g = torch.randn(6, 5), torch.randn(6, 5)
    if case == "inf":
        g[2, 3] = float("inf")
    elif case == "nan":
        g[1, 1] = float("nan")
    elif case == "zero rows and columns":
        g[:, 2] = 0.0
        g[4, :] = 0.0
    else:
        g[0, 0] = 3e19
    out = []
    for cls in (torch.optim.Adafactor, ft.Adafactor):
        w = torch.nn.Parameter(start.clone())
        opt = cls([w], lr=0.1)
        for _ in range(2):
            w.grad = g.clone()
            opt.step()
        out.append(w.detach())
    theirs, mine = out
    if case == "square overflows":
        assert theirs.isnan().all() and mine.isfinite().all()
    else:
        assert torch.equal(theirs.isnan(), mine.isnan())
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)


# ---- CUDA (run where a GPU is: marked cuda, skipped elsewhere) --------------------------------

CUDA_OK = torch is not None and torch.cuda.is_available() and fastopt.cuda_available()


def _twins(shapes, dtype, seed=0):
    """(CPU tensors, their CUDA copies) of params, grads per step and zeroed state."""
    g = torch.Generator().manual_seed(seed)
    host = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    states = []
    for p in host:
        shapes_of = {"row_vars": None, "col_vars": None, "variances": None}
        for k, shape in fastopt.adafactor.state_shapes(tuple(p.shape)).items():
            shapes_of[k] = torch.zeros(shape, dtype=state_dtype)
        states.append(shapes_of)
    return host, states


def _assert_cuda_matches_cpu(shapes, tdtype, tol, steps, opts, *, seed=0, grad_seed=1,
                             masters=False):
    """`steps` steps of adafactor_ (keywords `opts`; `masters`: with float32 master copies)
    on CPU tensors and on their CUDA copies with the same grads; then the params within
    `tol`, the masters and state within float32 rounding (the same passes, float64 sums in
    another order)."""
    host, states = _twins(shapes, tdtype, seed=seed)
    dev = [p.cuda() for p in host]
    dev_states = [{k: None if v is None else v.cuda() for k, v in s.items()} for s in states]
    host_masters = [p.float() for p in host] if masters else None
    dev_masters = [p.cuda() for p in host_masters] if masters else None
    gen = torch.Generator().manual_seed(grad_seed)
    for t in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(tdtype) for p in host]
        for params, st, gs, ms in ((host, states, grads, host_masters),
                                   (dev, dev_states, [g.cuda() for g in grads], dev_masters)):
            fastopt.adafactor_(params, gs, *([s[k] for s in st] for k in
                                             ("row_vars", "col_vars", "variances")), step=t,
                               master_params=ms, **opts)
    torch.cuda.synchronize()
    for a, b in zip(host, dev):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tol, atol=tol)
    for a, b in zip(host_masters or [], dev_masters or []):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    for sa, sb in zip(states, dev_states):
        for k in sa:
            if sa[k] is not None:
                torch.testing.assert_close(sb[k].cpu(), sa[k], rtol=1e-5, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shapes", [[(33, 17)], [(3, 70, 5000)], [(7,), (), (70001,)],
                                    [(600, 3, 3), (4, 4097)],
                                    [(1500, 1, 1), (300, 1, 5), (200, 6, 1), (40, 8, 8), (1, 1),
                                     (2, 3, 3, 3), (50, 9, 8), (30, 8, 9), (700, 3, 3),
                                     (512, 3, 3)]], ids=str)
@pytest.mark.parametrize("opts", OPTIONS[:2], ids=["defaults", "wd-maximize"])
def test_cuda_matches_the_cpu_kernel(dtype, shapes, opts):
    # The same passes, float64 sums in another order: equal within float rounding. The
    # last list: matrices of at most 8 x 8 (a thread each, 256 per unit; 700 x 3 x 3: the
    # last unit part-full, 512 x 3 x 3: full), and the next larger (9 rows, 9 columns: a
    # block per matrix).
    tol = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2.0**-7}[dtype]
    _assert_cuda_matches_cpu(shapes, getattr(torch, dtype), tol, 4, opts)


# Lists longer than one launch's table (64 params): mixed kinds across three tables; 64
# matrices then vectors alone (a table without the matrices' passes 2 and 3); zero-size
# params among them (skipped, their places still key the rounding).
LONG_LISTS = {
    "mixed": [(5, 7), (3, 3, 3), (9,), (40, 1, 1), (2, 33, 65), (), (0, 4)] * 22,
    "matrices-then-vectors": [(33, 17)] * 64 + [(7,)] * 10,
}


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", list(LONG_LISTS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16-masters"])
def test_cuda_long_lists_match_the_cpu_kernel(layout, dtype):
    opts = {"rounding": "stochastic", "seed": 3} if dtype == "bfloat16" else {"weight_decay": 0.1}
    # (stochastic rounding and rounding from masters: 16-bit results one ulp apart at most)
    tol = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2.0**-7, "float16-masters": 2.0**-10}[dtype]
    _assert_cuda_matches_cpu(LONG_LISTS[layout], getattr(torch, dtype.split("-")[0]), tol, 3,
                             opts, seed=5, grad_seed=2, masters=dtype.endswith("-masters"))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU")
def test_cuda_runs_are_deterministic_and_torch_class_matches_torch():
    results = []
    for _ in range(2):
        host, states = _twins([(300, 700), (700,)], torch.float32, seed=3)
        params = [torch.nn.Parameter(p.cuda()) for p in host]
        opt = ft.Adafactor(params, weight_decay=0.1)
        for t in range(3):
            for p in params:
                p.grad = torch.randn_like(p) * (t + 1)
            torch.manual_seed(t)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    host, _ = _twins([(300, 700), (700,)], torch.float32, seed=3)
    theirs = [torch.nn.Parameter(p.cuda()) for p in host]
    topt = torch.optim.Adafactor(theirs, weight_decay=0.1)
    for t in range(3):
        for p in theirs:
            p.grad = torch.randn_like(p) * (t + 1)
        torch.manual_seed(t)
        topt.step()
    for a, b in zip(theirs, results[0]):
        torch.testing.assert_close(b, a.detach().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU")
def test_cuda_bad_arrays_are_refused_before_anything_is_written():
    p = torch.randn(6, 5, device="cuda")
    before = p.clone()
    g = torch.randn(6, 5, device="cuda")
    row, col = torch.zeros(6, 1, device="cuda"), torch.zeros(1, 5, device="cuda")
    with pytest.raises(TypeError, match=r"row_vars\[0\]: is a host array"):
        fastopt.adafactor_([p], [g], [torch.zeros(6, 1)], [col], [None], step=1)
    with pytest.raises(ValueError, match=r"col_vars\[0\]: expected shape \(1, 5\)"):
        fastopt.adafactor_([p], [g], [row], [torch.zeros(5, 1, device="cuda")], [None], step=1)
    with pytest.raises(ValueError, match=r"overlaps"):
        fastopt.adafactor_([p], [g], [row], [row.view(1, 6)[:, :5]], [None], step=1)
    with pytest.raises(ValueError, match=r"params\[0\]: must be C-contiguous"):
        fastopt.adafactor_([p.t()], [g.t()], [torch.zeros(5, 1, device="cuda")],
                           [torch.zeros(1, 6, device="cuda")], [None], step=1)
    torch.cuda.synchronize()
    assert torch.equal(p, before) and not row.any() and not col.any()


@needs_torch
def test_torch_step_refused_by_the_kernel_checks_changes_nothing():
    # Checks only the binding makes (overlaps) refuse the whole step, before any group
    # runs, naming the params by their groups; no state is made.
    buf = torch.zeros(40)
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(buf[:30].view(5, 6))
    c = torch.nn.Parameter(buf[20:].view(20))  # overlaps b
    opt = ft.Adafactor([{"params": [a]}, {"params": [b, c]}])
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in (a, b, c)]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] overlaps "
                                         r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, (a, b, c)))
    assert not opt.state_dict()["state"]


@needs_torch
def test_torch_eps1_of_a_mixed_dtype_group_is_its_first_params():
    # torch takes eps1 (None) from the group's first param and uses it for all.
    out = []
    for cls in (torch.optim.Adafactor, ft.Adafactor):
        torch.manual_seed(0)
        w16 = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
        w32 = torch.nn.Parameter(torch.randn(5, 3))
        opt = cls([w16, w32])
        w16.grad = (torch.randn(4, 3) * 1e-3).bfloat16()
        w32.grad = torch.randn(5, 3) * 1e-3
        opt.step()
        out.append(w32.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-7)


@needs_torch
def test_torch_16_bit_params_state_round_trips_in_float32():
    w = torch.nn.Parameter(torch.randn(8, 16).bfloat16())
    opt = ft.Adafactor([w])
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    saved = torch_roundtrip(opt.state_dict())
    other = ft.Adafactor([torch.nn.Parameter(w.detach().clone())])
    other.load_state_dict(saved)
    entry = next(iter(other.state.values()))
    assert entry["row_var"].dtype == torch.float32
    assert torch.equal(entry["row_var"], saved["state"][0]["row_var"])


@needs_torch
def test_torch_grad_scaler_with_a_skipped_step():
    # GradScaler unscales the grads before the step (as for torch's Adafactor) and skips
    # the step whose grads hold an inf: the same trajectory as torch's.
    out = []
    for cls in (torch.optim.Adafactor, ft.Adafactor):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        opt = cls(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for i in range(4):
            opt.zero_grad()
            scaler.scale(model(torch.randn(8, 5)).square().sum()).backward()
            if i == 2:
                model.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---- stochastic rounding of bfloat16 params ---------------------------------------------------

SR_SHAPES = [(33, 17), (7,), (3, 5, 1030), (1500, 1, 1), (300, 3, 3), (4097,), ()]
SR_DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU")])]


def _sr_problem(shapes, seed):
    """bfloat16 params, 3 steps of bfloat16 grads, zeroed float32 state (torch tensors)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes] for _ in range(3)]
    states = [[None if s is None else torch.from_numpy(s) for s in state_for(p.float().numpy())]
              for p in params]
    return params, grads, states


def _sr_step(params, grads, states, t, **kw):
    # eps1 of bfloat16 (its default) also for the float32 twins
    fastopt.adafactor_(params, grads, *map(list, zip(*states)), step=t, weight_decay=0.1,
                       eps=(2.0**-7, 1e-3), **kw)


def _host(tensors):
    """bfloat16 CPU tensors as NumPy bfloat16 arrays (ml_dtypes), as the array classes take
    them."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    return [t.view(torch.int16).numpy().view(bf16).copy() for t in tensors]


def _assert_same_states(got, want):
    """Per param (row_var, col_var, variance) lists, bit for bit (None where none)."""
    for i, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            if x is not None:
                assert_bits(x.cpu().numpy(), y.cpu().numpy(), f"state of params[{i}]")


def _bf16_bits(tensors):
    return [t.cpu().view(torch.int16).numpy().view(np.uint16) for t in tensors]


@needs_torch
@pytest.mark.parametrize("device", SR_DEVICES)
@pytest.mark.parametrize("shapes", [SR_SHAPES, SR_SHAPES[:3] * 30 + [(0, 4)] + SR_SHAPES[:2]],
                         ids=["short", "longer-than-a-launch"])
def test_stochastic_rounding_is_the_float32_step_rounded(cpu_path, device, shapes):
    # bfloat16 params: float32 math as for float32 params holding the same values, then
    # each param's result rounded by the reference's rule with its (seed, step, place); a
    # list of 93 params takes two launches on the GPU, a zero-size param keeping its place
    params, grads, states = _sr_problem(shapes, 3)
    twin = [p.float().to(device) for p in params]
    twin_states = [[None if s is None else s.clone().to(device) for s in st] for st in states]
    dev = [p.to(device) for p in params]
    dev_states = [[None if s is None else s.to(device) for s in st] for st in states]
    for t, gs in enumerate(grads, start=1):
        seed = 1000 + t
        _sr_step(dev, [g.to(device) for g in gs], dev_states, t, rounding="stochastic", seed=seed)
        _sr_step(twin, [g.float().to(device) for g in gs], twin_states, t)
        for i, p in enumerate(twin):
            bits = reference.bfloat16_stochastic(p.cpu().numpy(), seed, t, i)
            p.copy_(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float())
    for i, (got, want) in enumerate(zip(_bf16_bits(dev), _bf16_bits([p.bfloat16() for p in twin]))):
        assert_bits(got, want, f"params[{i}]")
    _assert_same_states(dev_states, twin_states)


@needs_torch
def test_stochastic_rounding_paths_and_threads_bit_identical():
    shapes = [(20000, 3, 3), (40000, 1, 1), (5000, 1, 7), (3, 40, 1030), (70001,)]
    runs = []
    for path, threads in [("scalar", 1), ("avx2", 1), ("avx2", 2), ("scalar", 3)]:
        with using_cpu_path(path), using_threads(threads):
            params, grads, states = _sr_problem(shapes, 4)
            for t, gs in enumerate(grads, start=1):
                _sr_step(params, gs, states, t, rounding="stochastic", seed=77)
            runs.append(_bf16_bits(params))
    for run in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert_bits(b, a, f"params[{i}]")


@needs_torch
def test_stochastic_rounding_is_unbiased_where_nearest_stalls():
    # Params of 1.0 and equal grads: each step moves them by lr (u = 1 everywhere), a third
    # of the bfloat16 gap below 1.0. Round-to-nearest never moves them; stochastic rounding
    # moves them on average as the float64 reference does.
    shape, steps, lr = (200, 100), 30, 2.0**-8 / 3
    nearest = torch.ones(shape, dtype=torch.bfloat16)
    stochastic = nearest.clone()
    want = np.ones(shape)
    g = torch.full(shape, 0.5, dtype=torch.bfloat16)
    states = {name: [torch.from_numpy(s) for s in state_for(np.ones(shape, np.float32))[:2]]
              for name in ("nearest", "stochastic")}
    ref_state = state_for(want)
    for t in range(1, steps + 1):
        for name, p, kw in (("nearest", nearest, {}),
                            ("stochastic", stochastic, {"rounding": "stochastic", "seed": t})):
            row, col = states[name]
            fastopt.adafactor_([p], [g], [row], [col], [None], step=t, lr=lr, **kw)
        reference.adafactor(want, g.double().numpy(), *ref_state, step=t, lr=lr, eps1=2.0**-7,
                            eps2=1e-3)
    assert (nearest == 1).all()
    drift, want_drift = (stochastic.double() - 1).mean().item(), want.mean() - 1
    assert abs(drift - want_drift) < 0.05 * abs(want_drift), (drift, want_drift)


@needs_torch
def test_stochastic_rounding_reproducible_and_checked(rng):
    params, grads, states = _sr_problem([(40, 50)], 5)
    runs = {}
    for seed in (1, 1, 2):
        p = [params[0].clone()]
        st = [[None if s is None else s.clone() for s in states[0]]]
        _sr_step(p, grads[0], st, 1, rounding="stochastic", seed=seed)
        runs.setdefault(seed, []).append(_bf16_bits(p)[0])
    assert_bits(runs[1][0], runs[1][1], "the same seed")
    assert (runs[1][0] != runs[2][0]).any()
    f32 = rng.standard_normal(5).astype(np.float32)
    before = f32.copy()
    args = ([f32], [f32.copy()], [None], [None], [np.zeros(5, np.float32)])
    with pytest.raises(ValueError, match=r"rounding: 'stochastic' .* bfloat16 params, these are float32"):
        fastopt.adafactor_(*args, step=1, rounding="stochastic", seed=1)
    with pytest.raises(ValueError, match=r"rounding: expected 'nearest' or 'stochastic'"):
        fastopt.adafactor_(*args, step=1, rounding="down")
    with pytest.raises(ValueError, match=r"seed: only applies"):
        fastopt.adafactor_(*args, step=1, seed=3)
    for value, error, match in [(-1, ValueError, r"stochastic_seed: must be in \[0, 2\*\*64\)"),
                                (2**64, ValueError, r"stochastic_seed: must be in \[0, 2\*\*64\)"),
                                (1.5, TypeError, r"stochastic_seed: expected an integer"),
                                (True, TypeError, r"stochastic_seed: expected an integer")]:
        with pytest.raises(error, match=match):
            _ext._cpu.adafactor_step(*args, [1], 0.01, -0.8, 1e-3, 1e-3, 1.0, 0.0, False, True,
                                     stochastic_seed=value)
    assert_bits(f32, before, "params")


@needs_torch
def test_array_class_stochastic_rounding():
    params, grads, states = _sr_problem([(30, 20), (9,)], 6)

    opt = fastopt.Adafactor(_host(params), weight_decay=0.1, stochastic_rounding=True, seed=11)
    for t, gs in enumerate(grads, start=1):
        opt.step(_host(gs))
        _sr_step(params, gs, states, t, rounding="stochastic",
                 seed=fastopt.functional.step_seed(11, t))
    for i, (a, b) in enumerate(zip(opt.params, _bf16_bits(params))):
        assert_bits(a.view(np.uint16), b, f"params[{i}]")
    with pytest.raises(ValueError, match=r"stochastic_rounding: applies to bfloat16 params; "
                                         r"params\[0\] is float32"):
        fastopt.Adafactor([np.ones(3, np.float32)], stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"seed: only applies"):
        fastopt.Adafactor(_host(params), seed=1)


@needs_torch
def test_torch_stochastic_rounding():
    params, grads, _ = _sr_problem([(30, 20), (9,), (4, 4)], 7)
    twin_states = [[None if s is None else torch.from_numpy(s)
                    for s in state_for(p.float().numpy())] for p in params]
    model = [torch.nn.Parameter(p.clone()) for p in params]
    extra = torch.nn.Parameter(torch.randn(5, 6))  # float32 in the group: rounds to nearest
    extra_twin = [extra.detach().clone()]
    extra_state = [[None if s is None else torch.from_numpy(s)
                    for s in state_for(extra_twin[0].numpy())]]
    opt = ft.Adafactor([{"params": [model[0]]}, {"params": [model[1], extra, model[2]]}],
                       weight_decay=0.1, stochastic_rounding=True, seed=21)
    twins = [[p.clone() for p in params[:1]], [p.clone() for p in params[1:]]]
    states = [twin_states[:1], twin_states[1:]]
    for t, gs in enumerate(grads, start=1):
        for p, g in zip(model, gs):
            p.grad = g
        extra.grad = torch.randn(5, 6)
        opt.step()
        # each group's bfloat16 call keyed by the seed, the group's rounded steps, its place
        # and its first param's
        key = [fastopt.functional.step_seed(21, t, g << 32 | 0) for g in (0, 1)]
        _sr_step(twins[0], gs[:1], states[0], t, rounding="stochastic", seed=key[0])
        _sr_step(twins[1], gs[1:], states[1], t, rounding="stochastic", seed=key[1])
        _sr_step(extra_twin, [extra.grad], extra_state, t)
    assert_bits(_bf16_bits(model)[0], _bf16_bits(twins[0])[0], "group 0")
    for i, (a, b) in enumerate(zip(_bf16_bits(model[1:]), _bf16_bits(twins[1]))):
        assert_bits(a, b, f"group 1, params[{i}]")
    assert_bits(extra.detach().numpy(), extra_twin[0].numpy(), "the float32 param")
    saved = torch_roundtrip(opt.state_dict())
    assert [g["rounding_seed"] for g in saved["param_groups"]] == [21, 21]
    theirs = torch.optim.Adafactor([torch.nn.Parameter(p.clone()) for p in model])
    theirs.load_state_dict({"state": {}, "param_groups": [
        {**saved["param_groups"][1], "params": [0, 1, 2]}]})
    with pytest.raises(ValueError, match=r"seed: only applies"):
        ft.Adafactor(model, seed=1)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['stochastic_rounding'\]"):
        bad = ft.Adafactor(model[:1])
        bad.param_groups[0]["stochastic_rounding"] = "yes"
        model[0].grad = grads[0][0]
        bad.step()


@needs_torch
def test_torch_stochastic_rounding_options_survive_and_are_checked():
    p = torch.nn.Parameter(torch.randn(4, 5).bfloat16())
    opt = ft.Adafactor([p], stochastic_rounding=True, seed=9)
    opt.load_state_dict(torch.optim.Adafactor([p]).state_dict())  # lacks fastopt's keys
    assert (opt.param_groups[0]["stochastic_rounding"], opt.param_groups[0]["rounding_seed"]) == (
        True, 9)
    opt.param_groups[0]["rounding_seed"] = np.int64(7)  # any whole number, as the others take
    p.grad = torch.randn(4, 5).bfloat16()
    opt.step()
    q = torch.nn.Parameter(torch.randn(3).bfloat16())
    plain = ft.Adafactor([p])
    for group, match in [({"stochastic_rounding": True}, r"param_groups\[1\]\['rounding_seed'\]"),
                         ({"stochastic_rounding": "yes"},
                          r"param_groups\[1\]\['stochastic_rounding'\]")]:
        with pytest.raises((TypeError, ValueError), match=match):
            plain.add_param_group({"params": [q], **group})
        assert len(plain.param_groups) == 1
    plain.add_param_group({"params": [q], "stochastic_rounding": True, "rounding_seed": 3})
    fastopt.Adafactor([], stochastic_rounding=True, seed=1).step([])  # nothing to step


def _train_mlp(device, dtype, stochastic):
    """The small MLP's final loss after 400 steps of fastopt.torch.Adafactor at lr=1e-3
    (updates of about a quarter of bfloat16's gap)."""
    return train_small_mlp(device, dtype, lambda params: ft.Adafactor(
        params, lr=1e-3, stochastic_rounding=stochastic, seed=0 if stochastic else None))[0]


@needs_torch
@pytest.mark.parametrize("device", SR_DEVICES)
def test_bfloat16_training_with_stochastic_rounding_tracks_float32(device):
    # Measured on the CPU: float32 0.2257, stochastic 0.2304-0.2317 over six seeds (the
    # rounding noise a quarter-gap update leaves in the weights), nearest 0.3547.
    fp32 = _train_mlp(device, torch.float32, False)
    sr = _train_mlp(device, torch.bfloat16, True)
    nearest = _train_mlp(device, torch.bfloat16, False)
    assert abs(sr - fp32) <= 0.05 * fp32, (sr, fp32, nearest)
    assert nearest > 1.3 * fp32, (sr, fp32, nearest)


# ---- master weights of 16-bit params ----------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("device", SR_DEVICES)
def test_master_params_step_is_the_float32_step_rounded(cpu_path, device, dtype):
    # The float32 copies are stepped as float32 params holding their values would be, with
    # the 16-bit grads as they are; the params are written as the copies rounded to nearest.
    tdtype = getattr(torch, dtype)
    params, grads, states = _sr_problem(SR_SHAPES, 8)
    params = [p.to(tdtype).to(device) for p in params]
    masters = [p.float() for p in params]
    twin = [p.float() for p in params]
    twin_states = [[None if s is None else s.clone().to(device) for s in st] for st in states]
    dev_states = [[None if s is None else s.to(device) for s in st] for st in states]
    for t, gs in enumerate(grads, start=1):
        gs = [g.to(tdtype).to(device) for g in gs]
        _sr_step(params, gs, dev_states, t, master_params=masters)
        _sr_step(twin, [g.float() for g in gs], twin_states, t)
    for i, (p, m, w) in enumerate(zip(params, masters, twin)):
        assert_bits(m.cpu().numpy(), w.cpu().numpy(), f"master_params[{i}]")
        assert_bits(p.cpu().view(torch.int16).numpy(), w.to(tdtype).cpu().view(torch.int16).numpy(),
                    f"params[{i}]")
    _assert_same_states(dev_states, twin_states)


@needs_torch
def test_master_params_are_checked_before_anything_is_written():
    params, grads, states = _sr_problem([(6, 5), (4,)], 9)
    masters = [p.float() for p in params]
    before = [t.clone() for t in params + masters]

    def step(**kw):
        _sr_step(params, grads[0], states, 1, **kw)

    f32 = [p.float() for p in params]
    cases = [
        ({"master_params": [masters[0]]}, ValueError, r"master_params: expected 2 arrays"),
        ({"master_params": [masters[0].double(), masters[1]]}, TypeError,
         r"master_params\[0\]: dtype float64 is not float32"),
        ({"master_params": [masters[0].t(), masters[1]]}, ValueError, r"master_params\[0\]"),
        ({"master_params": masters, "rounding": "stochastic", "seed": 1}, ValueError,
         r"master_params: excludes stochastic rounding"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            step(**kw)
    with pytest.raises(ValueError, match=r"master params are for float16 or bfloat16 params"):
        fastopt.adafactor_(f32, [g.float() for g in grads[0]], *map(list, zip(*states)), step=1,
                           master_params=[m.clone() for m in masters])
    for i, (a, b) in enumerate(zip(params + masters, before)):
        assert torch.equal(a, b), i


@needs_torch
def test_array_class_master_weights():
    params, grads, states = _sr_problem([(30, 20), (9,)], 10)

    opt = fastopt.Adafactor(_host(params), weight_decay=0.1, master_weights=True)
    masters = [p.float() for p in params]
    for t, gs in enumerate(grads, start=1):
        opt.step(_host(gs))
        _sr_step(params, gs, states, t, master_params=masters)
    for i, (a, b, m, want) in enumerate(zip(opt.params, params, opt.master_params, masters)):
        assert_bits(a.view(np.uint16), b.view(torch.int16).numpy().view(np.uint16), f"params[{i}]")
        assert_bits(m, want.numpy(), f"master_params[{i}]")
    saved = opt.state_dict()
    other = fastopt.Adafactor(_host(params), weight_decay=0.1, master_weights=True)
    other.load_state_dict(saved)
    for m, want in zip(other.master_params, opt.master_params):
        assert_bits(m, want, "loaded master")
    with pytest.raises(ValueError, match=r"has 'master_params' but this optimizer keeps no"):
        fastopt.Adafactor(_host(params)).load_state_dict(saved)
    opt.zero_state()
    for m, p in zip(opt.master_params, opt.params):
        assert_bits(m, p.astype(np.float32), "master after zero_state")
    with pytest.raises(ValueError, match=r"master_weights: applies to float16/bfloat16 params"):
        fastopt.Adafactor([np.ones(3, np.float32)], master_weights=True)
    with pytest.raises(ValueError, match=r"master_weights: excludes stochastic_rounding"):
        fastopt.Adafactor(_host(params), master_weights=True, stochastic_rounding=True)


@needs_torch
def test_torch_master_weights():
    g = torch.Generator().manual_seed(11)
    conv = torch.randn(4, 3, 2, 2, generator=g).bfloat16().to(memory_format=torch.channels_last)
    shapes_params = [torch.randn(30, 20, generator=g).bfloat16(), torch.randn(9, generator=g).half(),
                     conv]
    model = [torch.nn.Parameter(p.clone()) for p in shapes_params]
    extra = torch.nn.Parameter(torch.randn(5, 6, generator=g))  # float32: no copy
    opt = ft.Adafactor(model + [extra], weight_decay=0.1, master_weights=True)
    twins = [p.float().contiguous() for p in shapes_params] + [extra.detach().clone()]
    states = [[None if s is None else torch.from_numpy(s) for s in state_for(t.numpy())]
              for t in twins]
    for t in range(1, 4):
        gs = [torch.randn(p.shape, generator=g).to(p.dtype) for p in model + [extra]]
        for p, grad in zip(model + [extra], gs):
            p.grad = grad
        opt.step()
        for i in range(4):  # each param alone: its own eps1 (the group's first param's: bf16)
            fastopt.adafactor_([twins[i]], [gs[i].float().contiguous()], *map(list, zip(states[i])),
                               step=t, weight_decay=0.1, eps=(2.0**-7, 1e-3))
    for i, p in enumerate(model):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_bits(master.numpy(), twins[i].numpy(), f"master of params[{i}]")
        assert torch.equal(p.detach(), twins[i].to(p.dtype)), i
    assert "master_param" not in opt.state[extra]
    assert_bits(extra.detach().numpy(), twins[3].numpy(), "the float32 param")
    saved = torch_roundtrip(opt.state_dict())
    other = ft.Adafactor([torch.nn.Parameter(p.detach().clone()) for p in model + [extra]],
                         master_weights=True)
    other.load_state_dict(saved)
    for i, p in enumerate(other.param_groups[0]["params"][:3]):
        assert other.state[p]["master_param"].dtype == torch.float32
        assert torch.equal(other.state[p]["master_param"], opt.state[model[i]]["master_param"])
    # a checkpoint without copies (torch's): they are made from the params at the next step
    fresh = ft.Adafactor(model[:1], master_weights=True)
    fresh.load_state_dict(torch.optim.Adafactor(model[:1]).state_dict())
    model[0].grad = torch.randn(30, 20, generator=g).bfloat16()
    before = model[0].detach().float()
    fresh.step()
    assert fresh.state[model[0]]["master_param"].dtype == torch.float32
    assert not torch.equal(fresh.state[model[0]]["master_param"], before)
    with pytest.raises(ValueError, match=r"master_weights: excludes stochastic_rounding"):
        ft.Adafactor(model, master_weights=True, stochastic_rounding=True)


@needs_torch
def test_torch_master_copy_is_dropped_when_not_stepped():
    # Stepped without its copy (the option switched off), a param drops it: switched on
    # again, the copy is made afresh from the param, not taken stale.
    w = torch.nn.Parameter(torch.randn(8, 16).bfloat16())
    opt = ft.Adafactor([w], lr=0.1, master_weights=True)
    w.grad = torch.randn(8, 16).bfloat16()
    opt.step()
    assert "master_param" in opt.state[w]
    opt.param_groups[0]["master_weights"] = False
    for _ in range(3):
        w.grad = torch.randn(8, 16).bfloat16()
        opt.step()
    assert "master_param" not in opt.state[w]
    before = w.detach().clone()
    opt.param_groups[0].update(master_weights=True, lr=1e-8)
    w.grad = torch.randn(8, 16).bfloat16()
    opt.step()
    assert torch.equal(w.detach(), before)  # a step of 1e-8 relative: the param as it was
    assert torch.equal(opt.state[w]["master_param"].bfloat16(), before)
