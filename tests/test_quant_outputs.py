"""Tests of what the int8 quantization API writes and returns: results of the input's kind
and ``out=`` filled completely (every backend: NumPy, CuPy, PyTorch CUDA; and PyTorch CPU
tensors), PyTorch tensors in and out, the streaming-store sizes with outputs at every
alignment, ``check_finite=False`` (every backend; on a GPU the CPU's bits), and sizes taken
once from the buffers the kernels use.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import reference

from backends import CPU, assert_bits, host_matching_cpu
from quant_cases import (BF16, F32, IN_DTYPES, IN_IDS, LARGE_BLOCK, OUT_DTYPES, OUT_IDS,
                         TORCH_DEPRECATION, channel_params, fresh, poisoned, ref_blockwise,
                         ref_quantize, run_with_out, shape_id, unchecked_input)

qpt, qpc, deq = fastopt.quantize_per_tensor, fastopt.quantize_per_channel, fastopt.dequantize
qbw, dqbw = fastopt.quantize_blockwise, fastopt.dequantize_blockwise

# ---- against PyTorch ----------------------------------------------------------------------

@TORCH_DEPRECATION
@pytest.mark.parametrize("tdtype", ["float32", "float16", "bfloat16"])
def test_torch_in_torch_out(tdtype, rng):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(fresh(rng, (5, 31, 67), np.float32)).to(getattr(torch, tdtype))
    if tdtype == "bfloat16":
        x = t.view(torch.int16).numpy().view(BF16)
    else:
        x = t.numpy()
    scales, zps = channel_params(rng, "int8", 31)

    q = fastopt.quantize_per_tensor(t, 0.05, 3)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.int8 and q.shape == t.shape
    assert_bits(q.numpy(), fastopt.quantize_per_tensor(x, 0.05, 3))
    qu = fastopt.quantize_per_tensor(t, 0.05, 128, "uint8")
    assert isinstance(qu, torch.Tensor) and qu.dtype == torch.uint8
    assert_bits(qu.numpy(), fastopt.quantize_per_tensor(x, 0.05, 128, "uint8"))
    d = fastopt.dequantize(q, 0.05, 3)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.float32
    assert_bits(d.numpy(), fastopt.dequantize(q.numpy(), 0.05, 3))

    qc = fastopt.quantize_per_channel(t, scales, zps, 1)
    assert isinstance(qc, torch.Tensor) and qc.dtype == torch.int8
    assert_bits(qc.numpy(), fastopt.quantize_per_channel(x, scales, zps, 1))
    dc = fastopt.dequantize(qc, scales, zps, axis=1)
    assert isinstance(dc, torch.Tensor) and dc.dtype == torch.float32
    assert_bits(dc.numpy(), fastopt.dequantize(qc.numpy(), scales, zps, axis=1))

    qb, ab = fastopt.quantize_blockwise(t, 64, rounding="stochastic", seed=9)
    assert isinstance(qb, torch.Tensor) and qb.dtype == torch.int8 and qb.shape == t.shape
    assert isinstance(ab, torch.Tensor) and ab.dtype == torch.float32
    nq, na = fastopt.quantize_blockwise(x, 64, rounding="stochastic", seed=9)
    assert_bits(qb.numpy(), nq)
    assert_bits(ab.numpy(), na)
    db = fastopt.dequantize_blockwise(qb, ab, 64)
    assert isinstance(db, torch.Tensor) and db.dtype == torch.float32
    assert_bits(db.numpy(), fastopt.dequantize_blockwise(nq, na, 64))

    s, z = fastopt.choose_qparams(t, symmetric=False)
    assert (s, z) == fastopt.choose_qparams(x, symmetric=False)
    assert type(s) is float and type(z) is int


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16"])
def test_torch_dequantize_16bit_outputs(out_dtype, rng):
    """dequantize/dequantize_blockwise of torch CPU tensors with out_dtype given as a name or
    a torch dtype return torch tensors of that dtype, with the NumPy call's bits; out= takes a
    torch tensor of that dtype too."""
    torch = pytest.importorskip("torch")
    q = rng.integers(-128, 128, (7, 4097)).astype(np.int8)
    absmax = rng.uniform(0.5, 20, -(-q.size // 64)).astype(F32)
    tq, ta = torch.from_numpy(q), torch.from_numpy(absmax)
    tdtype = getattr(torch, out_dtype)
    as_numpy = (lambda t: t.view(torch.int16).numpy().view(BF16)) if out_dtype == "bfloat16" \
        else (lambda t: t.numpy())
    for spelled in (out_dtype, tdtype):
        for got, want in (
                (fastopt.dequantize(tq, 0.0371, 3, out_dtype=spelled),
                 fastopt.dequantize(q, 0.0371, 3, out_dtype=out_dtype)),
                (fastopt.dequantize_blockwise(tq, ta, 64, out_dtype=spelled),
                 fastopt.dequantize_blockwise(q, absmax, 64, out_dtype=out_dtype))):
            assert isinstance(got, torch.Tensor) and got.dtype == tdtype
            assert_bits(as_numpy(got), want)
    out = torch.full(q.shape, float("nan"), dtype=tdtype)
    assert fastopt.dequantize(tq, 0.0371, 3, out_dtype=tdtype, out=out) is out
    assert_bits(as_numpy(out), fastopt.dequantize(q, 0.0371, 3, out_dtype=out_dtype))
    strided = torch.full(q.shape[::-1], float("nan"), dtype=tdtype).t()  # not C-contiguous
    with pytest.raises(ValueError, match="^out: must be C-contiguous"):
        fastopt.dequantize(tq, 0.0371, 3, out_dtype=out_dtype, out=strided)
    assert torch.isnan(strided).all()


@TORCH_DEPRECATION
@pytest.mark.parametrize("check_finite", [True, False])
def test_torch_cpu_tensors_as_out(check_finite, rng):
    """out= takes PyTorch CPU tensors too: the very tensors come back, holding the result."""
    torch = pytest.importorskip("torch")
    x = fresh(rng, (3, 4097), np.float32)
    t = torch.from_numpy(x)
    kw = dict(check_finite=check_finite)
    q = torch.full(x.shape, 0x5A, dtype=torch.int8)
    assert fastopt.quantize_per_tensor(t, 0.05, 3, out=q, **kw) is q
    assert_bits(q.numpy(), fastopt.quantize_per_tensor(x, 0.05, 3))
    outs = (torch.full(x.shape, 0x5A, dtype=torch.int8), torch.full((193,), np.nan))
    assert fastopt.quantize_blockwise(t, 64, seed=1, out=outs, **kw) is outs
    for got, want in zip(outs, fastopt.quantize_blockwise(x, 64, seed=1)):
        assert_bits(got.numpy(), want)
    d = torch.full(x.shape, np.nan)
    assert fastopt.dequantize_blockwise(outs[0], outs[1], 64, out=d) is d
    assert_bits(d.numpy(), fastopt.dequantize_blockwise(outs[0].numpy(), outs[1].numpy(), 64))
    assert fastopt.dequantize(q, 0.05, 3, out=d) is d
    assert_bits(d.numpy(), fastopt.dequantize(q.numpy(), 0.05, 3))


# ---- results and out= ---------------------------------------------------------------------

def test_results_are_the_inputs_kind(array_backend, rng):
    """Every function returns arrays of the input's kind (NumPy, or the CUDA library's on
    the input's device), contiguous, of the documented dtype and shape."""
    b = array_backend
    shape = (5, 31, 67)
    blocks = -(-int(np.prod(shape)) // 64)
    scales, zps = channel_params(rng, "int8", 31)
    for in_dtype in IN_DTYPES:
        if not b.holds(in_dtype):
            continue  # CuPy has no bfloat16
        x = b.asarray(fresh(rng, shape, in_dtype))
        for qdtype, zp in (("int8", 3), ("uint8", 128)):
            q = qpt(x, 0.05, zp, qdtype)
            b.assert_result(q, x, qdtype, shape)
            b.assert_result(deq(q, 0.05, zp), x, "float32", shape)
            b.assert_result(deq(q, 0.05, zp, out_dtype="float16"), x, "float16", shape)
        qc = qpc(x, scales, zps, 1)
        b.assert_result(qc, x, "int8", shape)
        b.assert_result(deq(qc, scales, zps, axis=1), x, "float32", shape)
        qb, ab = qbw(x, 64, rounding="stochastic", seed=9)
        b.assert_result(qb, x, "int8", shape)
        b.assert_result(ab, x, "float32", (blocks,))
        b.assert_result(dqbw(qb, ab, 64), x, "float32", shape)


@pytest.mark.parametrize("shape", [(4097,), (3, 37, 41)], ids=shape_id)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_out_receives_results(backend, in_dtype, shape, rng):
    """Every function writes every element of a poisoned out= (of the input's backend), the
    CPU's results, and returns that very out."""
    x = fresh(rng, shape, in_dtype)
    xd = backend.asarray(x)
    c = shape[-1]
    scales, zps = channel_params(rng, "uint8", c)
    for qdtype, zp in (("int8", -3), ("uint8", 130)):
        q = qpt(x, 0.0371, zp, qdtype)
        run_with_out(lambda o, z=zp, t=qdtype: qpt(xd, 0.0371, z, t, out=o), [q], backend)
        d = deq(q, 0.0371, zp)
        qd = backend.asarray(q)
        run_with_out(lambda o, q=qd, z=zp: deq(q, 0.0371, z, out=o), [d], backend)
    qc = qpc(x, scales, zps, -1, "uint8")
    run_with_out(lambda o: qpc(xd, scales, zps, -1, "uint8", out=o), [qc], backend)
    dc = deq(qc, scales, zps, axis=-1)
    qcd = backend.asarray(qc)
    run_with_out(lambda o: deq(qcd, scales, zps, axis=-1, out=o), [dc], backend)
    for block in (64, 7, LARGE_BLOCK, x.size + 5):
        for rounding in ("nearest", "stochastic"):
            qb, ab = qbw(x, block, rounding=rounding, seed=77)
            run_with_out(lambda o, b=block, r=rounding: qbw(xd, b, rounding=r, seed=77, out=o),
                         [qb, ab], backend)
        db = dqbw(qb, ab, block)
        qbd, abd = backend.asarray(qb), backend.asarray(ab)
        run_with_out(lambda o, b=block, q=qbd, a=abd: dqbw(q, a, b, out=o), [db], backend)
    for od in OUT_DTYPES[1:]:  # 16-bit outputs
        if not backend.holds(od):
            continue  # CuPy has no bfloat16 (test_quant_affine checks that it says so)
        d = deq(qc, scales, zps, axis=-1, out_dtype=od)
        run_with_out(lambda o, od=od: deq(qcd, scales, zps, axis=-1, out_dtype=od, out=o), [d],
                     backend)
        db = dqbw(qb, ab, block, out_dtype=od)
        run_with_out(lambda o, od=od: dqbw(qbd, abd, block, out_dtype=od, out=o), [db], backend)


# ---- streaming stores ---------------------------------------------------------------------

# Calls whose arrays exceed 32 MiB write their outputs with streaming stores, 16 bytes at a
# time where the output is 16-byte aligned and plain stores elsewhere: check those sizes
# with outputs at every alignment (element offsets into a poisoned buffer).
STREAMING_N = 9_000_011  # 36 MB of float32 in, 9 MB out


@pytest.mark.parametrize("offset", [0, 1, 4], ids=lambda k: f"offset{k}")
def test_streaming_sizes_match_reference(cpu_path, offset, rng):
    x = fresh(rng, (STREAMING_N,), F32)
    qb, ab = fastopt.quantize_blockwise(x, 256)
    want_q, want_a = ref_blockwise(x, 256, "nearest")
    assert_bits(qb, want_q, "blockwise q")
    assert_bits(ab, want_a, "blockwise absmax")
    q = fastopt.quantize_per_tensor(x, 0.0371, -3)
    assert_bits(q, ref_quantize(x, 0.0371, -3, "int8"), "per-tensor q")
    for k in (0, 1):
        buf = poisoned((STREAMING_N + offset,), F32, k)
        out = buf[offset:]
        assert fastopt.dequantize_blockwise(qb, ab, 256, out=out) is out
        assert_bits(out, reference.dequantize_blockwise(qb, ab), f"blockwise dequantize ({k})")
        assert fastopt.dequantize(q, 0.0371, -3, out=out) is out
        assert_bits(out, reference.dequantize_affine(q, 0.0371, -3), f"dequantize ({k})")
        assert_bits(buf[:offset], poisoned((offset,), F32, k), "before out")


STREAMING_N16 = 12_000_017  # 36 MB of 1-byte q in and 2-byte results out


@pytest.mark.parametrize("offset", [0, 1, 4], ids=lambda k: f"offset{k}")
@pytest.mark.parametrize("out_dtype", OUT_DTYPES[1:], ids=OUT_IDS[1:])
def test_streaming_16bit_outputs_match_reference(cpu_path, out_dtype, offset, rng):
    """Dequantizing to float16/bfloat16 past the streaming size, with outputs 16-byte aligned
    (offset 0) and not (2 and 8 bytes off)."""
    q = rng.integers(-128, 128, STREAMING_N16).astype(np.int8)
    absmax = rng.uniform(0.5, 20, -(-q.size // 256)).astype(F32)
    for k in (0, 1):
        buf = poisoned((STREAMING_N16 + offset,), out_dtype, k)
        out = buf[offset:]
        assert fastopt.dequantize_blockwise(q, absmax, 256, out_dtype=out_dtype, out=out) is out
        assert_bits(out, reference.dequantize_blockwise(q, absmax, 256, out_dtype=out_dtype),
                    f"blockwise dequantize ({k})")
        assert fastopt.dequantize(q, 0.0371, -3, out_dtype=out_dtype, out=out) is out
        assert_bits(out, reference.dequantize_affine(q, 0.0371, -3, out_dtype=out_dtype),
                    f"dequantize ({k})")
        assert_bits(buf[:offset], poisoned((offset,), out_dtype, k), "before out")


# ---- check_finite=False -------------------------------------------------------------------

def unchecked_calls(x, scales, zps, shape, seed: int = 5):
    """(name, call(out) -> result, result templates) for each quantizing function with
    check_finite=False, on ``x`` (of ``shape``, on any backend); per channel along the last
    axis."""
    n_blocks = -(-int(np.prod(shape)) // 64)
    return [
        ("per_tensor", lambda o: qpt(x, 0.0371, -3, out=o, check_finite=False),
         [(shape, np.int8)]),
        ("per_channel", lambda o: qpc(x, scales, zps, -1, "uint8", out=o, check_finite=False),
         [(shape, np.uint8)]),
        ("blockwise", lambda o: qbw(x, 64, rounding="stochastic", seed=seed, out=o,
                                    check_finite=False),
         [(shape, np.int8), ((n_blocks,), np.float32)]),
    ]


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_unchecked_equals_checked_on_finite_input(backend, in_dtype, rng):
    """check_finite=False gives the checked call's bits (on a GPU: the CPU's), returned or
    written straight into every element of out=."""
    x = fresh(rng, (5, 4099), in_dtype)
    scales, zps = channel_params(rng, "uint8", x.shape[-1])
    checked = {
        "per_tensor": [qpt(x, 0.0371, -3)],
        "per_channel": [qpc(x, scales, zps, -1, "uint8")],
        "blockwise": list(qbw(x, 64, rounding="stochastic", seed=5)),
    }
    on_cpu = {name: call for name, call, _ in unchecked_calls(x, scales, zps, x.shape)}
    for name, call, _ in unchecked_calls(backend.asarray(x), scales, zps, x.shape):
        got = host_matching_cpu(backend, call(None), lambda n=name: on_cpu[n](None), name)
        for g, w in zip(got if isinstance(got, tuple) else (got,), checked[name]):
            assert_bits(g, w, f"{name} without out=")
        run_with_out(call, checked[name], backend)


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
def test_unchecked_nonfinite_input_spares_the_rest(backend, in_dtype, rng):
    """With NaN/Inf in the input: no error, and every element (per tensor/channel) or block
    (blockwise, of 64) without one is exact (on a GPU: the CPU's bits there, and the CPU's
    q in every element); returned, or written into out= which is the result."""
    x, scales, zps, ok, ok_blocks, in_ok_blocks = unchecked_input(rng, in_dtype)
    with np.errstate(invalid="ignore"):
        want = {
            "per_tensor": [ref_quantize(x, 0.0371, -3, "int8")],
            "per_channel": [ref_quantize(x, scales, zps, "uint8", axis=1)],
            "blockwise": list(ref_blockwise(x, 64, "stochastic", seed=5)),
        }
    on_cpu = {name: call for name, call, _ in unchecked_calls(x, scales, zps, x.shape)}
    for name, call, templates in unchecked_calls(backend.asarray(x), scales, zps, x.shape):
        outs = tuple(backend.asarray(poisoned(s, d, 1)) for s, d in templates)
        got = call(outs if len(outs) > 1 else outs[0])
        assert got is (outs if len(outs) > 1 else outs[0])
        returned = call(None)
        for how, results in (("out=", outs),
                             ("returned", returned if isinstance(returned, tuple)
                              else (returned,))):
            res = [backend.to_numpy(r) for r in results]
            what = f"{name} ({how})"
            if backend.is_cuda:
                with CPU.activate():
                    cpu = on_cpu[name](None)
                cpu = cpu if isinstance(cpu, tuple) else (cpu,)
                keep = [np.ones(x.size, bool), ok_blocks] if name == "blockwise" else [ok]
                for r, c, m in zip(res, cpu, keep):
                    assert_bits(r.reshape(-1)[m], c.reshape(-1)[m], f"{what} against the CPU")
            if name == "blockwise":
                assert_bits(res[0].reshape(-1)[in_ok_blocks],
                            want[name][0].reshape(-1)[in_ok_blocks],
                            f"{what} q of the finite blocks")
                assert_bits(res[1][ok_blocks], want[name][1][ok_blocks],
                            f"{what} absmax of the finite blocks")
                assert (res[0].reshape(-1)[~in_ok_blocks] == 0).all(), f"{what} q of the bad blocks"
                assert np.isnan(res[1][~ok_blocks]).all(), f"{what} absmax of the bad blocks"
            else:
                assert_bits(res[0].reshape(-1)[ok], want[name][0].reshape(-1)[ok],
                            f"{what} of the finite elements")


def test_check_finite_must_be_a_bool(rng):
    x = fresh(rng, (7,), F32)
    for call in (lambda: fastopt.quantize_per_tensor(x, 0.1, 0, check_finite=1),
                 lambda: fastopt.quantize_per_channel(x, [0.1] * 7, [0] * 7, 0,
                                                      check_finite="no"),
                 lambda: fastopt.quantize_blockwise(x, check_finite=None)):
        with pytest.raises(TypeError, match="check_finite"):
            call()


# ---- sizes taken once, from the buffers the kernels use (issue 16, items 1 and 4) --------

def _retyping_out(x: np.ndarray, view: np.ndarray):
    """An ``out=`` that is a PyTorch CPU tensor (of a subclass). When fastopt takes its NumPy
    view (``detach().numpy()``), it retypes x to int8 -- four times the elements in the same
    buffer -- after x's shape was read for sizing the outputs: a kernel sized from x.size
    at call time would read past x and write past out."""
    torch = pytest.importorskip("torch")

    class RetypingOut(torch.Tensor):
        def detach(self):
            x.dtype = np.int8
            return self

        def numpy(self, *args, **kwargs):
            return view

    return torch.empty(0).as_subclass(RetypingOut)


@pytest.mark.parametrize("check_finite", [False, True])
def test_input_retyped_while_out_is_converted_raises(check_finite):
    """Issue 16's reproducer: the kernel reads x's dtype and size itself, so the retyped x
    is refused (TypeError naming x) and neither x nor out is touched."""
    x = np.ones(4096, np.float32)
    out = np.full(4096, 77, np.int8)
    with pytest.raises(TypeError, match="^x: dtype int8"):
        fastopt.quantize_per_tensor(x, 0.1, 0, out=_retyping_out(x, out),
                                    check_finite=check_finite)
    assert (out == 77).all()
    assert (x.view(np.float32) == 1).all()


@pytest.mark.parametrize("which", [0, 1])
def test_blockwise_out_with_none_raises_before_writing(which, rng):
    """out=(q, None) and out=(None, absmax): TypeError naming the missing one, and the
    other is not written (it used to be, before the error)."""
    x = fresh(rng, (4, 6), F32)
    outs = [poisoned((4, 6), np.int8, 0), poisoned((4,), F32, 0)]
    given = tuple(None if k == which else o for k, o in enumerate(outs))
    for check_finite in (True, False):
        with pytest.raises(TypeError, match=rf"^out\[{which}\]: "):
            fastopt.quantize_blockwise(x, 7, out=given, check_finite=check_finite)
        other = 1 - which
        assert_bits(outs[other], poisoned(outs[other].shape, outs[other].dtype, 0),
                    "the given out was written despite the error")


def test_blockwise_out_checked_whole_before_writing(rng):
    """A bad out[1] (read-only, or overlapping out[0]) raises before out[0] is written."""
    x = fresh(rng, (4, 6), F32)
    q = poisoned((4, 6), np.int8, 0)
    absmax = poisoned((4,), F32, 0)
    absmax.setflags(write=False)
    pair = poisoned((10,), F32, 0)
    for out, match in (((q, absmax), r"^out\[1\]: must be writeable"),
                       ((pair.view(np.int8)[:24].reshape(4, 6), pair[2:6]),
                        r"^out\[1\]: overlaps out\[0\]")):
        before = [o.copy() for o in out]
        with pytest.raises(ValueError, match=match):
            fastopt.quantize_blockwise(x, 7, out=out, check_finite=False)
        for o, b in zip(out, before):
            assert_bits(o, b, "out was written despite the error")
