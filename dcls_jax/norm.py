"""LayerNorm over the last axis, `layer_norm(x, weight, bias, eps)`: torch.nn.functional.layer_norm over
channels-last inputs, float32 statistics (the mean, then the mean of squared deviations, as PyTorch computes them).

    "xla"     the formula, in XLA;
    "native"  the value in one C++ call on the CPU (csrc/norm.cc), float32: a row's two statistics and its output
              in one pass over memory, where XLA:CPU takes three and turns the row sums into windowed reductions
              (1.5-5x slower than PyTorch at the models' shapes: BENCHMARKS.md). Under differentiation the
              XLA form runs, value and gradient (custom_vjp), so every order of reverse-mode differentiation works
              and a train step's program is as autodiff makes it: the C++ call speeds the forward passes
              (evaluation, inference).

Which runs follows the dense layers' choice (dcls_jax.dense.selected_impl: the `impl` argument, else
DCLS_JAX_DENSE, else "native" for float32 on the CPU where the kernels are available).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dcls_jax.dense import selected_impl
from dcls_jax.native import batched_call, fit_vma, match_vma


def layer_norm_xla(x, weight, bias=None, eps: float = 1e-5):
    """The formula: (x - mean) / sqrt(var + eps) * weight + bias over the last axis, in float32, cast back."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * lax.rsqrt(var + eps) * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def layer_norm(x, weight, bias=None, eps: float = 1e-5, *, impl: str | None = None):
    """x (..., C) normalized over C, then scaled by weight (C,) and shifted by bias (C,) or None."""
    x = jnp.asarray(x)
    if x.ndim < 1 or jnp.shape(weight) != x.shape[-1:] or (bias is not None and jnp.shape(bias) != x.shape[-1:]):
        raise ValueError(f"layer_norm: weight and bias must be ({x.shape[-1:]}), got {jnp.shape(weight)} and "
                         f"{None if bias is None else jnp.shape(bias)} for x {x.shape}")
    if selected_impl(x.dtype, impl) == "xla" or x.size == 0:
        return layer_norm_xla(x, weight, bias, eps)
    w = jnp.asarray(weight, jnp.float32)
    b = jnp.zeros_like(w) if bias is None else jnp.asarray(bias, jnp.float32)
    return _native(x, w, b, float(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native(x, w, b, eps):
    y = _op(eps)(x.reshape(-1, x.shape[-1]), w, b).reshape(x.shape)
    return match_vma(y, x, w, b)


def _native_fwd(x, w, b, eps):
    # differentiated: the XLA form, value and gradient, so a train step's program is autodiff's own (the C++ value
    # with the XLA form's backward recomputing the statistics measured no faster there)
    y, vjp = jax.vjp(lambda x, w, b: layer_norm_xla(x, w, b, eps), x, w, b)
    return y, (vjp, x, w, b)


def _native_bwd(eps, res, g):
    vjp, x, w, b = res
    dx, dw, db = vjp(g)
    return fit_vma(dx, x), fit_vma(dw, w), fit_vma(db, b)


_native.defvjp(_native_fwd, _native_bwd)


@functools.cache
def _op(eps: float):
    """The custom call on (rows, C) (native.batched_call: x's rows are the batch; weight and bias are not)."""
    from jax.sharding import PartitionSpec as P

    def ffi(x, w, b):
        return jax.ffi.ffi_call("dcls_jax_layer_norm", jax.ShapeDtypeStruct(x.shape, jnp.float32))(
            x, w, b, eps=np.float32(eps))
    return batched_call(ffi, "m c, c, c -> m c", lambda axes: (P(axes, None), P(), P(), P(axes, None)),
                        (True, False, False), True)
