"""What an architecture file registers: `Entry` (one per model name) and its `Checkpoint`, with `register`
(`register_test` for its tiny `test_*` variants) and the builders' helpers (`override`, `rename_keys`,
`infer_kernel_count`). It imports no architecture file, so they can import it while models.registry
imports them (lazily, on the first lookup): the import graph stays acyclic.

Each entry carries what a user of the name needs besides the network: its preprocessing (the study's
transform), the CAM target layer, the published checkpoint, and the key renaming that maps the original
repository's state-dict names to ours (timm's names).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from models.layers import ConvSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    url: str
    key: str | None          # container key inside the file ("model", "state_dict_ema"), None for raw state dicts
    filename: str
    # SHA-256 of the published file, checked on download. None where not published by the authors: the hash
    # is then recorded at the first download (data.download, `<file>.sha256`) and checked afterwards.
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., nnx.Module]   # builder(*, rngs, **overrides) -> model
    family: str                          # "resnet", "convnext", "metaformer", "fastvit"
    target_layer: str                    # the study's CAM layer: the model class's (models.layers.CutModel)
    resize_size: int                     # resize (bicubic) of the shorter side
    input_size: int                      # center crop
    checkpoint: Checkpoint | None = None
    # Maps a state dict in the original repository's key layout to timm's layout (identity for timm keys).
    # Must return a timm-layout state dict unchanged.
    remap_keys: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    # Builder overrides a checkpoint implies (FastViT saved in its reparameterised form), from its timm-layout keys.
    infer_overrides: Callable[[Mapping[str, np.ndarray]], dict] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    num_classes: int = 1000
    in_study: bool = True                # one of the study's 16 models (`evaluate.py --models all`)


@dataclasses.dataclass(frozen=True)
class Origin:
    """The registry name and config overrides a model was built with, stored on it as `model.registry_origin`
    (a static attribute: nnx.split/merge keep it; hashed by value, so equal models share one graphdef)."""
    name: str
    overrides: Mapping = dataclasses.field(default_factory=dict)

    def __hash__(self):
        return hash((self.name, repr(sorted(self.overrides.items()))))


MODELS: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in MODELS:
        raise ValueError(f"model {entry.name!r} is registered twice")
    MODELS[entry.name] = entry
    return entry


def override(config, overrides: Mapping):
    """`dataclasses.replace(config, **overrides)` for a builder, with a ValueError naming unknown fields.

    A config's `conv` (a `models.layers.ConvSpec`) can also be changed field by field: overrides named like
    its fields (`kernel_count`, `dilated_kernel_size`, `kernel_size`, `version`, `init`) replace them in
    `conv` (after a `conv` override, if both are given), so such overrides stay JSON-serialisable."""
    fields = {f.name for f in dataclasses.fields(config)}
    spec_fields = ({f.name for f in dataclasses.fields(ConvSpec)} - {"kind"} - fields
                   if isinstance(getattr(config, "conv", None), ConvSpec) else set())
    unknown = sorted(set(overrides) - fields - spec_fields)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown} for {type(config).__module__}."
                         f"{type(config).__qualname__}; valid: {sorted(fields | spec_fields)}")
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in fields})
    spec = {k: v for k, v in overrides.items() if k in spec_fields}
    return dataclasses.replace(config, conv=dataclasses.replace(config.conv, **spec)) if spec else config


def rename_keys(state_dict: Mapping[str, np.ndarray],
                rename: Callable[[str], str] | Sequence[tuple[re.Pattern, str]]) -> dict[str, np.ndarray]:
    """{rename(key): value} for a family's `remap_keys`, with a ValueError naming two keys that collide. `rename`
    is a function or a sequence of (compiled pattern, replacement) rules applied in order with `re.sub`."""
    if not callable(rename):
        rules = tuple(rename)

        def rename(key: str) -> str:
            for pattern, repl in rules:
                key = pattern.sub(repl, key)
            return key
    out = {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            raise ValueError(f"state-dict keys collide after renaming: {key!r} -> {new!r}")
        out[new] = value
    return out


def infer_kernel_count(key: str) -> Callable[[Mapping[str, np.ndarray]], dict]:
    """`Entry.infer_overrides` for a DCLS model: its `kernel_count` override, read from the last axis of the
    DCLS weight (O, I/g, K) stored under `key` (a checkpoint without it, or with a dense 4-D kernel there,
    implies nothing, and loading then reports the missing key or the shape mismatch)."""
    def infer(state_dict: Mapping[str, np.ndarray]) -> dict:
        w = state_dict.get(key)
        return {"kernel_count": int(w.shape[-1])} if w is not None and w.ndim == 3 else {}
    return infer


TEST_SIZE = 64       # input (and resize) size of the tiny `test_*` variants
TEST_CLASSES = 10    # ... and their class count


def build(preset, *, model_cls: type, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    """A family's registry builder: `model_cls(override(preset, overrides), rngs=rngs)`. Families bind it as
    `functools.partial(build, model_cls=...)`, entries add their preset (the builder's first argument)."""
    return model_cls(override(preset, overrides), rngs=rngs)


def register_test(name: str, builder: Callable[..., nnx.Module], family: str, target_layer: str,
                  **fields) -> Entry:
    """Registers a tiny variant of a family for tests (name `test_*`): random weights only (no checkpoint), a
    TEST_SIZE input, TEST_CLASSES classes (its builder's preset must say so), not one of the study's models.
    tests/test_registry_sweep.py runs every registered name; these are the ones it checks in depth."""
    if not name.startswith("test_"):
        raise ValueError(f"a test variant's name starts with 'test_', got {name!r}")
    return register(Entry(name=name, builder=builder, family=family, target_layer=target_layer,
                          resize_size=TEST_SIZE, input_size=TEST_SIZE, num_classes=TEST_CLASSES, in_study=False,
                          **fields))
