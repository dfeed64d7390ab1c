"""Regressions found in review: each of these once crashed or returned garbage."""
import threading
import time

import numpy as np
import pytest

import fastopt


def test_big_endian_input_is_rejected_not_misread():
    x = np.linspace(-1, 1, 8).astype(">f4")
    for call in (lambda: fastopt.quantize_per_tensor(x, 0.01, 0),
                 lambda: fastopt.quantize_per_channel(x.reshape(1, 8), [0.01], [0], 0),
                 lambda: fastopt.choose_qparams(x),
                 lambda: fastopt.quantize_blockwise(x)):
        with pytest.raises(TypeError, match="native byte order"):
            call()
    with pytest.raises(TypeError, match="absmax"):
        fastopt.dequantize_blockwise(np.zeros(8, np.int8), np.ones(1, ">f4"))


@pytest.mark.parametrize("block", [2**62, 2**63 - 1])
def test_huge_block_size_is_one_block(block):
    x = np.linspace(-1, 1, 10).astype(np.float32)
    q, absmax = fastopt.quantize_blockwise(x, block)
    want_q, want_absmax = fastopt.reference.quantize_blockwise(x, 10)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(absmax, want_absmax)
    np.testing.assert_array_equal(fastopt.dequantize_blockwise(q, absmax, block),
                                  fastopt.reference.dequantize_blockwise(q, absmax, 10))


def test_absurd_thread_count_is_a_value_error():
    with pytest.raises(ValueError, match="threads"):
        fastopt.set_num_threads(2**31 - 1)
    assert fastopt.get_num_threads() >= 1


def _misaligned(n, dtype):
    raw = np.zeros(n * np.dtype(dtype).itemsize + 1, np.uint8)
    a = raw[1:].view(dtype)
    a[...] = np.arange(n) + 1
    assert not a.flags.aligned
    return a


def test_misaligned_arrays_are_rejected_by_quant_and_newton():
    x = _misaligned(16, np.float32)
    with pytest.raises(ValueError, match="aligned"):
        fastopt.quantize_blockwise(x)
    with pytest.raises(ValueError, match="aligned"):
        fastopt.quantize_per_tensor(x, 0.1, 0)
    g = _misaligned(4, np.float64).reshape(1, 4)
    with pytest.raises(ValueError, match="aligned"):
        fastopt.cholesky_solve(np.eye(4)[None], g)


def test_arrays_stay_alive_while_the_kernel_runs_without_the_gil():
    """Another thread empties the caller's lists mid-step: the step must still finish on
    arrays it holds (it used to write into freed memory)."""
    n = 1 << 25
    params, grads = [np.ones(n, np.float32)], [np.ones(n, np.float32)]
    keep = params[0]
    old = fastopt.get_num_threads()
    fastopt.set_num_threads(1)
    try:
        worker = threading.Thread(target=lambda: fastopt.sgd_(params, grads, lr=0.25))
        worker.start()
        time.sleep(0.01)  # usually mid-step: the kernel takes ~50 ms on one thread
        params.clear()
        grads.clear()
        worker.join()
    finally:
        fastopt.set_num_threads(old)
    # the whole step landed in the held array (or, if the lists were emptied before the
    # call began, nothing ran); never a crash or a partial update
    assert np.all(keep == np.float32(0.75)) or np.all(keep == np.float32(1.0))
