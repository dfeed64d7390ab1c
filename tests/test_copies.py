"""copy.deepcopy and pickling of the array-list optimizer classes (optim.Copies): an
independent optimizer that continues bit for bit as the original; copy.copy is refused."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import fastopt
from backends import assert_bits

CLASSES = {**fastopt.optim.CLASSES, "adafactor": fastopt.Adafactor}
SHAPES = [(33,), (70, 90)]  # (70 x 90 = 6300: 8-bit state where asked)


def _make(name, params, **options):
    kwargs = {"lr": 1e-3} if name in ("sgd", "sophia", "adafactor") else {}
    return CLASSES[name](params, **kwargs, **options)


def _grads(rng, steps=3):
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def _arrays(opt):
    """Every array the optimizer holds, in a fixed order."""
    out = list(opt.params)
    out += [a for arrays in opt.state.values() for a in arrays if a is not None]
    out += [a for arrays in getattr(opt, "absmax", {}).values() for a in arrays if a is not None]
    return out


def _copies(opt, params):
    """(the optimizer copied, its params): deep-copied with its params, and pickled."""
    params_copy, opt_copy = copy.deepcopy((params, opt))
    yield opt_copy, params_copy
    params_copy, opt_copy = pickle.loads(pickle.dumps((params, opt)))
    yield opt_copy, params_copy


CASES = [(name, {}) for name in sorted(CLASSES)] + [
    (name, {"state_dtype": "int8"}) for name in sorted(fastopt.optim.CLASSES) if name != "sophia"
]  # (Sophia and Adafactor keep no 8-bit state)


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_a_copy_continues_as_the_original_on_its_own(name, options, rng):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = _make(name, params, **options)
    grads = _grads(rng)
    opt.step(grads[0])
    for copied, copied_params in _copies(opt, params):
        assert type(copied) is type(opt)
        assert all(a is b for a, b in zip(copied.params, copied_params))  # shared as given
        before = [a.copy() for a in _arrays(opt)]
        for g in grads[1:]:
            copied.step(g)
        for a, b in zip(_arrays(opt), before):  # the original untouched
            assert_bits(a, b, "original")
        assert opt.step_count == 1 and copied.step_count == 3
    twin = copy.deepcopy(opt)
    for g in grads[1:]:
        opt.step(g)
        twin.step(g)
    for a, b in zip(_arrays(twin), _arrays(opt)):
        assert_bits(a, b, "twin")


def test_a_copy_of_torch_cpu_params_steps_its_own_tensors(rng):
    """PyTorch CPU params are stepped through NumPy views: a copy's views are of the
    copied tensors."""
    torch = pytest.importorskip("torch")
    params = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = fastopt.AdamW(params, lr=1e-2)
    grads = _grads(rng)
    opt.step(grads[0])
    for copied, copied_params in _copies(opt, params):
        kept = [p.clone() for p in params]
        copied.step(grads[1])
        assert all(torch.equal(a, b) for a, b in zip(params, kept))
        assert not any(torch.equal(a, b) for a, b in zip(copied_params, kept))


def test_a_shallow_copy_is_refused(rng):
    for name in ("adamw", "adafactor"):
        opt = _make(name, [rng.standard_normal(s).astype(np.float32) for s in SHAPES])
        with pytest.raises(TypeError, match=r"copy.copy would step the same state arrays"):
            copy.copy(opt)


def test_a_copy_keeps_its_options(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    params = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in SHAPES]
    grads = [[g.astype(ml_dtypes.bfloat16) for g in step] for step in _grads(rng)]
    for options in ({"stochastic_rounding": True}, {"master_weights": True}):
        opt = fastopt.AdamW(params, lr=1e-2, **options)
        opt.step(grads[0])
        twin = pickle.loads(pickle.dumps(opt))
        for g in grads[1:]:
            opt.step(g)
            twin.step(g)
        for a, b in zip(twin.params, opt.params):
            assert_bits(a, b, str(options))
