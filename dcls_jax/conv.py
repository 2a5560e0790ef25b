"""PyTorch-semantics N-d convolution on channels-last inputs with PyTorch-layout kernels, and the one place
where every depthwise and DCLS convolution of the project picks its implementation.

`conv(x, w, stride, padding, groups, dilation, impl=None)` takes x as (N, *spatial, C) and w as
(O, C/groups, *k) (the layout of torch.nn.ConvNd and of the dense DCLS kernel) and pads symmetrically like
PyTorch (never 'SAME'). Depthwise convolutions (groups == C, O == C or a multiple m of it, dilation 1, x and w
of one dtype; a multiplier runs as the depthwise conv of x with each channel repeated m times) run one of
several implementations of the same cross-correlation, each with its forward pass and both gradients:

    "xla"      lax.conv_general_dilated (every other convolution always runs this);
    "shifted"  a sum of strided shifted multiply-adds (XLA's CPU depthwise convolution is ~25x slower);
    "fft"      real FFTs, overlap-save tiling along long axes, float32 inside for bf16 (dcls_jax.fft_conv);
    "shifted_fft"  the shifted sums when only the value is needed, the FFT path under differentiation (its
               forward and both gradients): large kernels on CPU, whose shifted forward is the faster one;
    "pallas"   Pallas kernels, 2-D only: Triton on GPU, Mosaic on TPU, interpret mode elsewhere
               (dcls_jax.pallas_conv; forward, input and kernel gradients through a custom_vjp);
    "native"   C++ kernels for the CPU as XLA FFI custom calls, 1-D and 2-D (dcls_jax.native: compiled on first
               use; where no compiler works, "auto" never picks it and forcing it is an error).

Which one runs: the `impl` argument, else the innermost `use_impl(...)` context, else the environment variable
DCLS_JAX_CONV ("auto" or a name), else `choose_impl`, a table measured per backend (BENCHMARKS.md). "autotune"
(any of the three) times the implementations once per case and keeps the fastest (dcls_jax.autotune). The choice
is made when a function is traced: a jitted function keeps the implementation it was traced with. A forced
implementation that cannot run a case (pallas on a 3-D input) is an error when given as the argument and
falls back to the table when it comes from the context or the environment.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dcls_jax.fft_conv import fft_backward, fft_depthwise

IMPLS = ("xla", "shifted", "fft", "shifted_fft", "pallas", "native")
ENV_VAR = "DCLS_JAX_CONV"
_DIMS = {1: ("NHC", "OIH", "NHC"), 2: ("NHWC", "OIHW", "NHWC"), 3: ("NDHWC", "OIDHW", "NDHWC")}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dcls_jax_conv_impl", default=None)


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (v,) * n


def _check_impl(name: str, where: str) -> str:
    if name not in IMPLS + ("auto", "autotune"):
        raise ValueError(f"unknown convolution implementation {name!r} ({where}); expected 'auto', 'autotune' or "
                         f"one of {IMPLS}")
    return name


@contextlib.contextmanager
def use_impl(name: str):
    """Run the depthwise convolutions traced inside this context with implementation `name` (or "auto")."""
    token = _forced.set(_check_impl(name, "use_impl"))
    try:
        yield
    finally:
        _forced.reset(token)


def _supports(impl: str, nd: int, backend: str | None = None, dtype=None) -> bool:
    if impl == "pallas":
        return nd == 2
    if impl == "native":   # float32 inside: 16-bit floats are cast in and out; float64 would lose its precision
        from dcls_jax.native import available
        return (nd <= 2 and (backend or jax.default_backend()) == "cpu"
                and (dtype is None or jnp.dtype(dtype).itemsize <= 4) and available())
    return True


_NATIVE_MAX_TAPS = 23 * 23   # CPU: the C++ kernels up to here (their cost grows with the taps, the FFT's not)


def choose_impl(ksize: Sequence[int], spatial: Sequence[int], channels: int, stride: Sequence[int],
                dtype, backend: str | None = None) -> str:
    """The measured-fastest implementation of a depthwise convolution (BENCHMARKS.md, 'dispatch table').

    CPU (2 cores, jax 0.10): the C++ kernels ("native") for 1-D and 2-D kernels up to 23x23, float32 or narrower:
    3-6x faster than the best XLA formulation below in the forward, 3.5-11x with both gradients, at 7x7 and
    17x17 (BENCHMARKS.md). Without them (no compiler, 3-D): the shifted sum wins while kernel taps x output
    pixels stay small; FFT cost grows with the padded map, not the kernel, so it wins from about 9x9 kernels at
    stride 1 (the strided shifted sum computes 1/stride^nd of the work the FFT does), except the forward of
    15x15-23x23 kernels at stride 1 where the shifted sum (a scan over kernel rows) is the faster forward again:
    "shifted_fft" there. GPU (H100): XLA's depthwise convolution is fast for small kernels in bf16 and falls off
    a cliff beyond; FFT (cuFFT) runs large kernels at a fraction of its cost.
    TPU: XLA's convolution for small kernels, FFT for large ones."""
    backend = backend or jax.default_backend()
    taps = math.prod(ksize)
    sub = math.prod(stride)
    if backend == "cpu" and taps <= _NATIVE_MAX_TAPS and _supports("native", len(ksize), backend, dtype):
        return "native"
    if backend == "cpu":
        if taps <= 64 * sub:
            return "shifted"
        # 15x15..23x23 at stride 1 (DCLS's 17x17, gauss 23x23): the shifted-sum forward beats the FFT's
        # (inference), the FFT path runs under differentiation; 9x9-13x13 and beyond 23: FFT both ways. bf16 / f16
        # stay on the FFT: timed in fp32 only (the shifted sums of narrow dtypes accumulate in fp32, casts untimed).
        wide = jnp.dtype(dtype).itemsize >= 4
        return "shifted_fft" if wide and sub == 1 and all(15 <= k <= 23 for k in ksize) else "fft"
    if backend in ("gpu", "cuda", "rocm"):
        if taps <= 64:
            return "xla" if jnp.dtype(dtype) == jnp.bfloat16 else "shifted"
        return "fft"
    return "xla" if taps <= 64 else "fft"


def selected_impl(x_shape, w_shape, stride=1, padding=0, groups: int = 1, dilation=1, dtype=jnp.float32,
                  impl: str | None = None, backend: str | None = None) -> str:
    """The implementation `conv` would run for these shapes (what the benchmarks report)."""
    nd = len(w_shape) - 2
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    c_in, c_out = x_shape[-1], w_shape[0]
    # depthwise, also with a channel multiplier (out = m * in, groups = in: FastViT's downsampling convs)
    depthwise = groups == c_in and c_out % c_in == 0 and w_shape[1] == 1 and all(d == 1 for d in dilation)
    if impl is not None:
        _check_impl(impl, "impl argument")
        if impl == "autotune":
            return _autotuned(x_shape, w_shape, stride, padding, dtype, backend) if depthwise else "xla"
        if impl not in ("auto", "xla") and not depthwise:
            raise ValueError(f"implementation {impl!r} runs depthwise convolutions only (groups == in "
                             f"channels, out a multiple of in, dilation 1); got x {tuple(x_shape)}, "
                             f"w {tuple(w_shape)}, groups {groups}")
        if impl not in ("auto",) and not _supports(impl, nd, backend, dtype):
            if impl == "native" and nd <= 2 and jnp.dtype(dtype).itemsize > 4:
                raise ValueError(f"implementation 'native' computes in float32; got {jnp.dtype(dtype).name}")
            if impl == "native" and nd <= 2:
                from dcls_jax.native import unavailable_reason
                why = unavailable_reason() or f"backend {backend or jax.default_backend()}"
                raise ValueError(f"implementation 'native' needs the CPU backend and its compiled kernels ({why})")
            raise ValueError(f"implementation {impl!r} does not run {nd}-D convolutions")
        if impl != "auto":
            return impl
    if not depthwise:
        return "xla"
    forced = _forced.get() or os.environ.get(ENV_VAR) or "auto"
    _check_impl(forced, f"use_impl / {ENV_VAR}")
    if impl is None and forced == "autotune":
        return _autotuned(x_shape, w_shape, stride, padding, dtype, backend)
    if impl is None and forced != "auto" and _supports(forced, nd, backend, dtype):
        return forced
    return choose_impl(w_shape[2:], x_shape[1:-1], c_in, stride, dtype, backend)


def _autotuned(x_shape, w_shape, stride, padding, dtype, backend) -> str:
    """The timed choice (dcls_jax.autotune): one name, or "value+differentiated" when the two differ."""
    from dcls_jax.autotune import choose
    nd = len(w_shape) - 2
    value, differentiated = choose(tuple(x_shape), tuple(w_shape), _tuple(stride, nd), _tuple(padding, nd), dtype,
                                   backend)
    return value if value == differentiated else f"{value}+{differentiated}"


_MAX_UNROLLED_TAPS = 64


def _tap_loop(ksize, body, init):
    """Fold `acc = body(acc, tap_index)` over every kernel tap. Kernels of more than _MAX_UNROLLED_TAPS
    taps (DCLS: 17x17, 23x23) scan over all kernel axes but the last, which stays unrolled: fully unrolled, a
    17x17 kernel's gradient takes over 10 minutes to compile on CPU; scanned, a few seconds."""
    nd = len(ksize)
    if nd == 1 or math.prod(ksize) <= _MAX_UNROLLED_TAPS:
        acc = init
        for idx in itertools.product(*(range(k) for k in ksize)):
            acc = body(acc, idx)
        return acc
    lead = ksize[:-1]

    def row(acc, t):
        lead_idx = jnp.unravel_index(t, lead)
        for j in range(ksize[-1]):
            acc = body(acc, (*lead_idx, j))
        return acc, None

    return lax.scan(row, init, jnp.arange(math.prod(lead)))[0]


def _slice(x, start, size, stride, axis0: int):
    """x[..., start:start + (size-1)*stride + 1:stride, ...] along axes axis0.., static or traced starts."""
    for a, (i, o, s) in enumerate(zip(start, size, stride)):
        n = (o - 1) * s + 1
        x = (lax.slice_in_dim(x, i, i + n, s, axis=axis0 + a) if isinstance(i, int) else
             lax.slice_in_dim(lax.dynamic_slice_in_dim(x, i, n, axis=axis0 + a), 0, n, s, axis=axis0 + a))
    return x


def _shifted_valid_batch(xp, wt, stride):
    """Valid correlation of padded xp (N, *P, C) with wt (*k, C): sum over taps of strided shifted products,
    accumulated in float32 at least (a 289-tap sum in bfloat16 drifts by 4e-2; as the FFT path, fp32 inside)."""
    nd = xp.ndim - 2
    ksize = wt.shape[:-1]
    out = [(xp.shape[1 + a] - ksize[a]) // stride[a] + 1 for a in range(nd)]
    acc_dtype = jnp.promote_types(xp.dtype, jnp.float32)

    def body(acc, idx):
        w_tap = wt[idx] if all(isinstance(i, int) for i in idx) else wt[tuple(idx)]
        term = _slice(xp, idx, out, stride, 1).astype(acc_dtype) * w_tap.astype(acc_dtype)
        return term if acc is None else acc + term

    if nd == 1 or math.prod(ksize) <= _MAX_UNROLLED_TAPS:
        return _tap_loop(ksize, body, None).astype(xp.dtype)
    return _tap_loop(ksize, body, jnp.zeros((xp.shape[0], *out, xp.shape[-1]), acc_dtype)).astype(xp.dtype)


_BLOCK_BYTES = 1 << 19   # CPU: input rows per block of the shifted sums, about this many bytes (in L2)
_MIN_BLOCK_ROWS = 2      # fewer output rows per block re-read the kernel's rows too often: no blocks then


def _row_blocks(xp, s0: int, out0: int) -> tuple[int, int]:
    """(R, nb): nb blocks of R output rows along the first spatial axis, R s0 input rows ~ _BLOCK_BYTES;
    (out0, 1) where the rows are too wide for _MIN_BLOCK_ROWS (ConvNeXt-T's 7x7x768 stage: whole array faster)."""
    per_row = xp.dtype.itemsize * math.prod(xp.shape) // xp.shape[1] * s0
    R = int(min(out0, _BLOCK_BYTES // max(per_row, 1)))
    if R < _MIN_BLOCK_ROWS:
        return out0, 1
    return R, -(-out0 // R)


def _shifted_valid(xp, wt, stride):
    """Valid correlation of padded xp (N, *P, C) with wt (*k, C). On CPU in blocks of rows of the first spatial
    axis: XLA:CPU runs the shifted sums over an L2-sized block 1.4-3x faster than over the whole array
    (ConvNeXt-T stages, batch 8). Blocks of rows, not of samples: a batch sharded over devices stays sharded."""
    nd = xp.ndim - 2
    k0, s0 = wt.shape[0], stride[0]
    out0 = (xp.shape[1] - k0) // s0 + 1
    R, nb = _row_blocks(xp, s0, out0)
    if nd == 1 or nb == 1 or jax.default_backend() != "cpu" or math.prod(wt.shape[:-1]) > _MAX_UNROLLED_TAPS:
        # a GPU runs the whole array at once; large kernels scan over kernel rows (as fast unblocked)
        return _shifted_valid_batch(xp, wt, stride)
    rows_in = (R - 1) * s0 + k0
    need = (nb * R - 1) * s0 + k0
    xp = jnp.pad(xp, [(0, 0), (0, max(0, need - xp.shape[1]))] + [(0, 0)] * nd)
    y = lax.map(lambda b: _shifted_valid_batch(lax.dynamic_slice_in_dim(xp, b * R * s0, rows_in, axis=1), wt,
                                               stride), jnp.arange(nb))          # (nb, N, R, *rest, C)
    y = jnp.moveaxis(y, 0, 1).reshape(y.shape[1], nb * R, *y.shape[3:])
    return lax.slice_in_dim(y, 0, out0, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_sum_depthwise(x, w, stride, pads):
    """Depthwise conv (groups == C, one output per channel) as a sum of strided shifted products. Its custom
    backward computes, up to _MAX_UNROLLED_TAPS taps, the input gradient with the same shifted sums (autodiff of
    the strided slices is ~8x slower on XLA:CPU) and the kernel gradient per tap; beyond, both by FFTs."""
    return _shifted_valid(jnp.pad(x, [(0, 0), *pads, (0, 0)]), jnp.moveaxis(w[:, 0], 0, -1), stride)


def _shifted_fwd(x, w, stride, pads):
    return _shifted_sum_depthwise(x, w, tuple(stride), tuple(pads)), (x, w)


def _shifted_bwd(stride, pads, res, dy):
    x, w = res
    nd = x.ndim - 2
    ksize = w.shape[2:]
    xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    crop = (slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1])))
    if math.prod(ksize) > _MAX_UNROLLED_TAPS:
        # Large kernels: input and kernel gradients from one set of FFTs (per-tap reductions and the shifted
        # input gradient are 2-6x slower on XLA:CPU); the FFT's rounding scales with the largest lag.
        dxp, dw = fft_backward(xp, w, dy, stride)
        return dxp[crop].astype(x.dtype), dw.astype(w.dtype)
    wt = jnp.moveaxis(w[:, 0], 0, -1)
    out = dy.shape[1:-1]
    # Input gradient: the full correlation of the stride-dilated cotangent with the flipped kernel.
    cfg = [(0, 0, 0)]
    for a in range(nd):
        extra = xp.shape[1 + a] - ((out[a] - 1) * stride[a] + ksize[a])
        cfg.append((ksize[a] - 1, ksize[a] - 1 + extra, stride[a] - 1))
    dyd = lax.pad(dy, jnp.zeros((), dy.dtype), cfg + [(0, 0, 0)])
    dx = _shifted_valid(dyd, wt[(slice(None, None, -1),) * nd], (1,) * nd)[crop]
    # Kernel gradient: per tap, the sum over batch and outputs of the shifted input times the cotangent (on CPU
    # per block of rows, then summed): each tap's own reduction, with autodiff's per-tap rounding, which
    # test_train's 1- vs 4-device comparison needs (an FFT's rounding scales with the largest lag instead).
    axes = tuple(range(nd + 1))

    def taps(xp, dy):
        return jnp.stack([jnp.sum(_slice(xp, idx, dy.shape[1:-1], stride, 1) * dy, axis=axes)
                          for idx in itertools.product(*(range(k) for k in ksize))])
    R, nb = _row_blocks(xp, stride[0], out[0])
    if nd == 1 or nb == 1 or jax.default_backend() != "cpu":
        dwt = taps(xp, dy)
    else:   # in blocks of rows (as _shifted_valid), summed
        rows_in = (R - 1) * stride[0] + ksize[0]
        xp = jnp.pad(xp, [(0, 0), (0, max(0, (nb * R - 1) * stride[0] + ksize[0] - xp.shape[1]))] + [(0, 0)] * nd)
        dyb = jnp.pad(dy, [(0, 0), (0, nb * R - out[0])] + [(0, 0)] * nd)

        def block(b, acc):
            return acc + taps(lax.dynamic_slice_in_dim(xp, b * R * stride[0], rows_in, axis=1),
                              lax.dynamic_slice_in_dim(dyb, b * R, R, axis=1))
        dwt = lax.fori_loop(1, nb, block, taps(lax.slice_in_dim(xp, 0, rows_in, axis=1),
                                                lax.slice_in_dim(dyb, 0, R, axis=1)))
    dwt = dwt.reshape(*ksize, -1)
    return dx, jnp.moveaxis(dwt, -1, 0)[:, None].astype(w.dtype)


_shifted_sum_depthwise.defvjp(_shifted_fwd, _shifted_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _pair_depthwise(x, w, stride, padding, value_impl, differentiated_impl):
    """One implementation for the value and another, forward and backward, under differentiation."""
    return conv(x, w, stride, padding, x.shape[-1], impl=value_impl)


def _pair_fwd(x, w, stride, padding, value_impl, differentiated_impl):
    return jax.vjp(lambda a, b: conv(a, b, stride, padding, a.shape[-1], impl=differentiated_impl), x, w)


def _pair_bwd(stride, padding, value_impl, differentiated_impl, vjp, dy):
    return vjp(dy)


_pair_depthwise.defvjp(_pair_fwd, _pair_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_fft_depthwise(x, w, stride, pads):
    """Shifted sums when only the value is needed (inference: the faster forward for large kernels on XLA:CPU);
    under differentiation the forward and both gradients run the FFT path (cheaper than shifted forward + FFT
    backward, which would recompute the input's spectrum)."""
    return _shifted_sum_depthwise(x, w, stride, pads)


def _shifted_fft_fwd(x, w, stride, pads):
    return jax.vjp(lambda a, b: fft_depthwise(a, b, stride, pads), x, w)


def _shifted_fft_bwd(stride, pads, vjp, dy):
    return vjp(dy)


_shifted_fft_depthwise.defvjp(_shifted_fft_fwd, _shifted_fft_bwd)


def _xla(x, w, stride, pads, groups, dilation):
    nd = w.ndim - 2
    return lax.conv_general_dilated(x, w, window_strides=stride, padding=pads, rhs_dilation=dilation,
                                    dimension_numbers=_DIMS[nd], feature_group_count=groups)


def conv(x, w, stride=1, padding=0, groups: int = 1, dilation=1, *, impl: str | None = None):
    """Cross-correlation of channels-last `x` with a PyTorch-layout kernel `w` (O, I/groups, *k).

    `impl` forces an implementation (see the module docstring); None lets the context, the environment
    variable DCLS_JAX_CONV or the measured table decide."""
    nd = w.ndim - 2
    if x.ndim != nd + 2:
        raise ValueError(f"expected a {nd + 2}-D channels-last input, got shape {x.shape}")
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    padding = _tuple(padding, nd)
    if len(stride) != nd or len(padding) != nd or len(dilation) != nd:
        raise ValueError(f"stride {stride}, padding {padding} and dilation {dilation} must give {nd} values")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride {stride} and dilation {dilation} must be >= 1, padding {padding} >= 0")
    if groups < 1 or x.shape[-1] % groups or w.shape[0] % groups or w.shape[1] * groups != x.shape[-1]:
        raise ValueError(f"groups {groups} does not fit input channels {x.shape[-1]} and kernel {tuple(w.shape)} "
                         f"(need groups >= 1 dividing both channel counts, and kernel in-channels x groups = "
                         f"input channels)")
    pads = [(p, p) for p in padding]
    span = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation)]
    if any(s + 2 * p < k for s, p, k in zip(x.shape[1:-1], padding, span)):
        raise ValueError(f"kernel {tuple(w.shape[2:])} (dilation {dilation}) is larger than the padded input "
                         f"{tuple(s + 2 * p for s, p in zip(x.shape[1:-1], padding))}")
    fixed = impl not in (None, "auto", "autotune")
    plain = x.dtype == w.dtype and jnp.issubdtype(x.dtype, jnp.floating)
    empty = x.size == 0 or w.size == 0
    # the fast paths run real floating inputs of one dtype, and have nothing to do on empty ones: lax runs those
    name = ("xla" if not fixed and (empty or not plain) else
            selected_impl(x.shape, w.shape, stride, padding, groups, dilation, x.dtype, impl))
    if name != "xla" and not plain:
        raise ValueError(f"implementation {impl!r} needs x and w of one real floating dtype, got {x.dtype} "
                         f"and {w.dtype}")
    if empty:
        name = "xla"
    if "+" in name:
        return _pair_depthwise(x, w, tuple(stride), tuple(padding), *name.split("+"))
    if name != "xla" and w.shape[0] != x.shape[-1]:
        # channel multiplier m: output channel o reads input channel o // m, i.e. a depthwise conv of the input
        # with each channel repeated m times (autodiff sums the copies' gradients)
        x = jnp.repeat(x, w.shape[0] // x.shape[-1], axis=-1)
    if name == "shifted":
        return _shifted_sum_depthwise(x, w, tuple(stride), tuple(pads))
    if name == "fft":
        return fft_depthwise(x, w, stride, pads)
    if name == "shifted_fft":
        return _shifted_fft_depthwise(x, w, tuple(stride), tuple(pads))
    if name == "pallas":
        from dcls_jax.pallas_conv import pallas_depthwise
        return pallas_depthwise(x, w, stride, pads)
    if name == "native":
        from dcls_jax.native import depthwise
        return depthwise(x, w, tuple(stride), tuple(pads))
    return _xla(x, w, stride, pads, groups, dilation)
