"""Property tests (hypothesis): random list structures, dtypes, CPU paths and valid
hyper-parameters match the reference for a few steps; random invalid hyper-parameters always
raise (naming the argument) and modify nothing."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import _specs

from conftest import (DTYPES, HAS_AVX2, OPTIMIZERS, Problem, assert_same_arrays,
                      flatten_arrays, snapshot, using_cpu_path)

PATHS = ["scalar", "avx2"] if HAS_AVX2 else ["scalar"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- structures ----------------------------------------------------------------------------

small_nd = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)  # () and 0 dims
flat = st.integers(0, 300).map(lambda n: (n,))
shapes_st = st.lists(st.one_of(small_nd, flat), min_size=1, max_size=6)


def unit(lo=0.0, hi=1.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def maybe_zero(s):
    return st.one_of(st.just(0.0), s)


def log_uniform(lo, hi):
    return unit(math.log10(lo), math.log10(hi)).map(lambda e: 10.0 ** e)


# Valid hyper-parameters. Ranges are the valid ones, except where float32 arithmetic itself
# is ill-conditioned and no float32 implementation can be compared with a float64 oracle
# to a tolerance: RMSprop's alpha is kept >= 0.5 (centered: v - gavg^2 cancels like 1/alpha),
# and lr/eps stay in ranges where one step is not dominated by g/eps.
@st.composite
def sgd_hyper(draw):
    momentum = draw(maybe_zero(unit(0.0, 0.99)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(maybe_zero(unit()))
    return dict(lr=draw(unit(0.0, 0.5)), momentum=momentum, dampening=dampening,
                nesterov=nesterov, weight_decay=draw(maybe_zero(unit(0.0, 0.1))),
                maximize=draw(st.booleans()), l1=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def adagrad_hyper(draw):
    return dict(lr=draw(unit(0.0, 0.5)), lr_decay=draw(maybe_zero(unit(0.0, 1.0))),
                weight_decay=draw(maybe_zero(unit(0.0, 0.1))), eps=draw(log_uniform(1e-10, 0.1)),
                maximize=draw(st.booleans()), l1=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def rmsprop_hyper(draw):
    return dict(lr=draw(unit(0.0, 0.05)), alpha=draw(unit(0.5, 0.999)),
                eps=draw(log_uniform(1e-8, 1e-2)), weight_decay=draw(maybe_zero(unit(0.0, 0.1))),
                momentum=draw(maybe_zero(unit(0.0, 0.95))), centered=draw(st.booleans()),
                maximize=draw(st.booleans()), l1=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def adam_hyper(draw, adamw=False):
    h = dict(lr=draw(unit(0.0, 0.1)), beta1=draw(maybe_zero(unit(0.0, 0.99))),
             beta2=draw(maybe_zero(unit(0.0, 0.9999))), eps=draw(log_uniform(1e-8, 1e-2)),
             weight_decay=draw(maybe_zero(unit(0.0, 0.1))), amsgrad=draw(st.booleans()),
             maximize=draw(st.booleans()), l1=draw(maybe_zero(unit(0.0, 0.1))))
    if not adamw:
        h["decoupled_weight_decay"] = draw(st.booleans())
    return h


# Sophia: the table's hessian_diags start in [0.05, 1]; rho >= 0.01 and eps <= 1e-4 keep the
# clip's slope |m| / (rho*h) below ~2e3, so float32 rounding of m stays within tolerance.
@st.composite
def sophia_hyper(draw):
    return dict(lr=draw(unit(0.0, 0.1)), beta1=draw(maybe_zero(unit(0.0, 0.99))),
                rho=draw(log_uniform(1e-2, 1.0)), eps=draw(log_uniform(1e-15, 1e-4)),
                weight_decay=draw(maybe_zero(unit(0.0, 0.1))), maximize=draw(st.booleans()),
                l1=draw(maybe_zero(unit(0.0, 0.1))))


# Lion: the Problem keeps float32 gradients where its sign step is well defined.
@st.composite
def lion_hyper(draw):
    return dict(lr=draw(unit(0.0, 0.1)), beta1=draw(maybe_zero(unit(0.0, 0.99))),
                beta2=draw(maybe_zero(unit(0.0, 0.999))),
                weight_decay=draw(maybe_zero(unit(0.0, 0.1))), maximize=draw(st.booleans()),
                l1=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def adamax_hyper(draw):
    return dict(lr=draw(unit(0.0, 0.1)), beta1=draw(maybe_zero(unit(0.0, 0.99))),
                beta2=draw(maybe_zero(unit(0.0, 0.9999))), eps=draw(log_uniform(1e-8, 1e-2)),
                weight_decay=draw(maybe_zero(unit(0.0, 0.1))), maximize=draw(st.booleans()),
                l1=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def radam_hyper(draw):
    # Adamax's hyper-parameters and RAdam's but decoupled_weight_decay are the same
    return dict(**draw(adamax_hyper()), decoupled_weight_decay=draw(st.booleans()))


@st.composite
def adadelta_hyper(draw):
    return dict(lr=draw(unit(0.0, 1.0)), rho=draw(maybe_zero(unit(0.0, 0.99))),
                eps=draw(log_uniform(1e-6, 1e-2)), weight_decay=draw(maybe_zero(unit(0.0, 0.1))),
                maximize=draw(st.booleans()), l1=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def rprop_hyper(draw):
    low = draw(log_uniform(1e-6, 1e-2))
    return dict(lr=draw(unit(0.0, 0.1)), etaminus=draw(unit(0.1, 0.9)),
                etaplus=draw(unit(1.05, 2.0)), step_size_min=low,
                step_size_max=draw(unit(low, 1.0)), maximize=draw(st.booleans()))


@st.composite
def nadam_hyper(draw):
    return dict(**draw(radam_hyper()), momentum_decay=draw(maybe_zero(unit(0.0, 0.1))))


@st.composite
def asgd_hyper(draw):
    return dict(lr=draw(unit(0.0, 0.1)), lambd=draw(maybe_zero(unit(0.0, 0.01))),
                alpha=draw(unit(0.5, 1.0)), t0=draw(st.sampled_from([1e6, 0.0, 3.0])),
                weight_decay=draw(maybe_zero(unit(0.0, 0.1))), maximize=draw(st.booleans()))


HYPER = {"sgd": sgd_hyper(), "adagrad": adagrad_hyper(), "rmsprop": rmsprop_hyper(),
         "adam": adam_hyper(), "adamw": adam_hyper(adamw=True), "sophia": sophia_hyper(),
         "lion": lion_hyper(), "adamax": adamax_hyper(), "radam": radam_hyper(),
         "adadelta": adadelta_hyper(), "rprop": rprop_hyper(), "nadam": nadam_hyper(),
         "asgd": asgd_hyper()}


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_random_valid_calls_match_reference(data):
    name = data.draw(st.sampled_from(list(OPTIMIZERS)), label="optimizer")
    opt = OPTIMIZERS[name]
    hyper = data.draw(HYPER[name], label="hyper")
    shapes = data.draw(shapes_st, label="shapes")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    listed = len(shapes) > 1 or data.draw(st.booleans(), label="listed")
    path = data.draw(st.sampled_from(PATHS), label="cpu_path")
    start = data.draw(st.integers(1, 1000), label="first step") if opt.takes_step else 1
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    pr = Problem(opt, hyper, shapes, dtype, rng, listed=listed)
    pr.t = start - 1
    with using_cpu_path(path):
        for _ in range(3):
            pr.step(pr.draw_grads(rng))
            pr.check()


# ---- invalid hyper-parameters --------------------------------------------------------------------

not_a_number = st.one_of(st.text(max_size=3), st.none(), st.lists(unit(), max_size=2),
                         st.just(True), st.just(False), st.just(1 + 2j))
nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.floats(-1e30, -1e-30)
above_one = st.floats(1.0 + 1e-6, 1e30)


def bad_real(kind):
    """(value, exception) for a real in [0, inf) ("nonneg"), [0, 1] ("unit"), [0, 1)
    ("beta"), (0, inf) ("positive"), (0, 1) ("open_unit"), (1, inf) ("above_one", Rprop's
    etas) or any finite real ("any"): out of range or not finite
    -> ValueError (also as NumPy scalars), not a real number -> TypeError."""
    out_of_range = {"nonneg": negative, "unit": st.one_of(negative, above_one),
                    "beta": st.one_of(negative, st.just(1.0), above_one),
                    "positive": st.one_of(negative, st.just(0.0), st.just(-0.0)),
                    "open_unit": st.one_of(negative, st.just(0.0), st.just(1.0), above_one),
                    "above_one": st.one_of(negative, st.floats(0.0, 1.0)),
                    "any": nonfinite}[kind]
    numeric = st.one_of(out_of_range, nonfinite)
    as_numpy = st.tuples(numeric, st.sampled_from([np.float32, np.float64])).map(
        lambda vt: vt[1](vt[0]))
    return st.one_of(st.tuples(st.one_of(numeric, as_numpy), st.just(ValueError)),
                     st.tuples(not_a_number, st.just(TypeError)))


bad_flag = st.tuples(st.one_of(st.text(max_size=3), st.none(), unit(), st.just(1)),
                     st.just(TypeError))
bad_step = st.one_of(st.tuples(st.integers(max_value=0), st.just(ValueError)),
                     st.tuples(st.one_of(unit(0.5, 100.0), st.booleans(), st.text(max_size=2),
                                         st.none()), st.just(TypeError)))

def _bad_value(name, key):
    """Bad values of hyper-parameter ``key`` of optimizer ``name``, from its range in
    fastopt's table."""
    if key == "step":
        return bad_step
    h = OPTIMIZERS[name].spec.hyper[key]
    if isinstance(h, _specs.Flag):
        return bad_flag
    kind = {(0.0, math.inf, False, False): "nonneg", (0.0, 1.0, False, False): "unit",
            (0.0, 1.0, False, True): "beta", (0.0, math.inf, True, False): "positive",
            (0.0, 1.0, True, True): "open_unit", (1.0, math.inf, True, False): "above_one",
            (-math.inf, math.inf, False, False): "any"}
    return bad_real(kind[(h.lo, h.hi, h.lo_open, h.hi_open)])


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_random_invalid_hyper_parameters_raise_and_modify_nothing(data):
    name = data.draw(st.sampled_from(list(OPTIMIZERS)), label="optimizer")
    opt = OPTIMIZERS[name]
    hyper = data.draw(HYPER[name], label="valid hyper")
    if opt.takes_step:
        hyper["step"] = 1
    keys = sorted(k for k in hyper if k != "nesterov" or name == "sgd")
    key = data.draw(st.sampled_from(keys), label="bad key")
    value, exc = data.draw(_bad_value(name, key), label="bad value")
    shapes = data.draw(shapes_st, label="shapes")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    state_opts = {k: v for k, v in hyper.items() if k != "step"}
    pr = Problem(opt, state_opts, shapes, dtype, rng)
    args, kwargs = pr.fastopt_args(pr.draw_grads(rng))
    kwargs.update(hyper)
    kwargs[key] = value
    before = snapshot(*args)
    with pytest.raises(exc, match=re.escape(key)):
        opt.fn(*args, **kwargs)
    assert_same_arrays(before, flatten_arrays(*args))


@settings(max_examples=100, **SETTINGS)
@given(momentum=st.one_of(st.just(0.0), unit(0.0, 0.99)), dampening=st.one_of(st.just(0.0), unit()),
       seed=st.integers(0, 2**32 - 1))
def test_random_invalid_nesterov_combinations(momentum, dampening, seed):
    if momentum > 0 and dampening == 0:
        return  # valid
    rng = np.random.default_rng(seed)
    opts = dict(momentum=momentum, dampening=dampening)
    pr = Problem(OPTIMIZERS["sgd"], opts, [(5,), (33,)], np.float32, rng)
    args, kwargs = pr.fastopt_args(pr.draw_grads(rng))
    before = snapshot(*args)
    with pytest.raises(ValueError, match="nesterov"):
        fastopt.sgd_(*args, **dict(kwargs, nesterov=True))
    assert_same_arrays(before, flatten_arrays(*args))
