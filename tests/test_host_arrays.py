"""Host arrays beyond contiguous float32/float64 NumPy: 16-bit params (torch bfloat16 and
float16 tensors, NumPy float16) with float32 state, torch CPU tensors read natively, dense
layouts in any dimension order (channels_last, transposed, Fortran), and the grad scale
(GradScaler's) divided out inside the kernel. Every optimizer of the compiled registry
(``fastopt._cpu.optimizers()``) runs through the same bodies, called through the binding."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import fastopt
from fastopt import reference
from fastopt._ext import _cpu
from fastopt._specs import EMA, OPTIMIZERS

from conftest import CPU_PATHS, using_cpu_path, using_threads

torch = pytest.importorskip("torch")

REGISTRY = _cpu.optimizers()
# The optimizers with a float64 reference (all of the registry's but the EMA helper's twin).
NAMES = [n for n in REGISTRY if hasattr(reference, n)]
SIZES = [1, 7, 33, 4097]


def hyper(name):
    """Every hyper-parameter of ``name`` with a value that exercises it: the reference's
    default, lr 0.01 where it has none, weight decay and L1 on, flags as in the defaults."""
    defaults = {k: p.default for k, p in inspect.signature(getattr(reference, name)).parameters.items()
                if p.default is not inspect.Parameter.empty}
    out = {}
    for field in REGISTRY[name]["hyper"]:
        value = defaults.get(field)
        if value is None:  # (NAdam's mu_product: computed when None, the binding's is a float)
            value = {"lr": 0.01, "beta": 0.9, "mu_product": 0.25, "eta": 0.01, "mu": 0.5}.get(field)
        if field in ("weight_decay", "l1"):
            value = 0.01 if field == "weight_decay" else 1e-3
        if field == "momentum":
            value = 0.9
        if value is None:
            value = False
        out[field] = value
    return out


def roles(name, h):
    """The role names the call uses under hyper-parameters h (optional ones by the options)."""
    used = []
    for role, kind, written, optional in REGISTRY[name]["roles"]:
        if optional and not (h.get("momentum", 0.0) if "momentum" in role else
                             h.get("centered", False) if role == "grad_avgs" else
                             h.get("amsgrad", False)):
            used.append((role, kind, None))
        else:
            used.append((role, kind, written))
    return used


def make_arrays(name, h, n, dtype, rng):
    """Fresh random arrays for one call: params and grads of ``dtype`` (a torch dtype),
    state float32 (float64 for float64 params), positive where a state must be (the
    states the kernel marks nonnegative, Hessian diagonals)."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for role, kind, written in roles(name, h):
        if written is None:
            out[role] = None
            continue
        x = rng.standard_normal(n)
        if kind == "state" and (role in REGISTRY[name]["nonnegative"] or role == "hessian_diags"):
            x = np.abs(x) + 0.1
        if role == "grad_avgs":
            x = x * 0.01  # keeps square_avg - grad_avg^2 positive
        out[role] = torch.from_numpy(x).to(state_dtype if kind == "state" else dtype)
    return out


def call(name, arrays, h, step=3, **extra):
    takes_step = REGISTRY[name]["takes_step"]
    lists = [None if a is None else [a] for a in arrays.values()]
    kw = dict(h, **extra)
    if takes_step:
        kw["step"] = step
    getattr(_cpu, name)(*lists, True, **kw)


def reference_step(name, arrays, h, step=3):
    """The float64 reference on copies of the arrays; returns them as float64 NumPy arrays."""
    copies = {k: None if a is None else a.double().numpy().copy() for k, a in arrays.items()}
    kw = dict(h)
    if REGISTRY[name]["takes_step"]:
        kw["step"] = step
    if name == "adam":
        kw.setdefault("decoupled_weight_decay", False)
    getattr(reference, name)(*copies.values(), **kw)
    return copies


def ulp16(x, dtype):
    """One unit in the last place of the 16-bit type at each |x| (its spacing)."""
    bits = 7 if dtype == torch.bfloat16 else 10
    e = np.floor(np.log2(np.maximum(np.abs(x), 1e-30)))
    lowest = -126 if dtype == torch.bfloat16 else -14
    return 2.0 ** (np.maximum(e, lowest) - bits)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", NAMES)
def test_16bit_params_match_the_reference(name, dtype, n, rng):
    dt = getattr(torch, dtype)
    h = hyper(name)
    arrays = make_arrays(name, h, n, dt, rng)
    want = reference_step(name, arrays, h)
    call(name, arrays, h)
    for role, kind, written in roles(name, h):
        if not written:
            continue
        got = arrays[role].double().numpy()
        if kind == "state":  # float32 state: float32 roundings of the float64 result
            scale = np.abs(want[role]).max()
            np.testing.assert_allclose(got, want[role], rtol=1e-5, atol=1e-6 * scale, err_msg=role)
        else:  # one rounding to 16 bits of a float32 result: within one 16-bit ulp
            assert np.all(np.abs(got - want[role]) <= ulp16(want[role], dt)), role


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_bit_identical_over_paths_and_threads(name, dtype, rng):
    dt = getattr(torch, dtype)
    h = hyper(name)
    base = make_arrays(name, h, 100_003, dt, rng)  # past the threading threshold
    results = []
    for path in CPU_PATHS:
        for threads in (1, 2):
            arrays = {k: None if a is None else a.clone() for k, a in base.items()}
            with using_cpu_path(path), using_threads(threads):
                call(name, arrays, h)
            results.append({k: a for k, a in arrays.items() if a is not None})
    for other in results[1:]:
        for k in results[0]:
            a, b = results[0][k], other[k]
            assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                               b.view(torch.int16) if b.element_size() == 2 else b), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_rounding_is_round_to_nearest_even(dtype, rng):
    # p <- 0 - lr*g with p = 0: every written value is one float32 product rounded to 16
    # bits, compared with torch's own conversion (round to nearest even); NaN is 0x7FFF.
    # (lr = 1/3, which float32 rounds, so that the products round too.)
    dt = getattr(torch, dtype)
    x = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 6, 5000),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 6e-8, 65504.0, 65520.0,
                         3.4e38, -1e-40]]).astype(np.float32)
    g = torch.from_numpy(x).to(dt)
    lr = np.float32(1.0 / 3.0)
    for path in CPU_PATHS:
        p = torch.zeros_like(g)
        with using_cpu_path(path):
            _cpu.sgd([p], [g], None, True, lr=float(lr), momentum=0.0, dampening=0.0,
                     weight_decay=0.0, l1=0.0, nesterov=False, maximize=False, step=1)
        want = (torch.zeros(len(x)) - torch.tensor(lr) * g.float()).to(dt)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(p), nan)
        assert torch.equal(p[~nan].view(torch.int16), want[~nan].view(torch.int16))
        assert torch.all(p[nan].view(torch.int16) == 0x7FFF)


def test_numpy_float16_params(rng):
    p = rng.standard_normal(33).astype(np.float16)
    g = rng.standard_normal(33).astype(np.float16)
    m, v = np.zeros(33, np.float32), np.zeros(33, np.float32)
    want = p.astype(np.float64)
    reference.adam(want, g.astype(np.float64), np.zeros(33), np.zeros(33), step=1, lr=0.01)
    fastopt.adam_(p, g, m, v, step=1, lr=0.01)
    assert np.all(np.abs(p.astype(np.float64) - want) <= ulp16(want, torch.float16))
    with pytest.raises(TypeError, match=r"exp_avgs: dtype float16 differs from the state type float32"):
        fastopt.adam_(p, g, m.astype(np.float16), v, step=1, lr=0.01)


# ---- layouts --------------------------------------------------------------------------------

LAYOUTS = {
    "channels_last": lambda t: t.reshape(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.reshape(6, 20).t().contiguous().t(),  # a whole storage, as (6, 20)
    "fortran": lambda t: t.reshape(6, 20).t().contiguous().t(),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_dense_layouts_step_like_contiguous(name, layout, rng):
    h = hyper(name)
    base = make_arrays(name, h, 120, torch.float32, rng)
    flat = {k: None if a is None else a.clone() for k, a in base.items()}
    call(name, flat, h)
    shaped = {k: None if a is None else LAYOUTS[layout](a.clone()) for k, a in base.items()}
    assert not next(iter(shaped.values())).is_contiguous()
    call(name, shaped, h)
    for k, a in shaped.items():
        if a is not None:
            shape = a.shape
            assert torch.equal(a, flat[k].reshape(shape)), k


class _Subclass(torch.Tensor):
    """A tensor subclass: the binding reads it through its Python attributes."""


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "empty"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_plain_tensors_read_like_subclasses(dtype, layout, rng):
    """Plain tensors and Parameters (read through torch's DLPack exchange table) step as
    a subclass does (read through its attributes), masks and 16-bit types included."""
    shape = (0, 3) if layout == "empty" else (2, 3, 4, 5)
    base = {k: torch.from_numpy(rng.standard_normal(shape)).to(getattr(torch, dtype))
            for k in ("p", "g")}
    base["m"] = torch.from_numpy(np.abs(rng.standard_normal(shape))).to(
        torch.float64 if dtype == "float64" else torch.float32)
    base["mask"] = torch.from_numpy(rng.random(shape) < 0.7)
    lay = {"contiguous": lambda t: t.clone(),
           "channels_last": lambda t: t.clone().contiguous(memory_format=torch.channels_last),
           "transposed": lambda t: t.clone().transpose(0, 3).contiguous().transpose(0, 3),
           "empty": lambda t: t.clone()}[layout]
    runs = []
    for wrap in (lambda t: t, lambda t: t.as_subclass(_Subclass),
                 lambda t: torch.nn.Parameter(t, requires_grad=False)):
        a = {k: wrap(lay(t)) for k, t in base.items()}
        _cpu.adagrad([a["p"]], [a["g"]], [a["m"]], True, lr=0.1, lr_decay=0.0, eps=1e-10,
                     weight_decay=0.01, l1=0.0, maximize=False, step=2, masks=[a["mask"]])
        runs.append({k: torch.Tensor(t) for k, t in a.items()})
    for k in base:
        assert runs[0][k].stride() == runs[1][k].stride() == runs[2][k].stride()
        assert torch.equal(runs[0][k], runs[1][k]) and torch.equal(runs[0][k], runs[2][k]), k
    if layout != "empty":
        assert not torch.equal(runs[0]["p"], base["p"])


def test_numpy_fortran_arrays(rng):
    p = np.asfortranarray(rng.standard_normal((6, 5)).astype(np.float32))
    g = np.asfortranarray(rng.standard_normal((6, 5)).astype(np.float32))
    want = p - np.float32(0.1) * g
    fastopt.sgd_(p, g, lr=0.1)
    np.testing.assert_array_equal(p, want)
    with pytest.raises(ValueError, match=r"grads: its strides differ from params'"):
        fastopt.sgd_(p, np.ascontiguousarray(g), lr=0.1)


@pytest.mark.parametrize("bad", ["gaps", "negative", "other_order"])
def test_layouts_that_cannot_be_stepped_in_storage_order(bad, rng):
    p = torch.randn(4, 6)
    before = p.clone()
    g = {"gaps": torch.randn(4, 12)[:, ::2],
         "negative": rng.standard_normal((4, 6)).astype(np.float32)[::-1],  # NumPy has them
         "other_order": torch.randn(6, 4).t()}[bad]
    match = "must be dense" if bad != "other_order" else "its strides differ"
    with pytest.raises(ValueError, match=f"grads: {match}"):
        fastopt.sgd_(p, g, lr=0.1)
    assert torch.equal(p, before)


# ---- torch tensors the kernels cannot update ------------------------------------------------

def test_refused_tensors():
    g = torch.randn(3)
    with torch.inference_mode():
        frozen = torch.randn(3)
    cases = [(torch.empty(3, device="meta"), TypeError, "params: is a meta tensor"),
             (frozen, ValueError, "params: is an inference tensor"),
             (torch._neg_view(torch.randn(3)), ValueError, "params: is a negative view"),
             (torch.randn(3).to_sparse(), TypeError, "params: torch.sparse_coo tensors")]
    for p, error, match in cases:
        with pytest.raises(error, match=match):
            fastopt.sgd_(p, g, lr=0.1)
    fastopt.sgd_(torch.randn(3), frozen, lr=0.1)  # an inference tensor may be read
    with torch.inference_mode():  # and written where torch allows it
        fastopt.sgd_(frozen, g, lr=0.1)


# ---- the grad scale -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_grad_scale_divides_the_grads(name, dtype, rng):
    dt = getattr(torch, dtype)
    h = hyper(name)
    base = make_arrays(name, h, 257, dt, rng)
    plain = {k: None if a is None else a.clone() for k, a in base.items()}
    call(name, plain, h)
    scaled = {k: None if a is None else a.clone() for k, a in base.items()}
    grads = scaled["grads"] if "grads" in scaled else scaled["samples"]
    grads.mul_(1024.0)  # exact: a power of two
    kept = grads.clone()
    call(name, scaled, h, grad_scale=1024.0)
    assert torch.equal(grads, kept)  # the grads themselves are not written
    for k, a in plain.items():
        if a is not None and k not in ("grads", "samples"):
            assert torch.equal(a, scaled[k]), k


@pytest.mark.parametrize("bad,error", [(0.0, ValueError), (-2.0, ValueError),
                                       (float("inf"), ValueError), (float("nan"), ValueError),
                                       ("2", TypeError), (True, TypeError)])
def test_bad_grad_scale(bad, error):
    p, g = torch.randn(5), torch.randn(5)
    before = p.clone()
    with pytest.raises(error, match="grad_scale"):
        _cpu.sgd([p], [g], None, True, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 l1=0.0, nesterov=False, maximize=False, step=1, grad_scale=bad)
    assert torch.equal(p, before)


# ---- the generated binding's own argument checks ---------------------------------------------

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_binding_arguments_are_checked_by_name(name):
    spec = REGISTRY[name]
    fn = getattr(_cpu, name)
    n = len(spec["roles"])
    lists = [[np.ones(4, np.float32)] for _ in range(n)]
    table = next(s for s in [*OPTIMIZERS.values(), EMA] if s.kernel == name)  # valid values
    h = table.kernel_hyper(table.validate({**table.defaults(), **table.example}))
    h.update({k: c.through(1, h) for k, c in table.carried.items()})
    assert set(h) == set(spec["hyper"])
    if spec["takes_step"]:
        h["step"] = 1
    before = [a[0].copy() for a in lists]
    with pytest.raises(TypeError, match=f"expected {n + 1} positional arguments"):
        fn(*lists, **h)
    missing = dict(h)
    del missing[spec["hyper"][-1]]
    with pytest.raises(TypeError, match=f"missing keyword '{spec['hyper'][-1]}'"):
        fn(*lists, True, **missing)
    with pytest.raises(TypeError, match="unexpected keyword 'bogus'"):
        fn(*lists, True, bogus=1, **h)
    with pytest.raises(TypeError, match=f"{spec['hyper'][0]}: expected a real number"):
        fn(*lists, True, **dict(h, **{spec["hyper"][0]: "x"}))
    with pytest.raises(ValueError, match=f"{spec['hyper'][0]}: out of the float range"):
        fn(*lists, True, **dict(h, **{spec["hyper"][0]: 10**400}))
    with pytest.raises(TypeError, match="listed: expected a bool"):
        fn(*lists, 1, **h)
    for r, (role, _, _, optional) in enumerate(spec["roles"]):
        if not optional:  # a required role given None: refused by name, nothing touched
            with pytest.raises(TypeError, match=f"{role}: expected a list of arrays, got None"):
                fn(*lists[:r], None, *lists[r + 1:], True, **h)
    if spec["takes_step"]:
        with pytest.raises(ValueError, match="step: out of the 64-bit integer range"):
            fn(*lists, True, **dict(h, step=2**63))
        with pytest.raises(ValueError, match="step: must be >= 1"):
            fn(*lists, True, **dict(h, step=0))
    for a, b in zip(lists, before):
        np.testing.assert_array_equal(a[0], b)


# ---- the same on the GPU: bit-identical to the CPU -------------------------------------------

@pytest.fixture
def cuda_device():
    if not fastopt.cuda_available() or not torch.cuda.is_available():
        pytest.skip("needs a usable CUDA GPU with torch")
    return torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["channels_last", "transposed", "bfloat16", "grad_scale"])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_layouts_16bit_and_grad_scale_match_the_cpu(name, case, cuda_device, rng):
    from fastopt._ext import _cuda

    h = hyper(name)
    dt = torch.bfloat16 if case == "bfloat16" else torch.float32
    base = make_arrays(name, h, 120, dt, rng)
    shape = LAYOUTS.get(case, lambda t: t)
    cpu = {k: None if a is None else shape(a.clone()) for k, a in base.items()}
    gpu = {k: None if a is None else shape(a.clone()).to(cuda_device) for k, a in base.items()}
    extra = {"grad_scale": 1024.0} if case == "grad_scale" else {}
    call(name, cpu, h, **extra)
    lists = [None if a is None else [a] for a in gpu.values()]
    kw = dict(h, **extra)
    if REGISTRY[name]["takes_step"]:
        kw["step"] = 3
    getattr(_cuda, name)(*lists, True, stream=0, plan=None, **kw)
    torch.cuda.synchronize()
    for k, a in cpu.items():
        if a is not None:
            b = gpu[k].cpu()
            assert b.stride() == a.stride(), k
            assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                               b.view(torch.int16) if b.element_size() == 2 else b), k


@pytest.mark.cuda
@pytest.mark.parametrize("found", [False, True], ids=["finite", "found_inf"])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_grad_scaler_scalars_in_device_memory(name, found, cuda_device, rng):
    """The CUDA step's device_grad_scale and found_inf (a GradScaler's tensors, read by the
    kernel: no host synchronisation): the host grad_scale's bits, or nothing written."""
    from fastopt._ext import _cuda

    h = hyper(name)
    base = make_arrays(name, h, 300, torch.float32, rng)
    cpu = {k: None if a is None else a.clone() for k, a in base.items()}
    gpu = {k: None if a is None else a.clone().to(cuda_device) for k, a in base.items()}
    call(name, cpu, h, grad_scale=1024.0)
    kw = dict(h, step=3) if REGISTRY[name]["takes_step"] else dict(h)
    scale = torch.tensor([1024.0], device=cuda_device)
    found_inf = torch.tensor([1.0 if found else 0.0], device=cuda_device)
    lists = [None if a is None else [a] for a in gpu.values()]
    getattr(_cuda, name)(*lists, True, stream=0, plan=None, device_grad_scale=scale,
                         found_inf=found_inf, **kw)
    torch.cuda.synchronize()
    for k, a in (base if found else cpu).items():
        if a is not None:
            assert torch.equal(gpu[k].cpu(), a), k
    bads = [
        (dict(device_grad_scale=scale, grad_scale=2.0), TypeError, "grad_scale: excludes"),
        (dict(found_inf=found_inf.double()), TypeError, "found_inf: dtype float64"),
        (dict(device_grad_scale=torch.ones(2, device=cuda_device)), ValueError,
         "device_grad_scale: expected one element"),
    ]
    # a scalar inside an array the step writes (here a state array's last element) would be
    # read while it is written: refused like one inside the params
    for role, a in gpu.items():
        if a is not None and role not in ("params", "grads"):
            inside = a.view(-1)[-1:]
            bads += [(dict(found_inf=inside), ValueError, f"found_inf: overlaps one of {role}"),
                     (dict(device_grad_scale=inside), ValueError,
                      f"device_grad_scale: overlaps one of {role}"),
                     (dict(grad_norm=inside, max_grad_norm=1.0), ValueError,
                      f"grad_norm: overlaps one of {role}")]
    before = {k: None if a is None else a.clone() for k, a in gpu.items()}
    for bad, error, match in bads:
        with pytest.raises(error, match=match):
            getattr(_cuda, name)(*lists, True, stream=0, plan=None, **bad, **kw)
    for k, a in gpu.items():
        if a is not None:
            assert torch.equal(a, before[k]), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_inplace_ceiling_kernel(dtype, rng):
    # the bench's bandwidth ceiling: its argument lists must outlive the table built on them
    a = rng.standard_normal(4097).astype(dtype)
    b = rng.standard_normal(4097).astype(dtype)
    want = a + b
    _cpu.add_inplace(a, b)
    np.testing.assert_array_equal(a, want)
    with pytest.raises(TypeError, match="dst"):
        _cpu.add_inplace(a.astype(np.float16), b.astype(np.float16))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_numpy_16bit_params_in_the_classes(dtype, rng):
    """NumPy float16 and ml_dtypes bfloat16 params: the classes allocate float32 state, and
    a step equals the functional step on the same arrays."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.dtype(np.float16) if dtype == "float16" else np.dtype(ml_dtypes.bfloat16)
    params = rng.standard_normal(4097).astype(dt)
    grads = rng.standard_normal(4097).astype(dt)
    opt = fastopt.AdamW([params.copy()], lr=0.01)
    assert all(s[0].dtype == np.float32 for s in opt.state.values())
    opt.step([grads])
    p = params.copy()
    m, v = np.zeros(4097, np.float32), np.zeros(4097, np.float32)
    fastopt.adamw_([p], [grads], [m], [v], step=1, lr=0.01)
    np.testing.assert_array_equal(opt.params[0].view(np.uint16), p.view(np.uint16))
    np.testing.assert_array_equal(opt.state["exp_avgs"][0], m)


@pytest.mark.parametrize("how", ["share_memory_", "data"])
def test_array_classes_follow_torch_params_moved_in_place(how, rng):
    """The array classes step PyTorch CPU params through NumPy views of their memory: a
    param whose memory moved in place after construction (``share_memory_()`` frees the old
    memory; ``p.data = ...`` replaces it) is stepped where it is now."""
    init = [rng.standard_normal(n).astype(np.float32) for n in (5, 300, 33)]
    grads = [[rng.standard_normal(a.size).astype(np.float32) for a in init] for _ in range(4)]
    ref = [a.copy() for a in init]
    ref_opt = fastopt.AdamW(ref, lr=0.01)
    params = [torch.from_numpy(a.copy()) for a in init]
    opt = fastopt.AdamW(params, lr=0.01)
    for t, g in enumerate(grads):
        ref_opt.step(g)
        opt.step(g)
        if t == 1:
            for p in params[:2]:
                if how == "share_memory_":
                    p.share_memory_()
                else:
                    p.data = p.data.clone()
    for p, r in zip(params, ref):
        np.testing.assert_array_equal(p.numpy(), r)


# ---- autograd's version counters --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_every_written_tensor_has_its_version_bumped(name, dtype, rng):
    """A step writes torch tensors as torch's in-place ops do: their version counters move
    (those it only reads do not), so a backward through a param saved before the step
    raises as with torch.optim."""
    h = hyper(name)
    arrays = make_arrays(name, h, 33, dtype, rng)
    written = {role: w for role, _, w in roles(name, h)}
    before = {k: a._version for k, a in arrays.items() if a is not None}
    call(name, arrays, h)
    for role, version in before.items():
        moved = arrays[role]._version > version
        assert moved == bool(written[role]), role


def test_a_backward_through_a_param_stepped_since_raises(rng):
    w = torch.from_numpy(rng.standard_normal(9).astype(np.float32)).requires_grad_()
    for step in (lambda: fastopt.sgd_(w.data, torch.ones(9), lr=0.1),  # .data: a new tensor
                 lambda: None):
        loss = (w * w).sum()
        step()
        loss.backward()  # nothing it saved was written
    cases = {
        "functional": lambda p, g: fastopt.adamw_(p, g, torch.zeros(9), torch.zeros(9), step=1),
        "array class": lambda p, g: fastopt.AdamW([p]).step([g]),
        "adafactor": lambda p, g: fastopt.adafactor_([p], [g], [None], [None],
                                                     [torch.zeros(9)], step=1),
        "clip in place": lambda p, g: fastopt.clip_grad_norm_([p], 1e-3),
    }
    for what, write in cases.items():
        p = torch.from_numpy(rng.standard_normal(9).astype(np.float32)).requires_grad_()
        x = torch.from_numpy(rng.standard_normal(9).astype(np.float32))
        loss = (p * p * x).sum()
        with torch.no_grad():
            write(p, torch.ones(9))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        assert p._version > 0, what


def test_outputs_written_in_place_have_their_versions_bumped(rng):
    """Newton's params and the out= arrays of quantization and pruning, torch tensors, are
    written as by torch's in-place ops."""
    x = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32))
    writes = {
        "quantize out": (lambda o: fastopt.quantize_per_tensor(x, 0.1, 0, out=o[0]),
                         [torch.empty((4, 64), dtype=torch.int8)]),
        "dequantize out": (lambda o: fastopt.dequantize(torch.ones((4, 64), dtype=torch.int8),
                                                         0.1, 0, out=o[0]),
                           [torch.empty((4, 64))]),
        "blockwise out": (lambda o: fastopt.quantize_blockwise(x, 64, out=(o[0], o[1])),
                          [torch.empty((4, 64), dtype=torch.int8), torch.empty(4)]),
        "prune out": (lambda o: fastopt.prune_magnitude([x], 0.5, out=[o[0]]),
                      [torch.empty((4, 64), dtype=torch.bool)]),
        "newton params": (lambda o: fastopt.newton_(
            o[0], torch.ones((3, 2)), torch.eye(2).expand(3, 2, 2).contiguous()),
            [torch.ones((3, 2))]),
    }
    for what, (write, tensors) in writes.items():
        write(tensors)
        assert all(t._version > 0 for t in tensors), what
