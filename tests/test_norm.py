"""dcls_jax.norm.layer_norm: the C++ call against PyTorch's layer_norm in float64, its gradients (the XLA form
under differentiation) against PyTorch's autograd, vmap, edge rows and the dispatcher."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dcls_jax import native
from dcls_jax.norm import layer_norm, layer_norm_xla

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no C++ kernels: {native.unavailable_reason()}")

# (shape, bias): the models' rows (64-768 channels) and the vector edges: one channel, fewer than a vector, one
# more than whole vectors and than four-vector blocks, one row.
SHAPES = [((2, 7, 7, 96), True), ((3, 1), True), ((5, 3), False), ((4, 16), True), ((3, 17), True),
          ((2, 3, 64), False), ((5, 65), True), ((1, 768), True), ((9, 130), False), ((2, 4, 4, 320), False)]


def torch_layer_norm(x, w, b, eps):
    t = torch.nn.functional.layer_norm(torch.from_numpy(np.asarray(x, np.float64)), (x.shape[-1],),
                                       torch.from_numpy(np.asarray(w, np.float64)),
                                       None if b is None else torch.from_numpy(np.asarray(b, np.float64)), eps)
    return t.numpy()


def case(shape, bias, seed=0):
    rng = np.random.default_rng(seed + sum(shape))
    x = (rng.normal(size=shape) * 3 + rng.normal(size=shape[:-1] + (1,)) * 5).astype(np.float32)
    w = rng.normal(size=shape[-1:]).astype(np.float32)
    b = rng.normal(size=shape[-1:]).astype(np.float32) if bias else None
    return x, w, b


def native_layer_norm(x, w, b, eps=1e-6):
    return jax.jit(lambda x, w, b: layer_norm(x, w, b, eps, impl="native"))(x, w, b)


@pytest.mark.parametrize("shape, bias", SHAPES)
def test_equals_pytorch_float64(shape, bias):
    x, w, b = case(shape, bias)
    for eps in (1e-6, 1e-5):
        got, want = np.asarray(native_layer_norm(x, w, b, eps)), torch_layer_norm(x, w, b, eps)
        assert got.shape == x.shape and np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_edge_rows():
    """Constant rows (zero variance: y = bias), rows far from zero (the two-pass variance), a NaN (its row only)."""
    w, b = np.full(24, 2.0, np.float32), np.arange(24, dtype=np.float32)
    x = np.stack([np.full(24, 7.5), 1e4 + np.linspace(-1, 1, 24), np.linspace(-1, 1, 24)]).astype(np.float32)
    got = np.asarray(native_layer_norm(x, w, b, 1e-5))
    want = torch_layer_norm(x, w, b, 1e-5)
    assert np.array_equal(got[0], b) and np.abs(got - want).max() <= 1e-4   # 1e4 in float32: ulp 1e-3
    x[2, 5] = np.nan
    got = np.asarray(native_layer_norm(x, w, b))
    assert np.isnan(got[2]).all() and np.isfinite(got[:2]).all()


def test_gradients_equal_pytorch():
    x, w, b = case((3, 5, 40), True, seed=1)
    g = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)
    f = jax.jit(jax.vjp(lambda x, w, b: layer_norm(x, w, b, 1e-6, impl="native"), x, w, b)[1])
    got = f(g)
    ts = [torch.from_numpy(np.asarray(v, np.float64)).requires_grad_(True) for v in (x, w, b)]
    torch.nn.functional.layer_norm(ts[0], (40,), ts[1], ts[2], 1e-6).backward(torch.from_numpy(g.astype(np.float64)))
    for a, t in zip(got, ts):
        want = t.grad.numpy()
        assert np.abs(np.asarray(a) - want).max() <= 1e-5 * np.abs(want).max()


def test_vmap_and_second_order_equal_xla():
    x, w, b = case((4, 6, 33), True, seed=2)
    ws = np.stack([w, -w, 2 * w, w]).astype(np.float32)
    for fn, args in ((lambda f: jax.vmap(f, (0, None, None)), (x, w, b)),   # mapped x: folds into the rows
                     (lambda f: jax.vmap(f, (0, 0, None)), (x, ws, b))):      # mapped weight too: a loop
        got = jax.jit(fn(lambda x, w, b: layer_norm(x, w, b, impl="native")))(*args)
        assert np.abs(np.asarray(got) - np.asarray(fn(layer_norm_xla)(*args))).max() <= 1e-5

    def second(impl):
        inner = lambda x: jnp.sum(jnp.sin(layer_norm(x, w, b, impl=impl)))            # noqa: E731
        return jax.grad(lambda x: jnp.sum(jax.grad(inner)(x) ** 2))(x)
    assert np.abs(np.asarray(jax.jit(lambda: second("native"))()) - np.asarray(second("xla"))).max() <= 1e-4


def test_dispatch_and_errors(monkeypatch):
    x, w, b = case((3, 20), True)
    hlo = jax.jit(lambda x: layer_norm(x, w, b)).lower(x).compile().as_text()
    assert "dcls_jax_layer_norm" in hlo                                      # float32 on the CPU: the C++ call
    monkeypatch.setenv("DCLS_JAX_DENSE", "xla")
    assert "dcls_jax_layer_norm" not in jax.jit(lambda x: layer_norm(x, w, b)).lower(x).compile().as_text()
    monkeypatch.delenv("DCLS_JAX_DENSE")
    xb = jnp.asarray(x, jnp.bfloat16)                                         # 16-bit: the XLA form, its dtype
    y = layer_norm(xb, w, b)
    assert y.dtype == jnp.bfloat16 and np.array_equal(np.asarray(y), np.asarray(layer_norm_xla(xb, w, b)))
    with pytest.raises(ValueError, match="float32 only"):
        layer_norm(xb, w, b, impl="native")
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm(x, w, b[:5])
    assert layer_norm(np.zeros((0, 20), np.float32), w, b).shape == (0, 20)
