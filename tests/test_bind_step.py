"""``bind_step``: a step binding with its hyper-parameters read once (what the functional
steps call on the host), against the plain step binding: the same bits for every optimizer
of the table, and the bad-input contract of the private bindings (TypeError/ValueError
naming the problem, nothing written)."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest
from backends import assert_bits
from cuda_libs import lib_fixture

from fastopt import _ext
from fastopt._specs import EMA, OPTIMIZERS, OptimizerSpec, Real

lib = lib_fixture(scope="module")


def kernel_keywords(spec: OptimizerSpec) -> Dict[str, Any]:
    """The spec's example hyper-parameters (every array used), validated, with fixed ones
    and the carried ones (NAdam's mu_product) as after 3 steps."""
    values = spec.kernel_hyper(spec.validate({**spec.defaults(), **spec.example}))
    return {**values, **{n: c.through(3, values) for n, c in spec.carried.items()}}


def fresh_arrays(spec: OptimizerSpec, n: int, rng: np.random.Generator) -> List[List[Any]]:
    """One list of one float32 array per role of the spec, random and non-zero (second
    moments positive)."""
    return [
        [np.abs(rng.standard_normal(n)).astype(np.float32) + 0.5] for _ in spec.arrays
    ]


def copies(arrays: List[List[Any]]) -> List[List[Any]]:
    return [[a.copy() for a in role] for role in arrays]


@pytest.mark.parametrize("name", [*sorted(OPTIMIZERS), "ema"])
@pytest.mark.parametrize("n", [1, 7, 33, 4097])
def test_bound_step_equals_the_step(name: str, n: int, rng: np.random.Generator) -> None:
    spec = EMA if name == "ema" else OPTIMIZERS[name]
    kw = kernel_keywords(spec)
    step = {"step": 3} if spec.takes_step else {}
    arrays = fresh_arrays(spec, n, rng)
    bound_arrays = copies(arrays)
    getattr(_ext._cpu, spec.kernel)(*arrays, True, **kw, **step)
    _ext._cpu.bind_step(spec.kernel, **kw)(*bound_arrays, True, **step)
    for role, want, got in zip(spec.arrays, arrays, bound_arrays):
        assert_bits(got[0], want[0], role.name)
    # a step binding with keyword names that are not interned strings (built at run time)
    again = copies(bound_arrays)
    named = {"".join(list(k)): v for k, v in {**kw, **step}.items()}
    getattr(_ext._cpu, spec.kernel)(*again, True, **named)
    getattr(_ext._cpu, spec.kernel)(*bound_arrays, True, **kw, **step)
    for role, want, got in zip(spec.arrays, bound_arrays, again):
        assert_bits(got[0], want[0], role.name)


@pytest.mark.parametrize("name", [*sorted(OPTIMIZERS), "ema"])
def test_cuda_bound_step_equals_the_step_and_the_cpu(lib: Any, name: str,
                                                   rng: np.random.Generator) -> None:
    """fastopt._cuda.bind_step: the bound step on device arrays gives the bits of the plain
    CUDA step binding and of the CPU kernels."""
    spec = EMA if name == "ema" else OPTIMIZERS[name]
    kw = kernel_keywords(spec)
    step = {"step": 3} if spec.takes_step else {}
    host = fresh_arrays(spec, 4097, rng)
    plain = [[lib.to_device(a) for a in role] for role in host]
    bound = [[lib.to_device(a) for a in role] for role in host]
    getattr(_ext._cuda, spec.kernel)(*plain, True, **kw, **step)
    _ext._cuda.bind_step(spec.kernel, **kw)(*bound, True, **step)
    getattr(_ext._cpu, spec.kernel)(*host, True, **kw, **step)
    for role, want, got_plain, got_bound in zip(spec.arrays, host, plain, bound):
        assert_bits(lib.to_host(got_bound[0], sync=True), lib.to_host(got_plain[0], sync=True),
                    role.name)
        assert_bits(lib.to_host(got_bound[0], sync=True), want[0], role.name)


def _out_of_range(h: Any) -> List[float]:
    """Values a real hyper-parameter refuses: NaN, inf, and just past each finite end."""
    values = [float("nan"), float("inf") if h.hi == float("inf") else -float("inf")]
    if h.lo != -float("inf"):
        values.append(h.lo if h.lo_open else np.nextafter(h.lo, -np.inf))
    if h.hi != float("inf"):
        values.append(h.hi if h.hi_open else np.nextafter(h.hi, np.inf))
    return values


REAL_HYPERS = [
    (name, field)
    for name, spec in [*sorted(OPTIMIZERS.items()), ("ema", EMA)]
    for field, h in spec.hyper.items()
    if isinstance(h, Real)
]


@pytest.mark.parametrize("name, field", REAL_HYPERS, ids=[f"{n}-{f}" for n, f in REAL_HYPERS])
def test_step_bindings_refuse_hyper_parameters_out_of_range(name: str, field: str,
                                                             rng: np.random.Generator) -> None:
    # Called directly, a step binding (and bind_step) refuses what the Python API refuses
    # (the ranges of fastopt/_specs.py), naming the hyper-parameter; nothing written.
    spec = EMA if name == "ema" else OPTIMIZERS[name]
    step = {"step": 3} if spec.takes_step else {}
    arrays = fresh_arrays(spec, 9, rng)
    before = copies(arrays)
    for value in _out_of_range(spec.hyper[field]):
        kw = {**kernel_keywords(spec), field: value}
        with pytest.raises(ValueError, match=rf"^{field}: must be "):
            getattr(_ext._cpu, spec.kernel)(*arrays, True, **kw, **step)
        with pytest.raises(ValueError, match=rf"^{field}: must be "):
            _ext._cpu.bind_step(spec.kernel, **kw)
    for want, got in zip(before, arrays):
        assert_bits(got[0], want[0], name)


def test_bind_step_refuses_bad_arguments() -> None:
    kw = kernel_keywords(OPTIMIZERS["adam"])
    bind = _ext._cpu.bind_step
    with pytest.raises(ValueError, match="no optimizer 'adamx'"):
        bind("adamx", **kw)
    with pytest.raises(TypeError, match="optimizer's name"):
        bind(3, **kw)
    with pytest.raises(TypeError, match="optimizer's name"):
        bind()
    with pytest.raises(TypeError, match="optimizer's name"):
        bind("adam", 1, **kw)
    with pytest.raises(TypeError, match="missing keyword 'beta1'"):
        bind("adam", **{k: v for k, v in kw.items() if k != "beta1"})
    with pytest.raises(TypeError, match="nothing else"):
        bind("adam", step=1, **kw)
    with pytest.raises(TypeError, match="amsgrad: expected a bool, got int"):
        bind("adam", **{**kw, "amsgrad": 1})
    with pytest.raises(TypeError, match="lr: expected a real number, got str"):
        bind("adam", **{**kw, "lr": "0.1"})


class _OddHash(str):
    """A keyword name equal to another but hashed apart: a dict can hold both."""

    def __hash__(self) -> int:
        return 12345


def test_odd_keyword_names_are_refused_by_name(rng: np.random.Generator) -> None:
    spec = OPTIMIZERS["adam"]
    kw = kernel_keywords(spec)
    arrays = fresh_arrays(spec, 9, rng)
    before = copies(arrays)
    adam = _ext._cpu.adam
    with pytest.raises(TypeError, match=r"unexpected keyword '\\udc80'"):
        adam(*arrays, True, step=1, **kw, **{"\udc80": 1})
    with pytest.raises(TypeError, match="keyword 'step' given twice"):
        adam(*arrays, True, **kw, **{"step": 2, _OddHash("step"): 1})
    with pytest.raises(ValueError, match=r"^bind_step\(\): name: no optimizer '\\udc80'$"):
        _ext._cpu.bind_step("\udc80", **kw)
    for role, want, got in zip(spec.arrays, before, arrays):
        assert_bits(got[0], want[0], role.name)


def test_bound_step_refuses_bad_calls_and_writes_nothing(rng: np.random.Generator) -> None:
    spec = OPTIMIZERS["adam"]
    bound = _ext._cpu.bind_step("adam", **kernel_keywords(spec))
    arrays = fresh_arrays(spec, 65, rng)
    before = copies(arrays)
    calls = [
        (TypeError, "unexpected keyword 'lr'", lambda: bound(*arrays, True, step=1, lr=0.1)),
        (TypeError, "missing keyword 'step'", lambda: bound(*arrays, True)),
        (ValueError, "step: must be >= 1", lambda: bound(*arrays, True, step=0)),
        (TypeError, "expected 6 positional", lambda: bound(*arrays, step=1)),
        (TypeError, "listed: expected a bool", lambda: bound(*arrays, 1, step=1)),
        (TypeError, "unexpected keyword 'bogus'", lambda: bound(*arrays, True, step=1, bogus=2)),
    ]
    for exc, match, call in calls:
        with pytest.raises(exc, match=match):
            call()
    for role, want, got in zip(spec.arrays, before, arrays):
        assert_bits(got[0], want[0], role.name)


def test_step_functions_describe_themselves() -> None:
    specs = {s.kernel: s for s in (*OPTIMIZERS.values(), EMA)}
    for name in _ext._cpu.optimizers():
        fn = getattr(_ext._cpu, name)
        assert fn.__name__ == name and fn.__module__ == "fastopt._cpu"
        assert fn.__doc__.startswith(f"{name}(*args, **kwargs)\n")
        kw = kernel_keywords(specs[name])
        assert _ext._cpu.bind_step(name, **kw).__doc__.startswith(f"{name}(*args, **kwargs)\n")


@pytest.mark.parametrize("name", [*sorted(OPTIMIZERS), "ema"])
def test_check_only_checks_as_the_step_and_writes_nothing(
    name: str, rng: np.random.Generator
) -> None:
    """check_only=True (how a step of several kernel calls checks them all before the first
    runs): the step's own errors for a bad call, nothing written for a good one."""
    spec = EMA if name == "ema" else OPTIMIZERS[name]
    kw = {**kernel_keywords(spec), **({"step": 3} if spec.takes_step else {})}
    kernel = getattr(_ext._cpu, spec.kernel)
    arrays = fresh_arrays(spec, 33, rng)
    before = copies(arrays)
    kernel(*arrays, True, **kw, check_only=True)
    for role, want, got in zip(spec.arrays, before, arrays):
        assert_bits(got[0], want[0], role.name)
    bad = copies(arrays)
    bad[1] = [bad[0][0]]  # the grads are the params
    errors = []
    for check_only in (True, False):
        with pytest.raises(ValueError) as info:
            kernel(*bad, True, **kw, check_only=check_only)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "overlaps" in errors[0]
    with pytest.raises(TypeError, match="check_only: expected a bool, got int"):
        kernel(*arrays, True, **kw, check_only=1)
    for role, want, got in zip(spec.arrays, before, arrays):
        assert_bits(got[0], want[0], role.name)
