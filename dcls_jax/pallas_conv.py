"""Pallas kernels for the 2-D depthwise cross-correlation: forward, input gradient and kernel gradient.

Every kernel computes a *valid, stride-1* correlation of a padded map; `pallas_depthwise` pads, splits a
strided convolution into stride^2 stride-1 phases (output (i, j) of a stride-s conv reads x[i*s + a + s*m]:
phase (a, b) is the stride-1 conv of x[a::s, b::s] with w[a::s, b::s]) and sums them. A custom_vjp makes
the backward pass run the same kernels: the input gradient is the forward kernel on the cotangent padded by
k - 1 with the flipped kernel, the kernel gradient its own reduction kernel. Accumulation is float32 for
every input dtype.

Two lowerings, chosen by backend:
- GPU (Triton): grid (batch, output row, channel block of 32); each program loops over the taps with
  fori_loops and accumulates one output row (width rounded up to a power of two) in registers. Inputs are
  passed whole and flattened to (pixels, channels) and padded so that every contiguous row load stays inside
  the array (no masks); the columns beyond the output width are computed and cropped.
- TPU (Mosaic): grid (batch, channel block of 128 lanes); the padded map of one image and channel block sits
  in VMEM and the taps are unrolled with static slices.
Elsewhere (CPU) both run with interpret=True, which is how their correctness is tested; `PALLAS_FLAVOUR`
chooses which one ("gpu" | "tpu" | None = by backend) and `PALLAS_INTERPRET` whether it is interpreted (None = on
any backend the flavour is not for; False lowers it natively, e.g. to check the lowering for another platform).

Each call names its compiler: jax 0.10 sends a GPU `pallas_call` without compiler parameters to Mosaic GPU
(`jax_pallas_use_mosaic_gpu`), which would stage these whole-array kernels in shared memory and fail (jax 0.11
and later default to Triton); the Triton parameters make every jax version lower them to Triton. The TPU grid
is (parallel, parallel), so chips with two TensorCores split it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

PALLAS_FLAVOUR: str | None = None
PALLAS_INTERPRET: bool | None = None
_BC_GPU, _BC_TPU = 32, 128
_GPU_PARAMS = pltriton.CompilerParams(num_warps=4)
_TPU_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def _flavour() -> tuple[str, bool]:
    backend = jax.default_backend()
    flavour = PALLAS_FLAVOUR or ("tpu" if backend == "tpu" else "gpu")
    if flavour not in ("gpu", "tpu"):
        raise ValueError(f"PALLAS_FLAVOUR must be 'gpu', 'tpu' or None, got {flavour!r}")
    if PALLAS_INTERPRET is not None:
        return flavour, bool(PALLAS_INTERPRET)
    native = (flavour == "gpu" and backend in ("gpu", "cuda", "rocm")) or (flavour == "tpu" and backend == "tpu")
    return flavour, not native


def _pad_channels(a, block):
    c = a.shape[-1]
    cp = -(-c // block) * block
    return a if cp == c else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, cp - c)])


# ---------------------------------------------------------------------------------------------------- GPU
def _gpu_fwd_kernel(x_ref, w_ref, o_ref, *, hp, wp, kh, kw, bw, bc):
    n, i, cb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c0 = pl.multiple_of(cb * bc, bc)

    def row(r, acc):
        base = (n * hp + i + r) * wp

        def tap(s, acc):
            xs = x_ref[pl.ds(base + s, bw), pl.ds(c0, bc)].astype(jnp.float32)
            ws = w_ref[pl.ds(r * kw + s, 1), pl.ds(c0, bc)].astype(jnp.float32)
            return acc + xs * ws
        return lax.fori_loop(0, kw, tap, acc)

    acc = lax.fori_loop(0, kh, row, jnp.zeros((bw, bc), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _gpu_dw_kernel(x_ref, dy_ref, o_ref, *, hp, wp, ho, kw, bw, bc):
    t, cb, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r, s = t // kw, t % kw
    c0 = pl.multiple_of(cb * bc, bc)

    def body(i, acc):
        xs = x_ref[pl.ds((n * hp + i + r) * wp + s, bw), pl.ds(c0, bc)].astype(jnp.float32)
        ds = dy_ref[pl.ds((n * ho + i) * bw, bw), pl.ds(c0, bc)].astype(jnp.float32)
        return acc + xs * ds

    acc = lax.fori_loop(0, ho, body, jnp.zeros((bw, bc), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0, keepdims=True).astype(o_ref.dtype)


def _gpu_flat_x(x, bw, kw):
    n, hp, wp, cp = x.shape
    return jnp.pad(x.reshape(n * hp * wp, cp), [(0, bw + kw), (0, 0)])


def _gpu_fwd(x, wt, interpret):
    n, hp, wp, c = x.shape
    kh, kw = wt.shape[:2]
    ho, wo = hp - kh + 1, wp - kw + 1
    bc, bw = _BC_GPU, pl.next_power_of_2(wo)
    x, wt = _pad_channels(x, bc), _pad_channels(wt, bc)
    cp = x.shape[-1]
    out = pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, hp=hp, wp=wp, kh=kh, kw=kw, bw=bw, bc=bc),
        out_shape=jax.ShapeDtypeStruct((n, ho, bw, cp), x.dtype),
        grid=(n, ho, cp // bc),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, bw, bc), lambda b, i, cb: (b, i, 0, cb)),
        interpret=interpret, compiler_params=_GPU_PARAMS, name="dcls_depthwise_fwd",
    )(_gpu_flat_x(x, bw, kw), wt.reshape(kh * kw, cp))
    return out[:, :, :wo, :c]


def _gpu_dw(x, dy, kh, kw, interpret):
    n, hp, wp, c = x.shape
    ho, wo = dy.shape[1:3]
    bc, bw = _BC_GPU, pl.next_power_of_2(wo)
    x = _pad_channels(x, bc)
    cp = x.shape[-1]
    dy = jnp.pad(dy, [(0, 0), (0, 0), (0, bw - wo), (0, cp - c)]).reshape(n * ho * bw, cp)  # zero columns
    part = pl.pallas_call(
        functools.partial(_gpu_dw_kernel, hp=hp, wp=wp, ho=ho, kw=kw, bw=bw, bc=bc),
        out_shape=jax.ShapeDtypeStruct((n, kh * kw, 1, cp), jnp.float32),
        grid=(kh * kw, cp // bc, n),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, 1, bc), lambda t, cb, b: (b, t, 0, cb)),
        interpret=interpret, compiler_params=_GPU_PARAMS, name="dcls_depthwise_dw",
    )(_gpu_flat_x(x, bw, kw), dy)
    return part.sum(0).reshape(kh, kw, cp)[..., :c]


# ---------------------------------------------------------------------------------------------------- TPU
def _tpu_fwd_kernel(x_ref, w_ref, o_ref, *, kh, kw, ho, wo):
    def row(r, acc):                       # dynamic index on the untiled leading axis, static column shifts
        for s in range(kw):
            xs = x_ref[pl.ds(r, ho), s:s + wo, :].astype(jnp.float32)
            acc += xs * w_ref[pl.ds(r, 1), s, :].astype(jnp.float32)
        return acc

    acc = lax.fori_loop(0, kh, row, jnp.zeros((ho, wo, o_ref.shape[-1]), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_dw_kernel(x_ref, dy_ref, o_ref, *, kh, kw, ho, wo):
    dy = dy_ref[...].astype(jnp.float32)

    @pl.loop(0, kh)
    def _(r):
        for s in range(kw):
            prod = x_ref[pl.ds(r, ho), s:s + wo, :].astype(jnp.float32) * dy
            o_ref[pl.ds(r, 1), s, :] = jnp.sum(prod, axis=(0, 1))[None]


def _tpu_call(kernel, name: str, out_shape, out_block: tuple, operands: list, blocks: list, interpret):
    """A Mosaic call over the grid (batch, block of _BC_TPU channels). Each operand is tiled by its block shape:
    (pl.squeezed, ...) takes sample b, otherwise the whole leading axes; the last axis is channel block cb."""
    def spec(block):
        batched = block[0] is pl.squeezed
        return pl.BlockSpec(block, lambda b, cb: ((b,) if batched else (0,)) + (0,) * (len(block) - 2) + (cb,))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(out_shape.shape[0], out_shape.shape[-1] // _BC_TPU),
                          in_specs=[spec(b) for b in blocks], out_specs=spec(out_block), interpret=interpret,
                          compiler_params=_TPU_PARAMS, name=name)(*operands)


def _tpu_fwd(x, wt, interpret):
    n, hp, wp, c = x.shape
    kh, kw = wt.shape[:2]
    ho, wo = hp - kh + 1, wp - kw + 1
    x, wt = _pad_channels(x, _BC_TPU), _pad_channels(wt, _BC_TPU)
    out = _tpu_call(functools.partial(_tpu_fwd_kernel, kh=kh, kw=kw, ho=ho, wo=wo), "dcls_depthwise_fwd_tpu",
                    jax.ShapeDtypeStruct((n, ho, wo, x.shape[-1]), x.dtype), (pl.squeezed, ho, wo, _BC_TPU),
                    [x, wt], [(pl.squeezed, hp, wp, _BC_TPU), (kh, kw, _BC_TPU)], interpret)
    return out[..., :c]


def _tpu_dw(x, dy, kh, kw, interpret):
    n, hp, wp, c = x.shape
    ho, wo = dy.shape[1:3]
    x, dy = _pad_channels(x, _BC_TPU), _pad_channels(dy, _BC_TPU)
    cp = x.shape[-1]
    part = _tpu_call(functools.partial(_tpu_dw_kernel, kh=kh, kw=kw, ho=ho, wo=wo), "dcls_depthwise_dw_tpu",
                     jax.ShapeDtypeStruct((n, kh, kw, cp), jnp.float32), (pl.squeezed, kh, kw, _BC_TPU),
                     [x, dy], [(pl.squeezed, hp, wp, _BC_TPU), (pl.squeezed, ho, wo, _BC_TPU)], interpret)
    return part.sum(0).reshape(kh, kw, cp)[..., :c]


# ------------------------------------------------------------------------------------------ custom_vjp
def _fwd_call(x, wt):
    flavour, interpret = _flavour()
    return (_gpu_fwd if flavour == "gpu" else _tpu_fwd)(x, wt, interpret)


def _dw_call(x, dy, kh, kw):
    flavour, interpret = _flavour()
    return (_gpu_dw if flavour == "gpu" else _tpu_dw)(x, dy, kh, kw, interpret)


@jax.custom_vjp
def valid_depthwise(x, wt):
    """Valid stride-1 correlation of x (N, Hp, Wp, C) with wt (kh, kw, C): (N, Hp-kh+1, Wp-kw+1, C)."""
    return _fwd_call(x, wt)


def _vjp_fwd(x, wt):
    return _fwd_call(x, wt), (x, wt)


def _vjp_bwd(res, dy):
    x, wt = res
    kh, kw = wt.shape[:2]
    dx = _fwd_call(jnp.pad(dy, [(0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)]), wt[::-1, ::-1])
    dw = _dw_call(x, dy, kh, kw)
    return dx.astype(x.dtype), dw.astype(wt.dtype)


valid_depthwise.defvjp(_vjp_fwd, _vjp_bwd)


def pallas_depthwise(x, w, stride, pads):
    """Depthwise cross-correlation of channels-last x (N, H, W, C) with w (C, 1, kh, kw)."""
    if x.ndim != 4:
        raise ValueError(f"the Pallas depthwise convolution is 2-D; got input shape {x.shape}")
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    wt = jnp.moveaxis(w[:, 0], 0, -1)                               # (kh, kw, C)
    kh, kw = wt.shape[:2]
    sh, sw = stride
    if (sh, sw) == (1, 1):
        return valid_depthwise(x, wt)
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    out = None
    for a in range(min(sh, kh)):
        for b in range(min(sw, kw)):
            wk = wt[a::sh, b::sw]
            xs = x[:, a::sh, b::sw][:, :ho + wk.shape[0] - 1, :wo + wk.shape[1] - 1]
            y = valid_depthwise(xs, wk)
            out = y if out is None else out + y
    return out
