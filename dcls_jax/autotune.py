"""Autotune-once for the depthwise convolutions: `DCLS_JAX_CONV=autotune`, `use_impl("autotune")` or
`conv(..., impl="autotune")`.

The first time a case is traced (device kind, jax version, shapes, stride, padding, dtype), every implementation
that can run it on this backend is timed on random data of its shapes: its forward alone, and its forward with
both gradients. The fastest forward runs the value; under differentiation the pair fastest with both gradients
runs the forward and the backward (a custom_vjp joins the two when they differ, as "shifted_fft" does, so forward
mode AD then needs a fixed implementation). The choice is kept for the process and in `autotune.json` beside the
native kernels' cache (`$DCLS_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/dcls-jax` or ~/.cache/dcls-jax), so later
processes time nothing; a file that does not parse, or entries naming unknown implementations, are ignored and
replaced.

Not timed: the Pallas kernels in interpret mode (off GPU and TPU) and XLA's convolution on the CPU for kernels of
more than 64 taps (minutes per call). Implementations round differently (within float32's rounding of the same
sums), so runs that tuned differently differ in the last bits; in a multi-process run the processes could pick
differently and run different programs, so autotune there takes its choices from the cache file only and refuses
to time a case the file lacks.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from dcls_jax.native import _cpu_features, _private_dir, cache_dir

_conv_mod = importlib.import_module("dcls_jax.conv")   # the module (the attribute dcls_jax.conv is the function)

FILE_VERSION = 1
REPS = 3
_CANDIDATES = ("native", "xla", "shifted", "fft", "pallas")   # "shifted_fft" is the pair (shifted, fft)
_lock = threading.Lock()
_memory: dict[str, tuple[str, str]] = {}
_loaded: list[bool] = []


def cache_file() -> Path:
    return cache_dir().parent / "autotune.json"


def _valid(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) and e in _CANDIDATES
                                                                  for e in entry))


def _read() -> dict[str, tuple[str, str]]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("entries"),
                                                                                           dict):
        return {}
    return {k: tuple(v) for k, v in data["entries"].items() if isinstance(k, str) and _valid(v)}


def _write(entries: dict[str, tuple[str, str]]) -> None:
    path = cache_file()
    try:
        _private_dir(path.parent)
        merged = {**_read(), **entries}                 # keep what other processes added meanwhile
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": FILE_VERSION, "entries": {k: list(v) for k, v in sorted(merged.items())}}, f,
                      indent=0)
        os.replace(tmp, path)                           # atomic: readers see the old file or the new one
    except OSError as e:
        warnings.warn(f"dcls_jax autotune: choices kept for this process only ({path}: {e})", stacklevel=3)


@functools.cache
def _cpu_tag() -> str:
    """Every CPU's device kind is "cpu": this one named by its features (a home folder may be shared)."""
    return hashlib.sha256(f"{platform.machine()} {_cpu_features()}".encode()).hexdigest()[:10]


def _key(x_shape, w_shape, stride, padding, dtype, backend: str) -> str:
    kind = jax.devices(backend)[0].device_kind
    if backend == "cpu":
        kind += "-" + _cpu_tag()
    return (f"{backend}|{kind}|jax {jax.__version__}|x{tuple(x_shape)} w{tuple(w_shape)} "
            f"s{tuple(stride)} p{tuple(padding)} {jnp.dtype(dtype).name}")


def candidates(x_shape, w_shape, dtype, backend: str) -> list[str]:
    """The implementations timed for this case on `backend`."""
    nd, taps = len(w_shape) - 2, math.prod(w_shape[2:])
    out = []
    for impl in _CANDIDATES:
        if not _conv_mod._supports(impl, nd, backend, dtype):
            continue
        if impl == "pallas" and backend not in ("gpu", "cuda", "rocm", "tpu"):
            continue                                    # interpret mode: a correctness tool, not a contender
        if impl == "xla" and backend == "cpu" and taps > 64:
            continue
        out.append(impl)
    return out


def _time_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))                    # compiles
    best = float("inf")
    for _ in range(REPS):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure(impl: str, x_shape, w_shape, stride, padding, dtype) -> tuple[float, float]:
    """(forward ms, forward + both gradients ms) of `impl` on random data of these shapes."""
    from dcls_jax.options import compiler_options
    groups = x_shape[-1]
    f = lambda x, w: _conv_mod.conv(x, w, stride, padding, groups, impl=impl)   # noqa: E731
    with jax.ensure_compile_time_eval():                # we may be inside a trace: run these, do not stage them
        kx, kw, kc = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, x_shape, dtype)
        w = jax.random.normal(kw, w_shape, dtype)
        y_shape = jax.eval_shape(f, x, w)
        ct = jax.random.normal(kc, y_shape.shape, y_shape.dtype)

        def both(x, w, ct):
            y, vjp = jax.vjp(f, x, w)
            return y, vjp(ct)
        opts = compiler_options()
        return (_time_ms(jax.jit(f, compiler_options=opts), x, w),
                _time_ms(jax.jit(both, compiler_options=opts), x, w, ct))


def choose(x_shape, w_shape, stride, padding, dtype, backend: str | None = None) -> tuple[str, str]:
    """(implementation for the value, implementation under differentiation) of this depthwise case, timed once."""
    backend = backend or jax.default_backend()
    key = _key(x_shape, w_shape, stride, padding, dtype, backend)
    with _lock:
        if not _loaded:
            _memory.update(_read())
            _loaded.append(True)
        runnable = candidates(x_shape, w_shape, dtype, backend)
        if key in _memory and all(impl in runnable for impl in _memory[key]):   # a file may name others
            return _memory[key]
        if jax.process_count() > 1:
            raise RuntimeError(
                f"autotune would time {key} in each of {jax.process_count()} processes, which could choose "
                f"differently and run different programs: tune it in one process first (the choice goes to "
                f"{cache_file()}, to be copied to the others), or set a fixed implementation (DCLS_JAX_CONV)")
        timed, errors = {}, {}
        for impl in runnable:
            try:
                timed[impl] = measure(impl, x_shape, w_shape, stride, padding, dtype)
            except Exception as e:   # noqa: BLE001 (an implementation that cannot run the case, e.g. memory)
                errors[impl] = f"{type(e).__name__}: {e}"
        if not timed:
            raise RuntimeError(f"autotune: no implementation ran {key}: {errors}")
        choice = (min(timed, key=lambda i: timed[i][0]), min(timed, key=lambda i: timed[i][1]))
        _memory[key] = choice
        _write({key: choice})
        return choice
