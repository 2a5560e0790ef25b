"""Multi-head self-attention over tokens, from a qkv Linear's output: `attention(qkv, heads)`.

qkv (B, N, 3 * heads * head_dim) holds each token's (3, heads, head_dim) queries, keys and values, as a timm
Attention's qkv Linear writes them; the result (B, N, heads * head_dim) is softmax(q k^T * scale) v per head
(scale: head_dim ** -0.5 by default), what its proj Linear reads.

    "xla"     two einsums around jax.nn.softmax;
    "native"  one C++ call (csrc/attention.cc) on the CPU, float32: XLA:CPU writes the (B, heads, N, N) scores to
              memory and back and takes exp at ~1 ns an element, ~17 ms per MetaFormer 14 x 14 layer at batch 8
              on 2 cores where the fused call takes ~4 ms (BENCHMARKS.md).

Which runs follows the dense layers (dcls_jax.dense.selected_impl: the `impl` argument, else DCLS_JAX_DENSE,
else "native" for float32 on the CPU). "native" differentiates in reverse mode: the gradient is a second C++ call
(the scores recomputed per block of rows, dK and dV summed over the blocks in order), whose own derivatives
(second order) are the xla form's; forward mode needs "xla".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcls_jax.dense import selected_impl
from dcls_jax.native import available, batched_call, fit_vma, match_vma, unavailable_reason


def _split(qkv, heads: int):
    b, n, k = qkv.shape
    if heads <= 0 or k % (3 * heads):
        raise ValueError(f"attention: the last axis of qkv {qkv.shape} is not 3 x heads x head_dim for "
                         f"heads={heads}")
    return b, n, k // (3 * heads)


def attention_xla(qkv, heads: int, scale: float | None = None):
    """The reference form: einsums and jax.nn.softmax, the softmax in float32 (any input dtype)."""
    b, n, d = _split(qkv, heads)
    qkv = qkv.reshape(b, n, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                         # (B, N, heads, head_dim)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (d ** -0.5 if scale is None else scale)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, n, heads * d)


def attention(qkv, heads: int, scale: float | None = None, *, impl: str | None = None):
    """softmax(q k^T * scale) v per head of qkv (B, N, 3 * heads * head_dim): (B, N, heads * head_dim)."""
    if qkv.ndim != 3:
        raise ValueError(f"attention: qkv must be (batch, tokens, 3 * heads * head_dim), got shape {qkv.shape}")
    _, n, d = _split(qkv, heads)
    scale = float(d ** -0.5 if scale is None else scale)
    if selected_impl(qkv.dtype, impl) == "xla" or qkv.size == 0:
        return attention_xla(qkv, heads, scale)
    return _native(qkv, heads, scale)


def _batched_call(ffi, rule: str, operands: int):
    """The custom call `ffi` on (batch, tokens, features) arrays (native.batched_call: every operand batch-leading)."""
    from jax.sharding import PartitionSpec as P
    if not available():   # also what registers the custom calls
        raise RuntimeError(f"dcls_jax.attention: the C++ kernels are unavailable: {unavailable_reason()}")
    return batched_call(ffi, rule, lambda axes: (P(axes, None, None),) * (operands + 1), (True,) * operands, True)


@functools.cache
def _op(heads: int, scale: float):
    """The forward's custom call, qkv -> y."""
    def ffi(qkv):
        b, n, k = qkv.shape
        return jax.ffi.ffi_call("dcls_jax_attention", jax.ShapeDtypeStruct((b, n, k // 3), jnp.float32))(
            qkv, heads=np.int64(heads), scale=np.float32(scale))
    return _batched_call(ffi, "b n k -> b n m", 1)


@functools.cache
def _grad_op(heads: int, scale: float):
    """The gradient's custom call, (qkv, g) -> dqkv."""
    def ffi(qkv, g):
        return jax.ffi.ffi_call("dcls_jax_attention_grad", jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(
            qkv, g, heads=np.int64(heads), scale=np.float32(scale))
    return _batched_call(ffi, "b n k, b n m -> b n k", 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _native(qkv, heads: int, scale: float):
    return match_vma(_op(heads, scale)(qkv.astype(jnp.float32)), qkv)


def _native_fwd(qkv, heads, scale):
    return _native(qkv, heads, scale), qkv


def _native_bwd(heads, scale, qkv, g):
    return (fit_vma(_native_grad(qkv, g, heads, scale).astype(qkv.dtype), qkv),)


_native.defvjp(_native_fwd, _native_bwd)


def _xla_grad(qkv, g, heads, scale):
    return jax.vjp(lambda x: attention_xla(x, heads, scale), qkv)[1](g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_grad(qkv, g, heads: int, scale: float):
    """The gradient with respect to qkv as one C++ call; differentiated (second order) through the XLA form."""
    f32 = jnp.float32
    return match_vma(_grad_op(heads, scale)(qkv.astype(f32), g.astype(f32)), qkv, g)


def _native_grad_fwd(qkv, g, heads, scale):
    return jax.vjp(lambda q, c: _xla_grad(q, c, heads, scale), qkv, g)


def _native_grad_bwd(heads, scale, vjp, ct):
    return vjp(ct)


_native_grad.defvjp(_native_grad_fwd, _native_grad_bwd)
