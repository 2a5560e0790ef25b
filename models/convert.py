"""PyTorch checkpoints -> Flax NNX models, and orbax save/restore of converted models.

    sd = read_checkpoint("convnext_dcls_tiny_1k_224_ema.pth")      # {name: np.ndarray}, no torch, no pickled code
    model = from_state_dict("convnext_tiny_dcls", sd)                # timm or original key names
    model = load("convnext_tiny_dcls", "ckpt.pth")                   # both steps; also an orbax dir or a URL
    save(model, "out/convnext_tiny_dcls"); model = restore("out/convnext_tiny_dcls")

    python -m models.convert --model convnext_tiny_dcls --checkpoint FILE_OR_URL [--key model] --out DIR

Reading. `.pth`/`.pth.tar` files are torch (>= 1.6) zip archives: `<prefix>/data.pkl` is a pickle whose
persistent ids name raw storages `<prefix>/data/<key>`. The pickle is read by a restricted unpickler that
imports nothing: an allowlist of globals (tensor/parameter rebuilding, OrderedDict, storage and dtype names,
argparse.Namespace, pure-data builtins) maps to local stand-ins, and every other global becomes an inert
placeholder (calling it, or restoring its state, only makes more placeholders). Placeholders outside the
requested weights (optimizer state, args, metrics) are dropped; one inside them is an error naming it.
`.safetensors` files are parsed directly. A container is unwrapped with `key` if given, else with the first
of CONTAINER_KEYS that holds a dict (a flat state dict is used as is); "module." prefixes are stripped.

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
import json
import os
import pickle
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
from flax import nnx

from data.download import cached_download
from models import registry

# Tried in this order when no key is given and the file is not itself a flat state dict: EMA weights first
# (timm's training checkpoints carry both "state_dict" and "state_dict_ema"; FAIR's "model" and "model_ema").
CONTAINER_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict", "module")
MAX_LISTED = 20  # problems listed per kind in an error message

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
            raw = self.archive.raw(self.key)
            nbytes = self.numel * self.dtype.itemsize
            if len(raw) < nbytes:
                raise ValueError(f"{self.archive.path}: storage {self.key!r} holds {len(raw)} bytes, expected "
                                 f"{nbytes}; the file is truncated or corrupt")
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

    def raw(self, key: str) -> bytes:
        if key not in self._raw:
            try:
                self._raw[key] = self.zf.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise ValueError(f"{self.path}: storage {key!r} is missing from the archive; the file is "
                                 "truncated or corrupt") from None
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise ValueError(f"{self.path}: cannot read storage {key!r} ({e}); the file is truncated or "
                                 "corrupt") from e
        return self._raw[key]

    def load(self):
        try:
            with self.zf.open(f"{self.prefix}/data.pkl") as f:
                return _Unpickler(f, self).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError,
                IndexError, KeyError, OSError) as e:
            raise ValueError(f"{self.path}: cannot parse the checkpoint's pickle ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from e


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
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError(f"{path}: safetensors header of {n} bytes exceeds the file; truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"{path}: tensor {name!r} (bytes {begin}..{end} of the data) does not fit the "
                                 f"file of {size} bytes; truncated or corrupt")
            array = np.empty(shape, dtype)
            f.seek(8 + n + begin)
            f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
            out[name] = array
    return out


# ---------------------------------------------------------------------------------------------------------
# from_state_dict
# ---------------------------------------------------------------------------------------------------------

_STATE = (nnx.Param, nnx.BatchStat)
_ORIGIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (name, overrides), for save()


def from_state_dict(name: str, state_dict: Mapping[str, np.ndarray], *, strict: bool = True,
                    **overrides) -> nnx.Module:
    """The registered model `name` with the weights of `state_dict` (timm or original key names), in eval mode.

    overrides: builder config overrides; they take precedence over those the entry infers from the keys.
    strict=False fills missing parameters with their random initialisation and ignores unexpected keys
    (shape mismatches remain errors). Raises ValueError listing every problem.
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

    model = _assign(nnx.eval_shape(build), sd, build, strict=strict, what=repr(name))
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


def _assign(abstract, sd: Mapping, build: Callable[[], nnx.Module], *, strict: bool, what: str) -> nnx.Module:
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

_STATE_DIR, _META_FILE = "state", "model.json"


def load(name: str, path: str | os.PathLike | None = None, key: str | None = None, **overrides) -> nnx.Module:
    """from_state_dict(name, read_checkpoint(path, key)). `path` may also be a URL (downloaded to the cache),
    an orbax directory written by save(), or None for the entry's published checkpoint."""
    if path is None:
        ckpt = registry.get_entry(name).checkpoint
        if ckpt is None:
            raise ValueError(f"model {name!r} has no published checkpoint; pass a path")
        path, key = cached_download(ckpt.url, filename=ckpt.filename), key or ckpt.key
    elif str(path).startswith(("http://", "https://")):
        path = cached_download(str(path))
    if Path(path).is_dir():
        return restore(name, path, **overrides)
    return from_state_dict(name, read_checkpoint(path, key), **overrides)


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


def restore(name_or_directory: str | os.PathLike, directory: str | os.PathLike | None = None,
            **overrides) -> nnx.Module:
    """restore(directory) or restore(name, directory): the model save() wrote, in eval mode."""
    if directory is None:
        name, directory = None, Path(name_or_directory)
    else:
        name, directory = str(name_or_directory), Path(directory)
    state_dir, meta_file = directory.absolute() / _STATE_DIR, directory / _META_FILE
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{directory} is not a checkpoint written by models.convert.save (no {_STATE_DIR}/)")
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"model": None, "overrides": {}}
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
    return from_state_dict(name, flat, **overrides)


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
    args = parser.parse_args(argv)
    if args.model not in registry.list_models():
        parser.error(f"unknown model {args.model!r}; valid names: {', '.join(registry.list_models())}")
    if Path(args.out).exists() and not args.force:
        parser.error(f"{args.out} already exists (pass --force to replace it)")
    try:
        model = load(args.model, args.checkpoint, args.key)
        out = save(model, args.out, args.model, overwrite=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
