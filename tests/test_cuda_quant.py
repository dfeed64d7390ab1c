"""What only the CUDA quantization path has (``fastopt.quant`` on CuPy arrays and PyTorch
CUDA tensors). Everything that is the same computation on another backend -- exactness
against the reference and the CPU, results and ``out=``, zero blocks, non-finite input,
``check_finite=False``, stochastic rounding, ``choose_qparams``, bad arrays -- has one test
body run on every backend, in test_quant_affine/blockwise/outputs/checks.py.

* ``stream=`` and the library's current stream.
* The wait for the non-finite report (and the observer's results) lets other Python
  threads run (the GIL is released for the device-to-host copy and the wait).
* Host arrays among CUDA ones, and bad streams, raise naming the argument and write nothing.

Every GPU test takes the ``lib`` fixture: it marks the test ``cuda`` and skips it where
CUDA is not usable or the library is missing. The tests at the end need no GPU.
"""
from __future__ import annotations

import contextlib
import threading
import time
import types
from typing import Any

import numpy as np
import pytest

import fastopt

from backends import CudaBackend, assert_bits
from cuda_libs import FakeCudaArray, lib_fixture
from quant_cases import F32, bad_input_arrays, fresh, poisoned

qpt, qpc, deq = fastopt.quantize_per_tensor, fastopt.quantize_per_channel, fastopt.dequantize
qbw, dqbw = fastopt.quantize_blockwise, fastopt.dequantize_blockwise

lib = lib_fixture(scope="session")  # the adapters are in cuda_libs.py


def assert_same(lib, got: Any, cpu: Any, what: str = "") -> None:
    """Device result ``got`` has the bits of the CPU's result."""
    assert_bits(lib.to_host(got), np.asarray(cpu), f"{what} (GPU vs CPU)")


# ---- streams ------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stream=", "current stream"])
def test_runs_on_the_given_stream(lib, how, rng):
    """The input is written on a side stream behind ~0.1 s of work, then quantized (and
    dequantized) on that stream, named by ``stream=`` or made the library's current
    stream. A kernel on any other stream would read the stale data written before."""
    n, block = 1 << 20, 64
    x = fresh(rng, (n,), F32)
    want_q, want_absmax = qbw(x, block)
    want_d = dqbw(want_q, want_absmax, block)
    xd, x_src = lib.to_device(fresh(rng, (n,), F32)), lib.to_device(x)
    qd, q_src = lib.to_device(np.zeros(n, np.int8)), lib.to_device(want_q)
    ad, a_src = lib.to_device(np.zeros_like(want_absmax)), lib.to_device(want_absmax)
    lib.synchronize()
    stream = lib.side_stream()
    kwargs = {"stream": stream} if how == "stream=" else {}
    scope = (lambda: lib.current(stream)) if how == "current stream" else contextlib.nullcontext

    lib.write_late(stream, [(xd, x_src)])
    with scope():
        q, absmax = qbw(xd, block, **kwargs)  # waits for its stream
    assert_same(lib, absmax, want_absmax, what="absmax")
    assert_same(lib, q, want_q, what="q")

    lib.write_late(stream, [(qd, q_src), (ad, a_src)])
    with scope():
        d = dqbw(qd, ad, block, **kwargs)  # does not wait
    stream.synchronize()
    assert_same(lib, d, want_d, what="dequantized")


# ---- bad input ----------------------------------------------------------------------------

_S6, _Z6 = np.full(6, 0.05, np.float32), np.zeros(6, np.int64)

# The GPU's own cases (the rest, on every backend, are test_quant_checks' BAD_INPUTS): host
# arrays among CUDA ones, and bad streams.
# (id, call(arrays, lib), exception, regex the message must match)
BAD_INPUTS = [
    # absmax and per-channel parameters
    ("absmax on the host", lambda a, lib: dqbw(a.q8, a.am_host, 7, out=a.d_out), TypeError,
     "^absmax: "),
    # out on the host
    ("per_tensor host out", lambda a, lib: qpt(a.x, 0.1, 0, out=a.q_host_out), TypeError,
     "^out: "),
    ("per_channel host out", lambda a, lib: qpc(a.x, _S6, _Z6, 1, out=a.q_host_out),
     TypeError, "^out: "),
    ("blockwise host out[0]", lambda a, lib: qbw(a.x, 7, out=(a.q_host_out, a.am_out)),
     TypeError, r"^out\[0\]: "),
    ("blockwise host out[1]", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_host_out)),
     TypeError, r"^out\[1\]: "),
    ("dequantize host out", lambda a, lib: deq(a.q8, 0.1, 0, out=a.d_host_out), TypeError,
     "^out: "),
    ("dequantize_blockwise host out", lambda a, lib: dqbw(a.q8, a.am, 7, out=a.d_host_out),
     TypeError, "^out: "),
    # streams
    ("stream str", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_out), stream="0"), TypeError,
     "^stream: "),
    ("stream negative", lambda a, lib: qbw(a.x, 7, out=(a.q_out, a.am_out), stream=-1),
     ValueError, "^stream: "),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_writes_nothing(lib, call, exc, match, rng):
    arrays = bad_input_arrays(CudaBackend(lib), rng)
    before = {k: lib.to_host(v) for k, v in vars(arrays).items()}
    with pytest.raises(exc, match=match):
        call(arrays, lib)
    lib.synchronize()  # anything queued before the error has landed
    for k, v in vars(arrays).items():
        assert_bits(lib.to_host(v), before[k], f"{k} was modified")


WAITING_CALLS = {
    "quantize_per_tensor": lambda x: qpt(x, 0.1, 0),
    "quantize_blockwise": lambda x: qbw(x, 64),
    "choose_qparams": lambda x: fastopt.choose_qparams(x, axis=0),
}


@pytest.mark.parametrize("func", list(WAITING_CALLS))
def test_waiting_for_the_stream_releases_the_gil(lib, func, rng):
    """The non-finite report (and the observer's min/max) come back by a copy into host
    memory, which waits for the work queued on the stream: other Python threads run
    meanwhile (the copy used to run with the GIL held, stalling them for the whole wait)."""
    x = lib.to_device(fresh(rng, (64, 64), F32))
    lib.synchronize()
    done = threading.Event()

    def call():
        try:
            lib.spin()  # ~0.1 s of GPU work queued ahead on this thread's current stream
            WAITING_CALLS[func](x)
        finally:
            done.set()

    worker = threading.Thread(target=call)
    ticks = [time.perf_counter()]
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    worker.join()
    assert ticks[-1] - ticks[0] > 0.05, "the call did not wait for the spin"
    assert max(np.diff(ticks)) < 0.04, "this thread stalled while the call waited"


# ---- without a GPU ------------------------------------------------------------------------

FAKE_CALLS = {
    "quantize_per_tensor": lambda f: qpt(f, 0.1, 0),
    "quantize_per_channel": lambda f: qpc(f, _S6, _Z6, 1),
    "dequantize": lambda f: deq(f, 0.1, 0),
    "quantize_blockwise": lambda f: qbw(f, 7),
    "dequantize_blockwise": lambda f: dqbw(f, FakeCudaArray(), 7),
}


@pytest.mark.skipif(fastopt.cuda_available(), reason="checks the refusal when CUDA is not usable")
@pytest.mark.parametrize("func", list(FAKE_CALLS))
def test_cuda_input_without_usable_cuda_raises_type_error(func):
    with pytest.raises(TypeError, match="CUDA is not usable"):
        FAKE_CALLS[func](FakeCudaArray())


_X = np.random.default_rng(7).standard_normal((4, 6)).astype(np.float32)
_Q, _A = qbw(_X, 7)

# name: (call(stream, out), out templates)
HOST_STREAM_CALLS = {
    "quantize_per_tensor": (lambda s, o: qpt(_X, 0.1, 0, out=o, stream=s), [((4, 6), np.int8)]),
    "quantize_per_channel": (lambda s, o: qpc(_X, _S6, _Z6, 1, out=o, stream=s),
                             [((4, 6), np.int8)]),
    "dequantize": (lambda s, o: deq(_Q, 0.1, 0, out=o, stream=s), [((4, 6), np.float32)]),
    "quantize_blockwise": (lambda s, o: qbw(_X, 7, out=o, stream=s),
                           [((4, 6), np.int8), ((4,), np.float32)]),
    "dequantize_blockwise": (lambda s, o: dqbw(_Q, _A, 7, out=o, stream=s),
                             [((4, 6), np.float32)]),
}


@pytest.mark.parametrize("stream", [0, types.SimpleNamespace(cuda_stream=0)],
                         ids=["int", "stream object"])
@pytest.mark.parametrize("func", list(HOST_STREAM_CALLS))
def test_stream_with_host_input_is_rejected(func, stream):
    call, templates = HOST_STREAM_CALLS[func]
    outs = tuple(poisoned(s, d, 0) for s, d in templates)
    with pytest.raises(ValueError, match="^stream: only applies to CUDA arrays"):
        call(stream, outs if len(outs) > 1 else outs[0])
    for o, (s, d) in zip(outs, templates):
        assert_bits(o, poisoned(s, d, 0), "out was written despite the error")
