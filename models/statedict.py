"""State dicts (timm or original key names, numpy arrays) -> registered Flax NNX models.

Conversion. Our parameters keep PyTorch's names and layouts, so keys match one to one: the entry's
`remap_keys` turns original-repository names into timm names, the model is built abstractly
(`nnx.eval_shape`), every parameter and batch statistic is filled from the key of the same path, and all
problems (missing, unexpected, shape mismatches) are reported together. A variable shared by several
modules (the DCLS positions of a stage) is one leaf in `nnx.split`, while PyTorch repeats it under every
user's key: all those keys are accepted and must hold equal values.

`merge_state_dict` is the one strict merge: conversion uses it, and so can fine-tuning (its `skip` keeps fresh
values for a new head).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcls_jax.optim import path_names
from models import registry
from models.torchfile import MAX_LISTED

_STATE = (nnx.Param, nnx.BatchStat)


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

    model = merge_state_dict(nnx.eval_shape(build), sd, build, strict=strict, what=repr(name),
                             allow_nonfinite=allow_nonfinite)
    model.eval()
    model.registry_origin = registry.Origin(name, overrides)  # save() and registry.model_name read it
    return model


def _key(path) -> str:
    """The state-dict key of an nnx state path or a jax key path ("stages.0.blocks.1.conv_dw.weight")."""
    return ".".join(path_names(path))


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


def merge_state_dict(abstract: nnx.Module, sd: Mapping, build: Callable[[], nnx.Module], *, strict: bool = True,
                     what: str = "the model", allow_nonfinite: bool = False,
                     skip: Callable[[str], bool] | None = None) -> nnx.Module:
    """The strict merge: a model whose parameters and batch stats come from `sd` (keys = '.'-joined paths,
    every alias of a shared variable accepted), built from the abstract model `abstract` (nnx.eval_shape of
    `build`). Missing keys, unexpected keys (strict), shape mismatches and unequal copies of a shared variable
    are one ValueError listing them all; non-finite values are an error unless allow_nonfinite. Keys for
    which `skip(key)` is true are left out on both sides: those variables keep `build`'s fresh values
    (fine-tuning a new head). Variables that are neither parameters nor batch stats (RNG state) are fresh."""
    graphdef, params, rest = nnx.split(abstract, _STATE, ...)
    aliases = _aliases(abstract)
    known = set(aliases)
    missing, skipped, shapes, unshared, values = [], [], [], [], {}
    flat = list(nnx.to_flat_state(params))
    for path, var in flat:
        key = _key(path)
        present = [k for k in aliases.get(key, [key]) if k in sd]
        known.add(key)
        if skip is not None and skip(key):
            skipped.append(key)
            continue
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
    unexpected = sorted(k for k in set(sd) - known if skip is None or not skip(k))
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
        check_finite({k: sd[k] for k in sd if k in known and k not in skipped}, what=f"the checkpoint for {what}")

    if missing or unexpected:  # strict=False
        warnings.warn(f"loading into {what}: {len(missing)} parameters missing from the checkpoint keep their "
                      f"initial values ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                      f"{len(unexpected)} unexpected keys ignored", stacklevel=3)
    rest_flat = list(nnx.to_flat_state(rest))
    fresh_keys = tuple(missing) + tuple(skipped) + tuple(_key(p) for p, _ in rest_flat)
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
