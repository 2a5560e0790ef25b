"""Resumable, verified downloads with urllib (checkpoints, ClickMe shards).

    path = download(url, "ckpt.pth", expected_size=123456)   # resumes "ckpt.pth.part", renames when complete
    path = cached_download(url)                               # under $DCLS_JAX_CACHE or ~/.cache/dcls_jax

A download goes to `dest + ".part"`; after a dropped connection it resumes with an HTTP Range request when
the server honours it (206) and starts over otherwise. The size is checked against the server's length and
`expected_size`, the SHA-256 against `sha256` if given; only a complete, verified file is renamed to `dest`,
so an existing `dest` is complete and later calls return it at once.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCLS_JAX_CACHE") or Path.home() / ".cache" / "dcls_jax")


def cached_download(url: str, cache_dir: str | os.PathLike | None = None, *, filename: str | None = None,
                    expected_size: int | None = None, sha256: str | None = None, **kwargs) -> Path:
    """download() into the cache: `cache_dir / host / url path` (or `cache_dir / host / filename`)."""
    parts = urllib.parse.urlsplit(url)
    names = [urllib.parse.unquote(p) for p in parts.path.split("/") if p not in ("", ".", "..")]
    if filename is not None:
        names = [filename]
    if not names:
        raise ValueError(f"cannot derive a file name from {url!r}; pass filename=")
    dest = Path(cache_dir or default_cache_dir()) / (parts.hostname or "local") / Path(*names)
    return download(url, dest, expected_size=expected_size, sha256=sha256, **kwargs)


def download(url: str, dest: str | os.PathLike, *, expected_size: int | None = None, sha256: str | None = None,
             retries: int = 3, timeout: float = 60) -> Path:
    """Downloads `url` to `dest` (resuming, verified, atomic) and returns `dest`; no-op if already complete."""
    dest = Path(dest)
    if dest.exists():
        if _complete(dest, expected_size, sha256):
            return dest
        dest.unlink()  # a wrong file from elsewhere: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            total = _fetch(url, part, timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and before:  # nothing past our offset: the .part is complete or stale
                if expected_size is not None and before == expected_size:
                    total = before
                    break
                part.unlink()
                continue
            if e.code < 500:
                raise OSError(f"could not download {url}: HTTP {e.code} {e.reason}. {_offline_hint(dest)}") from e
            error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, _Short) as e:
            error = e
        after = part.stat().st_size if part.exists() else 0
        failures = 0 if after > before else failures + 1  # progress resets the retry budget
        if failures > retries:
            raise OSError(f"could not download {url} after {retries + 1} attempts without progress: "
                          f"{getattr(error, 'reason', error)}. {_offline_hint(dest)}") from error
        time.sleep(min(0.2 * 2 ** failures, 5.0) if failures else 0.0)
    size = part.stat().st_size
    for what, want in (("the server's length", total), ("expected_size", expected_size)):
        if want is not None and size != want:
            part.unlink()
            raise ValueError(f"download of {url} has {size} bytes but {what} is {want}; removed {part}")
    if sha256 is not None and (got := _sha256(part)) != sha256.lower():
        part.unlink()
        raise ValueError(f"download of {url} has SHA-256 {got}, expected {sha256}; removed {part}")
    os.replace(part, dest)
    return dest


class _Short(Exception):
    """The connection ended before the announced length."""


def _fetch(url: str, part: Path, timeout: float) -> int | None:
    """One request: appends to `part` from its current size (Range) or rewrites it. Returns the total size."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if m is None or int(m[1]) != offset:
                part.unlink(missing_ok=True)  # start over
                raise _Short(f"unusable Content-Range {response.headers.get('Content-Range')!r}")
            total = None if m[2] == "*" else int(m[2])
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(part, mode) as f:
            try:
                while chunk := response.read1(CHUNK):
                    f.write(chunk)
            except http.client.IncompleteRead as e:
                f.write(e.partial)
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Short(f"connection closed after {got} of {total} bytes")
    return total


def _complete(path: Path, expected_size: int | None, sha256: str | None) -> bool:
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    return sha256 is None or _sha256(path) == sha256.lower()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _offline_hint(dest: Path) -> str:
    return (f"Without network access, download the file on another machine and pass its local path instead "
            f"(e.g. `--checkpoint /path/to/file`), or copy it to {dest}.")
