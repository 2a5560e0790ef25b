"""Checkpoints for evaluation and fine-tuning: the published ones found in the registry, downloaded into the cache
(SHA-256 verified), converted once (under a lock shared by the runs using one cache) and restored from there; any
file, orbax directory or URL; and the SHA-256 of what is evaluated.

    model = load("convnext_tiny_dcls", "ckpt.pth")             # a file, an orbax dir, a URL, or None (published)
    model = load_published("convnext_tiny_dcls", cache_dir)    # downloaded and converted once, verified
    model, source, sha256 = load_model("resnet50_dcls")        # what evaluate.py scores, with its provenance

    python -m evaluation.checkpoints --model convnext_tiny_dcls --checkpoint FILE_OR_URL --out DIR   # converter

The conversion itself (torch-free reader, strict state-dict merge, orbax store) is models.convert's: this module
adds the downloads (data.download), which the model layer does not import. Downloads go through
`fetch(url, cache_dir, filename, sha256) -> path`, by default `download` (data.download.cached_download).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

from data import download as downloads
from models import checkpoints as store, registry
from models.checkpoints import CorruptCheckpointError, Fetch
from models.statedict import from_state_dict
from models.torchfile import read_checkpoint

__all__ = ["ChecksumError", "cache_root", "checkpoint_sha256", "download", "load", "load_model", "load_published",
           "main", "pinned_sha256", "verify_sha256"]


class ChecksumError(ValueError):
    """A checkpoint whose SHA-256 differs from the one the registry pins."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, or the default cache ($DCLS_JAX_CACHE, else ~/.cache/dcls_jax)."""
    return Path(cache_dir) if cache_dir is not None else downloads.default_cache_dir()


def download(url: str, cache_dir: str | os.PathLike | None = None, filename: str | None = None,
             sha256: str | None = None) -> Path:
    """The default `fetch`: data.download.cached_download (SHA-256 checked, or recorded at the first download)."""
    return downloads.cached_download(url, cache_dir, filename=filename, sha256=sha256)


def load(name: str, path: str | os.PathLike | None = None, key: str | None = None, *,
         cache_dir: str | os.PathLike | None = None, allow_nonfinite: bool = False, fetch: Fetch = download,
         **overrides):
    """models.convert.load with downloads: `path` a checkpoint file, an orbax directory written by save(), a URL
    (downloaded into `cache_dir`), or None for the entry's published checkpoint (its SHA-256 checked when the
    registry pins it, else the one recorded at its first download)."""
    def fetch_into_cache(url, _, filename, sha256):
        return fetch(url, cache_dir, filename, sha256)
    return store.load(name, path, key, allow_nonfinite=allow_nonfinite, fetch=fetch_into_cache, **overrides)


def load_published(name: str, cache_dir: str | os.PathLike | None = None, *, allow_nonfinite: bool = False,
                   fetch: Fetch = download, **overrides):
    """The entry's published checkpoint, downloaded (SHA-256 verified) and converted once into
    `cache_dir/converted/<name>`, and restored (manifest verified) from there. Runs sharing the cache
    serialise on a lock: the first converts, the others wait and restore what it wrote. A converted directory
    that fails verification is converted again; temporary directories of killed runs are removed."""
    ckpt = registry.get_entry(name).checkpoint
    if ckpt is None:
        raise ValueError(f"model {name!r} has no published checkpoint; pass a path")
    root = cache_root(cache_dir)
    converted = root / "converted" / name
    with downloads.file_lock(converted.with_name(f".{name}.lock")):
        for stale in converted.parent.glob(f".{name}.*"):   # only a holder of the lock writes these
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if converted.is_dir():
            try:
                return store.restore(name, converted, allow_nonfinite=allow_nonfinite, **overrides)
            except CorruptCheckpointError as e:
                warnings.warn(f"{e}; converting it again", stacklevel=2)
        path = fetch(ckpt.url, root, ckpt.filename, ckpt.sha256)
        model = from_state_dict(name, read_checkpoint(path, ckpt.key), allow_nonfinite=allow_nonfinite)
        store.save(model, converted, name, overwrite=True)
        del model
        return store.restore(name, converted, allow_nonfinite=allow_nonfinite, **overrides)


# ------------------------------------------------------------------------------------------------------------
# Hashes


def checkpoint_sha256(path) -> str:
    """The SHA-256 of a checkpoint file; of a directory (an orbax checkpoint), the SHA-256 of the sorted lines
    "<sha256 of the file>  <path relative to the directory>" of all its files (as `sha256sum` prints them)."""
    path = Path(path)
    if path.is_dir():
        lines = sorted(f"{downloads.sha256_file(p)}  {p.relative_to(path).as_posix()}\n"
                       for p in path.rglob("*") if p.is_file())
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    return downloads.sha256_file(path)


def pinned_sha256(entry) -> str | None:
    """The SHA-256 a registry entry pins for its published checkpoint (Checkpoint.sha256 or Entry.sha256), if any."""
    pinned = getattr(entry.checkpoint, "sha256", None) or getattr(entry, "sha256", None)
    return pinned.lower() if pinned else None


def verify_sha256(digest: str, pinned: str | None, what: str) -> str:
    """`digest`, or ChecksumError when the registry pins another hash."""
    if pinned and digest.lower() != pinned.lower():
        raise ChecksumError(f"SHA-256 mismatch for {what}: got {digest}, the registry pins {pinned}. The file is "
                            "corrupt or not the published checkpoint; delete it to download it again, or pass the "
                            "right file (evaluate.py --checkpoint)")
    return digest


# ------------------------------------------------------------------------------------------------------------
# What evaluate.py scores


def load_model(name: str, checkpoint: str | os.PathLike | None = None, *, random_init: bool = False, seed: int = 0,
               cache_dir: str | os.PathLike | None = None):
    """(model, source, sha256): random weights (`random_init`, nnx.Rngs(seed)), a given checkpoint (file, orbax
    directory or URL, downloaded into the cache), or the published checkpoint, converted once into an orbax
    directory under the cache and restored from there afterwards. `sha256` is that of the bytes evaluated
    (checkpoint_sha256; None for random weights), checked against the registry's pinned hash of the published
    checkpoint, if any, on every load (ChecksumError). FileNotFoundError for a checkpoint path that does not exist,
    ValueError for a model without a published checkpoint."""
    import models
    if random_init:
        if checkpoint is not None:
            raise ValueError("random_init and a checkpoint exclude each other")
        from flax import nnx
        return models.create_model(name, rngs=nnx.Rngs(seed)), "random-init", None
    if checkpoint is not None:
        path = str(checkpoint)
        if path.startswith(("http://", "https://")):
            path = downloads.cached_download(path, cache_dir)
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return store.load(name, path), str(checkpoint), checkpoint_sha256(path)
    entry = models.get_entry(name)
    ckpt = entry.checkpoint
    if ckpt is None:
        raise ValueError(f"{name} has no published checkpoint: pass --checkpoint or --random-init")
    raw = downloads.cache_path(ckpt.url, cache_root(cache_dir), filename=ckpt.filename)
    if raw.is_file():   # bytes already cached: a pinned hash they fail is refused before any conversion
        verify_sha256(downloads.sha256_file(raw), pinned_sha256(entry),
                      f"{name}'s checkpoint {raw} (from {ckpt.url})")
    # downloads (pinned hash checked), converts once under a lock shared by concurrent runs, verifies the cache
    model = load_published(name, cache_root(cache_dir))
    record = downloads.read_record(raw)   # the SHA-256 of the bytes the conversion was made from
    return model, ckpt.url, record["sha256"] if record else None


def main(argv: list[str] | None = None) -> int:
    """models.convert's command line, with URLs downloaded into the cache."""
    from models import convert
    return convert.main(argv, fetch=download, prog="python -m evaluation.checkpoints")


if __name__ == "__main__":
    sys.exit(main())
