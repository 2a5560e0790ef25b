"""Multi-head self-attention over tokens, from a qkv Linear's output: `attention(qkv, heads)`.

qkv (B, N, 3 * heads * head_dim) holds each token's (3, heads, head_dim) queries, keys and values, as a timm
Attention's qkv Linear writes them; the result (B, N, heads * head_dim) is softmax(q k^T * scale) v per head
(scale: head_dim ** -0.5 by default), what its proj Linear reads.

    "xla"     two einsums around jax.nn.softmax;
    "native"  one C++ call (csrc/attention.cc) on the CPU, float32: XLA:CPU writes the (B, heads, N, N) scores to
              memory and back and takes exp at ~1 ns an element, ~17 ms per MetaFormer 14 x 14 layer at batch 8
              on 2 cores where the fused call takes ~4 ms (BENCHMARKS.md).

Which runs follows the dense layers (dcls_jax.dense.selected_impl: the `impl` argument, else DCLS_JAX_DENSE,
else "native" for float32 on the CPU). "native" is the value only: under reverse-mode differentiation the xla
form runs (a custom_vjp), as for dense.linear's GELU; forward mode needs "xla".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcls_jax.dense import selected_impl
from dcls_jax.native import available, match_vma, partition_over_batch, unavailable_reason


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


@functools.cache
def _op(heads: int, scale: float):
    """The custom call, partitioned over the batch (a sharded jit); under vmap the mapped axis folds into it."""
    from jax.sharding import PartitionSpec as P
    if not available():   # also what registers the custom calls
        raise RuntimeError(f"dcls_jax.attention: the C++ kernels are unavailable: {unavailable_reason()}")

    def ffi(qkv):
        b, n, k = qkv.shape
        return jax.ffi.ffi_call("dcls_jax_attention", jax.ShapeDtypeStruct((b, n, k // 3), jnp.float32))(
            qkv, heads=np.int64(heads), scale=np.float32(scale))
    call = partition_over_batch(ffi, "b n k -> b n m", lambda axes: (P(axes, None, None), P(axes, None, None)))

    @jax.custom_batching.custom_vmap
    def op(qkv):
        return call(qkv)

    @op.def_vmap
    def batched(axis_size, in_batched, qkv):
        y = op(qkv.reshape(-1, *qkv.shape[2:]))
        return y.reshape(axis_size, -1, *y.shape[1:]), True
    return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _native(qkv, heads: int, scale: float):
    return match_vma(_op(heads, scale)(qkv.astype(jnp.float32)), qkv)


def _native_fwd(qkv, heads, scale):
    return jax.vjp(lambda x: attention_xla(x, heads, scale), qkv)


def _native_bwd(heads, scale, vjp, g):
    return vjp(g)


_native.defvjp(_native_fwd, _native_bwd)
