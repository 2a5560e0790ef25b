"""The converted-checkpoint store: orbax save/restore of converted models with a SHA-256 manifest, and load(),
PyTorch checkpoint or orbax directory -> model. Nothing here downloads (the model layer imports nothing of data):
URLs and the published checkpoints go through an injected `fetch`, which evaluation.checkpoints provides with the
download cache (and its load_published: downloaded, verified, converted once under a lock).

    save(model, "out/convnext_tiny_dcls"); model = restore("out/convnext_tiny_dcls")
    model = load("convnext_tiny_dcls", "ckpt.pth")        # a file or an orbax dir (a URL or None: pass fetch=)

save() writes a SHA-256 manifest of its files and restore() checks it (CorruptCheckpointError).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from models import registry
from models.statedict import _STATE, _key, from_state_dict
from models.torchfile import read_checkpoint

Fetch = Callable[[str, "str | os.PathLike | None", "str | None", "str | None"], Path]
_STATE_DIR, _META_FILE, _MANIFEST = "state", "model.json", "manifest.json"


def _hash_tree(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory` (but the manifest), by relative path."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != _MANIFEST:
            with open(p, "rb") as f:
                out[rel] = hashlib.file_digest(f, "sha256").hexdigest()
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
         allow_nonfinite: bool = False, fetch: Fetch | None = None, **overrides) -> nnx.Module:
    """from_state_dict(name, read_checkpoint(path, key)), or restore() of an orbax directory written by save().
    A URL, or None for the entry's published checkpoint (its registry SHA-256 passed on), is first turned into a
    local file by `fetch(url, cache_dir, filename, sha256) -> path` (cache_dir None): evaluation.checkpoints.load
    passes the download cache's; without one a URL is a ValueError."""
    if path is None or str(path).startswith(("http://", "https://")):
        if fetch is None:
            raise ValueError(f"{'a URL' if path else 'the published checkpoint'} needs a download: use "
                             "evaluation.checkpoints.load, or pass fetch=")
        if path is None:
            ckpt = registry.get_entry(name).checkpoint
            if ckpt is None:
                raise ValueError(f"model {name!r} has no published checkpoint; pass a path")
            path, key = fetch(ckpt.url, None, ckpt.filename, ckpt.sha256), key or ckpt.key
        else:
            path = fetch(str(path), None, None, None)
    if Path(path).is_dir():
        return restore(name, path, allow_nonfinite=allow_nonfinite, **overrides)
    return from_state_dict(name, read_checkpoint(path, key), allow_nonfinite=allow_nonfinite, **overrides)


class CorruptCheckpointError(ValueError):
    """A directory written by save() whose files no longer match its manifest."""


def save(model: nnx.Module, directory: str | os.PathLike, name: str | None = None, *,
         overrides: Mapping | None = None, overwrite: bool = False) -> Path:
    """Writes the model's parameters and batch stats as an orbax checkpoint in `directory/state`, with its
    registry name and config overrides in `directory/model.json` (taken from from_state_dict/restore when
    not given). Written to a temporary directory, then renamed: no half-written output."""
    directory = Path(directory)
    origin = getattr(model, "registry_origin", None) or registry.Origin(None, {})
    name = name or origin.name
    overrides = dict(origin.overrides if overrides is None else overrides)
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
    overrides = {**json_tuples(meta["overrides"]), **overrides}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # addressable on every host
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(state_dir).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        tree = checkpointer.restore(state_dir, target)
    finally:
        checkpointer.close()
    flat = {_key(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return from_state_dict(name, flat, allow_nonfinite=allow_nonfinite, **overrides)


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{value!r} is not JSON-serialisable")


def json_tuples(value):
    """`value` read back from JSON with its lists as tuples again (config overrides and train configs hold tuples)."""
    if isinstance(value, list):
        return tuple(json_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: json_tuples(v) for k, v in value.items()}
    return value
