"""PyTorch checkpoints -> Flax NNX models, and orbax save/restore of converted models.

    sd = read_checkpoint("convnext_dcls_tiny_1k_224_ema.pth")      # {name: np.ndarray}, no torch, no pickled code
    model = from_state_dict("convnext_tiny_dcls", sd)                # timm or original key names
    model = load("convnext_tiny_dcls", "ckpt.pth")                   # both steps; also an orbax dir or a URL
    save(model, "out/convnext_tiny_dcls"); model = restore("out/convnext_tiny_dcls")
    model = load_published("convnext_tiny_dcls", cache_dir)         # downloaded and converted once, verified

    python -m models.convert --model convnext_tiny_dcls --checkpoint FILE_OR_URL [--key model] --out DIR

Reading. `.pth`/`.pth.tar` files are torch (>= 1.6) zip archives: `<prefix>/data.pkl` is a pickle whose
persistent ids name raw storages `<prefix>/data/<key>`. The pickle is read by a restricted unpickler that
imports nothing: an allowlist of globals (tensor/parameter rebuilding, OrderedDict, storage and dtype names,
argparse.Namespace, pure-data builtins) maps to local stand-ins, and every other global becomes an inert
placeholder (calling it, or restoring its state, only makes more placeholders). Placeholders outside the
requested weights (optimizer state, args, metrics) are dropped; one inside them is an error naming it.
`.safetensors` files are parsed directly. A container is unwrapped with `key` if given, else with the first
of CONTAINER_KEYS that holds a dict (a flat state dict is used as is); "module." prefixes are stripped.

Limits (hostile files fail with a ValueError before anything large is allocated): zip entries are read with
a cap (their declared sizes checked against the file, compressed entries at most MAX_RATIO times their
compressed size, streamed); data.pkl is at most MAX_PICKLE_BYTES and its opcodes are scanned first
(pickletools: a counted BINBYTES8/BINUNICODE8/LONG4 larger than the rest of the file is an error, at most
MAX_PICKLE_OPS opcodes); a tensor view holding more elements than its storage (stride 0, overlapping) counts
against MAX_EXPANDED_BYTES for the whole file; safetensors headers are validated completely (types, shapes,
in-range and non-overlapping offsets).

Integrity: NaN or infinite parameters are an error naming the tensors (allow_nonfinite=True /
--allow-nonfinite to load them anyway); save() writes a SHA-256 manifest of its files and restore() checks
it (CorruptCheckpointError); load_published() downloads, converts and restores the published checkpoint
under a lock shared by the runs using one cache, converting again when the cached copy is corrupt.

Conversion. Our parameters keep PyTorch's names and layouts, so keys match one to one: the entry's
`remap_keys` turns original-repository names into timm names, the model is built abstractly
(`nnx.eval_shape`), every parameter and batch statistic is filled from the key of the same path, and all
problems (missing, unexpected, shape mismatches) are reported together. A variable shared by several
modules (the DCLS positions of a stage) is one leaf in `nnx.split`, while PyTorch repeats it under every
user's key: all those keys are accepted and must hold equal values.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import shutil
import sys
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import safetensors
from flax import nnx

from data.download import cached_download, default_cache_dir, file_lock
from models import registry

# Tried in this order when no key is given and the file is not itself a flat state dict: EMA weights first
# (timm's training checkpoints carry both "state_dict" and "state_dict_ema"; FAIR's "model" and "model_ema").
CONTAINER_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict", "module")
MAX_LISTED = 20  # problems listed per kind in an error message
# Resource limits, checked before anything is allocated. torch stores its zip entries uncompressed; a
# compressed entry may expand at most MAX_RATIO times (+ 1 MiB), so memory stays proportional to the file.
MAX_RATIO = 32
MAX_PICKLE_BYTES = 32 << 20     # data.pkl: real checkpoints (with optimizer state) hold well under 10 MiB
MAX_EXPANDED_BYTES = 64 << 20  # all views larger than their storage (expanded buffers), together
MAX_PICKLE_OPS = 2_000_000      # opcodes in data.pkl (each may allocate one object); real files: < 100 000

# ---------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------------------

# torch type names a pickle may use, and their numpy dtypes.
_TYPE_NAMES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,  # bytes; the tensor's dtype comes with _rebuild_tensor_v3
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}

# Safety. The unpickler itself only builds containers and calls what find_class returns; find_class never
# imports and returns either a pure function/immutable builtin type below, or an object made for this load
# alone. Our objects ignore the state a pickle's BUILD opcode would set on them (__setstate__), so a pickle
# cannot change them, and nothing it touches outlives the load.


class _Inert:
    def __setstate__(self, state):
        pass


class _Opaque(_Inert):
    """An instance of (or the class for) a global the reader does not allow. Nothing it is given is run."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _opaque(self.global_name)

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _opaque(name: str) -> _Opaque:
    obj = _Opaque()
    obj.global_name = name
    return obj


class _Namespace:
    """Stand-in for argparse.Namespace: holds its attributes as the dict `state`."""

    def __new__(cls, *args, **kwargs):  # the pickle calls only __new__ (NEWOBJ), then __setstate__ (BUILD)
        self = object.__new__(cls)
        self.state = {}
        return self

    def __init__(self, **kwargs):
        self.state.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.state.update(state)


class _TypeName(_Inert):
    """A torch storage type or dtype named by the pickle (torch.FloatStorage, torch.float16...)."""

    def __init__(self, name: str):
        self.name = name


def _dtype(type_name) -> np.dtype | None:
    if isinstance(type_name, _TypeName) and type_name.name in _TYPE_NAMES:
        return np.dtype(_TYPE_NAMES[type_name.name])
    return None


class _Storage(_Inert):
    """One raw storage of the archive, read on first use."""

    def __init__(self, archive: _Archive, key: str, dtype: np.dtype, numel: int):
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel
        self._arrays: dict[np.dtype, np.ndarray] = {}

    def array(self, dtype: np.dtype) -> np.ndarray:
        """The storage's bytes as a 1-D native-order array of `dtype` (read-only, cached)."""
        if dtype not in self._arrays:
            nbytes = self.numel * self.dtype.itemsize
            raw = self.archive.raw(self.key, nbytes)
            raw = memoryview(raw)[:nbytes - nbytes % dtype.itemsize]
            if self.archive.big_endian and dtype.itemsize > 1:
                unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
                raw = np.frombuffer(raw, np.dtype(f">u{unit}")).astype(f"<u{unit}").view(np.uint8)
            self._arrays[dtype] = np.frombuffer(raw, dtype)
        return self._arrays[dtype]


class _Tensor(_Inert):
    """A tensor as pickled: a view (offset, size, stride, in elements) of a storage. Read only if requested."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def numpy(self, name: str) -> np.ndarray:
        if not isinstance(self.storage, _Storage):
            raise ValueError(f"checkpoint entry {name!r}: its storage is a pickled {_opaque_name(self.storage)} "
                             "object; refusing to load it")
        dtype = self.storage.dtype if self.dtype is None else _dtype(self.dtype)
        size, stride, offset = self.size, self.stride, self.offset
        if (dtype is None or not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
                or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride))):
            raise ValueError(f"checkpoint entry {name!r}: invalid tensor (dtype {self.dtype!r}, offset {offset!r}, "
                             f"size {size!r}, stride {stride!r}); the file is corrupt")
        numel = int(np.prod(size, dtype=object)) if size else 1
        if numel > self.storage.numel * self.storage.dtype.itemsize // dtype.itemsize:
            # A stride-0 (expanded) or overlapping view repeats its storage's elements: its copy costs memory
            # the file does not hold, so all such copies together are capped.
            archive = self.storage.archive
            archive.expanded += numel * dtype.itemsize
            if archive.expanded > MAX_EXPANDED_BYTES:
                raise ValueError(f"checkpoint entry {name!r}: a view of {numel} elements (size {size}, stride "
                                 f"{stride}) of a storage of {self.storage.numel} elements: views that repeat their "
                                 f"storage's elements (stride 0 or overlapping) would take more than "
                                 f"{MAX_EXPANDED_BYTES >> 20} MiB in all; refusing it, the file is corrupt or hostile")
        buf = self.storage.array(dtype)
        if 0 in size:
            return np.zeros(size, dtype)
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > buf.size:
            raise ValueError(f"checkpoint entry {name!r}: view (offset {offset}, size {size}, stride {stride}) "
                             f"runs past its storage of {buf.size} elements; the file is corrupt")
        view = np.lib.stride_tricks.as_strided(buf[offset:], size, [s * dtype.itemsize for s in stride])
        return np.array(view)  # a writable copy, independent of storages shared with other entries


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *metadata):
    return _Tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *args):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)  # func is itself a stand-in from find_class (or an inert placeholder)


def _codecs_encode(text, *encoding):
    """Protocol-2 pickles store bytes as _codecs.encode(str, "latin1")."""
    if isinstance(text, str) and encoding in (("latin1",), ("latin-1",)):
        return text.encode("latin1")
    return _opaque("_codecs.encode")


def _bytes(*args):
    return b"" if not args else _opaque("builtins.bytes")


_FUNCTIONS = {  # pure functions and immutable builtin types
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    **{(module, name): obj for module in ("builtins", "__builtin__") for name, obj in
       (("set", set), ("frozenset", frozenset), ("slice", slice), ("complex", complex), ("bytes", _bytes))},
}


def _opaque_name(obj) -> str | None:
    if isinstance(obj, _Opaque) or (isinstance(obj, type) and issubclass(obj, _Opaque)):
        return obj.global_name
    return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self.archive = archive
        self.storages: dict[str, _Storage] = {}
        self.names: dict[tuple[str, str], object] = {}  # stand-ins made for this load

    def find_class(self, module, name):
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[module, name]
        if (module, name) not in self.names:
            if module in ("torch", "torch.storage") and name in _TYPE_NAMES:
                obj = _TypeName(name)
            elif (module, name) == ("argparse", "Namespace"):
                obj = type("Namespace", (_Namespace,), {})
            else:
                obj = type(f"{module}.{name}", (_Opaque,), {"global_name": f"{module}.{name}"})
            self.names[module, name] = obj
        return self.names[module, name]

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and _dtype(pid[1]) is not None
                and type(pid[2]) is str and type(pid[4]) is int and pid[4] >= 0):
            return _opaque(f"persistent id {pid!r:.60}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:  # a storage shared by several tensors is read once
            self.storages[key] = _Storage(self.archive, key, _dtype(storage_type), numel)
        return self.storages[key]


class _Archive:
    """A torch zip checkpoint: its pickle prefix, byte order and lazily read storages."""

    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise ValueError(f"{path}: a zip archive without <prefix>/data.pkl is not a PyTorch checkpoint")
        self.prefix = pkls[0][: -len("/data.pkl")]
        byteorder = f"{self.prefix}/byteorder"  # absent in files of torch < 1.10: little-endian
        order = zf.read(byteorder).decode().strip() if byteorder in zf.namelist() else "little"
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {order!r}")
        self.big_endian = order == "big"
        self._raw: dict[str, bytes] = {}
        self.expanded = 0  # bytes of views larger than their storage, read so far

    def raw(self, key: str, nbytes: int) -> bytes:
        """The first `nbytes` bytes of storage `key`: the entry's declared sizes are checked first, and it is
        read with that cap (a compressed entry is streamed, never expanded past what the tensors need)."""
        if key not in self._raw or len(self._raw[key]) < nbytes:
            name = f"{self.prefix}/data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise ValueError(f"{self.path}: storage {key!r} is missing from the archive; the file is "
                                 "truncated or corrupt") from None
            self._raw[key] = self._read(info, nbytes, f"storage {key!r}")
        return self._raw[key]

    def _read(self, info: zipfile.ZipInfo, nbytes: int, what: str) -> bytes:
        size = self.path.stat().st_size
        if info.file_size < nbytes:
            raise ValueError(f"{self.path}: {what} holds {info.file_size} bytes, expected {nbytes}; the file is "
                             "truncated or corrupt")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size < nbytes or info.header_offset + info.compress_size > size:
                raise ValueError(f"{self.path}: {what} ({nbytes} bytes) runs past the end of the file of {size} "
                                 "bytes; the file is truncated or corrupt")
        elif nbytes > MAX_RATIO * info.compress_size + (1 << 20):
            raise ValueError(f"{self.path}: {what} would expand {info.compress_size} compressed bytes to {nbytes} "
                             f"(more than {MAX_RATIO}x: a decompression bomb?); refusing it")
        try:
            with self.zf.open(info) as f:
                data = f.read(nbytes)
                if info.file_size == nbytes and f.read(1):  # else at the end: the entry's CRC is checked
                    raise ValueError(f"{self.path}: {what} is longer than its declared {nbytes} bytes; the file "
                                     "is corrupt")
        except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as e:
            raise ValueError(f"{self.path}: cannot read {what} ({e}); the file is truncated or corrupt") from e
        if len(data) < nbytes:
            raise ValueError(f"{self.path}: {what} holds {len(data)} bytes, expected {nbytes}; the file is "
                             "truncated or corrupt")
        return data

    def load(self):
        info = self.zf.getinfo(f"{self.prefix}/data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"{self.path}: data.pkl declares {info.file_size} bytes, more than the "
                             f"{MAX_PICKLE_BYTES} a checkpoint's pickle may have; refusing it")
        try:
            data = self._read(info, info.file_size, "data.pkl")
            _scan_pickle(data)
            return _Unpickler(io.BytesIO(data), self).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError,
                IndexError, KeyError, OSError, MemoryError, RecursionError, OverflowError) as e:
            if isinstance(e, ValueError) and str(e).startswith(str(self.path)):
                raise
            raise ValueError(f"{self.path}: cannot parse the checkpoint's pickle ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from e


def _scan_pickle(data: bytes) -> None:
    """Walks the pickle's opcodes without building anything (pickletools reads each counted argument from the
    bytes present, so a BINBYTES8/BINUNICODE8/LONG4 larger than the rest of the file is an error, not an
    allocation) and bounds their number."""
    for n, _ in enumerate(pickletools.genops(data)):
        if n >= MAX_PICKLE_OPS:
            raise ValueError(f"data.pkl has more than {MAX_PICKLE_OPS} opcodes; refusing it")


# ---------------------------------------------------------------------------------------------------------
# read_checkpoint
# ---------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """The state dict in a torch zip checkpoint (.pth, .pth.tar) or a .safetensors file, as numpy arrays.

    key: the container entry holding the state dict ("model", "state_dict_ema"...); by default the first of
    CONTAINER_KEYS present, or the file itself if it is a flat state dict. "module." prefixes are removed.
    bfloat16 tensors are returned as ml_dtypes.bfloat16 arrays. Non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is not a readable zip archive ({e}): the download is truncated or the "
                             "file is corrupt") from e
        with zf:
            archive = _Archive(path, zf)
            sd = _select(archive.load(), key, path)
            return _arrays(sd, lambda name, value: value.numpy(name) if isinstance(value, _Tensor) else None)
    if len(head) >= 9 and head[8:9] == b"{":
        if key is not None:
            raise ValueError(f"{path}: a safetensors file is a flat state dict; key={key!r} does not apply")
        return _arrays(_read_safetensors(path), lambda name, value: value)
    if head[:1] == b"\x80" or head.startswith(b"\x1f\x8b") or path.suffix in (".pth", ".tar", ".pt", ".bin"):
        raise ValueError(f"{path} is not a zip archive: a legacy (torch < 1.6) checkpoint or not a checkpoint at "
                         "all. Legacy files are not read (their format is a bare pickle); re-save it with "
                         "torch >= 1.6: `torch.save(torch.load(f, weights_only=True), 'new.pth')`")
    raise ValueError(f"{path}: unknown checkpoint format (expected a torch zip .pth/.pth.tar or .safetensors)")


def _select(obj, key: str | None, path) -> Mapping:
    """The state dict inside a loaded checkpoint object."""
    if (bad := _opaque_name(obj)) is not None:
        raise ValueError(f"{path}: the checkpoint is a pickled {bad} object, not a state dict; refusing to load it")
    keys = list(obj) if isinstance(obj, Mapping) else []
    listed = ", ".join(map(repr, keys[:MAX_LISTED])) + (f", ... ({len(keys)} keys)" if len(keys) > MAX_LISTED else "")
    if key is not None:
        if key not in keys:
            raise ValueError(f"{path}: no container key {key!r}; available keys: {listed or '(none)'}")
        sd = obj[key]
    elif not isinstance(obj, Mapping):
        raise ValueError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict")
    elif any(isinstance(v, (_Tensor, np.ndarray)) for v in obj.values()):
        sd = obj
    else:
        found = [k for k in CONTAINER_KEYS
                 if k in obj and (_opaque_name(obj[k]) or (isinstance(obj[k], Mapping) and obj[k]))]
        if not found:
            raise ValueError(f"{path}: no state dict found (tried {', '.join(CONTAINER_KEYS)}); available keys: "
                             f"{listed or '(none)'}; pass key=")
        key, sd = found[0], obj[found[0]]
    if (bad := _opaque_name(sd)) is not None:
        raise ValueError(f"{path}: checkpoint entry {key!r} is a pickled {bad} object, not a state dict; "
                         "refusing to load it")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: checkpoint entry {key!r} is a {type(sd).__name__}, not a state dict")
    return sd


def _arrays(sd: Mapping, to_array: Callable) -> dict[str, np.ndarray]:
    out = {}
    for name, value in sd.items():
        if not isinstance(name, str):
            continue
        if (bad := _find_opaque(value)) is not None:
            raise ValueError(f"checkpoint entry {name!r} is a pickled {bad} object; refusing to load it "
                             "(the reader never runs pickled code)")
        array = to_array(name, value)
        if array is not None:
            out[name.removeprefix("module.")] = array
    return out


def _find_opaque(value) -> str | None:
    """The global name of a placeholder anywhere inside `value`, else None."""
    stack, seen = [value], set()
    while stack:
        value = stack.pop()
        if (name := _opaque_name(value)) is not None:
            return name
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, Mapping):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack += value
        elif isinstance(value, _Tensor):
            stack += [value.storage, value.offset, value.size, value.stride, value.dtype]
        elif isinstance(value, _Namespace):
            stack.append(value.state)
    return None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file, read and validated by the safetensors library (header types, shapes, in-range,
    non-overlapping offsets covering the data); its errors are reported as ValueErrors naming the file."""
    try:
        tensors = safetensors.deserialize(path.read_bytes())
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: malformed safetensors file ({e}); the file is truncated or corrupt") from None
    out = {}
    for name, info in tensors:
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        out[name] = np.frombuffer(info["data"], _SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


# ---------------------------------------------------------------------------------------------------------
# from_state_dict
# ---------------------------------------------------------------------------------------------------------

_STATE = (nnx.Param, nnx.BatchStat)
_ORIGIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (name, overrides), for save()


def from_state_dict(name: str, state_dict: Mapping[str, np.ndarray], *, strict: bool = True,
                    allow_nonfinite: bool = False, **overrides) -> nnx.Module:
    """The registered model `name` with the weights of `state_dict` (timm or original key names), in eval mode.

    overrides: builder config overrides; they take precedence over those the entry infers from the keys.
    strict=False fills missing parameters with their random initialisation and ignores unexpected keys
    (shape mismatches remain errors). Raises ValueError listing every problem; NaN or infinite values in the
    loaded parameters are an error naming the tensors unless allow_nonfinite=True.
    """
    entry = registry.get_entry(name)
    sd = dict(state_dict)
    if entry.remap_keys is not None:
        sd = dict(entry.remap_keys(sd))
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if entry.infer_overrides is not None:
        overrides = {**entry.infer_overrides(sd), **overrides}

    def build():
        return entry.builder(rngs=nnx.Rngs(0), **overrides)

    model = _assign(nnx.eval_shape(build), sd, build, strict=strict, what=repr(name),
                    allow_nonfinite=allow_nonfinite)
    model.eval()
    _ORIGIN[model] = (name, overrides)
    return model


def _key(path) -> str:
    return ".".join(map(str, path))


def _aliases(model) -> dict[str, list[str]]:
    """Each parameter/batch-stat key -> every key under which the same Variable is reachable, in graph order."""
    paths: dict[int, list[str]] = {}

    def walk(node, prefix, active):
        for k, child in nnx.graphlib.get_node_impl(node).node_dict(node).items():
            if isinstance(child, nnx.Variable):
                if isinstance(child, _STATE):
                    paths.setdefault(id(child), []).append(_key((*prefix, k)))
            elif nnx.graphlib.is_node(child) and id(child) not in active:  # modules, nnx.List, pytrees
                walk(child, (*prefix, k), active | {id(child)})

    walk(model, (), {id(model)})
    return {k: group for group in paths.values() for k in group}


def _assign(abstract, sd: Mapping, build: Callable[[], nnx.Module], *, strict: bool, what: str,
            allow_nonfinite: bool = False) -> nnx.Module:
    """Fills an abstract model's parameters and batch stats from `sd` (keys = '.'-joined paths)."""
    graphdef, params, rest = nnx.split(abstract, _STATE, ...)
    aliases = _aliases(abstract)
    known = set(aliases)
    missing, shapes, unshared, values = [], [], [], {}
    flat = list(nnx.to_flat_state(params))
    for path, var in flat:
        key = _key(path)
        present = [k for k in aliases.get(key, [key]) if k in sd]
        known.add(key)
        if not present:
            missing.append(key)
            continue
        array, target = sd[present[0]], var.get_value()
        if np.shape(array) != tuple(target.shape):
            shapes.append(f"{present[0]}: checkpoint {np.shape(array)} vs model {tuple(target.shape)}")
            continue
        differ = [k for k in present[1:] if not np.array_equal(np.asarray(sd[k]), np.asarray(array))]
        if differ:
            unshared.append(f"{present[0]} != {', '.join(differ)}")
        values[key] = array
    unexpected = sorted(set(sd) - known)
    problems = [("missing from the checkpoint", [f" - {k}" for k in missing]) if strict else None,
                ("unexpected in the checkpoint", [f" + {k}" for k in unexpected]) if strict else None,
                ("shape mismatches", [f"   {s}" for s in shapes]),
                ("shared in the model but different in the checkpoint (a checkpoint with unshared copies cannot "
                 "be loaded into a model that shares them)", [f"   {s}" for s in unshared])]
    problems = [(title, lines) for title, lines in filter(None, problems) if lines]
    if problems:
        text = [f"cannot load the checkpoint into {what}:"]
        for title, lines in problems:
            text += [f"{title} ({len(lines)}):", *lines[:MAX_LISTED]]
            if len(lines) > MAX_LISTED:
                text.append(f"   ... and {len(lines) - MAX_LISTED} more")
        matched = len(flat) - len(missing)
        if matched < len(flat) / 2:
            text.append(f"hint: only {matched} of the model's {len(flat)} parameters are in the checkpoint: is it "
                        "a checkpoint of another architecture, or does it need another container key?")
        elif shapes:
            text.append("hint: mismatched shapes mean another configuration (pass the matching overrides, e.g. "
                        "num_classes=) or another architecture")
        raise ValueError("\n".join(text))
    if not allow_nonfinite:
        check_finite({k: sd[k] for k in sd if k in known}, what=f"the checkpoint for {what}")

    if missing or unexpected:  # strict=False
        warnings.warn(f"loading into {what}: {len(missing)} parameters missing from the checkpoint keep their "
                      f"initial values ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                      f"{len(unexpected)} unexpected keys ignored", stacklevel=3)
    rest_flat = list(nnx.to_flat_state(rest))
    fresh_keys = tuple(missing) + tuple(_key(p) for p, _ in rest_flat)
    values |= _fresh(build, fresh_keys) if fresh_keys else {}

    def fill(flat_state):
        return nnx.from_flat_state([(p, v.copy(_cast(values[_key(p)], v.get_value().dtype))) for p, v in flat_state])

    return nnx.merge(graphdef, fill(flat), fill(rest_flat))


def check_finite(arrays: Mapping[str, np.ndarray], *, what: str = "the checkpoint") -> None:
    """ValueError naming every floating tensor of `arrays` that holds NaN or infinite values."""
    bad = []
    for key, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.kind in "fc" or (a.dtype.kind == "V" and a.dtype.itemsize <= 2):  # ml_dtypes floats are "V"
            finite = np.isfinite(a)
            if not finite.all():
                nan = int(np.isnan(a).sum())
                bad.append(f"   {key}: {nan} NaN, {a.size - int(finite.sum()) - nan} infinite of {a.size}")
    if bad:
        raise ValueError(f"{what} has non-finite values in {len(bad)} tensor(s) (a corrupt or diverged "
                         "checkpoint):\n" + "\n".join(bad[:MAX_LISTED])
                         + (f"\n   ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
                         + "\nrefusing to convert it (pass allow_nonfinite=True / --allow-nonfinite to load it anyway)")


def _cast(value, dtype) -> jax.Array:
    if isinstance(value, np.ndarray):
        value = value.astype(dtype, copy=False)
    value = jnp.asarray(value)
    return value if value.dtype == dtype else value.astype(dtype)


def _fresh(build: Callable[[], nnx.Module], keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Initial values of some variables (RNG state, parameters absent with strict=False): XLA computes only these."""
    def init():
        flat = {_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(build()))}
        return {k: flat[k] for k in keys}
    return jax.jit(init)()


# ---------------------------------------------------------------------------------------------------------
# load, save, restore
# ---------------------------------------------------------------------------------------------------------

_STATE_DIR, _META_FILE, _MANIFEST = "state", "model.json", "manifest.json"


def _hash_tree(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory` (but the manifest), by relative path."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != _MANIFEST:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def verify(directory: str | os.PathLike) -> bool:
    """Checks a directory written by save() against its manifest: raises CorruptCheckpointError naming the
    files that changed, are missing or were added; returns False (with nothing checked) for directories
    written before manifests existed."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())["sha256"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"converted checkpoint {directory} is corrupt: unreadable manifest ({e}); "
                                     "delete it to convert again") from e
    actual = _hash_tree(directory)
    problems = [f"{k} changed" for k in sorted(set(manifest) & set(actual)) if manifest[k] != actual[k]]
    problems += [f"{k} missing" for k in sorted(set(manifest) - set(actual))]
    problems += [f"{k} added" for k in sorted(set(actual) - set(manifest))]
    if problems:
        raise CorruptCheckpointError(f"converted checkpoint {directory} is corrupt ({', '.join(problems[:5])}"
                                     f"{', ...' if len(problems) > 5 else ''}); delete it to convert again")
    return True


def load(name: str, path: str | os.PathLike | None = None, key: str | None = None, *,
         allow_nonfinite: bool = False, **overrides) -> nnx.Module:
    """from_state_dict(name, read_checkpoint(path, key)). `path` may also be a URL (downloaded to the cache),
    an orbax directory written by save(), or None for the entry's published checkpoint (its SHA-256 checked
    when the registry knows it, else the one recorded at its first download)."""
    if path is None:
        ckpt = registry.get_entry(name).checkpoint
        if ckpt is None:
            raise ValueError(f"model {name!r} has no published checkpoint; pass a path")
        path, key = cached_download(ckpt.url, filename=ckpt.filename, sha256=ckpt.sha256), key or ckpt.key
    elif str(path).startswith(("http://", "https://")):
        path = cached_download(str(path))
    if Path(path).is_dir():
        return restore(name, path, allow_nonfinite=allow_nonfinite, **overrides)
    return from_state_dict(name, read_checkpoint(path, key), allow_nonfinite=allow_nonfinite, **overrides)


def load_published(name: str, cache_dir: str | os.PathLike | None = None, *, allow_nonfinite: bool = False,
                   **overrides) -> nnx.Module:
    """The entry's published checkpoint, downloaded (SHA-256 verified) and converted once into
    `cache_dir/converted/<name>`, and restored (manifest verified) from there. Runs sharing the cache
    serialise on a lock: the first converts, the others wait and restore what it wrote. A converted directory
    that fails verification is converted again; temporary directories of killed runs are removed."""
    ckpt = registry.get_entry(name).checkpoint
    if ckpt is None:
        raise ValueError(f"model {name!r} has no published checkpoint; pass a path")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    converted = root / "converted" / name
    with file_lock(converted.with_name(f".{name}.lock")):
        for stale in converted.parent.glob(f".{name}.*"):   # only a holder of the lock writes these
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if converted.is_dir():
            try:
                return restore(name, converted, allow_nonfinite=allow_nonfinite, **overrides)
            except CorruptCheckpointError as e:
                warnings.warn(f"{e}; converting it again", stacklevel=2)
        path = cached_download(ckpt.url, root, filename=ckpt.filename, sha256=ckpt.sha256)
        model = from_state_dict(name, read_checkpoint(path, ckpt.key), allow_nonfinite=allow_nonfinite)
        save(model, converted, name, overwrite=True)
        del model
        return restore(name, converted, allow_nonfinite=allow_nonfinite, **overrides)


class CorruptCheckpointError(ValueError):
    """A directory written by save() whose files no longer match its manifest."""


def save(model: nnx.Module, directory: str | os.PathLike, name: str | None = None, *,
         overrides: Mapping | None = None, overwrite: bool = False) -> Path:
    """Writes the model's parameters and batch stats as an orbax checkpoint in `directory/state`, with its
    registry name and config overrides in `directory/model.json` (taken from from_state_dict/restore when
    not given). Written to a temporary directory, then renamed: no half-written output."""
    directory = Path(directory)
    origin_name, origin_overrides = _ORIGIN.get(model, (None, {}))
    name = name or origin_name
    overrides = dict(origin_overrides if overrides is None else overrides)
    try:
        meta = json.dumps({"model": name, "overrides": overrides}, indent=1, default=_json_scalar)
    except TypeError as e:
        raise ValueError(f"config overrides must be JSON-serialisable to be saved ({e})") from e
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists (pass overwrite=True)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tree: dict = {}
        for path, var in nnx.to_flat_state(nnx.state(model, _STATE)):
            node = tree
            for part in map(str, path[:-1]):
                node = node.setdefault(part, {})
            node[str(path[-1])] = var.get_value()
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(tmp / _STATE_DIR, tree)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        (tmp / _META_FILE).write_text(meta)
        (tmp / _MANIFEST).write_text(json.dumps({"sha256": _hash_tree(tmp)}, indent=1, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def restore(name_or_directory: str | os.PathLike, directory: str | os.PathLike | None = None, *,
            allow_nonfinite: bool = False, **overrides) -> nnx.Module:
    """restore(directory) or restore(name, directory): the model save() wrote, in eval mode. Its files are
    checked against the manifest save() wrote (CorruptCheckpointError when they differ)."""
    if directory is None:
        name, directory = None, Path(name_or_directory)
    else:
        name, directory = str(name_or_directory), Path(directory)
    state_dir, meta_file = directory.absolute() / _STATE_DIR, directory / _META_FILE
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{directory} is not a checkpoint written by models.convert.save (no {_STATE_DIR}/)")
    if not verify(directory):
        warnings.warn(f"{directory} has no {_MANIFEST} (written by an older version): its files are not verified",
                      stacklevel=2)
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"model": None, "overrides": {}}
    except ValueError as e:
        raise CorruptCheckpointError(f"{meta_file} is unreadable ({e})") from e
    if name is None:
        name = meta["model"]
        if name is None:
            raise ValueError(f"{directory} does not record its model name; call restore(name, directory)")
    elif meta["model"] is not None and meta["model"] != name:
        raise ValueError(f"{directory} holds a {meta['model']!r} checkpoint, not {name!r}")
    overrides = {**_tuples(meta["overrides"]), **overrides}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # addressable on every host
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(state_dir).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        tree = checkpointer.restore(state_dir, target)
    finally:
        checkpointer.close()
    flat = {_key(tuple(getattr(k, "key", k) for k in path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return from_state_dict(name, flat, allow_nonfinite=allow_nonfinite, **overrides)


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{value!r} is not JSON-serialisable")


def _tuples(value):
    """JSON turns tuples into lists; config overrides are tuples."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.convert",
                                     description="Convert a PyTorch checkpoint into an orbax checkpoint.")
    parser.add_argument("--model", required=True, help="registry name, e.g. convnext_tiny_dcls")
    parser.add_argument("--checkpoint", required=True, help=".pth/.pth.tar/.safetensors file or URL")
    parser.add_argument("--key", default=None,
                        help=f"container key (default: the first of {', '.join(CONTAINER_KEYS)})")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert even if weights hold NaN or infinite values (an error by default)")
    args = parser.parse_args(argv)
    if args.model not in registry.list_models():
        parser.error(f"unknown model {args.model!r}; valid names: {', '.join(registry.list_models())}")
    if Path(args.out).exists() and not args.force:
        parser.error(f"{args.out} already exists (pass --force to replace it)")
    try:
        model = load(args.model, args.checkpoint, args.key, allow_nonfinite=args.allow_nonfinite)
        out = save(model, args.out, args.model, overwrite=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
