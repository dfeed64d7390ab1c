"""Tests of the quantized model file (``fastopt.save_quantized`` / ``fastopt.load_quantized``).

* Round trips exact: a loaded tensor equals the dequantization of the in-memory quantization
  bit for bit (every scheme, int8/uint8, float32/float16/bfloat16/float64 tensors, odd
  shapes, every out_dtype); ``dequantize=False`` gives back the same int8 bytes and scales.
  On every backend: tensors saved from NumPy (CPU paths), torch CPU, CuPy and torch CUDA;
  loaded as NumPy, torch CPU/CUDA and CuPy.
* A standard safetensors file: ``safetensors.numpy.load_file`` and the torch loader open it
  and see the documented tensors and metadata; a file of safetensors' ``save_file`` loads.
* ``skip=``: the default rule, names, a predicate; non-float tensors always stored as is.
* Corrupt or truncated files raise ValueError naming the path and the problem: truncation at
  every byte, every header byte flipped, and one hand-made file per documented problem.
* Bad arguments raise TypeError/ValueError naming them, and a failed save leaves no file.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict

import ml_dtypes
import numpy as np
import pytest
from backends import assert_bits
from quant_cases import BF16, F32, OUT_DTYPES, fresh

import fastopt
from fastopt import QuantizedTensor, load_quantized, save_quantized

safetensors_numpy = pytest.importorskip("safetensors.numpy")

F16, F64 = np.dtype(np.float16), np.dtype(np.float64)
SCHEMES = ["per_channel", "per_tensor", "blockwise"]
# (shape, axis): odd sizes, channels first / last / in the middle
SHAPES = [((33, 31), 0), ((7, 4097), 1), ((3, 37, 41), 1), ((1025, 1), 0), ((5, 2, 257), -1)]


def model(rng, dtypes=(F32, F16, BF16, F64)) -> Dict[str, np.ndarray]:
    """Fresh tensors of every float dtype and shape, plus ones the default skips (1-D, fewer
    than 1024 elements) and non-float ones."""
    tensors = {f"layer{i}.{np.dtype(dt).name}.weight": fresh(rng, shape, dt)
               for i, (shape, _) in enumerate(SHAPES) for dt in dtypes}
    tensors["layer0.bias"] = fresh(rng, (33,), F32)
    tensors["small.weight"] = fresh(rng, (7, 9), F16)
    tensors["steps"] = np.arange(11, dtype=np.int64)
    tensors["mask"] = rng.random((4, 300)) < 0.5
    tensors["empty"] = np.zeros((0, 3), F32)
    return tensors


def quantize_like_save(x: np.ndarray, scheme: str, qdtype: str, axis: int, block: int):
    """What save_quantized documents for one tensor, in memory: (q, dequantize(q, out_dtype))."""
    x = x.astype(F32) if x.dtype == F64 else x
    if scheme == "blockwise":
        q, absmax = fastopt.quantize_blockwise(x, block)
        return q, lambda od: fastopt.dequantize_blockwise(q, absmax, block, out_dtype=od)
    if scheme == "per_tensor":
        s, z = fastopt.choose_qparams(x, dtype=qdtype)
        q = fastopt.quantize_per_tensor(x, s, z, qdtype)
        return q, lambda od: fastopt.dequantize(q, s, z, out_dtype=od)
    s, z = fastopt.choose_qparams(x, axis=axis, dtype=qdtype)
    q = fastopt.quantize_per_channel(x, s, z, axis, qdtype)
    return q, lambda od: fastopt.dequantize(q, s, z, axis=axis, out_dtype=od)


def cast(a: np.ndarray, od) -> np.ndarray:
    return a.astype(F32).astype(od) if a.dtype == BF16 else a.astype(od)


def header_of(path) -> Dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


# ---- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, qdtype", [(s, q) for s in SCHEMES for q in ("int8", "uint8")
                                            if (s, q) != ("blockwise", "uint8")])
def test_round_trip_exact(cpu_path, scheme, qdtype, tmp_path, rng):
    tensors = model(rng)
    path = tmp_path / "m.safetensors"
    axis, block = -1, 100
    save_quantized(path, tensors, scheme=scheme, dtype=qdtype, axis=axis, block_size=block)
    pieces = load_quantized(path, dequantize=False)
    assert list(pieces) == list(tensors)  # every tensor, in the caller's order
    for od in OUT_DTYPES:
        loaded = load_quantized(path, out_dtype=od.name)
        for name, x in tensors.items():
            got = loaded[name]
            if x.dtype.kind != "f" and x.dtype != BF16:  # stored as is
                assert_bits(got, x, name)
                assert_bits(pieces[name], x, name)
                continue
            if x.ndim < 2 or x.size < 1024:  # the default skip: stored as is, cast on load
                assert_bits(pieces[name], x, name)
                with np.errstate(over="ignore"):
                    assert_bits(got, cast(x, od), f"{name} as {od}")
                continue
            q, deq = quantize_like_save(x, scheme, qdtype, axis % x.ndim, block)
            assert_bits(got, deq(od), f"{name} as {od}")
            p = pieces[name]
            assert isinstance(p, QuantizedTensor)
            assert (p.scheme, p.dtype, p.shape) == (scheme, x.dtype.name, x.shape)
            assert_bits(p.q, q, f"{name} q")
            assert_bits(p.dequantize(od), deq(od), f"{name} QuantizedTensor.dequantize")
            if scheme == "per_channel":
                assert p.axis == axis % x.ndim and p.scale.shape == (x.shape[p.axis],)
            if scheme == "blockwise":
                assert p.block_size == block and p.absmax.shape == (-(-x.size // block),)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_state_dict_round_trip(scheme, tmp_path, rng):
    """A torch state_dict (float32/bfloat16/float16 tensors, a non-float buffer) saves, and
    loads as torch tensors with device="cpu": equal to loading as NumPy."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.BatchNorm1d(48),
                              torch.nn.Linear(48, 40))
    net[2].to(torch.bfloat16)
    net[0].to(torch.float16)
    sd = net.state_dict()
    path = tmp_path / "net.safetensors"
    save_quantized(path, sd, scheme=scheme, block_size=64)
    header = header_of(path)
    assert header["__metadata__"]["fastopt.format"] == "quantized"
    assert json.loads(header["__metadata__"]["fastopt.tensor.2.weight"])["dtype"] == "bfloat16"
    assert header["1.num_batches_tracked"]["dtype"] == "I64"
    for od in ("float32", "bfloat16"):
        as_numpy = load_quantized(path, out_dtype=od)
        as_torch = load_quantized(path, out_dtype=getattr(torch, od), device="cpu")
        assert list(as_torch) == list(sd)
        for name, t in as_torch.items():
            assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16).numpy().view(BF16)
            else:
                t = t.numpy()
            assert_bits(t, as_numpy[name], name)
    # the quantized weights are those of the NumPy copy of the state_dict
    w = sd["0.weight"].numpy()
    _, deq = quantize_like_save(w, scheme, "int8", 0, 64)
    assert_bits(load_quantized(path)["0.weight"], deq("float32"))


def test_backends_save_and_load(backend, tmp_path, rng):
    """Tensors of the backend's library save to the bytes NumPy tensors give (CUDA tensors
    are quantized on their GPU), and load onto that backend's device with the same values."""
    tensors = {"w": fresh(rng, (37, 129), F32), "v": fresh(rng, (5, 300), F16),
               "b": fresh(rng, (129,), F32)}
    for scheme in SCHEMES:
        host_path, dev_path = tmp_path / f"h-{scheme}", tmp_path / f"d-{scheme}"
        save_quantized(host_path, tensors, scheme=scheme)
        save_quantized(dev_path, {k: backend.asarray(v) for k, v in tensors.items()},
                       scheme=scheme)
        assert dev_path.read_bytes() == host_path.read_bytes(), scheme
        if not backend.is_cuda:
            continue
        lib = backend.lib
        device = "cupy" if lib.name == "cupy" else "cuda"
        want = load_quantized(host_path, out_dtype="float16")
        got = load_quantized(dev_path, out_dtype="float16", device=device)
        for name in tensors:
            assert lib.is_array(got[name]), type(got[name])
            assert_bits(lib.to_host(got[name]), want[name], f"{scheme} {name}")
        pieces = load_quantized(dev_path, dequantize=False, device=device)
        assert lib.is_array(pieces["w"].q)
        assert_bits(lib.to_host(pieces["w"].q), load_quantized(host_path, dequantize=False)["w"].q)


@pytest.mark.cuda
def test_torch_cuda_device_names(tmp_path, rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no usable CUDA")
    path = tmp_path / "m"
    x = fresh(rng, (40, 64), F32)
    save_quantized(path, {"w": x}, scheme="blockwise", block_size=64)
    want = load_quantized(path, out_dtype="bfloat16")["w"]
    for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
        got = load_quantized(path, out_dtype="bfloat16", device=device)["w"]
        assert got.is_cuda and got.dtype == torch.bfloat16
        assert_bits(got.cpu().view(torch.int16).numpy().view(BF16), want)


def test_compression_and_accuracy(tmp_path, rng):
    """int8 per channel: a quarter of float32's bytes (plus the header and scales), and
    every element within half a step of the original."""
    x = fresh(rng, (256, 512), F32)
    path = tmp_path / "m"
    save_quantized(path, {"w": x})
    assert os.path.getsize(path) < x.nbytes / 4 + 4096
    got = load_quantized(path)["w"]
    p = load_quantized(path, dequantize=False)["w"]
    assert np.all(np.abs(got - x) <= p.scale[:, None] * (0.5 + 1e-5))


# ---- a standard safetensors file ------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_opens_with_safetensors(scheme, tmp_path, rng):
    tensors = model(rng, dtypes=(F32, BF16))
    path = tmp_path / "m.safetensors"
    save_quantized(path, tensors, scheme=scheme, dtype="int8")
    plain = safetensors_numpy.load_file(str(path))
    pieces = load_quantized(path, dequantize=False)
    for name, p in pieces.items():
        if isinstance(p, QuantizedTensor):
            assert_bits(plain[name], p.q, name)
            if scheme == "blockwise":
                assert_bits(plain[name + "::absmax"], p.absmax, name)
            else:
                assert_bits(plain[name + "::scale"], p.scale, name)
                assert_bits(plain[name + "::zero_point"], p.zero_point, name)
        elif p.dtype == BF16:  # safetensors.numpy has no bfloat16: the torch loader below
            assert name not in plain or plain[name].dtype.itemsize == 2
        else:
            assert_bits(plain[name], p, name)
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    as_torch = safetensors_torch.load_file(str(path))
    assert set(as_torch) == set(plain)
    bias = as_torch["layer0.bias"]
    assert bias.dtype == torch.float32
    assert_bits(bias.numpy(), tensors["layer0.bias"])
    with safetensors_numpy.safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["fastopt.format"] == "quantized" and meta["fastopt.version"] == "1"
    desc = json.loads(meta["fastopt.tensor.layer1.float32.weight"])
    assert desc["scheme"] == scheme and desc["shape"] == [7, 4097] and desc["dtype"] == "float32"


def test_file_layout(tmp_path, rng):
    """8-byte aligned data start, tensors aligned to their element size, no gaps; the usual
    permissions (0o666 less the umask), nothing else left in the directory."""
    path = tmp_path / "m"
    save_quantized(path, model(rng, dtypes=(F32,)), scheme="per_channel")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["m"]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for v in header.values():
        size = {"F32": 4, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1, "F16": 2}[v["dtype"]]
        assert v["data_offsets"][0] % size == 0


def test_plain_safetensors_file_loads(tmp_path, rng):
    """A file safetensors wrote (no fastopt metadata): its tensors as stored, floats cast to
    out_dtype."""
    tensors = {"a": fresh(rng, (33, 65), F32), "b": fresh(rng, (7,), F16),
               "c": fresh(rng, (3, 5), F64), "i": np.arange(6, dtype=np.int32)}
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "np"})
    for od in OUT_DTYPES:
        got = load_quantized(path, out_dtype=od)
        for name, x in tensors.items():
            assert_bits(got[name], x if x.dtype.kind == "i" else cast(x, od), name)
    raw = load_quantized(path, dequantize=False)
    for name, x in tensors.items():
        assert_bits(raw[name], x, name)


# ---- skip= ----------------------------------------------------------------------------------

def test_skip_rules(tmp_path, rng):
    tensors = {"w": fresh(rng, (40, 40), F32), "small": fresh(rng, (10, 10), F32),
               "b": fresh(rng, (2000,), F32), "i": np.ones((50, 50), np.int8)}
    path = tmp_path / "m"

    def quantized(skip) -> set:
        save_quantized(path, tensors, skip=skip)
        return {k for k, v in load_quantized(path, dequantize=False).items()
                if isinstance(v, QuantizedTensor)}

    assert quantized(None) == {"w"}  # 1-D and < 1024 elements skipped; ints never quantized
    assert quantized(()) == {"w", "small", "b"}
    assert quantized(["w", "b"]) == {"small"}
    assert quantized(lambda name, shape: name.startswith("s")) == {"w", "b"}
    assert quantized(lambda name, shape: True) == set()
    with pytest.raises(ValueError, match=r"^skip: no tensors named \['nope'\]"):
        save_quantized(path, tensors, skip=["w", "nope"])
    with pytest.raises(TypeError, match="^skip: "):
        save_quantized(path, tensors, skip="w")


# ---- corrupt and truncated files ------------------------------------------------------------

def expect_corrupt(path, match: str = "") -> None:
    with pytest.raises(ValueError) as info:
        load_quantized(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert match in msg, msg


@pytest.fixture
def good_file(tmp_path, rng):
    """A small file with every scheme's pieces: per channel, blockwise and stored tensors."""
    path = tmp_path / "good.safetensors"
    tensors = {"w": fresh(rng, (8, 130), F32), "v": fresh(rng, (9, 120), BF16),
               "b": fresh(rng, (8,), F32)}
    save_quantized(path, {"w": tensors["w"], "b": tensors["b"]}, scheme="per_channel")
    per_channel = path.read_bytes()
    save_quantized(path, tensors, scheme="blockwise", block_size=64)
    return path, path.read_bytes(), per_channel


def test_truncated_at_every_byte(good_file, tmp_path):
    path, raw, _ = good_file
    cut = tmp_path / "cut.safetensors"
    for size in range(len(raw)):
        cut.write_bytes(raw[:size])
        expect_corrupt(cut)
    cut.write_bytes(raw + b"\0")
    expect_corrupt(cut, "1 bytes after the last tensor's data")


def test_every_header_byte_flipped(good_file, tmp_path):
    """Any single header byte changed (three ways) gives ValueError or, where the change is
    harmless (padding, a digit of a name), a load; never another exception."""
    path, raw, per_channel = good_file
    bad = tmp_path / "flipped.safetensors"
    for base in (raw, per_channel):
        (n,) = struct.unpack("<Q", base[:8])
        for i in range(8 + n):
            for mask in (0x01, 0x20, 0xFF):
                b = bytearray(base)
                b[i] ^= mask
                bad.write_bytes(bytes(b))
                try:
                    load_quantized(bad)
                except ValueError as exc:
                    assert str(exc).startswith(f"{bad}: "), exc


def rewrite(path, raw: bytes, edit) -> None:
    """Writes ``raw`` with its header passed through ``edit(header) -> header`` (the data as
    it was, or ``edit`` returns (header, data))."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    out = edit(header)
    if isinstance(out, tuple):
        out, data = out
    text = json.dumps(out).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _meta(h, name, **changes):
    d = json.loads(h["__metadata__"][f"fastopt.tensor.{name}"])
    d.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del d[k]
    h["__metadata__"][f"fastopt.tensor.{name}"] = json.dumps(d)
    return h


def _set(h, name, key, value):
    h[name][key] = value
    return h


def _pop(h, key):
    h.pop(key)
    return h


def _pop_meta(h, key):
    h["__metadata__"].pop(key)
    return h


def _swap_offsets(h, a, b):
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    return h


def _scale_bytes(h, data, value):
    s, e = h["w::scale"]["data_offsets"]
    scales = np.frombuffer(data[s:e], F32).copy()
    scales[3] = value
    return h, data[:s] + scales.tobytes() + data[e:]


def _zp_bytes(h, data, value):
    s, e = h["w::zero_point"]["data_offsets"]
    zps = np.frombuffer(data[s:e], np.int32).copy()
    zps[5] = value
    return h, data[:s] + zps.tobytes() + data[e:]


# (id, edit of the blockwise file's header, expected text); "pc": of the per-channel file
HEADER_CASES = [
    ("not an object", lambda h: [1, 2], "header is not a JSON object"),
    ("metadata not strings", lambda h: {**h, "__metadata__": {"a": 1}}, "__metadata__"),
    ("dtype unknown", lambda h: _set(h, "w", "dtype", "Q8"), "dtype 'Q8' is not supported"),
    ("dtype lower case", lambda h: _set(h, "w", "dtype", "i8"), "dtype 'i8' is not supported"),
    ("dtype wrong but same size", lambda h: _set(h, "w", "dtype", "U8"), "is not the metadata's"),
    ("shape negative", lambda h: _set(h, "w", "shape", [-8, -130]), "is not a list of sizes"),
    ("shape float", lambda h: _set(h, "w", "shape", [8.0, 130]), "is not a list of sizes"),
    ("shape size mismatch", lambda h: _set(h, "w", "shape", [8, 131]), "needs 1048 bytes"),
    ("shape other with same size", lambda h: _set(h, "w", "shape", [130, 8]),
     "differs from the metadata's"),
    ("extra key", lambda h: _set(h, "w", "name", "w"), "expected dtype, shape and data_offsets"),
    ("offsets past the data", lambda h: _set(h, "b", "data_offsets", [10**6, 10**6 + 32]),
     "reach past the data"),
    ("offsets reversed", lambda h: _set(h, "b", "data_offsets",
                                        h["b"]["data_offsets"][::-1]), "are not [start, end]"),
    ("offsets one number", lambda h: _set(h, "b", "data_offsets", [0]), "are not [start, end]"),
    ("offsets overlap", lambda h: _set(h, "b", "data_offsets", [0, 32]), "overlap"),
    ("offsets swapped sizes differ", lambda h: _swap_offsets(h, "w", "v"), "bytes"),
    ("tensor removed: a gap", lambda h: _pop(h, "v::absmax"), "a gap of 68 bytes"),
    ("tensor missing", lambda h: _meta(h, "v", scheme="per_tensor", qdtype="int8"),
     "its scale tensor 'v::scale' is missing"),
    ("metadata of a tensor missing", lambda h: _pop_meta(h, "fastopt.tensor.v"),
     "not described in the metadata"),
    ("metadata not JSON", lambda h: _meta_text(h, "v", "{oops"), "is not a JSON object"),
    ("scheme unknown", lambda h: _meta(h, "v", scheme="int4"), "unknown scheme 'int4'"),
    ("block_size missing", lambda h: _meta(h, "v", block_size=None), "block_size None"),
    ("block_size 0", lambda h: _meta(h, "v", block_size=0), "block_size 0"),
    ("block_size mismatch", lambda h: _meta(h, "v", block_size=32), "expected F32 of shape [34]"),
    ("shape mismatch", lambda h: _meta(h, "v", shape=[120, 9]), "differs from the metadata's"),
    ("original dtype int", lambda h: _meta(h, "v", dtype="int32"), "a quantized tensor of dtype"),
    ("original dtype unknown", lambda h: _meta(h, "v", dtype="float8"), "'float8'"),
    ("qdtype uint8 blockwise", lambda h: _meta(h, "v", qdtype="uint8"), "qdtype 'uint8'"),
    ("described tensor absent", lambda h: _meta_text(h, "ghost", json.dumps(
        {"scheme": "none", "dtype": "float32", "shape": [1]})), "not in the file"),
    ("version", lambda h: _meta_text(h, None, "2"), "version '2' is not supported"),
    ("stored dtype mismatch", lambda h: _meta(h, "b", dtype="int32"), "differs from the metadata"),
    ("pc axis out of range", lambda h: _meta(h, "w", axis=2), "axis 2 is out of range"),
    ("pc axis mismatch", lambda h: _meta(h, "w", axis=1), "expected F32 of shape [130]"),
    ("pc zero_point dtype", lambda h: _set(h, "w::zero_point", "dtype", "F32"),
     "expected I32 of shape [8]"),
    ("dtype a list", lambda h: _set(h, "w", "dtype", ["I8"]), "dtype ['I8'] is not supported"),
    ("scheme a list", lambda h: _meta(h, "v", scheme=["blockwise"]), "unknown scheme"),
    ("original dtype a list", lambda h: _meta(h, "v", dtype=["float32"]), "is not supported"),
    ("qdtype an object", lambda h: _meta(h, "v", qdtype={"a": 1}), "qdtype"),
    ("absmax NaN", lambda h: None, "block maxima are not all finite and >= 0"),
    ("absmax inf", lambda h: None, "block maxima are not all finite and >= 0"),
    ("absmax negative", lambda h: None, "block maxima are not all finite and >= 0"),
    ("pc scale NaN", lambda h: None, "scales are not all positive and finite"),
    ("pc scale 0", lambda h: None, "scales are not all positive and finite"),
    ("pc zero point 200", lambda h: None, "zero points are outside [-128, 127]"),
]


def _meta_text(h, name, text):
    h["__metadata__"]["fastopt.version" if name is None else f"fastopt.tensor.{name}"] = text
    return h


def _absmax_bytes(h, data, value):
    s, e = h["v::absmax"]["data_offsets"]
    absmax = np.frombuffer(data[s:e], F32).copy()
    absmax[2] = value
    return h, data[:s] + absmax.tobytes() + data[e:]


_DATA_EDITS = {"absmax NaN": lambda h, d: _absmax_bytes(h, d, np.nan),
               "absmax inf": lambda h, d: _absmax_bytes(h, d, np.inf),
               "absmax negative": lambda h, d: _absmax_bytes(h, d, -0.5),
               "pc scale NaN": lambda h, d: _scale_bytes(h, d, np.nan),
               "pc scale 0": lambda h, d: _scale_bytes(h, d, 0.0),
               "pc zero point 200": lambda h, d: _zp_bytes(h, d, 200)}


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_corrupt_header_raises(case, good_file, tmp_path):
    name, edit, match = case
    _, raw, per_channel = good_file
    bad = tmp_path / "bad.safetensors"
    if name in _DATA_EDITS:
        base = per_channel if name.startswith("pc ") else raw
        (n,) = struct.unpack("<Q", base[:8])
        header = json.loads(base[8:8 + n])
        out, data = _DATA_EDITS[name](header, base[8 + n:])
        text = json.dumps(out).encode()
        bad.write_bytes(struct.pack("<Q", len(text)) + text + data)
    else:
        rewrite(bad, per_channel if name.startswith("pc ") else raw, edit)
    expect_corrupt(bad, match)
    for dequantize in (False, True):  # checked whichever way it is loaded
        with pytest.raises(ValueError):
            load_quantized(bad, dequantize=dequantize)


def test_path_must_name_a_file(good_file, tmp_path, rng):
    """An int is refused as a path: open() would take it as a file descriptor of the
    caller's (read from, then closed)."""
    r, w = os.pipe()
    try:
        for path in (r, True, 3.5, None):
            expected = r"^path: expected a str, bytes or an os.PathLike"
            with pytest.raises(TypeError, match=expected):
                load_quantized(path)
            with pytest.raises(TypeError, match=expected):
                save_quantized(path, {"w": fresh(rng, (40, 40), F32)})
        os.write(w, b"still open")  # the descriptors were not closed
        assert os.read(r, 10) == b"still open"
    finally:
        os.close(r)
        os.close(w)
    assert os.listdir(tmp_path) == [good_file[0].name]  # nothing else written


def test_path_may_be_bytes(tmp_path, rng):
    w = fresh(rng, (40, 40), F32)
    path = os.fsencode(tmp_path / "w.safetensors")
    save_quantized(path, {"w": w})
    assert load_quantized(path)["w"].shape == (40, 40)


def test_load_device_without_its_library_is_a_value_error(good_file, monkeypatch):
    """A device fastopt cannot place tensors on is named before the file is read."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("no cupy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(ValueError, match=r"^device: 'cupy' needs CuPy"):
        load_quantized(good_file[0], device="cupy")
    monkeypatch.setattr(builtins, "__import__", real_import)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"^device: 'meta': meta tensors hold no data"):
        load_quantized(good_file[0], device="meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"^device: 'mps': torch .* has no usable mps"):
            load_quantized(good_file[0], device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda': torch .* has no usable cuda"):
            load_quantized(good_file[0], device="cuda")
    else:
        with pytest.raises(ValueError, match=r"^device: 'cuda:99': torch sees"):
            load_quantized(good_file[0], device="cuda:99")
    assert load_quantized(os.fsencode(good_file[0])).keys() == load_quantized(good_file[0]).keys()


@pytest.mark.parametrize("case", [
    ("empty file", b"", "too short"),
    ("header length 0", struct.pack("<Q", 0), "header length 0"),
    ("header length past the file", struct.pack("<Q", 100) + b"{}", "header length 100"),
    ("header length 2^64 - 1", b"\xff" * 8 + b"{}", "header length"),
    ("header not UTF-8", struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
    ("header not JSON", struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
    ("deep nesting", struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ("gap before data", None, "a gap of 4 bytes"),
    ("empty but too big for NumPy", "huge", "shape [0, 2305843009213693952] is not possible"),
    ("65 dimensions", "ndim", "is not possible"),
], ids=lambda c: c[0])
def test_malformed_files_raise(case, tmp_path):
    name, raw, match = case
    path = tmp_path / "bad.safetensors"
    if raw is None:
        text = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
        raw = struct.pack("<Q", len(text)) + text + b"\0" * 8
    elif isinstance(raw, str):
        shape = [0, 2**61] if raw == "huge" else [0] * 65
        text = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
        raw = struct.pack("<Q", len(text)) + text.encode()
    path.write_bytes(raw)
    expect_corrupt(path, match)


def test_duplicate_keys_raise(tmp_path):
    path = tmp_path / "dup.safetensors"
    text = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    expect_corrupt(path, "key 'a' appears twice")


# ---- bad arguments --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scheme="per_row"), ValueError, "^scheme: "),
    (dict(dtype="int4"), ValueError, "^dtype: "),
    (dict(dtype="uint8", scheme="blockwise"), ValueError, "^dtype: blockwise"),
    (dict(axis=1.0), TypeError, "^axis: "),
    (dict(axis=2), ValueError, r"^tensors\['w'\]: axis: 2 is out of range"),
    (dict(block_size=0), ValueError, "^block_size: "),
    (dict(block_size=True), TypeError, "^block_size: "),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_save_bad_arguments(kwargs, exc, match, tmp_path, rng):
    path = tmp_path / "m"
    with pytest.raises(exc, match=match):
        save_quantized(path, {"w": fresh(rng, (40, 40), F32)}, **kwargs)
    assert not os.listdir(tmp_path)  # nothing written, no temporary left


def test_save_bad_tensors(tmp_path, rng):
    path = tmp_path / "m"
    x = fresh(rng, (40, 40), F32)
    cases = [
        ([("w", x)], TypeError, "^tensors: expected a dict"),
        ({"": x}, ValueError, "^tensors: '' is not a valid"),
        ({"__metadata__": x}, ValueError, "^tensors: '__metadata__'"),
        ({1: x}, ValueError, "^tensors: 1 is not"),
        ({"w": x.tolist()}, TypeError, r"^tensors\['w'\]: "),
        ({"w": x.astype(np.complex64)}, TypeError, r"^tensors\['w'\]: dtype complex64"),
        ({"w": x, "w::scale": x}, ValueError, r"^tensors: 'w::scale' is the name of 'w''s scale"),
    ]
    masked = np.ma.masked_array(x[0], mask=x[0] > 0)
    cases += [({"w": x, "b": masked}, TypeError, r"^tensors\['b'\]: masked arrays are not"),
              ({"w": np.ma.masked_array(x)}, TypeError, r"^tensors\['w'\]: masked arrays"),
              ({"w": x}, TypeError, r"^skip: expected tensor names \(str\), got list", [["w"]]),
              ({"w": x}, TypeError, r"^skip: expected tensor names \(str\), got int", [1, "w"]),
              ({"w": x}, TypeError, r"^skip: expected None, a collection.*got bytes", b"w")]
    bad = x.copy()
    bad[3, 7] = np.nan
    cases.append(({"w": bad}, ValueError,
                  r"^tensors\['w'\]: x: non-finite value at index \(3, 7\)"))
    for tensors, exc, match, *skip in cases:
        with pytest.raises(exc, match=match):
            save_quantized(path, tensors, skip=skip[0] if skip else None)
        assert not os.listdir(tmp_path)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_big_endian_floats_save_as_native_ones(scheme, tmp_path, rng):
    """A big-endian float array is quantized as its native-order copy (float64 cast to
    float32 first, as a native one is), and stored as it is where skipped."""
    x = fresh(rng, (40, 40), F32)
    for dtype in (">f4", ">f8", ">f2"):
        native = x.astype(dtype[1:])
        save_quantized(tmp_path / "a", {"w": native, "b": native[0]}, scheme=scheme)
        save_quantized(tmp_path / "b", {"w": native.astype(dtype), "b": native[0].astype(dtype)},
                       scheme=scheme)
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes(), dtype


def test_load_bad_arguments(good_file):
    path = good_file[0]
    with pytest.raises(TypeError, match="^dequantize: "):
        load_quantized(path, dequantize=1)
    with pytest.raises(ValueError, match="^out_dtype: "):
        load_quantized(path, out_dtype="float64")
    with pytest.raises(TypeError, match="^device: "):
        load_quantized(path, device=0)
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="^device: 'gpu7'"):
        load_quantized(path, device="gpu7")
    with pytest.raises(FileNotFoundError):
        load_quantized(path.parent / "missing.safetensors")


def test_bfloat16_as_dtype_object(good_file):
    path = good_file[0]
    a = load_quantized(path, out_dtype=ml_dtypes.bfloat16)
    b = load_quantized(path, out_dtype="bfloat16")
    for name in a:
        assert_bits(a[name], b[name], name)
    assert a["w"].dtype == BF16
