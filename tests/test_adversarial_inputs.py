"""Inputs from an adversarial pass over the bindings (2026-12-07): a None where a list of
grads goes, lists changed while the binding reads them, tensor subclasses (a user's, or one
answering oddly), tensors without dense memory, inference tensors as outputs. Each is
refused with a TypeError/ValueError naming the argument and nothing written, or works as
for plain arrays. Each test failed (or crashed) before its fix."""

import numpy as np
import pytest

import fastopt
from fastopt import _cpu

torch = pytest.importorskip("torch")

F32 = np.float32
ADAM = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, l1=0.0,
            decoupled_weight_decay=False, amsgrad=False, maximize=False)


class Tagged(torch.Tensor):
    """A user's tensor subclass, defined outside torch (a tag, nothing else)."""


class ShortStride(torch.Tensor):
    """A subclass whose stride() answers no strides at all."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "stride":
            return ()
        return super().__torch_function__(func, types, args, kwargs or {})


class Clearing(torch.Tensor):
    """A subclass that empties a list (``victim``) the first time torch is asked about it."""

    victim = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if Clearing.victim is not None:
            victim, Clearing.victim = Clearing.victim, None
            victim.clear()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_adafactor_binding_refuses_none_grads(rng):
    p = rng.standard_normal(5).astype(F32)
    v = np.abs(rng.standard_normal(5)).astype(F32)
    before = p.copy(), v.copy()
    for check_only in (True, False):
        with pytest.raises(TypeError, match=r"^grads: expected a list of arrays, got None$"):
            _cpu.adafactor_step([p], None, [None], [None], [v], [1], 0.01, -0.8, 1e-30, 1e-3,
                                1.0, 0.0, False, True, check_only=check_only)
    np.testing.assert_array_equal(p, before[0])
    np.testing.assert_array_equal(v, before[1])


def _adam_lists(n, grad_type=torch.Tensor):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, generator=gen) for _ in range(n)]
    grads = [torch.randn(5, generator=gen).as_subclass(grad_type) for _ in range(n)]
    state = [[torch.zeros(5) for _ in range(n)] for _ in range(2)]
    return params, grads, state


@pytest.mark.parametrize("call", ["adam", "clip_grad_norm_", "grad_norm_total", "tensor_layouts"])
def test_a_list_emptied_while_it_is_read_is_read_as_it_was(call):
    # grads[0]'s __torch_function__ empties the grads list as the binding reads grads[0]:
    # the binding goes on over the list as it was passed (it read indices past the end of
    # the emptied list and crashed before).
    params, grads, (m, v) = _adam_lists(50, Clearing)
    want_params, want_grads, (wm, wv) = _adam_lists(50)
    Clearing.victim = grads
    if call == "adam":
        _cpu.adam(params, grads, m, v, None, True, **ADAM)
        _cpu.adam(want_params, want_grads, wm, wv, None, True, **ADAM)
        for got, want in zip(params, want_params):
            assert torch.equal(got, want)
    elif call == "clip_grad_norm_":
        norm = fastopt.clip_grad_norm_(grads, 1.0)
        assert norm == fastopt.clip_grad_norm_(want_grads, 1.0)
    elif call == "grad_norm_total":
        assert _cpu.grad_norm_total(grads, True, 2.0, False) == _cpu.grad_norm_total(
            want_grads, True, 2.0, False)
    else:
        assert len(_cpu.tensor_layouts(grads)) > 0
    assert grads == []


def test_a_subclass_answering_no_strides_is_refused():
    p = [torch.randn(4, 6).as_subclass(ShortStride)]
    before = p[0].as_subclass(torch.Tensor).clone()
    state = [[torch.zeros(4, 6)] for _ in range(3)]
    with pytest.raises(TypeError, match=r"^params\[0\]: its shape and stride\(\) are not tuples"):
        _cpu.adam(p, *state, None, True, **ADAM)
    assert torch.equal(p[0].as_subclass(torch.Tensor), before)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested", "uninitialized"])
def test_tensor_layouts_names_tensors_it_cannot_follow(kind):
    bad = {
        "sparse_coo": lambda: torch.ones(3).to_sparse(),
        "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
        "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "uninitialized": lambda: torch.nn.UninitializedParameter(),
    }[kind]()
    with pytest.raises(TypeError, match=r"^tensors\[1\]: "):
        _cpu.tensor_layouts([torch.ones(2), bad])


@pytest.mark.parametrize("call", ["quantize_affine", "dequantize", "prune_magnitude",
                                  "newton_apply"])
def test_inference_tensors_are_not_written_outside_inference_mode(call):
    # As torch refuses in-place writes to inference tensors outside inference_mode: the
    # steps refused them; the quantization, pruning and Newton outputs did not.
    with torch.inference_mode():
        out = {
            "quantize_affine": lambda: torch.zeros(10, dtype=torch.int8),
            "dequantize": lambda: torch.zeros(10),
            "prune_magnitude": lambda: torch.zeros(10, dtype=torch.bool),
            "newton_apply": lambda: torch.zeros(2, 3, dtype=torch.float64),
        }[call]()
    x = torch.linspace(-1, 1, 10)
    run = {
        "quantize_affine": lambda: _cpu.quantize_affine(x, out, np.full(1, 0.01, F32),
                                                       np.zeros(1, F32), None, True),
        "dequantize": lambda: fastopt.dequantize(torch.ones(10, dtype=torch.int8), 0.5, 0,
                                                 out=out),
        "prune_magnitude": lambda: fastopt.prune_magnitude([x], 0.5, out=[out]),
        "newton_apply": lambda: _cpu.newton_apply(out, torch.ones(2, 3, dtype=torch.float64),
                                                  None, 1.0),
    }[call]
    name = {"quantize_affine": "q", "dequantize": "out", "prune_magnitude": "out",
            "newton_apply": "params"}[call]
    with pytest.raises(ValueError, match=rf"^{name}(\[0\])?: is an inference tensor"):
        run()
    assert not out.any()
    with torch.inference_mode():  # where torch writes them too
        run()
    assert out.any()


def test_a_users_tensor_subclass_on_the_cpu_is_a_host_array(rng):
    # A user's subclass (defined outside torch) is a CPU tensor to the public API, not "a
    # CUDA array" (torch.Tensor has a __cuda_array_interface__ property).
    def tagged(a):
        return torch.from_numpy(a.copy()).as_subclass(Tagged)

    grads = [rng.standard_normal(7).astype(F32) + 3 for _ in range(2)]
    assert fastopt.clip_grad_norm_([tagged(g) for g in grads], 1.0) == pytest.approx(
        fastopt.clip_grad_norm_([g.copy() for g in grads], 1.0), rel=1e-12)
    p = rng.standard_normal((4, 6)).astype(F32)
    g = rng.standard_normal((4, 6)).astype(F32)
    mine, plain = tagged(p), p.copy()
    fastopt.Adafactor([mine]).step([tagged(g)])
    fastopt.Adafactor([plain]).step([g])
    np.testing.assert_array_equal(mine.as_subclass(torch.Tensor).numpy(), plain)
    mask = fastopt.prune_magnitude([tagged(p)], 0.5)[0]
    np.testing.assert_array_equal(np.asarray(mask), fastopt.prune_magnitude([p], 0.5)[0])


def test_the_array_adapter_says_why_a_tensor_has_no_numpy_view():
    # It said "torch.float32 tensor is not supported on the CPU (float32 or float64)" for
    # a negative view of a float32 tensor.
    x = torch.ones(8)._neg_view()
    q = torch.zeros(8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"^x: is a negative view; call \.resolve_neg\(\) first$"):
        _cpu.quantize_affine(x, q, np.ones(1, F32), np.zeros(1, F32), None, True)
    assert not q.any()


def test_the_array_adapter_views_bfloat16_tensors_bits():
    """A bfloat16 tensor is read as an ml_dtypes.bfloat16 view of its memory (it had no
    NumPy view), so the array classes take bfloat16 params as the steps do."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = torch.linspace(-1, 1, 8, dtype=torch.bfloat16)
    q = torch.zeros(8, dtype=torch.int8)
    _cpu.quantize_affine(x, q, np.full(1, 0.1, F32), np.zeros(1, F32), None, True)
    assert torch.equal(q, torch.round(x.float() / 0.1).to(torch.int8))
    p = torch.randn(40, dtype=torch.bfloat16)
    grads = [torch.randn(40, dtype=torch.bfloat16) for _ in range(3)]
    for options in ({}, {"stochastic_rounding": True, "seed": 1}, {"master_weights": True}):
        mine, ref = p.clone(), p.clone()
        opt = fastopt.AdamW([mine], lr=1e-2, **options)
        ref_opt = fastopt.AdamW([ref.view(torch.int16).numpy().view(ml_dtypes.bfloat16)],
                                lr=1e-2, **options)
        for g in grads:
            opt.step([g])
            ref_opt.step([g.view(torch.int16).numpy().view(ml_dtypes.bfloat16)])
        assert torch.equal(mine.view(torch.int16), ref.view(torch.int16)), options
        assert not torch.equal(mine, p)


def test_set_array_adapter_refuses_what_is_not_callable():
    with pytest.raises(TypeError, match=r"^adapter: expected a callable, got int$"):
        _cpu.set_array_adapter(5)
    q = np.zeros(4, np.int8)  # the adapter set before is kept
    _cpu.quantize_affine(torch.ones(4), q, np.ones(1, F32), np.zeros(1, F32), None, True)
    assert (q == 1).all()
