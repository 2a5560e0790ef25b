"""PyTorch checkpoint files read without torch and without running pickled code: {name: np.ndarray}.

    sd = read_checkpoint("convnext_dcls_tiny_1k_224_ema.pth")   # .pth/.pth.tar (torch zip) or .safetensors

Reading. `.pth`/`.pth.tar` files are torch (>= 1.6) zip archives: `<prefix>/data.pkl` is a pickle whose
persistent ids name raw storages `<prefix>/data/<key>`. The pickle is read by a restricted unpickler that
imports nothing: an allowlist of globals (tensor/parameter rebuilding, OrderedDict, storage and dtype names,
argparse.Namespace, pure-data builtins) maps to local stand-ins, and every other global becomes an inert
placeholder (calling it, or restoring its state, only makes more placeholders). Placeholders outside the
requested weights (optimizer state, args, metrics) are dropped; one inside them is an error naming it.
`.safetensors` files are read by the safetensors library. A container is unwrapped with `key` if given, else
with the first of CONTAINER_KEYS that holds a dict (a flat state dict is used as is); "module." prefixes are
stripped.

Limits (hostile files fail with a ValueError before anything large is allocated): zip entries are read with
a cap (their declared sizes checked against the file, compressed entries at most MAX_RATIO times their
compressed size, streamed); data.pkl is at most MAX_PICKLE_BYTES and its opcodes are scanned first
(pickletools: a counted BINBYTES8/BINUNICODE8/LONG4 larger than the rest of the file is an error, at most
MAX_PICKLE_OPS opcodes); a tensor view holding more elements than its storage (stride 0, overlapping) counts
against MAX_EXPANDED_BYTES for the whole file; safetensors files are validated by the library (header types,
shapes, in-range offsets covering the data without overlap), its errors reported with the file's name.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors

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
