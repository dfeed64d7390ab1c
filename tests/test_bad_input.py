"""Bad input: every bad argument raises TypeError/ValueError naming the argument, before
anything is written (every array of the call is compared with a snapshot afterwards);
what must be accepted (read-only or aliasing gradients, zero-size arrays, adjacent slices
of one buffer) is; NaN/Inf gradients propagate exactly as in the reference."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

import fastopt

from conftest import (DTYPES, OPTIMIZERS, Problem, assert_same_arrays,
                      flatten_arrays, opts_id, snapshot)

# Index 4 (the 5th array, where most corruptions go) has the shape of index 0, so the
# "same array twice" and overlap cases keep every shape consistent.
SHAPES = [(5,), (3, 4), (7,), (1,), (5,), (2, 2)]
BAD = 4
# Options under which each optimizer uses every state role it has.
FULL = {name: opt.representative[-1] for name, opt in OPTIMIZERS.items()}


class Call:
    """A valid functional call (params, grads, state lists, hyper-parameters) to corrupt."""

    def __init__(self, name: str, rng, *, dtype=np.float32, listed: bool = True,
                 opts: Optional[Dict[str, Any]] = None, shapes=SHAPES):
        self.opt = OPTIMIZERS[name]
        self.opts = dict(FULL[name] if opts is None else opts)
        pr = Problem(self.opt, self.opts, shapes if listed else shapes[:1], dtype, rng,
                     listed=listed)
        self.args, self.kwargs = pr.fastopt_args(pr.draw_grads(rng))
        self.args = [list(a) if isinstance(a, list) else a for a in self.args]
        self.roles = ["params", "grads"] + list(pr.args)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, role: str) -> Any:
        return self.args[self.roles.index(role)]

    def __setitem__(self, role: str, value: Any) -> None:
        self.args[self.roles.index(role)] = value

    def run(self, **overrides) -> None:
        self.opt.fn(*self.args, **dict(self.kwargs, **overrides))

    def arrays(self) -> List[np.ndarray]:
        return flatten_arrays(*self.args)

    def expect(self, exc, match: str, **overrides) -> pytest.ExceptionInfo:
        """The call raises ``exc`` matching ``match`` and leaves every array as it was."""
        before = snapshot(*self.args)
        with pytest.raises(exc, match=match) as info:
            self.run(**overrides)
        assert_same_arrays(before, self.arrays())
        return info


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
WRITTEN_ROLES = role_cases(lambda n: ["params"] + states_of(n))
OPT_NAMES = list(OPTIMIZERS)


def at(role: str, i: int = BAD) -> str:
    return re.escape(f"{role}[{i}]")


# ---- structure: shapes, lengths, lists vs arrays -------------------------------------------

@pytest.mark.parametrize("bad_shape", [(6,), (5, 1), (1, 5), ()], ids=str)
@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_shape_mismatch(name, role, bad_shape, rng):
    c = Call(name, rng)
    c[role][BAD] = np.ones(bad_shape, np.float32)
    c.expect(ValueError, at(role))


@pytest.mark.parametrize("name", OPT_NAMES)
def test_param_shape_mismatch_names_params(name, rng):
    c = Call(name, rng)
    c["params"][BAD] = np.ones(6, np.float32)
    c.expect(ValueError, at("params"))


@pytest.mark.parametrize("delta", [-1, 1], ids=["shorter", "longer"])
@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_list_length_mismatch(name, role, delta, rng):
    c = Call(name, rng)
    if delta < 0:
        c[role].pop()
    else:
        c[role].append(np.ones(3, np.float32))
    c.expect(ValueError, re.escape(role))


@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_single_array_where_params_is_a_list(name, role, rng):
    c = Call(name, rng)
    c[role] = c[role][0]
    c.expect(TypeError, re.escape(role))


@pytest.mark.parametrize("name,role", NON_PARAM_ROLES)
def test_list_where_params_is_a_single_array(name, role, rng):
    c = Call(name, rng, listed=False)
    c[role] = [c[role]]
    c.expect(TypeError, re.escape(role))


# ---- dtypes ---------------------------------------------------------------------------------

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
def test_mixed_dtypes(name, role, base, rng):
    other = np.float64 if base == np.float32 else np.float32
    c = Call(name, rng, dtype=base)
    c[role] = [a.astype(other) for a in c[role]]
    c.expect(TypeError, at(role, 0))
    c = Call(name, rng, dtype=base)  # one array of the role in the other float type
    c[role][BAD] = c[role][BAD].astype(other)
    c.expect(TypeError, at(role))


# ---- memory layout and writability --------------------------------------------------------------

def _strided(a):
    buf = np.empty((a.size * 2,), a.dtype)
    out = buf[::2].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("kind", ["step2", "reversed", "fortran"])
@pytest.mark.parametrize("name,role", ALL_ROLES)
def test_non_contiguous(name, role, kind, rng):
    c = Call(name, rng)
    i = 1 if kind == "fortran" else BAD  # index 1 is 2-D (3, 4)
    a = c[role][i]
    if kind == "step2":
        bad = _strided(a)
    elif kind == "reversed":
        bad = a.copy()[::-1]
    else:
        bad = np.asfortranarray(a)
    assert not bad.flags.c_contiguous
    c[role][i] = bad
    c.expect(ValueError, at(role, i))


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_read_only_params_or_state(name, role, rng):
    c = Call(name, rng)
    c[role][BAD].setflags(write=False)
    c.expect(ValueError, at(role))


@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_read_only_grads_are_accepted(name, listed, rng):
    seed = int(rng.integers(2**31))
    runs = []
    for read_only in (False, True):
        c = Call(name, np.random.default_rng(seed), listed=listed)
        grads = c["grads"] if listed else [c["grads"]]
        for g in grads:
            g.setflags(write=not read_only)
        before = snapshot(grads)
        c.run()
        assert_same_arrays(before, grads)
        runs.append(snapshot(*c.args))
    assert_same_arrays(runs[0], runs[1])


# ---- aliasing -------------------------------------------------------------------------------------

def _message_names(info, *names):
    msg = str(info.value)
    for n in names:
        assert n in msg, f"message {msg!r} does not name {n}"


@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_grads_is_params(name, listed, rng):
    c = Call(name, rng, listed=listed)
    c["grads"] = c["params"] if not listed else list(c["params"])
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, "params", "grads")


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_grad_aliasing_a_written_array(name, role, read_only, rng):
    # Even a read-only view of an array the call writes is refused: the kernel would read
    # values it is overwriting.
    c = Call(name, rng)
    view = c[role][BAD].view()
    view.setflags(write=not read_only)
    c["grads"][BAD] = view
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"grads[{BAD}]", f"{role}[{BAD}]")


def _written_pairs():
    cases = []
    for name in OPT_NAMES:
        written = ["params"] + states_of(name)
        for i, a in enumerate(written):
            for b in written[i + 1:]:
                cases.append(pytest.param(name, a, b, id=f"{name}-{a}-is-{b}"))
    return cases


@pytest.mark.parametrize("name,role_a,role_b", _written_pairs())
def test_two_written_roles_share_an_array(name, role_a, role_b, rng):
    c = Call(name, rng)
    c[role_b][BAD] = c[role_a][BAD]
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{role_a}[{BAD}]", f"{role_b}[{BAD}]")


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_same_array_twice_in_one_list(name, role, rng):
    c = Call(name, rng)
    c[role][BAD] = c[role][0]
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{role}[0]", f"{role}[{BAD}]")


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_overlapping_slices_of_one_buffer(name, role, rng):
    c = Call(name, rng)
    buf = np.empty(9, np.float32)
    buf[0:5] = c[role][0]
    c[role][0] = buf[0:5]
    c[role][BAD] = buf[4:9]  # shares element 4
    info = c.expect(ValueError, "overlap|alias")
    _message_names(info, f"{role}[0]", f"{role}[{BAD}]")


@pytest.mark.parametrize("name,role", WRITTEN_ROLES)
def test_adjacent_slices_of_one_buffer_are_accepted(name, role, rng):
    # Back to back, not overlapping: valid, and the result equals separate arrays.
    seed = int(rng.integers(2**31))
    c = Call(name, np.random.default_rng(seed))
    ref = Call(name, np.random.default_rng(seed))
    buf = np.empty(10, np.float32)
    buf[0:5], buf[5:10] = c[role][0], c[role][BAD]
    c[role][0], c[role][BAD] = buf[0:5], buf[5:10]
    c.run()
    ref.run()
    assert_same_arrays(snapshot(*ref.args), snapshot(*c.args))


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_grads_aliasing_each_other_are_accepted(name, read_only, rng):
    # grads are only read, so they may share memory: the same array twice, and partially
    # overlapping views.
    seed = int(rng.integers(2**31))
    c = Call(name, np.random.default_rng(seed))
    ref = Call(name, np.random.default_rng(seed))
    big = np.random.default_rng(seed + 1).standard_normal(9).astype(np.float32)
    big.setflags(write=not read_only)
    c["grads"][0] = big[2:7]
    c["grads"][BAD] = c["grads"][0]  # the same object twice
    c["grads"][2] = big[0:7]  # overlaps grads[0]
    ref["grads"][0], ref["grads"][BAD], ref["grads"][2] = (big[2:7].copy(), big[2:7].copy(),
                                                           big[0:7].copy())
    c.run()
    ref.run()
    assert_same_arrays(snapshot(*ref.args), snapshot(*c.args))


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
PER_OPT = {
    "sgd": STEP + [("momentum", -0.1, V), ("momentum", NAN, V), ("dampening", -0.1, V),
                   ("dampening", 1.5, V), ("nesterov", "yes", T)],
    "adagrad": STEP + [("lr_decay", -0.1, V), ("lr_decay", INF, V), ("eps", 0.0, V),
                       ("eps", -1e-10, V), ("eps", NAN, V)],
    "rmsprop": [("alpha", -0.1, V), ("alpha", 1.5, V), ("alpha", NAN, V), ("eps", 0.0, V),
                ("eps", -1e-8, V), ("momentum", -0.1, V), ("centered", "yes", T)],
    "adam": STEP + [("beta1", 1.0, V), ("beta1", -0.1, V), ("beta1", NAN, V),
                    ("beta2", 1.0, V), ("beta2", -0.1, V), ("beta2", 1.5, V), ("eps", 0.0, V),
                    ("eps", -1e-8, V), ("amsgrad", "no", T), ("decoupled_weight_decay", 1, T)],
    "adamw": STEP + [("beta1", 1.0, V), ("beta2", -0.1, V), ("eps", 0.0, V),
                     ("amsgrad", "no", T)],
}


def _hyper_cases():
    cases = []
    for name in OPT_NAMES:
        for key, value, exc in COMMON + PER_OPT[name]:
            cases.append(pytest.param(name, key, value, exc,
                                      id=f"{name}-{key}={value!r}-{exc.__name__}"))
    return cases


@pytest.mark.parametrize("name,key,value,exc", _hyper_cases())
def test_bad_hyper_parameter(name, key, value, exc, rng):
    c = Call(name, rng)
    c.expect(exc, re.escape(key), **{key: value})


@pytest.mark.parametrize("opts", [dict(momentum=0.0, dampening=0.0, nesterov=True),
                                  dict(momentum=0.9, dampening=0.1, nesterov=True)],
                         ids=["without-momentum", "with-dampening"])
def test_sgd_nesterov_needs_momentum_and_no_dampening(opts, rng):
    c = Call("sgd", rng, opts=dict(opts, weight_decay=0.0, maximize=False, l1=0.0))
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
def test_missing_required_state(name, opts, role, listed, rng):
    c = Call(name, rng, opts=opts, listed=listed)
    c[role] = None
    c.expect(ValueError, re.escape(role))


# ---- zero-size arrays ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)], ids=str)
@pytest.mark.parametrize("listed", [True, False], ids=["list", "single"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_zero_size_is_a_no_op(name, listed, shape, rng):
    c = Call(name, rng, listed=listed, shapes=[shape] * 3)
    before = snapshot(*c.args)
    c.run()
    assert_same_arrays(before, c.arrays())
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

def _nonfinite_cases():
    cases = []
    for opt in OPTIMIZERS.values():
        for opts in opt.representative:
            cases.append(pytest.param(opt, opts, id=f"{opt.name}-{opts_id(opts)}"))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("opt,opts", _nonfinite_cases())
def test_nan_and_inf_gradients_propagate_like_reference(opt, opts, dtype, cpu_path, rng):
    # NaN, +Inf and -Inf at positions in the vector body, the head and the tail of each
    # array, at step 2 of 5 (so they also flow through the state afterwards).
    pr = Problem(opt, opts, [(33,), (4097,), (3,)], dtype, rng)
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
    got = np.concatenate([p.ravel() for p in pr.params])
    assert np.isnan(got).any() or np.isinf(got).any()
    assert np.isfinite(got).sum() >= got.size - 20, "non-finite values spread to other elements"
