"""The "native" depthwise convolution: C++ kernels for the CPU (csrc/depthwise.cc) run as XLA FFI custom calls,
and the library they share with the dense layers' GEMM (csrc/matmul.cc, run by dcls_jax.dense).

XLA:CPU has no fast depthwise convolution (its grouped convolution is ~50x slower than oneDNN's, the shifted
sums 5-10x), so the CPU kernels are our own: a register-blocked forward over vectors of 16 floats (8 without
AVX-512), used for the input gradient too (the cotangent with the flipped kernel), and a kernel-gradient
reduction. 1-D and 2-D; float32 inside (other float dtypes are cast in and out, as the FFT path does).

The sources are compiled on first use, into one library, with the system's C++ compiler (`$CXX`, else c++ / g++
/ clang++) against the installed jaxlib's FFI headers, for this CPU (-march=native; `DCLS_JAX_NATIVE_MARCH`
names another), into a per-user cache (`$DCLS_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/dcls-jax` or
~/.cache/dcls-jax, subfolder native/) under a name that hashes the sources, the compiler, the flags, jaxlib's
version and the CPU's features; later processes load it from there, and a new build deletes the builds no
process has loaded for STALE_DAYS days. Where no compiler works, or the cache folder is not private to this
user, `available()` is False, `unavailable_reason()` says why, and the dispatchers keep to the XLA paths.

Under shard_map, `match_vma` and `fit_vma` give the custom calls' results and cotangents the varying types JAX's
own primitives would have (ffi_call types its results as invariant).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CSRC = Path(__file__).with_name("csrc")
# one library; compiled side by side
SOURCES = tuple(CSRC / f for f in ("depthwise.cc", "matmul.cc", "attention.cc", "norm.cc", "barrier.cc"))
_TARGETS = {"dcls_jax_depthwise_forward": "DclsDepthwiseForward",   # XLA custom-call name: C symbol
            "dcls_jax_depthwise_kernel_grad": "DclsDepthwiseKernelGrad",
            "dcls_jax_matmul": "DclsMatmul",
            "dcls_jax_linear_act": "DclsLinearAct",
            "dcls_jax_attention": "DclsAttention",
            "dcls_jax_attention_grad": "DclsAttentionGrad",
            "dcls_jax_layer_norm": "DclsLayerNorm",
            "dcls_jax_fusion_barrier": "DclsFusionBarrier"}
_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("DCLS_JAX_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dcls-jax")
    return Path(root) / "native"


def _private_dir(path: Path) -> None:
    """Create `path` (mode 0700) and refuse a folder another user owns or may write: we load code from it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is not private to this user (owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)})")


def _compiler() -> str:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        found = shutil.which(name)
        if found:
            return found
    raise OSError("no C++ compiler found ($CXX, c++, g++, clang++)")


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build() -> Path:
    cxx = _compiler()
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    # DCLS_JAX_NATIVE_MARCH: the target CPU (default: this one); the tests build an AVX2 one (x86-64-v3) too
    flags = ["-std=c++17", "-O3", f"-march={os.environ.get('DCLS_JAX_NATIVE_MARCH') or 'native'}", "-fPIC", "-w"]
    parts = (*(f.read_bytes() for f in (*SOURCES, CSRC / "common.h")), version, " ".join(flags),
             importlib.metadata.version("jaxlib"), platform.machine(), _cpu_features())
    key = hashlib.sha256(b"\0".join(p.encode() if isinstance(p, str) else p for p in parts)).hexdigest()[:20]
    out_dir = cache_dir()
    _private_dir(out_dir)
    lib = out_dir / f"native-{key}.so"
    if lib.exists():
        os.utime(lib)   # marks it used: builds of other versions unused for STALE_DAYS are pruned
        return lib
    _prune(out_dir)
    # One compiler per source, side by side (on this project's 2-core machine ~9 s instead of ~11 in one process),
    # then one link; all in a private temporary folder, so a failed or concurrent build leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        objects = [os.path.join(work, f"{src.stem}.o") for src in SOURCES]
        commands = [[cxx, *flags, "-I", include, "-c", str(src), "-o", obj] for src, obj in zip(SOURCES, objects)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(commands)) as pool:
            list(pool.map(_compile, commands))   # raises the first failure
        tmp = os.path.join(work, "native.so")
        _compile([cxx, "-shared", *objects, "-o", tmp])
        os.replace(tmp, lib)   # atomic: a concurrent process sees the old state or the whole library
    return lib


def _compile(cmd: list[str]) -> None:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise OSError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")


STALE_DAYS = 30


def _prune(out_dir: Path) -> None:
    """Delete builds (of other sources, compilers or jaxlibs: several venvs may share the cache) that no
    process has loaded for STALE_DAYS days."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in [*out_dir.glob("native-*.so"), *out_dir.glob("depthwise-*.so")]:   # depthwise-*: the earlier name
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:   # another process pruned or used it meanwhile
            pass


def _load() -> None:
    with _lock:
        if "ok" in _state:
            return
        try:
            if os.environ.get("DCLS_JAX_NATIVE", "1") == "0":
                raise OSError("disabled by DCLS_JAX_NATIVE=0")
            lib = ctypes.CDLL(str(_build()))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state.update(ok=True, lib=lib)
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")


def available() -> bool:
    """True when the CPU kernels are compiled (or cached) and registered; compiles them on the first call."""
    _load()
    return _state["ok"]


def unavailable_reason() -> str | None:
    _load()
    return _state.get("reason")


def _vma(v) -> frozenset:
    """The shard_map axes v varies over (jax 0.10: aval.manual_axis_type.varying; older: aval.vma)."""
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def match_vma(y, *inputs):
    """An FFI call's result typed as varying over the shard_map axes its inputs vary over: ffi_call types its
    results as invariant, and a custom_vjp then rejects the (varying) cotangent of such a result."""
    missing = frozenset().union(*map(_vma, inputs)) - _vma(y)
    return lax.pcast(y, tuple(sorted(missing)), to="varying") if missing else y


def fit_vma(ct, primal):
    """A custom_vjp cotangent typed as its primal input: summed over the shard_map axes the primal does not vary
    over (a replicated weight's gradient adds every device's part, as JAX's own transposes do) and marked
    varying over those it does."""
    extra = _vma(ct) - _vma(primal)
    if extra:
        ct = lax.psum(ct, tuple(sorted(extra)))
    return match_vma(ct, primal)


@functools.cache
def _op(kind, stride, lo, size):
    """The custom call as a function of two arrays (x and the kernel, or x and the cotangent)."""
    from jax.sharding import PartitionSpec as P

    def specs(axes):   # the batch's axes: x and the cotangent sharded, the kernel replicated
        batch = P(axes, None, None, None)
        return (batch, P(), batch) if kind == "forward" else (batch, batch, P())
    rule = "n h w c, i j c -> n p q c" if kind == "forward" else "n h w c, n p q c -> i j c"
    return batched_call(lambda a, b: _ffi(kind, a, b, stride, lo, size), rule, specs,
                        (True, False) if kind == "forward" else (True, True), kind == "forward")


def _ffi(kind, a, b, stride, lo, size):
    """One custom call on (per-device) arrays: the forward (size: output H, W) or the kernel gradient (KH, KW)."""
    shape = (a.shape[0], *size, a.shape[-1]) if kind == "forward" else (*size, a.shape[-1])
    return jax.ffi.ffi_call(f"dcls_jax_depthwise_{kind}", jax.ShapeDtypeStruct(shape, jnp.float32))(
        a, b, sh=np.int64(stride[0]), sw=np.int64(stride[1]), ph=np.int64(lo[0]), pw=np.int64(lo[1]))


def partition_over_batch(fn, rule: str, specs):
    """`fn(a, b, ...)`, one custom call, partitioned over a's leading axis (the batch of a sharded jit): each device
    runs its own rows; an unannotated custom call would gather them on every device. `rule` is the Shardy
    einsum-like rule (its first factor is a's leading axis); `specs(axes)` gives every operand's and the result's
    PartitionSpecs for the batch's mesh axes. Where the leading factor is not in the result (a sum over the
    batch: a kernel or weight gradient), a psum adds the devices' partials. Other axes are replicated first."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding

    inputs, result = rule.split("->")
    factors = tuple(dict.fromkeys(inputs.replace(",", " ").split() + result.split()))   # in order (shardy)
    lead = factors[0]
    summed = lead not in result.split()

    def shardings(mesh, arg_shapes):
        spec = getattr(arg_shapes[0].sharding, "spec", None)
        axes = spec[0] if spec else None
        *args, out = (NamedSharding(mesh, p) for p in specs(axes))
        return axes, tuple(args), out

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    def partition(mesh, arg_shapes, result_shape):
        axes, args, out = shardings(mesh, arg_shapes)

        def lower(*operands):
            y = fn(*operands)
            return lax.psum(y, axes) if summed and axes else y
        return mesh, lower, out, args

    call = custom_partitioning(fn)
    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                       reduction_factors=(lead,) if summed else (),
                       need_replication_factors=tuple(f for f in factors if f != lead))
    return call


def batched_call(fn, rule: str, specs, leading: tuple[bool, ...], folds: bool, fallback=None):
    """partition_over_batch(fn, rule, specs) with a vmap rule. `leading[i]`: operand i's leading axis is the batch
    (the others are weights); `folds`: so is the result's. Under vmap, where only batch operands are mapped (an
    unmapped one broadcast first) and the result is batched, the mapped axis merges into the batch: one call.
    Otherwise (a mapped weight, a result summed over the batch) `fallback` (an XLA form) vmapped, or without one,
    one call per element (lax.map)."""
    call = partition_over_batch(fn, rule, specs)

    @jax.custom_batching.custom_vmap
    def op(*args):
        return call(*args)

    @op.def_vmap
    def batched(axis_size, in_batched, *args):
        if folds and not any(m and not lead for m, lead in zip(in_batched, leading)):
            def fold(a, m, lead):
                if not (m or lead):
                    return a
                return (a if m else jnp.broadcast_to(a, (axis_size, *a.shape))).reshape(-1, *a.shape[1 + m:])
            y = op(*map(fold, args, in_batched, leading))
            return y.reshape(axis_size, -1, *y.shape[1:]), True
        if fallback is not None:
            return jax.vmap(fallback, in_axes=tuple(0 if m else None for m in in_batched))(*args), True
        args = [a if m else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, m in zip(args, in_batched)]
        return lax.map(lambda a: op(*a), tuple(args)), True
    return op


# The three maps, on 2-D float32 arrays x (N, H, W, C), kernel (KH, KW, C), outputs (N, HO, WO, C), closed
# under differentiation (each one's gradients are the others), so every order of derivative runs the kernels:
#   forward      y  = F(x, w)          x_bar = T(y_bar, w),  w_bar = K(x, y_bar)
#   input grad   dx = T(g, w) = F(g dilated by the stride, w flipped) (differentiable through F)
#   kernel grad  dw = K(x, g)          x_bar = T(g, dw_bar), g_bar = F(x, dw_bar)
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _forward(x, w, stride, lo, out_hw):
    return match_vma(_op("forward", stride, lo, out_hw)(x, w), x, w)


def _input_grad(g, w, stride, lo, in_hw):
    if stride != (1, 1):
        g = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), (0, 0, stride[0] - 1), (0, 0, stride[1] - 1), (0, 0, 0)])
    return _forward(g, w[::-1, ::-1], (1, 1), tuple(k - 1 - p for k, p in zip(w.shape[:2], lo)), in_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _kernel_grad(x, g, stride, lo, ksize):
    return match_vma(_op("kernel_grad", stride, lo, ksize)(x, g), x, g)


def _forward_fwd(x, w, stride, lo, out_hw):
    return _forward(x, w, stride, lo, out_hw), (x, w)


def _forward_bwd(stride, lo, out_hw, res, y_bar):
    x, w = res
    return (fit_vma(_input_grad(y_bar, w, stride, lo, x.shape[1:3]), x),
            fit_vma(_kernel_grad(x, y_bar, stride, lo, w.shape[:2]), w))


def _kernel_grad_fwd(x, g, stride, lo, ksize):
    return _kernel_grad(x, g, stride, lo, ksize), (x, g)


def _kernel_grad_bwd(stride, lo, ksize, res, dw_bar):
    x, g = res
    return (fit_vma(_input_grad(g, dw_bar, stride, lo, x.shape[1:3]), x),
            fit_vma(_forward(x, dw_bar, stride, lo, g.shape[1:3]), g))


_forward.defvjp(_forward_fwd, _forward_bwd)
_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def depthwise(x, w, stride, pads):
    """Depthwise cross-correlation, x (N, *spatial, C), w (C, 1, *k), 1-D or 2-D, `pads` PyTorch-style
    (lo, hi) pairs; differentiable to any order (reverse mode)."""
    one_d = x.ndim == 3
    if one_d:
        x, w, stride, pads = x[:, None], w[:, :, None], (1, *stride), ((0, 0), *pads)
    wt = jnp.moveaxis(w[:, 0], 0, -1).astype(jnp.float32)
    out = tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(x.shape[1:3], pads, wt.shape[:2], stride))
    y = _forward(x.astype(jnp.float32), wt, tuple(stride), tuple(lo for lo, _ in pads), out)
    return (y[:, 0] if one_d else y).astype(x.dtype)


@jax.custom_jvp
def fusion_barrier(x):
    """x, computed once into memory: the identity as a custom call (csrc/barrier.cc) that XLA cannot fuse, whose
    result aliases its operand. XLA:CPU fuses an elementwise producer into each of its consumers, duplicating it;
    along a chain of residual blocks' cotangents, each parameter gradient's reduction then recomputed the whole
    chain back to the stage's end (caformer_s18's train step: ~0.6 s of 2.4). Any dtype and shape; partitioned
    as its operand is sharded, and under vmap the mapped axis is one more axis of the operand. Its derivative is the
    identity. Needs `available()`."""
    return match_vma(_barrier_op(x.ndim)(x), x)


@fusion_barrier.defjvp
def _fusion_barrier_jvp(primals, tangents):
    return fusion_barrier(primals[0]), tangents[0]


@functools.cache
def _barrier_op(ndim: int):
    from jax.experimental.custom_partitioning import custom_partitioning
    if not available():   # also what registers the custom call
        raise RuntimeError(f"dcls_jax.native.fusion_barrier: the C++ library is unavailable: {unavailable_reason()}")

    def ffi(x):
        return jax.ffi.ffi_call("dcls_jax_fusion_barrier", jax.ShapeDtypeStruct(x.shape, x.dtype),
                                input_output_aliases={0: 0})(x)

    def infer(mesh, arg_shapes, result_shape):
        return arg_shapes[0].sharding

    def partition(mesh, arg_shapes, result_shape):   # each device its own part, as the operand is laid out
        return mesh, ffi, arg_shapes[0].sharding, (arg_shapes[0].sharding,)

    call = custom_partitioning(ffi)
    factors = " ".join(f"d{i}" for i in range(ndim))
    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=f"{factors} -> {factors}")

    @jax.custom_batching.custom_vmap
    def op(x):
        return call(x)

    @op.def_vmap
    def batched(axis_size, in_batched, x):
        return _barrier_op(ndim + 1)(x), True
    return op
