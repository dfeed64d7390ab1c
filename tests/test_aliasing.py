"""Aliasing between the kernel calls of one step, and aliasing hidden by a copy.

One kernel call refuses arrays it writes that share memory with any other of its arrays.
A step may be several calls (8-bit state beside float32 state; fastopt.torch buckets of
other step counts, masks or master copies), and the calls do not run in the params' order:
they are checked apart as one call's arrays are. Grads or state of other strides than their
param's are copied for the call, and Adafactor steps a param that is not in C order through
a copy: the copies must not hide an alias either. Each case raises ValueError naming both
arrays and changes nothing; ``max_grad_norm`` refuses grads sharing memory, as
``clip_grad_norm_`` does. ``_cpu.first_overlap``, the check itself, is tested at the end.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import fastopt
from fastopt import _ext

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")

N8 = 4096  # the smallest tensor keeping 8-bit state (STATE8_MIN_ELEMENTS)


def snapshot(opt, params):
    """Everything a refused step must leave as it was: params, grads, state."""
    return [p.detach().clone() for p in params], [
        None if p.grad is None else p.grad.clone() for p in params
    ], copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, params, before):
    values, grads, state = before
    for p, v, g in zip(params, values, grads):
        assert torch.equal(p.detach(), v)
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    after = opt.state_dict()
    for k, entry in state["state"].items():
        for key, value in entry.items():
            got = after["state"][k][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


def refused(opt, params, match):
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, params, before)


def either(a, b):
    """The message naming a and b (regexes) in either order: which comes first follows
    the addresses."""
    return f"({a} overlaps .*{b}|{b} overlaps .*{a}) in memory"


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


GEN = torch.Generator().manual_seed(7)


# ---- fastopt.torch: buckets of one group ----------------------------------------------------

def test_grad_aliasing_a_param_of_another_step_count_bucket():
    # B missed the first step: it and C are stepped in two calls from then on
    A, B, C = (torch.nn.Parameter(randn(5)) for _ in range(3))
    opt = ft.Adam([A, B, C], lr=0.1)
    A.grad, C.grad = randn(5), randn(5)
    opt.step()
    A.grad, B.grad = randn(5), randn(5)
    C.grad = B.detach()
    refused(opt, [A, B, C], either(r"param_groups\[0\]\['params'\]\[2\] \(grads\)",
                                   r"param_groups\[0\]\['params'\]\[1\]"))


def test_grad_aliasing_a_param_of_a_masked_bucket():
    A, B, C = (torch.nn.Parameter(randn(5)) for _ in range(3))
    opt = ft.AdamW([A, B, C], lr=0.1)
    opt.set_masks({A: torch.ones(5, dtype=torch.bool), C: torch.ones(5, dtype=torch.bool)})
    for p in (A, B):
        p.grad = randn(5)
    C.grad = B.detach()
    refused(opt, [A, B, C], either(r"\['params'\]\[2\] \(grads\)", r"\['params'\]\[1\]"))


def test_grad_aliasing_a_param_with_8bit_state():
    X, Big, S = (torch.nn.Parameter(randn(n)) for n in (8, N8, 8))
    opt = ft.AdamW([X, Big, S], lr=0.1, state_dtype="int8")
    X.grad, Big.grad, S.grad = randn(8), randn(N8), randn(8)
    opt.step()
    X.grad, Big.grad = randn(8), randn(N8)
    S.grad = Big.detach()[:8]
    refused(opt, [X, Big, S], either(r"\['params'\]\[2\] \(grads\)", r"\['params'\]\[1\]"))


def test_overlapping_params_in_8bit_and_float_buckets():
    w = randn(N8)
    X, P, Q = torch.nn.Parameter(randn(8)), torch.nn.Parameter(w), torch.nn.Parameter(w[:8])
    opt = ft.AdamW([X, P, Q], lr=0.1, state_dtype="int8")
    for p in (X, P, Q):
        p.grad = randn(*p.shape)
    refused(opt, [X, P, Q], r"overlaps .* in memory")


# ---- fastopt.torch: copies that would hide an alias ----------------------------------------

@pytest.mark.parametrize("name", ["SGD", "AdamW", "Adagrad"])
def test_transposed_grad_aliasing_another_param_at_a_later_step(name):
    # step 1 builds the buckets; the alias comes at step 2 (no rebuild): the kernel refuses
    # the transposed grad and the step retries with a copy, which must not hide the alias
    A, B = torch.nn.Parameter(randn(4, 4)), torch.nn.Parameter(randn(4, 4))
    opt = getattr(ft, name)([A, B], lr=0.1)
    A.grad, B.grad = randn(4, 4), randn(4, 4)
    opt.step()
    A.grad, B.grad = randn(4, 4), A.detach().t()
    refused(opt, [A, B], either(r"\['params'\]\[1\] \(grads\)", r"\['params'\]\[0\]"))


def test_state_of_other_strides_shared_with_another_param():
    A, B = torch.nn.Parameter(randn(4, 4)), torch.nn.Parameter(randn(4, 4))
    opt = ft.AdamW([A, B], lr=0.1)
    A.grad, B.grad = randn(4, 4), randn(4, 4)
    opt.step()
    opt.state[A]["exp_avg"] = opt.state[B]["exp_avg"].t()
    refused(opt, [A, B], either(r"\[0\] \(exp_avgs\)", r"\[1\] \(exp_avgs\)"))


def test_step_count_shared_by_two_params():
    A, B = torch.nn.Parameter(randn(5)), torch.nn.Parameter(randn(5))
    ref = torch.optim.AdamW([A, B], lr=0.1)
    A.grad, B.grad = randn(5), randn(5)
    ref.step()
    saved = ref.state_dict()
    saved["state"][1]["step"] = saved["state"][0]["step"]
    opt = ft.AdamW([A, B], lr=0.1)
    opt.load_state_dict(saved)
    A.grad, B.grad = randn(5), randn(5)
    refused(opt, [A, B], either(r"\['params'\]\[1\] \(step\)", r"\['params'\]\[0\] \(step\)"))


def test_adafactor_param_stepped_through_a_copy_aliased_by_a_grad():
    w = randn(4, 4)
    A, B = torch.nn.Parameter(w.t()), torch.nn.Parameter(randn(4, 4))  # A is not in C order
    opt = ft.Adafactor([A, B], lr=0.01)
    A.grad, B.grad = randn(4, 4), w
    refused(opt, [A, B], either(r"\['params'\]\[1\]\.grad", r"\['params'\]\[0\]"))


def test_adafactor_transposed_grad_aliasing_another_param():
    A, B = torch.nn.Parameter(randn(4, 4)), torch.nn.Parameter(randn(4, 4))
    opt = ft.Adafactor([A, B], lr=0.01)
    A.grad, B.grad = randn(4, 4), A.detach().t()
    refused(opt, [A, B], either(r"\['params'\]\[1\]\.grad", r"\['params'\]\[0\]"))


# ---- max_grad_norm: grads sharing memory --------------------------------------------------

def test_torch_max_grad_norm_refuses_a_shared_grad():
    A, B = torch.nn.Parameter(randn(5)), torch.nn.Parameter(randn(5))
    opt = ft.SGD([A, B], lr=0.1)
    opt.max_grad_norm = 1.0
    A.grad = B.grad = randn(5) * 10
    refused(opt, [A, B], r"\['params'\]\[1\]\.grad overlaps .*\['params'\]\[0\]\.grad in "
                         r"memory; max_grad_norm clips as clip_grad_norm_")


@pytest.mark.parametrize("how", ["functional", "class"])
def test_max_grad_norm_refuses_overlapping_grads(how):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(5).astype(np.float32) for _ in range(2)]
    g = (rng.standard_normal(8) * 10).astype(np.float32)
    grads = [g[:5], g[3:]]
    before = [p.copy() for p in params] + [g.copy()]
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps grads\[0\] in memory; max_grad"):
        if how == "functional":
            fastopt.sgd_(params, grads, lr=1.0, max_grad_norm=1.0)
        else:
            fastopt.SGD(params, lr=1.0).step(grads, max_grad_norm=1.0)
    for a, b in zip(params + [g], before):
        np.testing.assert_array_equal(a, b)


# ---- array classes: the 8-bit call and the float32 call ----------------------------------

def test_array_class_grad_aliasing_a_param_of_the_other_call():
    rng = np.random.default_rng(4)
    small, big = (rng.standard_normal(n).astype(np.float32) for n in (8, N8))
    opt = fastopt.AdamW([small, big], lr=0.1, state_dtype="int8")
    opt.step([rng.standard_normal(8).astype(np.float32), rng.standard_normal(N8).astype(np.float32)])
    state = copy.deepcopy(opt.state_dict())
    values = [small.copy(), big.copy()]
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps params\[1\] in memory"):
        opt.step([big[:8], rng.standard_normal(N8).astype(np.float32)])
    np.testing.assert_array_equal(small, values[0])
    np.testing.assert_array_equal(big, values[1])
    assert opt.step_count == 1
    for name, arrays in opt.state_dict()["state"].items():
        for a, b in zip(arrays, state["state"][name]):
            np.testing.assert_array_equal(a, b)


def test_array_class_block_maxima_aliasing_float_state():
    rng = np.random.default_rng(5)
    opt = fastopt.AdamW([np.ones(16, np.float32), np.ones(N8, np.float32)], lr=0.1,
                        state_dtype="int8")
    grads = lambda: [rng.standard_normal(16).astype(np.float32),  # noqa: E731
                     rng.standard_normal(N8).astype(np.float32)]
    opt.step(grads())
    opt.absmax["exp_avgs"][1] = opt.state["exp_avgs"][0]
    with pytest.raises(ValueError, match=r"overlaps .* in memory"):
        opt.step(grads())


# ---- the check ------------------------------------------------------------------------------

class CudaLike:
    """An array exposing only __cuda_array_interface__ (CuPy's, Numba's), at a fake address."""

    def __init__(self, ptr, shape, typestr="<f4", strides=None):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape,
                                         "typestr": typestr, "strides": strides, "version": 3}


class DLPackOnly:
    """An array exposing only DLPack (a JAX-like producer)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, *args, **kwargs):
        return self.a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class Sub(torch.nn.Parameter):
    """A Parameter subclass: described through its attributes, not torch's exchange table."""


def test_spans_of_subclass_tensors_and_dlpack_arrays():
    first = _ext._cpu.first_overlap
    w = np.zeros(10, np.float32)
    assert first([DLPackOnly(w[:5]), w[5:]], [True, True]) is None
    assert first([DLPackOnly(w[:5]), w[4:]], [True, False]) == (0, 1)
    assert first([DLPackOnly(w[3:3]), w], [True, True]) is None

    class Refusing:
        def __dlpack__(self, *args, **kwargs):
            raise BufferError("cannot export")

    with pytest.raises(TypeError, match=r"^grads\[1\]: its __dlpack__\(\) refused: "
                                        r"BufferError: cannot export"):
        fastopt._arrays.check_apart([("grads", [w, Refusing()], False)])
    t = torch.zeros(4, 4)
    a, b = Sub(t[:2]), Sub(t[2:])  # two halves: apart
    assert first([a, b], [True, True]) is None
    assert first([a, Sub(t[1:3])], [True, False]) == (0, 1)
    # a group of subclass params steps (the spans once had garbage sizes: refused)
    params = [Sub(torch.randn(4)) for _ in range(3)]
    opt = ft.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.randn(4)
    opt.step()
    params[2].grad = params[1].detach()
    with pytest.raises(ValueError, match=either(r"\[2\] \(grads\)", r"\[1\]")):
        opt.step()


def test_first_overlap():
    first = _ext._cpu.first_overlap
    w = np.zeros(10, np.float32)
    assert first([w[:5], w[5:]], [True, True]) is None
    assert first([w[:5], w[4:]], [True, False]) == (0, 1)
    assert first([w[:5], w[4:]], [False, False]) is None  # reads may alias
    assert first([w[::-1], w[9:]], [True, False]) == (0, 1)  # negative strides
    assert first([w[::-1], np.zeros(3)], [True, False]) is None
    assert first([w[3:3], w], [True, True]) is None  # zero-size: no memory
    t = torch.zeros(4, 4)
    assert first([t, t.t()[0]], [False, True]) == (0, 1)
    assert first([t[:2], t[2:]], [True, True]) is None
    assert first([np.zeros(2), t[1], w, t[1:3, 1]], [True, True, True, True]) == (1, 3)
    base = 1 << 40
    assert first([CudaLike(base, (4,)), CudaLike(base + 16, (4,))], [True, True]) is None
    assert first([CudaLike(base, (4,)), CudaLike(base + 12, (2,), "<f8")], [True, False]) == (0, 1)
    assert first([CudaLike(base, (2, 4), strides=(4, 8)), CudaLike(base + 28, (1,))],
                 [True, True]) == (0, 1)
    # known=: spans described once (memory_spans), numbered after the arrays
    kept = [w[:4], w[6:], t]
    known = _ext._cpu.memory_spans(kept, [True, True, False])
    assert first([], [], known) is None
    assert first([w[4:6]], [False], known) is None
    assert first([w[3:5]], [False], known) == (0, 1)
    assert first([np.zeros(3), t[1]], [False, True], known) == (1, 4)
    assert first([np.zeros(3), t[1]], [False, False], known) is None
    assert first([], [], _ext._cpu.memory_spans([w, w[2:]], [True, False])) == (0, 1)
    for bad, error in ((b"x" * 31, ValueError), ("spans", TypeError), (known[32:] + known[:32],
                                                                       ValueError)):
        with pytest.raises(error, match=r"^known: "):
            first([w], [False], bad)
    with pytest.raises(TypeError, match=r"arrays\[0\]: expected an array, got int"):
        first([1], [True])
    with pytest.raises(ValueError, match="written: expected one bool per array"):
        first([w], [])
    with pytest.raises(TypeError, match=r"^written\[0\]: expected a bool, got int"):
        first([w], [1])
    with pytest.raises(TypeError, match=r"^arrays: expected a list, got tuple"):
        first((w,), [True])
    with pytest.raises(TypeError, match=r"^written: expected a list, got NoneType"):
        first([w], None)
    for bad in ({"shape": (4,)}, {"shape": (4,), "typestr": "<f", "data": (base, False)},
                {"shape": (4,), "typestr": "<f4", "data": (base, False), "strides": (4, 4)}):
        odd = CudaLike(base, (4,))
        odd.__cuda_array_interface__ = bad
        with pytest.raises(TypeError, match=r"^arrays\[1\]: its __cuda_array_interface__ is"):
            first([w, odd], [True, True])


def test_what_the_check_cannot_describe_is_named_as_the_caller_knows_it():
    rng = np.random.default_rng(6)
    opt = fastopt.AdamW([rng.standard_normal(n).astype(np.float32) for n in (8, N8)], lr=0.1,
                        state_dtype="int8")
    with pytest.raises(TypeError, match=r"^grads\[1\]: expected an array, got str"):
        opt.step([rng.standard_normal(8).astype(np.float32), "abc"])
    params = [rng.standard_normal(5).astype(np.float32) for _ in range(2)]
    with pytest.raises(TypeError, match=r"^grads\[1\]: expected an array, got str"):
        fastopt.sgd_(params, [params[0].copy(), "abc"], lr=0.1, max_grad_norm=1.0)
    # fastopt.torch, a group of two buckets (masks on one), a sparse grad at a later step
    A, B = torch.nn.Parameter(randn(5)), torch.nn.Parameter(randn(5))
    topt = ft.AdamW([A, B], lr=0.1)
    topt.set_masks({A: torch.ones(5, dtype=torch.bool)})
    A.grad, B.grad = randn(5), randn(5)
    topt.step()
    B.grad = randn(5).to_sparse()
    with pytest.raises(TypeError, match=r"^param_groups\[0\]\['params'\]\[1\] \(grads\): "
                                        r"torch.sparse_coo"):
        topt.step()
