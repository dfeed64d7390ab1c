"""A quantized model file: ``save_quantized`` writes a dict of tensors (a torch
``state_dict`` too) as a standard safetensors file, its float tensors quantized to int8
by fastopt's kernels; ``load_quantized`` reads it back, dequantized or as the quantized
pieces, as NumPy arrays, torch tensors (CPU or CUDA) or CuPy arrays.

The file is plain safetensors (an 8-byte little-endian header length, a JSON header, the
data), written here without the safetensors package, so any safetensors reader opens it.
For a quantized tensor ``name`` it holds:

* ``name``: the int8 (or uint8) values, I8/U8, in the tensor's shape;
* ``name::scale`` (F32) and ``name::zero_point`` (I32): one each per tensor (shape [1]) or
  per channel along the axis (shape [C]) -- schemes "per_tensor" and "per_channel", with
  the symmetric min/max observer of ``choose_qparams`` (zero point 0 for int8, 128 for
  uint8);
* ``name::absmax`` (F32, one per block) -- scheme "blockwise", ``quantize_blockwise``;
* in ``__metadata__``: ``"fastopt.tensor.<name>"``, a JSON object with ``scheme``,
  ``dtype`` (the original dtype), ``shape``, and ``qdtype``, ``axis`` or ``block_size``
  as the scheme has them; and ``"fastopt.format": "quantized"``, ``"fastopt.version": "1"``.

Tensors stored as they are (``skip``, and every tensor that is not floating point) keep
their dtype and get ``{"scheme": "none", ...}`` in the metadata. A safetensors file that
fastopt did not write (no ``fastopt.format`` key) loads as such unquantized tensors.

Loading checks everything before it returns anything: a corrupt or truncated file raises
``ValueError`` naming the path and the problem (header length, JSON, dtypes, shapes,
offsets out of range, overlapping or leaving gaps, missing or inconsistent metadata,
scales that are not positive finite float32, block maxima that are not finite and >= 0),
never a crash.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import struct
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Collection,
    Dict,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
)

import numpy as np

from . import _arrays
from . import quant as _quant

if TYPE_CHECKING:  # (typing.TypeGuard is Python 3.10's)
    from typing_extensions import TypeGuard

__all__ = ["save_quantized", "load_quantized", "QuantizedTensor"]

FORMAT_KEY, FORMAT = "fastopt.format", "quantized"
VERSION_KEY, VERSION = "fastopt.version", "1"
TENSOR_KEY = "fastopt.tensor."  # + the tensor's name: its JSON description
SCHEMES = ("per_tensor", "per_channel", "blockwise")
PIECES = {  # the scheme's tensors besides the values: suffix, safetensors dtype
    "per_tensor": (("::scale", "F32"), ("::zero_point", "I32")),
    "per_channel": (("::scale", "F32"), ("::zero_point", "I32")),
    "blockwise": (("::absmax", "F32"),),
    "none": (),
}
MAX_HEADER = 100 << 20  # as the safetensors package: a larger header is not a real one
SKIP_BELOW = 1024  # the default skip: fewer elements than this, or fewer than 2 dims

# safetensors dtype names <-> NumPy dtype names ("bfloat16": ml_dtypes')
_ST_TO_NAME = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
}
_NAME_TO_ST = {v: k for k, v in _ST_TO_NAME.items()}
_ITEMSIZE = {
    st: 2 if name == "bfloat16" else np.dtype(name).itemsize for st, name in _ST_TO_NAME.items()
}
_FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized tensor as ``load_quantized(..., dequantize=False)`` returns it.

    ``q``: the int8/uint8 values in the original shape, on the requested device (array of
    the requested library); ``scheme``: "per_tensor", "per_channel" or "blockwise";
    ``dtype`` and ``shape``: the original tensor's. Per tensor/channel: ``scale`` (float32)
    and ``zero_point`` (int32) NumPy arrays of shape (1,) or (channels,), ``axis`` the
    channel axis (None per tensor). Blockwise: ``absmax`` (float32, one per block, on q's
    device) and ``block_size``. ``dequantize()`` gives what ``load_quantized`` would.
    """

    q: Any
    scheme: str
    dtype: str
    shape: Tuple[int, ...]
    scale: Optional[np.ndarray] = None
    zero_point: Optional[np.ndarray] = None
    axis: Optional[int] = None
    absmax: Any = None
    block_size: Optional[int] = None

    def dequantize(self, out_dtype: Any = "float32") -> Any:
        if self.scheme == "blockwise":
            assert self.block_size is not None
            return _quant.dequantize_blockwise(self.q, self.absmax, self.block_size, out_dtype)
        assert self.scale is not None and self.zero_point is not None
        if self.scheme == "per_tensor":
            scale, zero_point = float(self.scale[0]), int(self.zero_point[0])
            return _quant.dequantize(self.q, scale, zero_point, out_dtype=out_dtype)
        return _quant.dequantize(self.q, self.scale, self.zero_point, self.axis, out_dtype)


# ---- saving ---------------------------------------------------------------------------------


def _default_skip(name: str, shape: Tuple[int, ...]) -> bool:
    return len(shape) < 2 or math.prod(shape) < SKIP_BELOW


def _skip_rule(skip: Any, names: Collection[str]) -> Callable[[str, Tuple[int, ...]], bool]:
    if skip is None:
        return _default_skip
    if callable(skip):
        return lambda name, shape: bool(skip(name, shape))
    if isinstance(skip, (str, bytes)) or not isinstance(skip, Collection):
        raise TypeError(
            f"skip: expected None, a collection of names or a callable, got {type(skip).__name__}"
        )
    for item in skip:
        if not isinstance(item, str):
            raise TypeError(f"skip: expected tensor names (str), got {type(item).__name__}")
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(f"skip: no tensors named {unknown}")
    skipped = frozenset(skip)
    return lambda name, shape: name in skipped


def _host(a: Any) -> np.ndarray:
    """A C-contiguous little-endian NumPy copy or view of array ``a`` (torch CPU/CUDA, CuPy,
    NumPy), bfloat16 as ml_dtypes'."""
    if isinstance(a, np.ndarray):
        h = _arrays._plain_ndarray("a", a)
    elif _arrays._is_torch(a):
        import torch

        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            h = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            h = t.numpy()
    else:
        h = a.get()  # CuPy
    if h.dtype.byteorder == ">":
        h = h.astype(h.dtype.newbyteorder("<"))
    return h if h.flags.c_contiguous else h.copy(order="C")  # (0-d arrays stay 0-d)


def _float_input(a: Any) -> Any:
    """``a`` as the quantizers take it: C-contiguous float32/float16/bfloat16 of its own
    library (float64 cast to float32; torch CPU tensors as they are)."""
    if isinstance(a, np.ndarray):
        if a.dtype.byteorder == ">":  # (a big-endian array: the kernels read native floats)
            a = a.astype(a.dtype.newbyteorder("="))
        return np.require(a, np.float32 if a.dtype == np.float64 else None, "C")
    if _arrays._is_torch(a):
        import torch

        t = a.detach()
        return (t.float() if t.dtype == torch.float64 else t).contiguous()
    import cupy

    return cupy.ascontiguousarray(a, np.float32 if a.dtype == np.float64 else None)


def _quantize(
    name: str, a: Any, scheme: str, qdtype: str, axis: int, block_size: int
) -> Tuple[Dict[str, Any], List[Tuple[str, np.ndarray]]]:
    """(the metadata entry's scheme fields, [(piece suffix, NumPy array)...]) of ``a``."""
    x = _float_input(a)
    shape = tuple(int(d) for d in x.shape)
    if scheme == "blockwise":
        q, absmax = _quant.quantize_blockwise(x, block_size)
        return {"scheme": scheme, "qdtype": "int8", "block_size": block_size}, [
            ("", _host(q)),
            ("::absmax", _host(absmax)),
        ]
    if scheme == "per_tensor":
        scale, zp = _quant.choose_qparams(x, dtype=qdtype)
        q = _quant.quantize_per_tensor(x, scale, zp, qdtype)
        scales = np.array([scale], np.float32)
        zps = np.array([zp], np.int32)
        fields: Dict[str, Any] = {"scheme": scheme, "qdtype": qdtype}
    else:
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis: {axis} is out of range for shape {shape}")
        axis %= len(shape)
        scales, zps = _quant.choose_qparams(x, axis=axis, dtype=qdtype)
        q = _quant.quantize_per_channel(x, scales, zps, axis, qdtype)
        fields = {"scheme": scheme, "qdtype": qdtype, "axis": axis}
    return fields, [
        ("", _host(q)),
        ("::scale", np.asarray(scales, np.float32)),
        ("::zero_point", np.asarray(zps, np.int32)),
    ]


def _check_options(scheme: Any, dtype: Any, axis: Any, block_size: Any) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    qdtype = _quant._qdtype(dtype)[0].name
    if scheme == "blockwise" and qdtype != "int8":
        raise ValueError("dtype: blockwise quantization is int8 only")
    for arg, value in (("axis", axis), ("block_size", block_size)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{arg}: expected an integer, got {type(value).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size: must be > 0, got {block_size}")
    return qdtype


def _check_path(path: Any) -> str:
    """``path`` as a str, or a TypeError unless it names a file (a str, bytes or an
    os.PathLike: open() would take an int as a file descriptor)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path: expected a str, bytes or an os.PathLike, got {type(path).__name__}")
    return os.fsdecode(path)


def save_quantized(
    path: Union[str, bytes, os.PathLike],
    tensors: Mapping[str, Any],
    *,
    scheme: str = "per_channel",
    dtype: str = "int8",
    axis: int = 0,
    block_size: int = 256,
    skip: Any = None,
) -> None:
    """Writes ``tensors`` (name -> NumPy array, torch tensor on any device, CuPy array; a
    torch ``state_dict``) to ``path`` as a safetensors file, float tensors quantized by
    ``scheme``: "per_channel" along ``axis`` or "per_tensor" (``dtype`` "int8" or "uint8",
    symmetric min/max scales as ``choose_qparams``), or "blockwise" (int8, ``block_size``
    elements per absmax). CUDA tensors are quantized on their GPU.

    ``skip`` names the tensors stored as they are: None (default) skips those with fewer
    than 2 dimensions (biases, norm weights) or fewer than 1024 elements, where int8 saves
    little and costs the most accuracy; a collection of names skips exactly those; a
    callable ``skip(name, shape) -> bool`` decides per tensor. Tensors that are not
    floating point are always stored as they are. Non-finite values in a tensor to
    quantize raise ValueError naming it. The file is written to a temporary name in the
    same directory and renamed, so a failed call leaves no partial file.
    """
    path = _check_path(path)
    qdtype = _check_options(scheme, dtype, axis, block_size)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a dict of name -> array, got {type(tensors).__name__}")
    names: List[Any] = list(tensors)  # checked below: str keys only
    for name in names:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensors: {name!r} is not a valid tensor name")
    rule = _skip_rule(skip, names)
    taken = set(names)
    pieces: List[Tuple[str, np.ndarray]] = []  # (file name, NumPy array)
    metadata = {FORMAT_KEY: FORMAT, VERSION_KEY: VERSION}
    for name in names:
        a = tensors[name]
        if not (isinstance(a, np.ndarray) or _arrays._is_torch(a) or _arrays._is_cupy(a)):
            raise TypeError(
                f"tensors[{name!r}]: expected a NumPy array, a torch tensor or a CuPy array, "
                f"got {type(a).__name__}"
            )
        if isinstance(a, (np.ma.MaskedArray, np.matrix)):
            _arrays._plain_ndarray(f"tensors[{name!r}]", a)  # (raises, naming the tensor)
        type_name = _arrays.dtype_name(a)
        shape = tuple(int(d) for d in a.shape)
        if type_name not in _NAME_TO_ST:
            raise TypeError(f"tensors[{name!r}]: dtype {type_name} cannot be stored")
        entry: Dict[str, Any] = {"dtype": type_name, "shape": list(shape)}
        if type_name in _FLOATS and not rule(name, shape):
            try:
                fields, parts = _quantize(name, a, scheme, qdtype, int(axis), int(block_size))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"tensors[{name!r}]: {exc}") from None
        else:
            fields, parts = {"scheme": "none"}, [("", _host(a))]
        for suffix, arr in parts:
            if suffix and name + suffix in taken:
                raise ValueError(
                    f"tensors: {name + suffix!r} is the name of {name!r}'s {suffix[2:]} "
                    "in the file; rename that tensor"
                )
            taken.add(name + suffix)
            pieces.append((name + suffix, arr))
        metadata[TENSOR_KEY + name] = json.dumps({**fields, **entry}, separators=(",", ":"))
    _write(path, pieces, metadata)


def _write(
    path: Union[str, os.PathLike], pieces: List[Tuple[str, np.ndarray]], metadata: Dict[str, str]
) -> None:
    # widest dtype first: every tensor then starts aligned to its element size
    pieces = sorted(pieces, key=lambda p: -p[1].dtype.itemsize)
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, arr in pieces:
        header[name] = {
            "dtype": _NAME_TO_ST[arr.dtype.name],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as safetensors pads
    # a new file beside the target (the usual permissions: 0o666 less the umask), renamed
    # over it once complete
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(path)), f".fastopt-{secrets.token_hex(8)}.tmp"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, arr in pieces:
                f.write(arr.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- loading --------------------------------------------------------------------------------


class _Corrupt(ValueError):
    """A problem of the file, raised as ValueError("<path>: <problem>") by load_quantized."""


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Corrupt(f"header: key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _named(v: Any, names: Collection[str]) -> TypeGuard[str]:
    """Whether JSON value ``v`` is one of ``names`` (a list or an object is none)."""
    return isinstance(v, str) and v in names


def _read(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, str], np.ndarray]:
    """(tensor entries with checked dtype/shape/offsets, metadata, the data bytes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _Corrupt(f"{size} bytes: too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER or n > size - 8:
            raise _Corrupt(f"header length {n} is impossible for a file of {size} bytes")
        raw = f.read(n)
        data = np.empty(size - 8 - n, np.uint8)
        if f.readinto(data.data) != data.size:
            raise _Corrupt("the file changed while it was read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _Corrupt(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _Corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _Corrupt("__metadata__ is not a map of strings to strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _Corrupt(f"tensor {name!r}: expected dtype, shape and data_offsets")
        st, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not _named(st, _ST_TO_NAME):
            raise _Corrupt(f"tensor {name!r}: dtype {st!r} is not supported")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**62 for d in shape):
            raise _Corrupt(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _Corrupt(f"tensor {name!r}: data_offsets {offsets!r} are not [start, end]")
        if offsets[1] > data.size:
            raise _Corrupt(
                f"tensor {name!r}: data_offsets {offsets} reach past the data's "
                f"{data.size} bytes (truncated file?)"
            )
        itemsize = _ITEMSIZE[st]
        if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise _Corrupt(
                f"tensor {name!r}: shape {shape} of {st} needs "
                f"{math.prod(shape) * itemsize} bytes, data_offsets give {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start < end:
            raise _Corrupt(f"tensor {name!r}: data_offsets overlap another tensor's")
        if start > end:
            raise _Corrupt(f"tensor {name!r}: a gap of {start - end} bytes before its data")
        end = stop
    if end != data.size:
        raise _Corrupt(f"{data.size - end} bytes after the last tensor's data")
    return header, metadata, data


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("bfloat16 tensors need the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _array(header: Dict[str, Any], data: np.ndarray, name: str) -> np.ndarray:
    info = header[name]
    start, stop = info["data_offsets"]
    dt = _np_dtype(_ST_TO_NAME[info["dtype"]])
    chunk = data[start:stop]
    if start % dt.itemsize:  # a writer that did not align it: a copy that is
        chunk = chunk.copy()
    try:
        return chunk.view(dt).reshape(info["shape"])
    except ValueError as exc:  # e.g. (0, 2**61) float32: NumPy's size limit
        raise _Corrupt(f"tensor {name!r}: shape {info['shape']} is not possible: {exc}") from None


def _describe(name: str, text: str, header: Dict[str, Any]) -> Dict[str, Any]:
    """The checked metadata entry of tensor ``name``."""
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        d = None
    if not isinstance(d, dict):
        raise _Corrupt(f"metadata of {name!r} is not a JSON object")
    scheme = d.get("scheme")
    if not _named(scheme, PIECES):
        raise _Corrupt(f"metadata of {name!r}: unknown scheme {scheme!r}")
    shape = d.get("shape")
    if not isinstance(shape, list) or not all(_is_int(v) and v >= 0 for v in shape):
        raise _Corrupt(f"metadata of {name!r}: shape {shape!r} is not a list of sizes")
    if not _named(d.get("dtype"), _NAME_TO_ST):
        raise _Corrupt(f"metadata of {name!r}: dtype {d.get('dtype')!r} is not supported")
    info = header.get(name)
    if info is None:
        raise _Corrupt(f"tensor {name!r} is described in the metadata but not in the file")
    if info["shape"] != shape:
        raise _Corrupt(
            f"tensor {name!r}: shape {info['shape']} differs from the metadata's {shape}"
        )
    n = math.prod(shape)
    if scheme == "none":
        if info["dtype"] != _NAME_TO_ST[d["dtype"]]:
            raise _Corrupt(f"tensor {name!r}: dtype {info['dtype']} differs from the metadata's")
        return d
    if d["dtype"] not in _FLOATS:
        raise _Corrupt(f"metadata of {name!r}: a quantized tensor of dtype {d['dtype']}")
    qdtype = d.get("qdtype")
    if not _named(qdtype, _quant.QRANGE) or (scheme == "blockwise" and qdtype != "int8"):
        raise _Corrupt(f"metadata of {name!r}: qdtype {qdtype!r} is not supported")
    if info["dtype"] != _NAME_TO_ST[qdtype]:
        raise _Corrupt(f"tensor {name!r}: dtype {info['dtype']} is not the metadata's {qdtype}")
    if scheme == "blockwise":
        block = d.get("block_size")
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise _Corrupt(f"metadata of {name!r}: block_size {block!r} is not a positive integer")
        counts = [-(-n // block)]
    elif scheme == "per_channel":
        axis = d.get("axis")
        if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape):
            raise _Corrupt(f"metadata of {name!r}: axis {axis!r} is out of range")
        counts = [shape[axis]] * 2
    else:
        counts = [1, 1]
    for (suffix, st), count in zip(PIECES[scheme], counts):
        piece = header.get(name + suffix)
        if piece is None:
            raise _Corrupt(f"tensor {name!r}: its {suffix[2:]} tensor {name + suffix!r} is missing")
        if piece["dtype"] != st or piece["shape"] != [count]:
            raise _Corrupt(
                f"tensor {name + suffix!r}: expected {st} of shape [{count}], got "
                f"{piece['dtype']} of shape {piece['shape']}"
            )
    return d


def _target(device: Any) -> Tuple[str, Any]:
    """Where results go: ("numpy", None), ("torch", torch.device) or ("cupy", cupy.Device)."""
    if device is None:
        return "numpy", None
    if device == "cupy":
        try:
            import cupy
        except ImportError:
            raise ValueError("device: 'cupy' needs CuPy, which is not installed") from None
        if not cupy.cuda.is_available():
            raise ValueError("device: 'cupy': CuPy sees no usable CUDA device")
        return "cupy", cupy.cuda.Device()
    if type(device).__module__.startswith("cupy"):
        return "cupy", device
    if isinstance(device, str) or type(device).__module__.startswith("torch"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"device: {device!r} needs torch, which is not installed") from None
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: {device!r} is not a device: {exc}") from None
        if dev.type == "meta":
            raise ValueError(f"device: {device!r}: meta tensors hold no data")
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if dev.type != "cpu" and callable(available) and not available():
            raise ValueError(
                f"device: {device!r}: torch {torch.__version__} has no usable {dev.type}"
            )
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
        return "torch", dev
    raise TypeError(
        f"device: expected None, 'cupy', a cupy.cuda.Device, a torch device or its name, "
        f"got {type(device).__name__}"
    )


def _place(a: np.ndarray, target: Tuple[str, Any]) -> Any:
    """NumPy array ``a`` as an array of the target library and device."""
    kind, dev = target
    if kind == "numpy":
        return a
    if kind == "torch":
        import torch

        t = (
            torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            if a.dtype.name == "bfloat16"
            else torch.from_numpy(a)
        )
        return t if dev.type == "cpu" else t.to(dev)
    import cupy

    if a.dtype.name == "bfloat16":
        raise TypeError("device: CuPy has no bfloat16; load with out_dtype='float16'")
    with dev:
        return cupy.asarray(a)


def _cast(a: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """A stored float tensor as out_dtype (rounded to nearest even)."""
    if a.dtype == out_dtype:
        return a
    return (
        a.astype(np.float32).astype(out_dtype)
        if a.dtype.name == "bfloat16"
        else a.astype(out_dtype)
    )


def load_quantized(
    path: Union[str, bytes, os.PathLike],
    *,
    dequantize: bool = True,
    out_dtype: Any = "float32",
    device: Any = None,
) -> Dict[str, Any]:
    """Reads a file of ``save_quantized`` (or any safetensors file) into a dict name -> array.

    ``dequantize=True``: every floating-point tensor comes back as ``out_dtype``
    ("float32", "float16" or "bfloat16"; quantized ones dequantized by fastopt's kernels,
    stored ones cast), others as stored. ``dequantize=False``: quantized tensors come back
    as ``QuantizedTensor`` (the int8 values and their scales), the others as stored.

    ``device``: None gives NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16``); "cpu",
    "cuda", "cuda:1" or a ``torch.device`` gives torch tensors there; "cupy" (the current
    CuPy device) or a ``cupy.cuda.Device`` gives CuPy arrays (no bfloat16). For a GPU the
    int8 data and scales are uploaded and dequantized there.

    A file that is not a valid safetensors file, or whose fastopt metadata does not match
    its tensors, raises ValueError naming ``path`` and the problem.
    """
    path = _check_path(path)
    if not isinstance(dequantize, (bool, np.bool_)):
        raise TypeError(f"dequantize: expected a bool, got {type(dequantize).__name__}")
    out_name = _quant.out_dtype_name(out_dtype)
    target = _target(device)
    try:
        return _load(path, bool(dequantize), out_name, target)
    except _Corrupt as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None


def _load(
    path: Union[str, os.PathLike], dequantize: bool, out_name: str, target: Tuple[str, Any]
) -> Dict[str, Any]:
    header, metadata, data = _read(path)
    out_np = _np_dtype(out_name)
    if FORMAT_KEY not in metadata:  # a plain safetensors file: every tensor as stored
        descriptions = {
            name: {"scheme": "none", "dtype": _ST_TO_NAME[info["dtype"]]}
            for name, info in header.items()
        }
    else:
        if metadata[FORMAT_KEY] != FORMAT or metadata.get(VERSION_KEY) != VERSION:
            raise _Corrupt(
                f"fastopt format {metadata[FORMAT_KEY]!r} version "
                f"{metadata.get(VERSION_KEY)!r} is not supported (expected {FORMAT!r} "
                f"version {VERSION!r})"
            )
        descriptions = {
            key[len(TENSOR_KEY) :]: _describe(key[len(TENSOR_KEY) :], text, header)
            for key, text in metadata.items()
            if key.startswith(TENSOR_KEY)
        }
        owned = set(descriptions)
        for name, d in descriptions.items():
            owned.update(name + suffix for suffix, _ in PIECES[d["scheme"]])
        stray = sorted(set(header) - owned)
        if stray:
            raise _Corrupt(f"tensors {stray} are not described in the metadata")
    result: Dict[str, Any] = {}
    for name, d in descriptions.items():
        stored = _array(header, data, name)
        if d["scheme"] == "none":
            if dequantize and d["dtype"] in _FLOATS:
                stored = _cast(stored, out_np)
            result[name] = _place(stored, target)
            continue
        qt = _quantized(name, d, header, data, target)
        if not dequantize:
            result[name] = qt
            continue
        try:
            result[name] = qt.dequantize(out_name)
        except ValueError as exc:  # scales or zero points the kernels refuse
            raise _Corrupt(f"tensor {name!r}: {exc}") from None
    return result


def _quantized(
    name: str,
    d: Dict[str, Any],
    header: Dict[str, Any],
    data: np.ndarray,
    target: Tuple[str, Any],
) -> QuantizedTensor:
    q = _place(_array(header, data, name), target)
    common = {"q": q, "scheme": d["scheme"], "dtype": d["dtype"], "shape": tuple(d["shape"])}
    if d["scheme"] == "blockwise":
        absmax = _array(header, data, name + "::absmax")
        if not (np.all(np.isfinite(absmax)) and np.all(absmax >= 0)):
            raise _Corrupt(f"tensor {name!r}: its block maxima are not all finite and >= 0")
        return QuantizedTensor(**common, absmax=_place(absmax, target), block_size=d["block_size"])
    scale = np.array(_array(header, data, name + "::scale"))
    zero_point = np.array(_array(header, data, name + "::zero_point"))
    qmin, qmax = _quant.QRANGE[d["qdtype"]]
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise _Corrupt(f"tensor {name!r}: its scales are not all positive and finite")
    if zero_point.size and (zero_point.min() < qmin or zero_point.max() > qmax):
        raise _Corrupt(f"tensor {name!r}: its zero points are outside [{qmin}, {qmax}]")
    axis = d.get("axis") if d["scheme"] == "per_channel" else None
    return QuantizedTensor(**common, scale=scale, zero_point=zero_point, axis=axis)
