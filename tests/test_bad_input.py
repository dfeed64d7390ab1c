"""Bad input: every bad argument raises TypeError/ValueError naming the argument, before
anything is written (every array of the call is compared with a snapshot afterwards);
what must be accepted (read-only or aliasing gradients, zero-size arrays, adjacent slices
of one buffer) is; NaN/Inf gradients propagate exactly as in the reference.

The tests taking ``array_backend`` run on NumPy arrays, CuPy arrays and PyTorch CUDA
tensors alike (the same checks, the same messages); the others are about what only host
arrays have (read-only flags, byte orders, dtypes the GPU kernels take) or about Python
values that are no arrays. Device-only bad input (host/device mixes, a second GPU,
stream=) is in test_cuda.py."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from typing import List

import numpy as np
import pytest

import fastopt
from fastopt import _specs

from backends import CPU, assert_bits
from conftest import BAD, DTYPES, OPTIMIZERS, Call, Problem, opt_cases

FULL = {name: opt.representative[-1] for name, opt in OPTIMIZERS.items()}


def states_of(name: str) -> List[str]:
    return OPTIMIZERS[name].states(FULL[name])


def role_cases(roles_of):
    cases = []
    for name in OPTIMIZERS:
        for role in roles_of(name):
            cases.append(pytest.param(name, role, id=f"{name}-{role}"))
    return cases


ALL_ROLES = role_cases(lambda n: ["params", "grads"] + states_of(n))
NON_PARAM_ROLES = role_cases(lambda n: ["grads"] + states_of(n))
WRITTEN_ROLES = role_cases(lambda n: OPTIMIZERS[n].written(FULL[n]))
READ_ROLES = role_cases(lambda n: OPTIMIZERS[n].read(FULL[n]))
OPT_NAMES = list(OPTIMIZERS)


def at(role: str, i: int = BAD) -> str:
    return re.escape(f"{role}[{i}]")


# ---- structure: shapes, lengths, lists vs arrays -------------------------------------------

@pytest.mark.parametrize("bad_shape", [(6,), (5, 1), (1, 5), ()], ids=str)
@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_shape_mismatch(array_backend, name, role, bad_shape, rng):
    c = Call(name, rng, backend=array_backend)
    c[role][BAD] = c.new(np.ones(bad_shape, np.float32))
    c.expect(ValueError, at(role))


@pytest.mark.parametrize("name", OPT_NAMES)
def test_param_shape_mismatch_names_params(array_backend, name, rng):
    c = Call(name, rng, backend=array_backend)
    c["params"][BAD] = c.new(np.ones(6, np.float32))
    c.expect(ValueError, at("params"))


@pytest.mark.parametrize("delta", [-1, 1], ids=["shorter", "longer"])
@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_list_length_mismatch(array_backend, name, role, delta, rng):
    c = Call(name, rng, backend=array_backend)
    if delta < 0:
        c[role].pop()
    else:
        c[role].append(c.new(np.ones(3, np.float32)))
    c.expect(ValueError, re.escape(role))


@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_single_array_where_params_is_a_list(array_backend, name, role, rng):
    c = Call(name, rng, backend=array_backend)
    c[role] = c[role][0]
    c.expect(TypeError, re.escape(role))


@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_list_where_params_is_a_single_array(array_backend, name, role, rng):
    c = Call(name, rng, backend=array_backend, listed=False)
    c[role] = [c[role]]
    c.expect(TypeError, re.escape(role))


# ---- dtypes ---------------------------------------------------------------------------------

# Host arrays only: the GPU kernels take float16/bfloat16 params, and CUDA libraries have no
# byte orders or long double (test_cuda.py checks integer dtypes on the GPU).
@pytest.mark.parametrize("bad_dtype", [np.int32, np.float16, np.int64, np.complex64, np.bool_,
                                       np.dtype(">f4"), np.longdouble],
                         ids=["int32", "float16", "int64", "complex64", "bool", "f4-big-endian",
                              "longdouble"])
@pytest.mark.parametrize("name,role", ALL_ROLES)
def test_unsupported_dtype_in_5th_array(name, role, bad_dtype, rng):
    c = Call(name, rng)
    c[role][BAD] = c[role][BAD].astype(bad_dtype)
    c.expect(TypeError, at(role))


@pytest.mark.parametrize("bad_dtype", [np.int32, np.float16], ids=["int32", "float16"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_unsupported_dtype_everywhere(name, bad_dtype, rng):
    c = Call(name, rng)
    c.args = [a if a is None else [x.astype(bad_dtype) for x in a] for a in c.args]
    c.expect(TypeError, "params")


@pytest.mark.parametrize("base", DTYPES, ids=["params-f32", "params-f64"])
@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_mixed_dtypes(array_backend, name, role, base, rng):
    other = np.float64 if base == np.float32 else np.float32
    c = Call(name, rng, backend=array_backend, dtype=base)
    c[role] = [c.new(c.values(role, i).astype(other)) for i in range(len(c[role]))]
    c.expect(TypeError, at(role, 0))
    c = Call(name, rng, backend=array_backend, dtype=base)  # one array of the other float type
    c[role][BAD] = c.new(c.values(role).astype(other))
    c.expect(TypeError, at(role))


# ---- memory layout and writability --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["step2", "reversed", "fortran"])
@pytest.mark.parametrize("name,role", ALL_ROLES)
def test_non_contiguous(array_backend, name, role, kind, rng):
    backend = array_backend
    if kind == "reversed" and backend.name == "torch-cuda":
        pytest.skip("PyTorch has no negative strides")
    c = Call(name, rng, backend=backend)
    i = 1 if kind == "fortran" else BAD  # index 1 is 2-D (3, 4)
    a = c.values(role, i)
    if kind == "step2":  # every other element of a buffer twice the size
        buf = c.new(np.repeat(a.ravel(), 2))
        bad = buf[::2].reshape(a.shape)
    elif kind == "reversed":
        bad = c.new(a[::-1].copy())[::-1]
    else:  # the transpose of a C-contiguous array of the transposed shape
        bad = c.new(np.ascontiguousarray(a.T)).T
    assert tuple(bad.shape) == a.shape
    if isinstance(bad, np.ndarray):
        assert not bad.flags.c_contiguous
    c[role][i] = bad
    c.expect(ValueError, at(role, i))


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_read_only_params_or_state(name, role, rng):
    c = Call(name, rng)
    c[role][BAD].setflags(write=False)
    c.expect(ValueError, at(role))


@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name,role", READ_ROLES)
def test_read_only_inputs_are_accepted(name, role, listed, rng):
    # Arrays the step only reads (grads, Sophia's hessian_diags) may be read-only NumPy
    # arrays: same results, and they stay as they were.
    seed = int(rng.integers(2**31))
    runs = []
    for read_only in (False, True):
        c = Call(name, np.random.default_rng(seed), listed=listed)
        inputs = c[role] if listed else [c[role]]
        for a in inputs:
            a.setflags(write=not read_only)
        before = [a.copy() for a in inputs]
        c.run()
        for i, (a, b) in enumerate(zip(inputs, before)):
            assert_bits(a, b, f"{role}[{i}] was written")
        runs.append(c.snapshot())
    for i, (a, b) in enumerate(zip(*runs)):
        assert_bits(a, b, f"array #{i}: read-only {role} changed the result")


# ---- aliasing -------------------------------------------------------------------------------------

def _message_names(info, *names):
    msg = str(info.value)
    for n in names:
        assert n in msg, f"message {msg!r} does not name {n}"


@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name,role", READ_ROLES)
def test_read_array_is_params(array_backend, name, role, listed, rng):
    c = Call(name, rng, backend=array_backend, listed=listed)
    c[role] = c["params"] if not listed else list(c["params"])
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, "params", role)


def _read_written_pairs():
    cases = []
    for name, opt in OPTIMIZERS.items():
        for read in opt.read(FULL[name]):
            for written in opt.written(FULL[name]):
                cases.append(pytest.param(name, read, written, id=f"{name}-{read}-{written}"))
    return cases


@pytest.mark.parametrize("name,read,written", _read_written_pairs())
def test_read_array_aliasing_a_written_array(array_backend, name, read, written, rng):
    # A view of an array the call writes, passed where it only reads, is refused: the
    # kernel would read values it is overwriting. (Read-only views: the next test.)
    c = Call(name, rng, backend=array_backend)
    c[read][BAD] = c[written][BAD][:]
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{read}[{BAD}]", f"{written}[{BAD}]")


@pytest.mark.parametrize("name,read,written", _read_written_pairs())
def test_read_only_view_aliasing_a_written_array(name, read, written, rng):
    # Even a read-only view (NumPy) of an array the call writes is refused.
    c = Call(name, rng)
    view = c[written][BAD].view()
    view.setflags(write=False)
    c[read][BAD] = view
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{read}[{BAD}]", f"{written}[{BAD}]")


def _written_pairs():
    cases = []
    for name, opt in OPTIMIZERS.items():
        written = opt.written(FULL[name])
        for i, a in enumerate(written):
            for b in written[i + 1:]:
                cases.append(pytest.param(name, a, b, id=f"{name}-{a}-is-{b}"))
    return cases


@pytest.mark.parametrize("name,role_a,role_b", _written_pairs())
def test_two_written_roles_share_an_array(array_backend, name, role_a, role_b, rng):
    c = Call(name, rng, backend=array_backend)
    c[role_b][BAD] = c[role_a][BAD]
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{role_a}[{BAD}]", f"{role_b}[{BAD}]")


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_same_array_twice_in_one_list(array_backend, name, role, rng):
    c = Call(name, rng, backend=array_backend)
    c[role][BAD] = c[role][0]
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{role}[0]", f"{role}[{BAD}]")


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_overlapping_slices_of_one_buffer(array_backend, name, role, rng):
    c = Call(name, rng, backend=array_backend)
    host = np.empty(9, np.float32)
    host[0:5], host[5:9] = c.values(role, 0), c.values(role)[1:]
    buf = c.new(host)
    c[role][0] = buf[0:5]
    c[role][BAD] = buf[4:9]  # shares element 4
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{role}[0]", f"{role}[{BAD}]")


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_adjacent_slices_of_one_buffer_are_accepted(array_backend, name, role, rng):
    # Back to back, not overlapping: valid, and the result equals separate arrays.
    seed = int(rng.integers(2**31))
    c = Call(name, np.random.default_rng(seed), backend=array_backend)
    ref = Call(name, np.random.default_rng(seed), backend=array_backend)
    buf = c.new(np.concatenate([c.values(role, 0), c.values(role)]))
    c[role][0], c[role][BAD] = buf[0:5], buf[5:10]
    c.run()
    ref.run()
    for i, (a, b) in enumerate(zip(c.snapshot(), ref.snapshot())):
        assert_bits(a, b, f"array #{i}", any_nan=True)


@pytest.mark.parametrize("name", OPT_NAMES)
def test_grads_aliasing_each_other_are_accepted(array_backend, name, rng):
    # grads are only read, so they may share memory: the same array twice, and partially
    # overlapping views. (Read-only NumPy views: the next test.)
    _check_aliasing_grads(name, rng, array_backend, read_only=False)


@pytest.mark.parametrize("name", OPT_NAMES)
def test_read_only_grads_aliasing_each_other_are_accepted(name, rng):
    _check_aliasing_grads(name, rng, CPU, read_only=True)


def _check_aliasing_grads(name, rng, backend, read_only):
    seed = int(rng.integers(2**31))
    c = Call(name, np.random.default_rng(seed), backend=backend)
    ref = Call(name, np.random.default_rng(seed), backend=backend)
    host = np.random.default_rng(seed + 1).standard_normal(9).astype(np.float32)
    big = c.new(host)
    if read_only:
        big.setflags(write=False)
    c["grads"][0] = big[2:7]
    c["grads"][BAD] = c["grads"][0]  # the same object twice
    c["grads"][2] = big[0:7]  # overlaps grads[0]
    ref["grads"][0], ref["grads"][BAD], ref["grads"][2] = (c.new(host[2:7]), c.new(host[2:7]),
                                                           c.new(host[0:7]))
    c.run()
    ref.run()
    for i, (a, b) in enumerate(zip(c.snapshot(), ref.snapshot())):
        assert_bits(a, b, f"array #{i}", any_nan=True)


# ---- not arrays -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [[0.1] * 5, None, 3.0, "abc"], ids=["pylist", "None", "float", "str"])
@pytest.mark.parametrize("name,role", ALL_ROLES)
def test_non_array_element(name, role, bad, rng):
    c = Call(name, rng)
    c[role][BAD] = bad
    c.expect(TypeError, at(role))


@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_python_list_of_floats_for_a_single_array(name, role, rng):
    c = Call(name, rng, listed=False)
    c[role] = c[role].tolist()
    c.expect(TypeError, re.escape(role))


@pytest.mark.parametrize("name", OPT_NAMES)
def test_python_list_of_floats_as_params(name, rng):
    c = Call(name, rng, listed=False)
    c["params"] = c["params"].tolist()
    c.args = [a if a is None or r == "params" else [a] for a, r in zip(c.args, c.roles)]
    c.expect(TypeError, "params")


# ---- hyper-parameters -----------------------------------------------------------------------------

V, T = ValueError, TypeError
NAN, INF = float("nan"), float("inf")
COMMON = [("lr", -1e-3, V), ("lr", NAN, V), ("lr", INF, V), ("lr", -INF, V),
          ("lr", "0.1", T), ("lr", None, T), ("lr", [0.1], T),
          ("weight_decay", -0.01, V), ("weight_decay", NAN, V), ("l1", -1e-3, V),
          ("l1", INF, V), ("maximize", "yes", T), ("maximize", None, T)]
STEP = [("step", 0, V), ("step", -1, V), ("step", 1.5, T), ("step", True, T), ("step", "1", T),
        ("step", None, T), ("step", 2.0, T)]
# Values chosen by hand; from_table adds those read from fastopt's table.
PER_OPT = {
    "sgd": STEP + [("momentum", -0.1, V), ("momentum", NAN, V), ("dampening", NAN, V),
                   ("nesterov", "yes", T)],
    "adagrad": STEP + [("lr_decay", -0.1, V), ("lr_decay", INF, V), ("eps", -1e-8, V),
                       ("eps", -1e-10, V), ("eps", NAN, V)],
    "rmsprop": [("alpha", -0.1, V), ("alpha", NAN, V), ("eps", -1e-8, V),
                ("momentum", -0.1, V), ("centered", "yes", T)],
    "adam": STEP + [("beta1", 1.0, V), ("beta1", -0.1, V), ("beta1", NAN, V),
                    ("beta2", 1.0, V), ("beta2", -0.1, V), ("beta2", 1.5, V), ("eps", -1e-8, V),
                    ("amsgrad", "no", T), ("decoupled_weight_decay", 1, T)],
    "adamw": STEP + [("beta1", 1.0, V), ("beta2", -0.1, V), ("eps", -1e-8, V),
                     ("amsgrad", "no", T)],
    "sophia": [("lr", -1.0, V), ("rho", 0.0, V), ("rho", -0.04, V), ("rho", NAN, V),
               ("eps", 0.0, V), ("eps", -1e-15, V), ("beta1", 1.0, V), ("beta1", -0.1, V),
               ("beta1", NAN, V), ("weight_decay", -0.1, V)],
}


def from_table(name: str):
    """Bad values of each hyper-parameter in fastopt's table for optimizer ``name``: a
    string for a flag; NaN, and the nearest values outside the range for a real; bad steps
    if it takes one."""
    spec = OPTIMIZERS[name].spec
    out = list(STEP) if spec.takes_step else []
    for key, h in spec.hyper.items():
        if isinstance(h, _specs.Flag):
            out.append((key, "yes", T))
            continue
        out += [(key, NAN, V), (key, h.lo if h.lo_open else h.lo - 0.1, V)]
        if math.isfinite(h.hi):
            out.append((key, h.hi if h.hi_open else h.hi + 0.5, V))
    return out


def _hyper_cases():
    cases, seen = [], set()
    for name in OPT_NAMES:
        hyper = OPTIMIZERS[name].spec.hyper
        for key, value, exc in COMMON + PER_OPT.get(name, []) + from_table(name):
            if key not in hyper and key != "step":  # (Rprop has no weight_decay or l1)
                continue
            if (name, key, repr(value)) in seen:
                continue
            seen.add((name, key, repr(value)))
            cases.append(pytest.param(name, key, value, exc,
                                      id=f"{name}-{key}={value!r}-{exc.__name__}"))
    return cases


@pytest.mark.parametrize("name,key,value,exc", _hyper_cases())
def test_bad_hyper_parameter(array_backend, name, key, value, exc, rng):
    c = Call(name, rng, backend=array_backend)
    c.expect(exc, re.escape(key), **{key: value})


@pytest.mark.parametrize("opts", [dict(momentum=0.0, dampening=0.0, nesterov=True),
                                  dict(momentum=0.9, dampening=0.1, nesterov=True)],
                         ids=["without-momentum", "with-dampening"])
def test_sgd_nesterov_needs_momentum_and_no_dampening(array_backend, opts, rng):
    c = Call("sgd", rng, backend=array_backend,
             opts=dict(opts, weight_decay=0.0, maximize=False, l1=0.0))
    c.expect(ValueError, "nesterov")


MISSING_STATE = [
    pytest.param("sgd", dict(momentum=0.9), "momentum_buffers", id="sgd-momentum"),
    pytest.param("rmsprop", dict(momentum=0.9), "momentum_buffers", id="rmsprop-momentum"),
    pytest.param("rmsprop", dict(centered=True), "grad_avgs", id="rmsprop-centered"),
    pytest.param("adam", dict(amsgrad=True), "max_exp_avg_sqs", id="adam-amsgrad"),
    pytest.param("adamw", dict(amsgrad=True, weight_decay=0.01), "max_exp_avg_sqs",
                 id="adamw-amsgrad"),
]


@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name,opts,role", MISSING_STATE)
def test_missing_required_state(array_backend, name, opts, role, listed, rng):
    c = Call(name, rng, backend=array_backend, opts=opts, listed=listed)
    c[role] = None
    c.expect(ValueError, re.escape(role))


@pytest.mark.parametrize("name,role", role_cases(
    lambda n: [r for r in OPTIMIZERS[n].state_args({}) if r is not None]))
def test_none_for_an_always_required_state(name, role, tmp_path):
    # In a child process: a regression here crashed the interpreter (a null table).
    opt = OPTIMIZERS[name]
    roles = ["params", "grads"] + opt.state_args({})
    code = (
        "import numpy as np, fastopt\n"
        f"roles = {roles!r}\n"
        "arrays = [None if r is None else np.full(5, 0.5, np.float32) for r in roles]\n"
        f"arrays[roles.index({role!r})] = None\n"
        f"kwargs = {dict(opt.base, **({'step': 1} if opt.takes_step else {}))!r}\n"
        "try:\n"
        f"    fastopt.{name}_(*arrays, **kwargs)\n"
        "except (TypeError, ValueError) as exc:\n"
        f"    assert str(exc).startswith({role!r}), str(exc)\n"
        "    assert all(a is None or (a == 0.5).all() for a in arrays), 'modified'\n"
        "else:\n"
        "    raise SystemExit('accepted')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-2000:]}"


# ---- zero-size arrays ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)], ids=str)
@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_zero_size_is_a_no_op(array_backend, name, listed, shape, rng):
    c = Call(name, rng, backend=array_backend, listed=listed, shapes=[shape] * 3)
    before = c.snapshot()
    c.run()
    c.assert_unchanged(before)
    # Hyper-parameters are still checked on zero-size input.
    c.expect(ValueError, "lr", lr=-1.0)


# ---- runtime settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                     ("2", TypeError), (None, TypeError)])
def test_set_num_threads_rejects(bad, exc):
    n = fastopt.get_num_threads()
    with pytest.raises(exc, match="n|thread"):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == n


@pytest.mark.parametrize("bad,exc", [("sse9", ValueError), ("", ValueError),
                                     ("AVX2 ", ValueError), (None, TypeError), (2, TypeError)])
def test_set_cpu_path_rejects(bad, exc):
    path = fastopt.get_cpu_path()
    with pytest.raises(exc, match="path"):
        fastopt.set_cpu_path(bad)
    assert fastopt.get_cpu_path() == path


# ---- NaN / Inf gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("opt,opts", opt_cases("representative"))
def test_nan_and_inf_gradients_propagate_like_reference(backend, opt, opts, dtype, rng):
    # NaN, +Inf and -Inf at positions in the vector body, the head and the tail of each
    # array, at step 2 of 5 (so they also flow through the state afterwards). On a GPU also
    # bit for bit like the CPU (any NaN matching any NaN).
    pr = Problem(opt, opts, [(33,), (4097,), (3,)], dtype, rng, backend=backend)
    positions = {0: [0, 5, 17, 32], 1: [1, 8, 9, 2048, 4096], 2: [0, 2]}
    values = [np.nan, np.inf, -np.inf]
    with np.errstate(all="ignore"):
        for t in range(5):
            grads = pr.draw_grads(rng)
            if t == 1:
                for i, idx in positions.items():
                    for k, j in enumerate(idx):
                        grads[i][j] = values[k % 3]
            pr.step(grads)
            pr.check()
    got = np.concatenate([p.ravel() for p in pr.host()["params"]])
    if opt.name == "rprop":  # a step is sign(g)*size, torch's sign of NaN 0: none gets through
        assert np.isfinite(got).all()
        return
    assert np.isnan(got).any() or np.isinf(got).any()
    assert np.isfinite(got).sum() >= got.size - 20, "non-finite values spread to other elements"
