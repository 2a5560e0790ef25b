"""The models' dense layers: `linear(x, weight, bias)`, torch.nn.functional.linear on (..., in) inputs with
PyTorch's (out, in) weight, and `matmul(a, b, ta, tb)`, the product it runs on the CPU.

    "xla"     jnp.einsum: XLA's dot;
    "native"  C++ kernels for the CPU (csrc/matmul.cc, built and cached with the depthwise ones by
              dcls_jax.native), float32. XLA:CPU's GEMM runs a Linear layer's (out, in) weight at about half
              oneDNN's speed on the few hundred to few thousand rows of a ConvNeXt's later stages
              (BENCHMARKS.md); this one is within ~10% of oneDNN there.

Which runs: the `impl` argument, else the environment variable DCLS_JAX_DENSE ("auto" or a name), else
"native" for float32 on the CPU where the kernels are available, else "xla". The choice is made when a function
is traced. Forcing "native" where it cannot run (no compiler, another backend, another dtype) is an error.
"native" differentiates in reverse mode (grad, vjp, to any order); forward mode (jax.jvp, jacfwd) needs "xla",
as the "native" convolutions do (DCLS_JAX_CONV).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dcls_jax.native import available, batched_call, fit_vma, match_vma, unavailable_reason

IMPLS = ("xla", "native")
ENV_VAR = "DCLS_JAX_DENSE"


def _native_reason(dtype, backend: str) -> str | None:
    """Why the native product cannot run here, or None."""
    if backend != "cpu":
        return f"it runs on the CPU only (backend {backend!r})"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes float32 only (dtype {jnp.dtype(dtype).name})"
    return None if available() else f"the C++ kernels are unavailable: {unavailable_reason()}"


def selected_impl(dtype=jnp.float32, impl: str | None = None, backend: str | None = None) -> str:
    """The implementation `linear` runs for inputs of `dtype` (what the benchmarks report)."""
    backend = backend or jax.default_backend()
    name, where = (impl, "argument") if impl else (os.environ.get(ENV_VAR) or "auto", ENV_VAR)
    if name not in IMPLS + ("auto",):
        raise ValueError(f"unknown dense implementation {name!r} ({where}); expected 'auto' or one of {IMPLS}")
    reason = _native_reason(dtype, backend)
    if name == "native" and reason:
        raise ValueError(f"dense implementation 'native' cannot run: {reason}")
    if name == "auto":
        return "xla" if reason else "native"
    return name


def gelu(x):
    """PyTorch nn.GELU(): the exact form x/2 (1 + erf(x / sqrt 2)), PyTorch's own formula (jax.nn.gelu defaults
    to the tanh approximation, and its exact form goes through erfc: 1.45x slower on XLA:CPU)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.float32)
    return 0.5 * x * (1 + lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


def star_relu(x, scale, shift):
    """MetaFormer's StarReLU, scale * relu(x)^2 + shift (scalars, or arrays of one element)."""
    return scale * jnp.square(jax.nn.relu(x)) + shift


ACTIVATIONS = (None, "gelu", "star_relu")
_CODES = {None: 0, "gelu": 1, "star_relu": 2}   # csrc/matmul.cc's Activation
FUSE = True   # "native" runs linear(..., activation=...) as one call (False: the product, then XLA's activation)


def _activation(activation):
    """(name, params): None, "gelu" or ("star_relu", scale, shift) as `linear` takes them."""
    if activation is None or (isinstance(activation, str) and activation == "gelu"):
        return activation, None
    if isinstance(activation, tuple) and len(activation) == 3 and activation[0] == "star_relu":
        return "star_relu", jnp.concatenate([jnp.ravel(jnp.asarray(p, jnp.float32)) for p in activation[1:]])
    raise ValueError(f"unknown activation {activation!r}; expected None, 'gelu' or ('star_relu', scale, shift)")


def activate(y, activation):
    """`activation` (as `linear` takes it) applied to y by XLA."""
    return _activate(y, *_activation(activation))


def _activate(y, name, params):
    if name == "gelu":
        return gelu(y)
    if name == "star_relu":
        return star_relu(y, params[0].astype(y.dtype), params[1].astype(y.dtype))
    return y


def linear(x, weight, bias=None, *, impl: str | None = None, activation=None):
    """y = x @ weight.T + bias over the last axis of x, weight (out, in) as in torch.nn.Linear; then `activation`:
    "gelu" (the exact GELU) or ("star_relu", scale, shift) (MetaFormer's StarReLU, scale * relu(y)^2 + shift,
    scalars). With "native", the value of a Linear and its activation is one C++ call that adds the bias and takes
    the activation on the product's registers (GELU's erf: max error 3.8e-7, XLA's 3.3e-7), saving XLA's pass over
    the output; under differentiation the product, bias and activation run as separate ops."""
    name, params = _activation(activation)
    native = selected_impl(jnp.result_type(x, weight), impl) == "native"
    rows = x.reshape(-1, x.shape[-1])
    if native and name and FUSE and rows.size and (bias is None or bias.dtype == jnp.float32):
        b = jnp.zeros((weight.shape[0],), jnp.float32) if bias is None else bias
        p = jnp.zeros((2,), jnp.float32) if params is None else params
        return linear_act(rows, weight, b, p, name).reshape(*x.shape[:-1], weight.shape[0])
    if native:
        y = matmul(rows, weight, False, True).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = jnp.einsum("...i,oi->...o", x, weight)
    y = y if bias is None else y + bias
    return _activate(y, name, params)


def _xla(a, b, ta: bool, tb: bool):
    """The same product with XLA's dot (the reference, and the batched case under vmap)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _ffi(a, b, ta: bool, tb: bool):
    m, n = a.shape[1 if ta else 0], b.shape[0 if tb else 1]
    return jax.ffi.ffi_call("dcls_jax_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, ta=int(ta), tb=int(tb))


def _rows_op(ffi, rule: str, specs, fallback, fold: bool):
    """A custom call of (a, *others) partitioned over a's rows (a batch-sharded jit); under vmap a mapped a alone
    folds into its rows (where `fold`: they are the result's rows), other cases run `fallback` (XLA) mapped
    (native.batched_call)."""
    if not available():   # also what registers the custom calls
        raise RuntimeError(f"dcls_jax.dense: the C++ kernels are unavailable: {unavailable_reason()}")
    others = rule.split("->")[0].count(",")   # operands after a
    return batched_call(ffi, rule, specs, (True,) + (False,) * others, fold, fallback)


@functools.cache
def _op(ta: bool, tb: bool):
    """The product's custom call, partitioned over a's rows (where they are the contraction, ta, b's rows follow
    them and the devices' partials are summed)."""
    from jax.sharding import PartitionSpec as P

    def specs(axes):
        if not ta:
            return P(axes, None), P(), P(axes, None)
        return P(axes, None), (P(None, axes) if tb else P(axes, None)), P()
    rule = f"{'k m' if ta else 'm k'}, {'n k' if tb else 'k n'} -> m n"
    return _rows_op(lambda a, b: _ffi(a, b, ta, tb), rule, specs, functools.partial(_xla, ta=ta, tb=tb),
                    fold=not ta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a, b, ta: bool, tb: bool):
    """op(a) @ op(b), float32, with the C++ kernels: op(a) = a.T when ta, op(b) = b.T when tb. Differentiable
    to any order (reverse mode): the gradients are products of the same kind (those summing over a's stored
    rows, a weight gradient, on XLA's dot: `_product`)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0 if ta else 1] != b.shape[1 if tb else 0]:
        raise ValueError(f"dcls_jax.dense.matmul: op(a) @ op(b) needs matrices with matching inner sizes, got a "
                         f"{a.shape}{' transposed' if ta else ''} and b {b.shape}{' transposed' if tb else ''}")
    return match_vma(_op(bool(ta), bool(tb))(a.astype(jnp.float32), b.astype(jnp.float32)), a, b)


def _matmul_fwd(a, b, ta, tb):
    return matmul(a, b, ta, tb), (a, b)


def _product(a, b, ta: bool, tb: bool):
    """A gradient's product: the C++ kernels, except where the contraction runs over a's stored rows (ta: a
    Linear's weight gradient, summed over the batch's rows), which XLA's dot runs faster at 7 of ConvNeXt-T's 8
    shapes (BENCHMARKS.md, bench_dense.py)."""
    return _xla(a, b, ta, tb) if ta else matmul(a, b, ta, tb)


def _matmul_bwd(ta, tb, res, g):
    a, b = res
    da = _product(b, g, tb, True) if ta else _product(g, b, False, not tb)
    db = _product(g, a, True, ta) if tb else _product(a, g, not ta, False)
    return fit_vma(da.astype(a.dtype), a), fit_vma(db.astype(b.dtype), b)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _unfused(x, w, b, p, name):
    return _activate(matmul(x, w, False, True) + b, name, p)


@functools.cache
def _act_op(name: str):
    """The Linear + activation custom call, partitioned over x's rows."""
    from jax.sharding import PartitionSpec as P

    def ffi(x, w, b, p):
        return jax.ffi.ffi_call("dcls_jax_linear_act", jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(
            x, w, b, p, act=np.int64(_CODES[name]))
    return _rows_op(ffi, "m k, n k, n, s -> m n", lambda axes: (P(axes, None), P(), P(), P(), P(axes, None)),
                    lambda x, w, b, p: _activate(_xla(x, w, False, True) + b, name, p), fold=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_act(x, w, b, p, name: str):
    """act(x @ w.T + b) for x (M, K), w (N, K), b (N,), act `name` ("gelu", "star_relu" with p = (scale, shift)),
    float32, as one C++ call (the value only: gradients differentiate `_unfused`)."""
    f32 = jnp.float32
    return match_vma(_act_op(name)(x.astype(f32), w.astype(f32), b.astype(f32), p.astype(f32)), x, w, b, p)


def _linear_act_fwd(x, w, b, p, name):
    return jax.vjp(lambda *a: _unfused(*a, name), x, w, b, p)


def _linear_act_bwd(name, vjp, g):
    return vjp(g)


linear_act.defvjp(_linear_act_fwd, _linear_act_bwd)
