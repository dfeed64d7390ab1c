"""What only the CUDA batched damped Newton path has (``fastopt.newton_`` and
``fastopt.cholesky_solve`` on CuPy arrays and PyTorch CUDA tensors). Everything that is the
same computation on another backend -- the CPU's bits for n <= 64, numpy.linalg.solve's
values beyond, failing systems, what is read and written, zero batches, bad arrays, the
logistic regressions -- has one test body run on every backend, in test_newton.py.

* ``stream=`` and the library's current stream: inputs written late on a side stream are
  seen, the wait for the solved flags and the mask's conversion happen on that stream.
* Host arrays among CUDA ones, and bad streams, raise naming the argument and write nothing.

Every GPU test takes the ``lib`` fixture: it marks the test ``cuda`` and skips it where
CUDA is not usable or the library is missing. The tests at the end need no GPU.
"""
from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest

import fastopt

from backends import CudaBackend, assert_bits
from cuda_libs import FakeCudaArray, lib_fixture
from newton_cases import bad_input_arrays, system

NPD = fastopt.NotPositiveDefiniteError

lib = lib_fixture(scope="session")  # the adapters are in cuda_libs.py


# ---- streams ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [16, 100])
@pytest.mark.parametrize("call", ["newton_ raise", "newton_ skip", "cholesky_solve"])
@pytest.mark.parametrize("how", ["stream=", "current stream"])
def test_runs_on_the_given_stream(lib, how, call, n, rng):
    """The inputs are written on a side stream behind ~0.1 s of work, then the call runs on
    that stream, named by ``stream=`` or made the library's current stream. A kernel -- or a
    wait for the solved flags, or the mask's conversion -- on any other stream would see the
    stale data written before. Every result is compared with the same call on synchronized
    inputs; systems that fail must be named exactly."""
    batch, dtype, bad = 64, np.float64, 3
    H, g, p = system(rng, (batch,), n, dtype)
    H_bad = H.copy()
    H_bad[bad] -= 5 * np.eye(n)
    stale = system(rng, (batch,), n, dtype)  # other valid systems

    # Expected results: the GPU on synchronized inputs (the CPU's bits for n <= 64).
    Hd0, gd0 = lib.to_device(H), lib.to_device(g)
    want_d = lib.to_host(fastopt.cholesky_solve(Hd0, gd0))
    pd0 = lib.to_device(p)
    fastopt.newton_(pd0, gd0, Hd0, lr=0.7)
    want_p = lib.to_host(pd0)
    pd0 = lib.to_device(p)
    want_mask = lib.to_host(fastopt.newton_(pd0, gd0, lib.to_device(H_bad), lr=0.7,
                                            on_failure="skip"))
    want_p_skip = lib.to_host(pd0)
    assert int((~want_mask).sum()) == 1 and not want_mask[bad]

    Hd, gd, pd = (lib.to_device(a) for a in stale)
    H_src, H_bad_src, g_src, p_src = (lib.to_device(a) for a in (H, H_bad, g, p))
    lib.synchronize()
    stream = lib.side_stream()
    kwargs = {"stream": stream} if how == "stream=" else {}
    scope = (lambda: lib.current(stream)) if how == "current stream" else contextlib.nullcontext

    def write_late(hessians_src):
        lib.write_late(stream, [(Hd, hessians_src), (gd, g_src), (pd, p_src)])

    if call == "newton_ raise":
        write_late(H_src)
        with scope():
            assert fastopt.newton_(pd, gd, Hd, lr=0.7, **kwargs) is None  # waits for its stream
        stream.synchronize()
        assert_bits(lib.to_host(pd), want_p, "params")
        write_late(H_bad_src)
        with scope():
            with pytest.raises(NPD, match="1 of 64") as info:
                fastopt.newton_(pd, gd, Hd, lr=0.7, **kwargs)
        assert info.value.indices == [(bad,)]
        stream.synchronize()
        assert_bits(lib.to_host(pd), p, "params after the error")
    elif call == "newton_ skip":
        write_late(H_bad_src)
        with scope():
            mask = fastopt.newton_(pd, gd, Hd, lr=0.7, on_failure="skip", **kwargs)  # no wait
        stream.synchronize()
        lib.assert_result(mask, pd, "bool", (batch,))
        assert_bits(lib.to_host(mask), want_mask, "mask")
        assert_bits(lib.to_host(pd), want_p_skip, "params")
    else:
        write_late(H_src)
        with scope():
            d = fastopt.cholesky_solve(Hd, gd, **kwargs)  # waits for its stream
        stream.synchronize()
        lib.assert_result(d, gd, "float64", (batch, n))
        assert_bits(lib.to_host(d), want_d, "d")
        write_late(H_bad_src)
        with scope():
            with pytest.raises(NPD, match="1 of 64") as info:
                fastopt.cholesky_solve(Hd, gd, **kwargs)
        assert info.value.indices == [(bad,)]
        stream.synchronize()
    assert_bits(lib.to_host(gd), g, "grads")


# ---- bad input ----------------------------------------------------------------------------

newton_, chol = fastopt.newton_, fastopt.cholesky_solve

# The GPU's own cases (the rest, on every backend, are test_newton's BAD_INPUTS): host arrays
# among CUDA ones, and bad streams.
# (id, call(arrays), exception, regex the message must match)
BAD_INPUTS = [
    # host arrays mixed in
    ("host grads", lambda a: newton_(a.p, a.g_host, a.H), TypeError, "^grads: "),
    ("host hessians", lambda a: newton_(a.p, a.g, a.H_host), TypeError, "^hessians: "),
    ("host params and grads", lambda a: newton_(a.p_host, a.g_host, a.H), TypeError,
     "^hessians: is a CUDA array"),
    ("host params and hessians", lambda a: newton_(a.p_host, a.g, a.H_host), TypeError,
     "^grads: is a CUDA array"),
    ("cholesky_solve host grads", lambda a: chol(a.H, a.g_host), TypeError, "^grads: "),
    ("cholesky_solve host hessians", lambda a: chol(a.H_host, a.g), TypeError,
     "^grads: is a CUDA array"),
    # streams
    ("stream str", lambda a: newton_(a.p, a.g, a.H, stream="0"), TypeError, "^stream: "),
    ("stream negative", lambda a: newton_(a.p, a.g, a.H, stream=-1), ValueError, "^stream: "),
    ("cholesky_solve stream negative", lambda a: chol(a.H, a.g, stream=-1), ValueError,
     "^stream: "),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_changes_nothing(lib, call, exc, match, rng):
    arrays = bad_input_arrays(CudaBackend(lib), rng)
    before = {k: lib.to_host(v) for k, v in vars(arrays).items()}
    with pytest.raises(exc, match=match):
        call(arrays)
    lib.synchronize()  # anything queued before the error has landed
    for k, v in vars(arrays).items():
        assert_bits(lib.to_host(v), before[k], f"{k} was modified")


# ---- without a GPU ------------------------------------------------------------------------

_H, _G, _P = system(np.random.default_rng(11), (4,), 6, np.float32)

# name: (call(fake CUDA array), the argument the error names)
FAKE_CALLS = {
    "newton_ params": (lambda f, p: fastopt.newton_(f, _G, _H), "params"),
    "newton_ grads": (lambda f, p: fastopt.newton_(p, f, _H), "grads"),
    "newton_ hessians": (lambda f, p: fastopt.newton_(p, _G, f), "hessians"),
    "cholesky_solve hessians": (lambda f, p: fastopt.cholesky_solve(f, _G), "hessians"),
    "cholesky_solve grads": (lambda f, p: fastopt.cholesky_solve(_H, f), "grads"),
}


@pytest.mark.skipif(fastopt.cuda_available(), reason="checks the refusal when CUDA is not usable")
@pytest.mark.parametrize("func", list(FAKE_CALLS))
def test_cuda_input_without_usable_cuda_raises_type_error(func):
    call, name = FAKE_CALLS[func]
    p = _P.copy()
    with pytest.raises(TypeError, match=f"^{name}: is a CUDA array, but CUDA is not usable"):
        call(FakeCudaArray(), p)
    assert_bits(p, _P, "params were modified")


# name: (call(stream, params), the argument the error names)
HOST_STREAM_CALLS = {
    "newton_": (lambda s, p: fastopt.newton_(p, _G, _H, stream=s), "params"),
    "newton_ skip": (lambda s, p: fastopt.newton_(p, _G, _H, on_failure="skip", stream=s),
                     "params"),
    "cholesky_solve": (lambda s, p: fastopt.cholesky_solve(_H, _G, stream=s), "hessians"),
}


@pytest.mark.parametrize("stream", [0, types.SimpleNamespace(cuda_stream=0)],
                         ids=["int", "stream object"])
@pytest.mark.parametrize("func", list(HOST_STREAM_CALLS))
def test_stream_with_host_input_is_rejected(func, stream):
    call, name = HOST_STREAM_CALLS[func]
    p = _P.copy()
    with pytest.raises(ValueError,
                       match=f"^stream: only applies to CUDA arrays; {name} is a host array"):
        call(stream, p)
    assert_bits(p, _P, "params were modified")
