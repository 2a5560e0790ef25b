"""Resumable, verified downloads with urllib (checkpoints, ClickMe shards).

    path = download(url, "ckpt.pth", expected_size=123456)   # resumes "ckpt.pth.part", renames when complete
    path = cached_download(url)                               # under $DCLS_JAX_CACHE or ~/.cache/dcls_jax

- resume: a download goes to `dest + ".part"` and continues after a dropped connection with an HTTP Range
  request (from the start if the server ignores it); only a complete, verified file is renamed to `dest`.
- cache paths: `cache_dir / host / <16 hex digits of the SHA-256 of the whole URL> / name`: the whole URL
  (scheme, host, port, path, query) is the key; `name` (the URL's last path segment, percent-decoded, or
  `filename=`) must be one plain file name. URLs whose decoded path has dot or empty segments, or slashes,
  backslashes or NUL inside a segment, are refused, and the resolved path must lie inside the cache.
- integrity: a completed download records its size and SHA-256 in `<dest>.sha256` (JSON). Later calls check
  the file against that record (or against a pinned `sha256`, which wins) and download it again on mismatch;
  a fresh download that differs from the record is an error (the server's file changed).
- completeness: a body of unannounced length is accepted only once its end is confirmed (chunked transfer
  completed, a Range request past the end answered 416, or two full reads with the same SHA-256); a pinned
  size or SHA-256 is always checked.
- time and size: every read has `timeout` seconds; a transfer under `min_rate` bytes/s over a
  `timeout`-second window, past `deadline` seconds in all or over `max_size` bytes fails.
- concurrency: processes downloading the same `dest` serialise on `file_lock(<dest>.lock)`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

_UMASK = os.umask(0o022)   # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)

CHUNK = 1 << 20
MIN_RATE = 1024          # bytes/s averaged over each `timeout`-second window
DEFAULT_DEADLINE = 6 * 3600.0
MAX_SIZE = 16 << 30      # bytes: no checkpoint or shard comes close; a server cannot fill the disk


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCLS_JAX_CACHE") or Path.home() / ".cache" / "dcls_jax")


def _unsafe(segment: str | None) -> bool:
    return segment in (None, "", ".", "..") or any(c in segment for c in "/\\\0")


def cache_path(url: str, cache_dir: str | os.PathLike | None = None, *, filename: str | None = None) -> Path:
    """Where cached_download(url, cache_dir, filename=...) keeps the file. Raises ValueError for URLs that
    could name a path outside the cache (percent-encoded slashes, dot segments...)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"cannot download {url!r}: only http:// and https:// URLs are supported")
    if not re.fullmatch(r"[a-z0-9_.\-]+|\[?[0-9a-f:.]+\]?", host) or set(host) <= {"."}:
        raise ValueError(f"cannot download {url!r}: unusable host name {host!r}")
    path, name = parts.path.removeprefix("/"), None
    for raw in path.removesuffix("/").split("/") if path else []:   # a trailing slash names the directory
        try:
            name = urllib.parse.unquote(raw, errors="strict")        # decoded before the checks: %2e%2e is ".."
        except UnicodeDecodeError:
            name = None
        if _unsafe(name):
            raise ValueError(f"refusing to download {url!r}: its path has an unsafe segment {raw!r} (decoded "
                             f"{name!r}): dot and empty segments, encoded slashes or backslashes, NUL and "
                             "non-UTF-8 bytes are not accepted")
    name = filename if filename is not None else name
    if name is None:
        raise ValueError(f"cannot derive a file name from {url!r}; pass filename=")
    if _unsafe(name) or len(name.encode("utf-8", "surrogateescape")) > 255:
        raise ValueError(f"unsafe file name {name!r} for {url!r}: a cache file name must be one plain path segment")
    key = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    root = Path(cache_dir or default_cache_dir())
    dest = root / host.strip("[]").replace(":", "_") / key / name
    real_root, real_dest = root.resolve(), dest.resolve()
    if not real_dest.is_relative_to(real_root) or real_dest == real_root:
        raise ValueError(f"refusing to download {url!r}: its cache path {dest} resolves outside {root}")
    return dest


def cached_download(url: str, cache_dir: str | os.PathLike | None = None, *, filename: str | None = None,
                    expected_size: int | None = None, sha256: str | None = None, **kwargs) -> Path:
    """download() into the cache, at cache_path(url, cache_dir, filename=filename)."""
    dest = cache_path(url, cache_dir, filename=filename)
    return download(url, dest, expected_size=expected_size, sha256=sha256, **kwargs)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive fcntl lock on `path` for the duration of the block, so that runs sharing a cache or data
    directory do not race; released when the process dies. The lock file is removed on release (a waiter
    that locked the removed file notices and locks the new one), which the `filelock` package does not do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file beside it: readers see the old file or the new one,
    never a part. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def read_record(dest: str | os.PathLike) -> dict | None:
    """The {"url", "size", "sha256"} recorded when `dest` was downloaded, or None."""
    try:
        rec = json.loads(_record_path(Path(dest)).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("size"), int)
          and isinstance(rec.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", rec["sha256"]))
    return rec if ok else None


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download(url: str, dest: str | os.PathLike, *, expected_size: int | None = None, sha256: str | None = None,
             retries: int = 3, timeout: float = 60, deadline: float | None = DEFAULT_DEADLINE,
             min_rate: float = MIN_RATE, max_size: int = MAX_SIZE) -> Path:
    """Downloads `url` to `dest` (resuming, verified, atomic) and returns `dest`; no-op if already complete."""
    dest = Path(dest)
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256 := sha256.lower()):
        raise ValueError(f"sha256 {sha256!r} is not 64 hex digits")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(dest.name + ".lock")):
        record = read_record(dest)
        want_sha = sha256 or (record["sha256"] if record else None)
        want_size = expected_size if expected_size is not None else (
            record["size"] if record and (sha256 is None or record["sha256"] == sha256) else None)
        if dest.exists():
            got = sha256_file(dest) if want_sha is not None else None
            if (want_size is None or dest.stat().st_size == want_size) and got == want_sha:
                if record is None or record["sha256"] != got:
                    _write_record(dest, url)
                return dest
            warnings.warn(f"{dest} does not match its recorded size/SHA-256 (corrupt or replaced); "
                          f"downloading it again from {url}", stacklevel=2)
            dest.unlink()
        _download(url, dest, want_size, want_sha, sha256 is not None, retries,
                  (timeout, time.monotonic(), deadline, min_rate, max_size))
        _write_record(dest, url)
    return dest


def _write_record(dest: Path, url: str) -> None:
    record = {"url": url, "size": dest.stat().st_size, "sha256": sha256_file(dest)}
    write_atomic(_record_path(dest), json.dumps(record) + "\n")


def _download(url, dest: Path, expected_size, sha256, pinned: bool, retries: int, limits: tuple) -> None:
    part = dest.with_name(dest.name + ".part")
    timeout, start, deadline = limits[:3]
    failures, reads, unconfirmed = 0, 0, None   # unconfirmed: SHA-256 of a full body of unannounced length
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            total, confirmed = _fetch(url, part, *limits)
            if confirmed or expected_size is not None or sha256 is not None:
                break
            # The server announced no length and closed the connection: that may be the end, or a drop.
            digest = sha256_file(part)
            if digest == unconfirmed:
                break                     # two full reads agree
            reads, unconfirmed, error = reads + 1, digest, None   # next: the bytes past the end (416: complete)
        except urllib.error.HTTPError as e:
            if e.code == 416 and before:  # nothing past our offset: the .part is complete or stale
                if unconfirmed is not None or before == expected_size:
                    total = before
                    break
                part.unlink()
                continue
            if e.code < 500:
                raise OSError(f"could not download {url}: HTTP {e.code} {e.reason}. {_offline_hint(dest)}") from e
            error = e
        except _TooSlow as e:
            part.unlink(missing_ok=True)
            raise OSError(f"could not download {url}: {e}. {_offline_hint(dest)}") from e
        except (http.client.HTTPException, OSError) as e:   # URLError, ConnectionError: a drop, retried
            error = e
        if reads > retries + 1:
            part.unlink()
            raise OSError(f"could not download {url}: the server announces no length and {reads} reads gave "
                          "different bodies; pass expected_size= or sha256=")
        if deadline is not None and time.monotonic() - start > deadline:
            part.unlink(missing_ok=True)
            raise OSError(f"could not download {url} within the {deadline:g} s deadline. {_offline_hint(dest)}")
        if error is not None:
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
    if sha256 is not None and (got := sha256_file(part)) != sha256:
        part.unlink()
        origin = "expected" if pinned else f"recorded in {_record_path(dest)} when it was first downloaded"
        raise ValueError(f"download of {url} has SHA-256 {got}, {origin} {sha256}; removed {part}"
                         + ("" if pinned else ". The server's file changed: delete the record to accept it"))
    os.replace(part, dest)


class _TooSlow(Exception):
    """The transfer is slower than the minimum rate, past the deadline or over the size limit: not retried."""


def _fetch(url: str, part: Path, timeout: float, start: float, deadline: float | None, min_rate: float,
           max_size: int) -> tuple[int | None, bool]:
    """One request: appends to `part` from its current size (Range) or rewrites it. Returns the total size
    (None if unknown) and whether the body's end is confirmed (announced length reached, or chunked transfer
    completed)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if m is None or int(m[1]) != offset:
                part.unlink(missing_ok=True)  # start over
                raise ConnectionError(f"unusable Content-Range {response.headers.get('Content-Range')!r}")
            total, mode = (None if m[2] == "*" else int(m[2])), "ab"
        else:  # 200: the server ignored the Range header, start over
            length = response.headers.get("Content-Length")
            total, mode = (int(length) if length is not None and length.isdigit() else None), "wb"
        chunked = getattr(response, "chunked", False)
        if total is not None and total > max_size:
            raise _TooSlow(f"the server announces {total} bytes, more than the limit of {max_size}")
        with open(part, mode) as f:
            window_start, window_bytes = time.monotonic(), 0
            try:
                while chunk := response.read1(CHUNK):
                    f.write(chunk)
                    now, window_bytes = time.monotonic(), window_bytes + len(chunk)
                    if f.tell() > max_size:
                        raise _TooSlow(f"more than the limit of {max_size} bytes")
                    if deadline is not None and now - start > deadline:
                        raise _TooSlow(f"not finished within the {deadline:g} s deadline")
                    if now - window_start >= timeout:
                        if window_bytes < min_rate * (now - window_start):
                            raise _TooSlow(f"the server sends {window_bytes / (now - window_start):.0f} bytes/s, "
                                           f"under the minimum of {min_rate:g} bytes/s")
                        window_start, window_bytes = now, 0
            except http.client.IncompleteRead as e:
                f.write(e.partial)
                raise ConnectionError(f"connection closed early ({e})") from None
        if total is not None and (got := part.stat().st_size) < total:
            raise ConnectionError(f"connection closed after {got} of {total} bytes")
        return total, total is not None or chunked


def _offline_hint(dest: Path) -> str:
    return (f"Without network access, download the file on another machine and pass its local path instead "
            f"(e.g. `--checkpoint /path/to/file`), or copy it to {dest}.")
