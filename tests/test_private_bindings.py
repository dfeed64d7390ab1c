"""The quantization and Newton kernels called directly, through ``fastopt._cpu`` and
``fastopt._cuda`` (same arguments on both): every size a kernel uses is checked against the
arrays it runs on, so a call with inconsistent sizes raises TypeError/ValueError naming the
argument and writes nothing -- instead of reading or writing out of bounds, or dividing by
zero (block=0, empty channels), as before.

Each case builds fresh arrays (random inputs, poisoned outputs) with one size, dtype or
layout wrong, calls the binding and checks the error and that no array changed. The same
table runs on the CPU and, where CUDA is usable, on the GPU (arrays copied there; the
layout cases that a copy cannot carry -- read-only, strided, aliasing views -- are
host-only).
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Tuple

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import _ext

from cuda_libs import lib_fixture

F32, F64, I8, U8 = np.float32, np.float64, np.int8, np.uint8
F16, BF16 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)

lib = lib_fixture(scope="module")


class Host:
    """An argument that stays a host NumPy array on every backend (scales, zero points)."""

    def __init__(self, a: np.ndarray):
        self.a = a


class Case(NamedTuple):
    id: str
    binding: str
    make: Callable[[np.random.Generator], Tuple[Any, ...]]  # the arguments before stream
    exc: type
    match: str
    host_only: bool = False


def rand(rng, shape, dtype=F32) -> np.ndarray:
    """Fresh non-zero values (integers 1..99, bools at random) of ``shape``."""
    if np.dtype(dtype).kind in "iu":
        return np.asarray(rng.integers(1, 100, size=shape), dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    return np.asarray(rng.standard_normal(shape) + 3.0, dtype)


def poison(shape, dtype) -> np.ndarray:
    """An output filled with a sentinel the kernels never write (77, NaN, True)."""
    if np.dtype(dtype).kind in "iu":
        return np.full(shape, 77, dtype)
    if dtype == np.bool_:
        return np.ones(shape, bool)
    return np.full(shape, np.nan, F32).astype(dtype)


def readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def spd(rng, batch: int, n: int, dtype=F64) -> np.ndarray:
    m = rng.standard_normal((batch, n, n))
    return (m @ m.transpose(0, 2, 1) + n * np.eye(n)).astype(dtype)


S1, Z1 = (lambda: Host(np.ones(1, F32))), (lambda: Host(np.zeros(1, F32)))


def qa(x, q, scales=None, zps=None, axis=None):
    """quantize_affine's arguments (check_finite on)."""
    return (x, q, scales or S1(), zps or Z1(), axis, True)


CASES: List[Case] = [
    # ---- quantize_affine(x, q, scales, zero_points, axis, check_finite)
    Case("q shorter than x", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(50, I8)), ValueError, "^q: shape"),
    Case("q longer than x", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(200, I8)), ValueError, "^q: shape"),
    Case("q of another shape", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((25, 4), I8)), ValueError, "^q: shape"),
    Case("q int32", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(100, np.int32)), TypeError, "^q: dtype"),
    Case("q float32", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(100, F32)), TypeError, "^q: dtype"),
    Case("x int8", "quantize_affine",
         lambda r: qa(rand(r, 100, I8), poison(100, I8)), TypeError, "^x: dtype int8"),
    Case("x float64", "quantize_affine",
         lambda r: qa(rand(r, 100, F64), poison(100, I8)), TypeError, "^x: dtype float64"),
    Case("x big-endian", "quantize_affine",
         lambda r: qa(rand(r, 100, ">f4"), poison(100, I8)), TypeError, "^x: dtype", True),
    Case("x a list", "quantize_affine",
         lambda r: qa([1.0, 2.0], poison(2, I8)), TypeError, "^x: ", True),
    Case("per tensor with 2 scales", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(100, I8), Host(np.ones(2, F32)),
                      Host(np.zeros(2, F32))), ValueError, "^scales: "),
    Case("per channel scales short", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), Host(np.ones(3, F32)),
                      Host(np.zeros(4, F32)), 0), ValueError, "^scales: "),
    Case("per channel scales long", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), Host(np.ones(25, F32)),
                      Host(np.zeros(4, F32)), 0), ValueError, "^scales: "),
    Case("per channel zero_points short", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), Host(np.ones(25, F32)),
                      Host(np.zeros(24, F32)), 1), ValueError, "^zero_points: "),
    Case("scales float64", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(100, I8), Host(np.ones(1, F64))), TypeError,
         "^scales: dtype"),
    Case("scales a list", "quantize_affine",
         lambda r: (rand(r, 100), poison(100, I8), [1.0], Z1(), None, True), TypeError,
         "^scales: "),
    Case("scales 2-D", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(100, I8), Host(np.ones((1, 1), F32))), ValueError,
         "^scales: "),
    Case("scales strided", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), Host(np.ones(8, F32)[::2]),
                      Host(np.zeros(4, F32)), 0), ValueError, "^scales: "),
    Case("axis out of range", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), axis=2), ValueError, "^axis: "),
    Case("axis negative", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), axis=-1), ValueError, "^axis: "),
    Case("axis of a 0-d array", "quantize_affine",
         lambda r: qa(rand(r, ()), poison((), I8), axis=0), ValueError, "^axis: "),
    Case("axis float", "quantize_affine",
         lambda r: qa(rand(r, (4, 25)), poison((4, 25), I8), axis=1.0), TypeError, "^axis: "),
    Case("q read-only", "quantize_affine",
         lambda r: qa(rand(r, 100), readonly(poison(100, I8))), ValueError, "^q: is read-only",
         True),
    Case("q strided", "quantize_affine",
         lambda r: qa(rand(r, 100), poison(200, I8)[::2]), ValueError, "^q: must be C-contig",
         True),
    Case("x strided", "quantize_affine",
         lambda r: qa(rand(r, 200)[::2], poison(100, I8)), ValueError, "^x: must be C-contig",
         True),
    Case("q inside x", "quantize_affine",
         lambda r: (lambda x: qa(x[:25], x.view(I8)[:25]))(rand(r, 100)), ValueError,
         "^q: overlaps x", True),
    Case("scales inside q", "quantize_affine",
         lambda r: (lambda q: qa(rand(r, 100), q, Host(q[:4].view(F32))))(poison(100, I8)),
         ValueError, "^q: overlaps scales", True),
    # ---- dequantize_affine(q, out, scales, zero_points, axis)
    Case("out shorter than q", "dequantize_affine",
         lambda r: (rand(r, 100, I8), poison(99, F32), S1(), Z1(), None), ValueError,
         "^out: shape"),
    Case("out float64", "dequantize_affine",
         lambda r: (rand(r, 100, I8), poison(100, F64), S1(), Z1(), None), TypeError,
         "^out: dtype"),
    Case("out int8", "dequantize_affine",
         lambda r: (rand(r, 100, I8), poison(100, I8), S1(), Z1(), None), TypeError,
         "^out: dtype"),
    Case("out float16 shorter than q", "dequantize_affine",
         lambda r: (rand(r, 100, I8), poison(99, F16), S1(), Z1(), None), ValueError,
         "^out: shape"),
    Case("out bfloat16 overlaps q", "dequantize_affine",
         lambda r: (lambda o: (o.view(I8)[:100], o[25:125], S1(), Z1(), None))(poison(150, BF16)),
         ValueError, "^out: overlaps q", True),
    Case("q float32", "dequantize_affine",
         lambda r: (rand(r, 100), poison(100, F32), S1(), Z1(), None), TypeError, "^q: dtype"),
    Case("dequantize scales short", "dequantize_affine",
         lambda r: (rand(r, (4, 25), U8), poison((4, 25), F32), Host(np.ones(3, F32)),
                    Host(np.zeros(4, F32)), 0), ValueError, "^scales: "),
    Case("dequantize zero_points long", "dequantize_affine",
         lambda r: (rand(r, (4, 25), I8), poison((4, 25), F32), Host(np.ones(25, F32)),
                    Host(np.zeros(26, F32)), 1), ValueError, "^zero_points: "),
    Case("dequantize axis out of range", "dequantize_affine",
         lambda r: (rand(r, (4, 25), I8), poison((4, 25), F32), S1(), Z1(), 5), ValueError,
         "^axis: "),
    Case("out read-only", "dequantize_affine",
         lambda r: (rand(r, 100, I8), readonly(poison(100, F32)), S1(), Z1(), None),
         ValueError, "^out: is read-only", True),
    Case("out overlaps q", "dequantize_affine",
         lambda r: (lambda o: (o.view(I8)[100:200], o, S1(), Z1(), None))(poison(100, F32)),
         ValueError, "^out: overlaps q", True),
    Case("zero_points inside out", "dequantize_affine",
         lambda r: (lambda o: (rand(r, 100, I8), o, S1(), Host(o[:1]), None))(poison(100, F32)),
         ValueError, "^out: overlaps zero_points", True),
    # ---- minmax(x, axis): no outputs, the errors only
    Case("minmax x int8", "minmax", lambda r: (rand(r, 100, I8), None), TypeError,
         "^x: dtype"),
    Case("minmax axis out of range", "minmax", lambda r: (rand(r, (4, 25)), 2), ValueError,
         "^axis: "),
    Case("minmax x strided", "minmax", lambda r: (rand(r, 200)[::2], None), ValueError,
         "^x: must be C-contig", True),
    # ---- quantize_blockwise(x, q, absmax, block, stochastic, seed, check_finite)
    Case("block 0", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), poison(10, F32), 0, False, 1, True),
         ValueError, "^block: must be > 0"),
    Case("block -10", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), poison(10, F32), -10, False, 1, True),
         ValueError, "^block: must be > 0"),
    Case("absmax short", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), poison(9, F32), 10, False, 1, True),
         ValueError, r"^absmax: expected shape \(10,\)"),
    Case("absmax long", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), poison(11, F32), 10, False, 1, True),
         ValueError, "^absmax: "),
    Case("absmax for one block of 1", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), poison(1, F32), 1, True, 1, True),
         ValueError, "^absmax: "),
    Case("absmax float64", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), poison(10, F64), 10, False, 1, True),
         TypeError, "^absmax: dtype"),
    Case("blockwise q short", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(10, I8), poison(10, F32), 10, False, 1, True),
         ValueError, "^q: shape"),
    Case("blockwise q uint8", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, U8), poison(10, F32), 10, False, 1, True),
         TypeError, "^q: dtype"),
    Case("blockwise x float64", "quantize_blockwise",
         lambda r: (rand(r, 100, F64), poison(100, I8), poison(10, F32), 10, False, 1, True),
         TypeError, "^x: dtype"),
    Case("absmax read-only", "quantize_blockwise",
         lambda r: (rand(r, 100), poison(100, I8), readonly(poison(10, F32)), 10, False, 1,
                    True), ValueError, "^absmax: is read-only", True),
    Case("absmax inside q", "quantize_blockwise",
         lambda r: (lambda q: (rand(r, 100), q, q[60:].view(F32), 10, False, 1, True))(
             poison(100, I8)), ValueError, "^(q: overlaps absmax|absmax: overlaps q)",
         True),
    # ---- dequantize_blockwise(q, absmax, out, block)
    Case("issue 16's call: one absmax for 10 blocks", "dequantize_blockwise",
         lambda r: (np.zeros(100, I8), np.ones(1, F32), poison(100, F32), 10), ValueError,
         "^absmax: "),
    Case("dequantize block 0", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 10), poison(100, F32), 0), ValueError,
         "^block: must be > 0"),
    Case("dequantize absmax long", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 11), poison(100, F32), 10), ValueError,
         "^absmax: "),
    Case("dequantize out short", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 10), poison(90, F32), 10), ValueError,
         "^out: shape"),
    Case("dequantize out float64", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 10), poison(100, F64), 10), TypeError,
         "^out: dtype"),
    Case("dequantize out float16 short", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 10), poison(99, F16), 10), ValueError,
         "^out: shape"),
    Case("dequantize out bfloat16 (10, 10) for q (100,)", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 10), poison((10, 10), BF16), 10), ValueError,
         "^out: shape"),
    Case("dequantize out uint8", "dequantize_blockwise",
         lambda r: (rand(r, 100, I8), rand(r, 10), poison(100, U8), 10), TypeError,
         "^out: dtype"),
    Case("dequantize q uint8", "dequantize_blockwise",
         lambda r: (rand(r, 100, U8), rand(r, 10), poison(100, F32), 10), TypeError,
         "^q: dtype"),
    Case("dequantize out overlaps absmax", "dequantize_blockwise",
         lambda r: (lambda o: (rand(r, 100, I8), o[95:], o[:100], 10))(rand(r, 105)),
         ValueError, "^out: overlaps absmax", True),
    # ---- newton_solve(hessians, grads, d, solved, damping, params)
    Case("n = 0", "newton_solve",
         lambda r: (np.ones((5, 0, 0)), np.ones((5, 0)), poison((5, 0), F64),
                    poison(5, np.bool_), 0.0, None), ValueError, "^grads: n = "),
    Case("grads 0-d", "newton_solve",
         lambda r: (spd(r, 1, 1)[0, 0], rand(r, (), F64), poison((), F64), poison((), np.bool_),
                    0.0, None), ValueError, "^grads: expected shape"),
    Case("hessians (5, 4, 3)", "newton_solve",
         lambda r: (spd(r, 5, 4)[:, :, :3].copy(), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, None), ValueError, "^hessians: expected shape"),
    Case("hessians (5, 3, 4), strided: the shape is named", "newton_solve",
         lambda r: (spd(r, 5, 4)[:, :3], rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, None), ValueError, "^hessians: expected shape",
         True),
    Case("hessians for fewer systems", "newton_solve",
         lambda r: (spd(r, 4, 4), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, None), ValueError, "^hessians: expected shape"),
    Case("hessians float16", "newton_solve",
         lambda r: (spd(r, 5, 4, np.float16), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, None), TypeError, "^hessians: dtype float16"),
    Case("grads float32", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4)), poison((5, 4), F64), poison(5, np.bool_),
                    0.0, None), TypeError, "^grads: dtype float32 differs"),
    Case("d short", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 3), F64),
                    poison(5, np.bool_), 0.0, None), ValueError, "^d: shape"),
    Case("d float32", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 4), F32),
                    poison(5, np.bool_), 0.0, None), TypeError, "^d: dtype"),
    Case("solved short", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(4, np.bool_), 0.0, None), ValueError, "^solved: expected shape"),
    Case("solved int8", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 4), F64), poison(5, I8),
                    0.0, None), TypeError, "^solved: dtype"),
    Case("params short", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, rand(r, (5, 3), F64)), ValueError,
         "^params: shape"),
    Case("params float32", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, rand(r, (5, 4))), TypeError,
         "^params: dtype float32 differs"),
    Case("params read-only", "newton_solve",
         lambda r: (spd(r, 5, 4), rand(r, (5, 4), F64), poison((5, 4), F64),
                    poison(5, np.bool_), 0.0, readonly(rand(r, (5, 4), F64))), ValueError,
         "^params: is read-only", True),
    Case("params is grads", "newton_solve",
         lambda r: (lambda g: (spd(r, 5, 4), g, poison((5, 4), F64), poison(5, np.bool_), 0.0,
                               g))(rand(r, (5, 4), F64)), ValueError, "^params: overlaps grads",
         True),
    Case("d inside hessians", "newton_solve",
         lambda r: (lambda H: (H, rand(r, (5, 4), F64), H.reshape(-1)[:20].reshape(5, 4),
                               poison(5, np.bool_), 0.0, None))(spd(r, 5, 4)), ValueError,
         "^d: overlaps hessians", True),
    # ---- newton_apply(params, d, use, lr)
    Case("apply d short", "newton_apply",
         lambda r: (rand(r, (5, 4), F64), rand(r, (5, 3), F64), None, 1.0), ValueError,
         "^d: shape"),
    Case("apply d for more systems", "newton_apply",
         lambda r: (rand(r, (5, 4), F64), rand(r, (6, 4), F64), None, 1.0), ValueError,
         "^d: shape"),
    Case("apply d float32", "newton_apply",
         lambda r: (rand(r, (5, 4), F64), rand(r, (5, 4)), None, 1.0), TypeError, "^d: dtype"),
    Case("apply n = 0", "newton_apply",
         lambda r: (np.ones((5, 0)), np.ones((5, 0)), None, 1.0), ValueError, "^params: "),
    Case("apply params 0-d", "newton_apply",
         lambda r: (rand(r, (), F64), rand(r, (), F64), None, 1.0), ValueError, "^params: "),
    Case("apply params int8", "newton_apply",
         lambda r: (rand(r, (5, 4), I8), rand(r, (5, 4), I8), None, 1.0), TypeError,
         "^params: dtype"),
    Case("apply use short", "newton_apply",
         lambda r: (rand(r, (5, 4), F64), rand(r, (5, 4), F64), np.ones(4, bool), 1.0),
         ValueError, "^use: expected shape"),
    Case("apply use float", "newton_apply",
         lambda r: (rand(r, (5, 4), F64), rand(r, (5, 4), F64), np.ones(5, F64), 1.0),
         TypeError, "^use: dtype"),
    Case("apply params read-only", "newton_apply",
         lambda r: (readonly(rand(r, (5, 4), F64)), rand(r, (5, 4), F64), None, 1.0),
         ValueError, "^params: is read-only", True),
    Case("apply params is d", "newton_apply",
         lambda r: (lambda p: (p, p, None, 1.0))(rand(r, (5, 4), F64)), ValueError,
         "^params: overlaps d", True),
]

BINDINGS = {"quantize_affine", "dequantize_affine", "minmax", "quantize_blockwise",
            "dequantize_blockwise", "newton_solve", "newton_apply"}


def test_every_binding_has_cases():
    assert {c.binding for c in CASES} == BINDINGS


def _argument_names(fn) -> List[str]:
    """The argument names of a compiled function, from its signature line
    ("name(a, b, *, c=None)", bindings/checked_def.h)."""
    signature = fn.__doc__.splitlines()[0]
    inside = signature[signature.index("(") + 1:signature.rindex(")")]
    return [a.split("=")[0].strip() for a in inside.split(", ") if a not in ("", "*")]


def _functions(module) -> List[str]:
    return sorted(n for n in dir(module) if not n.startswith("_")
                  and callable(getattr(module, n)) and not isinstance(getattr(module, n), type))


@pytest.mark.parametrize("module", ["_cpu", "_cuda"])
def test_every_function_names_a_wrong_call(module):
    """A call with an unknown keyword, too many arguments or none gets a TypeError saying so,
    after the function's name (never pybind11's generic message with every argument's repr;
    the step functions parse their own arguments)."""
    kernels = getattr(_ext, module)
    if kernels is None:
        pytest.skip("built without the CUDA module")
    for name in _functions(kernels):
        fn = getattr(kernels, name)
        for call in (lambda: fn(bogus=1), lambda: fn(*range(40))):
            with pytest.raises(TypeError, match=rf"^{name}\(\): ") as info:
                call()
            assert "incompatible function arguments" not in str(info.value), name
        names = _argument_names(fn)
        if names and not any(n.startswith("*") for n in names):  # (checked_def.h's parser)
            with pytest.raises(TypeError, match=rf"^{name}\(\): missing argument '"):
                fn()


def test_wrong_calls_are_named_precisely():
    with pytest.raises(TypeError, match=r"^adafactor_step\(\): unexpected keyword 'bogus'$"):
        _ext._cpu.adafactor_step([], [], [], [], [], [], 1.0, -0.8, 1e-30, 1e-3, 1.0, 0.0,
                                 False, True, bogus=1)
    with pytest.raises(TypeError, match=r"^minmax\(\): takes at most 3 positional arguments "
                                        r"\(4 given\)$"):
        _ext._cpu.minmax(np.ones(3, F32), None, None, None)
    with pytest.raises(TypeError, match=r"^minmax\(\): argument 'x' given twice$"):
        _ext._cpu.minmax(np.ones(3, F32), x=np.ones(3, F32))
    with pytest.raises(TypeError, match=r"^quantize_affine\(\): missing argument 'zero_points'$"):
        _ext._cpu.quantize_affine(np.ones(3, F32), np.ones(3, np.int8), np.ones(1, F32))
    with pytest.raises(TypeError, match=r"^get_num_threads\(\): takes no positional arguments"):
        _ext._cpu.get_num_threads(1)
    with pytest.raises(TypeError, match=r"^minmax\(\): unexpected keyword '\\udc80'$"):
        _ext._cpu.minmax(np.ones(3, F32), None, **{"\udc80": 1})
    with pytest.raises(TypeError, match=r"^set_hyper_ranges\(\): optimizer: expected str, "
                                        r"got int$"):
        _ext._cpu.set_hyper_ranges(5, {})
    # the defaults, by keyword or left out
    lo, hi = _ext._cpu.minmax(x=np.arange(5, dtype=F32), axis=None)[1:]
    assert (lo[0], hi[0]) == (0.0, 4.0)
    assert _ext._cpu.minmax(np.arange(5, dtype=F32), None, stream=None)[0] == -1


@pytest.mark.skipif(_ext._cuda is None, reason="built without the CUDA module")
@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_cpu_and_cuda_take_the_same_arguments(name):
    """One signature per kernel on both backends (compiled without a GPU too)."""
    cpu = _argument_names(getattr(_ext._cpu, name))
    cuda = _argument_names(getattr(_ext._cuda, name))
    assert cpu == cuda and cpu[-1] == "stream"


def _run(kernels, stream, to_device: Callable[[np.ndarray], Any],
         to_host: Callable[[Any], np.ndarray], case: Case, rng) -> None:
    """Calls case's binding with its arrays moved by ``to_device`` (Host ones stay NumPy),
    expecting the error; then every array still holds its values."""
    args, kept = [], []  # kept: (the array passed, where to read it from, values before)
    for a in case.make(rng):
        if isinstance(a, Host):
            args.append(a.a)
            kept.append((a.a, lambda h: h, a.a.copy()))
        elif isinstance(a, np.ndarray):
            args.append(to_device(a))
            kept.append((args[-1], to_host, a.copy()))
        else:
            args.append(a)
    with pytest.raises(case.exc, match=case.match):
        getattr(kernels, case.binding)(*args, stream=stream)
    for passed, read, before in kept:
        np.testing.assert_array_equal(read(passed), before)  # NaN poison equals NaN


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cpu_binding_checks_sizes(case, rng):
    _run(_ext._cpu, None, lambda a: a, lambda a: a, case, rng)


@pytest.mark.parametrize("case", [c for c in CASES if not c.host_only],
                         ids=[c.id for c in CASES if not c.host_only])
def test_cuda_binding_checks_sizes(lib, case, rng):
    _run(_ext._cuda, 0, lib.to_device, lib.to_host, case, rng)
    lib.synchronize()


# ---- zero size: checked like any call, then a no-op (no division by an empty extent) -----

def test_zero_size_calls_are_checked_no_ops():
    cpu = _ext._cpu
    for shape, axis, channels in [((0,), None, 1), ((4, 0), 0, 4), ((4, 0), 1, 0),
                                  ((0, 5), 1, 5), ((0, 5), 0, 0)]:
        s, z = np.ones(channels, F32), np.zeros(channels, F32)
        x, q = np.empty(shape, F32), np.empty(shape, I8)
        assert cpu.quantize_affine(x, q, s, z, axis, True) == -1
        cpu.dequantize_affine(q, np.empty(shape, F32), s, z, axis)
        bad, mins, maxs = cpu.minmax(x, axis)
        assert bad == -1 and mins.shape == maxs.shape == (channels,)
        assert np.all(mins == np.inf) and np.all(maxs == -np.inf)
        with pytest.raises(ValueError, match="^scales: "):
            cpu.quantize_affine(x, q, np.ones(channels + 1, F32), z, axis, True)
    x, q = np.empty(0, F32), np.empty(0, I8)
    assert cpu.quantize_blockwise(x, q, np.empty(0, F32), 7, False, 1, True) == -1
    cpu.dequantize_blockwise(q, np.empty(0, F32), np.empty(0, F32), 7)
    with pytest.raises(ValueError, match="^block: "):
        cpu.dequantize_blockwise(q, np.empty(0, F32), np.empty(0, F32), 0)
    with pytest.raises(ValueError, match="^absmax: "):
        cpu.quantize_blockwise(x, q, np.empty(1, F32), 7, False, 1, True)
    g = np.empty((0, 3))
    cpu.newton_solve(np.empty((0, 3, 3)), g, np.empty((0, 3)), np.empty(0, bool), 0.0, None)
    cpu.newton_apply(np.empty((0, 3)), np.empty((0, 3)), None, 1.0)


def test_block_past_the_size_is_the_whole_array(rng):
    """block > n (up to 2**63 - 1) is one block: the kernel sees min(block, n), so block
    boundaries b*block + block do not overflow."""
    x = rand(rng, 100)
    want_q, want_absmax = fastopt.quantize_blockwise(x, 100)
    for block in (101, 2**40, 2**63 - 1):
        q, absmax = np.empty(100, I8), np.empty(1, F32)
        assert _ext._cpu.quantize_blockwise(x, q, absmax, block, False, 1, True) == -1
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(absmax, want_absmax)
        out = np.empty(100, F32)
        _ext._cpu.dequantize_blockwise(q, absmax, out, block)
        np.testing.assert_array_equal(out, fastopt.dequantize_blockwise(want_q, want_absmax, 100))


@pytest.mark.parametrize("out_dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
def test_dequantize_bindings_take_16bit_outputs(out_dtype, rng):
    """The output's dtype picks the stored type: every element written, the public calls'
    bits."""
    q = rand(rng, (3, 41), I8) - 50
    absmax = rand(rng, 18)
    out = poison(q.shape, out_dtype)
    _ext._cpu.dequantize_affine(q, out, np.array([0.37], F32), np.array([3], F32), None)
    want = fastopt.dequantize(q, 0.37, 3, out_dtype=out_dtype)
    np.testing.assert_array_equal(out.view(np.uint8), want.view(np.uint8))
    out = poison(q.shape, out_dtype)
    _ext._cpu.dequantize_blockwise(q, absmax, out, 7)
    want = fastopt.dequantize_blockwise(q, absmax, 7, out_dtype=out_dtype)
    np.testing.assert_array_equal(out.view(np.uint8), want.view(np.uint8))


def test_host_stream_must_be_none():
    x, q = np.ones(4, F32), np.zeros(4, I8)
    with pytest.raises(ValueError, match="^stream: only applies to CUDA arrays"):
        _ext._cpu.quantize_affine(x, q, np.ones(1, F32), np.zeros(1, F32), None, True, 0)
    np.testing.assert_array_equal(q, 0)


def test_torch_cpu_tensors_go_through_the_array_adapter():
    torch = pytest.importorskip("torch")
    x = torch.linspace(-1, 1, 64)
    q = torch.zeros(64, dtype=torch.int8)
    assert _ext._cpu.quantize_affine(x, q, np.full(1, 0.01, F32), np.zeros(1, F32), None,
                                       True) == -1
    np.testing.assert_array_equal(q.numpy(), fastopt.quantize_per_tensor(x.numpy(), 0.01, 0))
