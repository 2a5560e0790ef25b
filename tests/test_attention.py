"""dcls_jax.attention: the C++ call against float64 NumPy, its gradients against PyTorch's attention, vmap,
edge values (saturated, underflowing, NaN) and the dispatcher."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dcls_jax import native
from dcls_jax.attention import attention, attention_xla

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no C++ kernels: {native.unavailable_reason()}")

# (batch, tokens, heads, head_dim): MetaFormer's and FastViT's (196 / 49 / 64 tokens, head_dim 32) and the tiles'
# edges: one token, token counts either side of whole vectors, more key vectors than a tile holds and a remainder,
# head_dim below a vector, between vectors, and beyond a whole tile of values (80 = 5 vectors).
SHAPES = [(2, 196, 10, 32), (1, 1, 1, 1), (3, 7, 3, 20), (2, 49, 16, 32), (1, 17, 2, 16), (1, 200, 2, 48),
          (2, 64, 3, 8), (1, 113, 1, 80), (1, 16, 4, 33)]


def reference(qkv, heads, scale=None):
    """Softmax attention in float64 NumPy."""
    b, n, k = qkv.shape
    d = k // (3 * heads)
    x = np.asarray(qkv, np.float64).reshape(b, n, 3, heads, d)
    s = np.einsum("bnhd,bmhd->bhnm", x[:, :, 0], x[:, :, 1]) * (d ** -0.5 if scale is None else scale)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", p, x[:, :, 2]).reshape(b, n, heads * d)


def native_attention(qkv, heads, scale=None):
    return jax.jit(lambda x: attention(x, heads, scale, impl="native"))(qkv)


@pytest.mark.parametrize("b,n,heads,d", SHAPES)
def test_equals_float64(b, n, heads, d):
    qkv = (np.random.default_rng(n * d).normal(size=(b, n, 3 * heads * d)) * 1.5).astype(np.float32)
    y = np.asarray(native_attention(qkv, heads))
    ref = reference(qkv, heads)
    assert y.shape == ref.shape and y.dtype == np.float32
    # float32 scores of up to ~|q||k| / sqrt(d) carry a relative error of ~d eps each; softmax turns an absolute
    # score error into a relative weight error: bound ~ 1e-5 of the values' scale
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(qkv).max()), np.abs(y - ref).max()


def test_scale_saturation_and_underflow():
    """A given scale; rows whose softmax is one-hot (scores 1e3 apart), uniform (equal keys), or whose other
    weights underflow to 0 in float32."""
    rng = np.random.default_rng(1)
    b, n, heads, d = 2, 37, 2, 16
    qkv = rng.normal(size=(b, n, 3, heads, d)).astype(np.float32)
    qkv[0, :, 0] *= 40.0                                     # huge scores: saturated rows
    qkv[1, :, 1] = qkv[1, :1, 1]                             # every key equal: uniform weights
    qkv = qkv.reshape(b, n, -1)
    for scale in (None, 0.3, 10.0):
        y = np.asarray(native_attention(qkv, heads, scale))
        assert np.abs(y - reference(qkv, heads, scale)).max() <= 1e-4, scale


def test_nan_spreads_as_in_xla():
    """A NaN key poisons its head's every row; a NaN value only its own channel: where XLA's result is NaN."""
    rng = np.random.default_rng(2)
    qkv = rng.normal(size=(2, 20, 3, 3, 8)).astype(np.float32)
    qkv[0, 5, 1, 1, 2] = np.nan          # sample 0, key of token 5, head 1
    qkv[1, 7, 2, 2, 4] = np.nan          # sample 1, value of token 7, head 2, channel 4
    qkv = qkv.reshape(2, 20, -1)
    y = np.asarray(native_attention(qkv, 3))
    r = np.asarray(jax.jit(lambda x: attention_xla(x, 3))(qkv))
    assert np.isnan(r).any() and (np.isnan(y) == np.isnan(r)).all()
    ok = ~np.isnan(r)
    assert np.abs(y[ok] - reference(np.nan_to_num(qkv), 3)[ok]).max() <= 1e-5


def test_gradients_equal_pytorch():
    """Reverse mode through the native value (the XLA form's gradients) against PyTorch's attention in float64."""
    rng = np.random.default_rng(3)
    b, n, heads, d = 2, 23, 3, 8
    qkv = rng.normal(size=(b, n, 3 * heads * d)).astype(np.float32)
    g = rng.normal(size=(b, n, heads * d)).astype(np.float32)
    dq = jax.jit(jax.grad(lambda x: jnp.sum(attention(x, heads, impl="native") * g)))(qkv)
    xt = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = xt.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n, -1)
    (y * torch.tensor(g, dtype=torch.float64)).sum().backward()
    ref = xt.grad.numpy()
    assert np.abs(np.asarray(dq) - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(native_attention(qkv, heads)), y.detach().numpy(), atol=1e-5)


def test_vmap_folds_into_the_batch():
    rng = np.random.default_rng(4)
    qkv = rng.normal(size=(3, 2, 10, 3 * 2 * 8)).astype(np.float32)
    y = jax.jit(jax.vmap(lambda x: attention(x, 2, impl="native")))(qkv)
    for i in range(3):
        assert np.abs(np.asarray(y[i]) - reference(qkv[i], 2)).max() <= 1e-5


def test_dispatch_and_errors(monkeypatch):
    qkv = jnp.zeros((1, 4, 12), jnp.float32)
    hlo = jax.jit(lambda x: attention(x, 2)).lower(qkv).as_text()
    assert "dcls_jax_attention" in hlo                           # float32 on the CPU: the C++ call
    monkeypatch.setenv("DCLS_JAX_DENSE", "xla")
    assert "dcls_jax_attention" not in jax.jit(lambda x: attention(x, 2)).lower(qkv).as_text()
    monkeypatch.delenv("DCLS_JAX_DENSE")
    y = attention(qkv.astype(jnp.bfloat16), 2)                   # narrow dtypes: the XLA form, their dtype
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="float32 only"):
        attention(qkv.astype(jnp.bfloat16), 2, impl="native")
    with pytest.raises(ValueError, match="3 x heads x head_dim"):
        attention(qkv, 5)
    with pytest.raises(ValueError, match="batch, tokens"):
        attention(qkv[0], 2)
    assert attention(jnp.zeros((0, 4, 12)), 2).shape == (0, 4, 4)


GRAD_SHAPES = [(2, 23, 3, 8), (1, 49, 2, 32), (1, 17, 1, 80), (2, 5, 2, 20), (1, 1, 1, 4)]


@pytest.mark.parametrize("b,n,heads,d", GRAD_SHAPES)
def test_gradient_call_equals_pytorch(b, n, heads, d):
    """The C++ gradient (its own custom call) against PyTorch's attention backward in float64, over row blocks
    that do not fill the last tile, head sizes off whole vectors and beyond a tile of values."""
    rng = np.random.default_rng(b * n * d)
    qkv = rng.normal(size=(b, n, 3 * heads * d)).astype(np.float32)
    g = rng.normal(size=(b, n, heads * d)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(attention(x, heads, impl="native") * g)))
    assert "dcls_jax_attention_grad" in grad.lower(qkv).as_text()
    xt = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = xt.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n, -1)
    (y * torch.tensor(g, dtype=torch.float64)).sum().backward()
    ref = xt.grad.numpy()
    assert np.abs(np.asarray(grad(qkv)) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_second_order_and_vmapped_gradients_equal_xla():
    rng = np.random.default_rng(5)
    qkv = jnp.asarray(rng.normal(size=(2, 11, 3 * 2 * 8)), jnp.float32)

    def outer(impl):
        inner = jax.grad(lambda x: jnp.sum(jnp.sin(attention(x, 2, impl=impl))))
        return jax.grad(lambda x: jnp.sum(inner(x) ** 2))
    got, want = jax.jit(outer("native"))(qkv), outer("xla")(qkv)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) <= 1e-5
    per = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(attention(x, 2, impl="native"))))))(qkv[:, None])
    ref = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(attention(x, 2, impl="xla")))))(qkv[:, None])
    assert float(jnp.abs(per - ref).max() / jnp.abs(ref).max()) <= 1e-5
