"""dcls_jax.dense: the C++ matrix product against float64 numpy (every transpose, shapes around the register
tile, the row blocks and the k blocks), its gradients to second order against XLA's dot, vmap, the dispatcher,
and the models' Linear and pointwise layers running through it. Sharding: test_native's 4-device test."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcls_jax import dense, native

# rows around the 12-row register tile and 96-row blocks, columns around the 32-column panels, k around the
# 256-product blocks and the 16-float transposes; empty products
# up to 768 rows (8 blocks of 96) each task packs its own panels; from 769 the whole opB is packed first
def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


SHAPES = [(1, 1, 1), (13, 17, 33), (97, 257, 65), (12, 513, 32), (200, 31, 100), (768, 19, 70), (769, 300, 47),
          (0, 3, 4), (3, 0, 5), (4, 5, 0)]


def _bound(a64, b64):
    """The error bound of any float32 summation order: K u (|A| |B|), u = 2^-24 (FMA or not), with a margin."""
    k = a64.shape[1]
    return 1.01 * k * 2.0 ** -24 * (np.abs(a64) @ np.abs(b64)) + 1e-30


@jax.jit
def _all_products(a, b, at, bt):
    """The four transposes of one product, op(a) @ op(b) with a (M, K), b (K, N) and at, bt their transposes."""
    return [dense.matmul(u, v, ta, tb) for (u, ta), (v, tb) in itertools.product(((a, False), (at, True)),
                                                                                     ((b, False), (bt, True)))]


@pytest.mark.parametrize("m, k, n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_matmul_equals_float64(m, k, n):
    rng = np.random.default_rng(m * 10007 + k * 101 + n)
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = _bound(a.astype(np.float64), b.astype(np.float64))
    for c in _all_products(a, b, np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)):
        c = np.asarray(c)
        assert c.shape == (m, n) and c.dtype == np.float32
        assert np.all(np.abs(c - exact) <= bound), float(np.max(np.abs(c - exact) - bound, initial=0))


def test_concurrent_products_each_get_their_own_packing():
    """The packed b (from 769 rows) lives in one kept buffer, or a call's own when that is in use or past 64 MiB
    (4100 -> 4100 is 65 MiB); below, each task packs its own panels: products on several threads at once, again
    and again, each equal float64."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(5)
    cases = []
    for m, k, n in ((769, 4100, 4100), (800, 200, 700), (50, 64, 40), (900, 33, 260), (780, 300, 500),
                    (1000, 64, 128), (97, 33, 260)):
        a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32)
        a64, b64 = a.astype(np.float64), b.T.astype(np.float64)
        cases.append((a, b, a64 @ b64, _bound(a64, b64)))
    product = jax.jit(lambda a, b: dense.matmul(a, b, False, True))

    def check(case):
        a, b, exact, bound = case
        return bool(np.all(np.abs(np.asarray(product(a, b)) - exact) <= bound))
    for case in cases:
        product(*case[:2])                                                  # compiled before the race
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, cases[:1] * 2 + cases[1:] * 25))   # the 65 MiB one twice: it takes the time


@pytest.mark.parametrize("m, k, n", [(1, 5, 1), (13, 17, 33), (97, 257, 65), (769, 40, 70)])
def test_linear_gelu_in_one_call_equals_float64(monkeypatch, m, k, n):
    """linear(..., activation="gelu") on the CPU: one call (bias and GELU on the product's registers), on both
    sides of the 768-row bound and with columns past the last whole panel, within the product's bound times
    GELU's slope (<= 1.13) plus erf's error (<= 4e-7) times |z| / 2, and within 1e-6 of the separate ops."""
    from scipy.special import erf
    rng = np.random.default_rng(m + k + n)
    x, w = rng.normal(size=(m, k)).astype(np.float32), (rng.normal(size=(n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.normal(size=(n,)).astype(np.float32) * 2
    fused = jax.jit(lambda x, w, b: dense.linear(x, w, b, activation="gelu"))
    assert "dcls_jax_linear_act" in fused.lower(x, w, b).as_text()
    y = np.asarray(fused(x, w, b))
    x64, w64 = x.astype(np.float64), w.T.astype(np.float64)
    z = x64 @ w64 + b
    exact = 0.5 * z * (1 + erf(z / np.sqrt(2)))
    bound = 1.13 * (_bound(x64, w64) + 2.0 ** -24 * np.abs(z)) + 2.5e-7 * (1 + np.abs(z)) + 2.0 ** -23 * np.abs(exact)
    assert np.all(np.abs(y - exact) <= bound), float(np.max(np.abs(y - exact) - bound))
    monkeypatch.setattr(dense, "FUSE", False)
    separate = jax.jit(lambda x, w, b: dense.linear(x, w, b, activation="gelu"))
    assert "dcls_jax_linear_act" not in separate.lower(x, w, b).as_text()
    assert np.abs(y - np.asarray(separate(x, w, b))).max() <= 1e-6


@pytest.mark.parametrize("m, k, n", [(1, 5, 1), (97, 257, 65), (769, 40, 70)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_star_relu_in_one_call_equals_float64(m, k, n, with_bias):
    """linear(..., activation=("star_relu", s, b)) on the CPU (MetaFormer's fc1: no bias): one call, within the
    product's bound times StarReLU's slope 2 |s| relu(z), plus the rounding of s relu(z)^2 + b."""
    rng = np.random.default_rng(m * k + n)
    x, w = rng.normal(size=(m, k)).astype(np.float32), (rng.normal(size=(n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.normal(size=(n,)).astype(np.float32) if with_bias else None
    s, t = np.float32([0.8]), np.float32([-0.3])
    fused = jax.jit(lambda x, w, b, s, t: dense.linear(x, w, b, activation=("star_relu", s, t)))
    assert "dcls_jax_linear_act" in fused.lower(x, w, b, s, t).as_text()
    y = np.asarray(fused(x, w, b, s, t))
    x64, w64 = x.astype(np.float64), w.T.astype(np.float64)
    z = x64 @ w64 + (0 if b is None else b)
    r = np.maximum(z, 0)
    exact = 0.8 * r ** 2 - 0.3
    bound = 1.6 * r * (_bound(x64, w64) + 2.0 ** -24 * np.abs(z)) + 2.0 ** -22 * (0.8 * r ** 2 + 0.3)
    assert np.all(np.abs(y - exact) <= bound), float(np.max(np.abs(y - exact) - bound))
    separate = np.asarray(dense.star_relu(dense.linear(x, w, b, impl="xla"), s, t))   # XLA's dot: its own order
    assert np.all(np.abs(y - separate) <= 4e-6 * (1 + np.abs(separate)))


def test_linear_star_relu_gradients_and_vmap_are_the_separate_ops():
    """Gradients of x, w and StarReLU's two scalars through the fused call equal XLA's separate ops; vmap folds."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(3, 7, 20)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(45, 20)) / 5, jnp.float32)
    s, t = jnp.float32([1.3]), jnp.float32([0.2])

    def loss(impl):
        return lambda x, w, s, t: jnp.sum(jnp.sin(dense.linear(x, w, impl=impl, activation=("star_relu", s, t))))
    grads = jax.jit(jax.grad(loss("native"), (0, 1, 2, 3)))(x, w, s, t)
    for got, want in zip(grads, jax.grad(loss("xla"), (0, 1, 2, 3))(x, w, s, t)):
        assert rel(got, want) <= 2e-5
    fn = jax.jit(jax.vmap(lambda x: dense.linear(x, w, impl="native", activation=("star_relu", s, t))))
    assert rel(fn(x), dense.star_relu(jnp.einsum("bni,oi->bno", x, w), s, t)) <= 1e-5
    for bad in ("star_relu", ("star_relu", s), ("relu", s, t)):
        with pytest.raises(ValueError, match="unknown activation"):
            dense.linear(x, w, activation=bad)


def test_linear_gelu_gradients_and_vmap_are_the_separate_ops():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(3, 7, 20)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(45, 20)) / 5, jnp.float32)
    b = jnp.asarray(rng.normal(size=(45,)), jnp.float32)

    def loss(impl):
        return lambda x, w, b: jnp.sum(jnp.sin(dense.linear(x, w, b, impl=impl, activation="gelu")))
    grads = jax.jit(jax.grad(loss("native"), (0, 1, 2)))(x, w, b)
    for got, want in zip(grads, jax.grad(loss("xla"), (0, 1, 2))(x, w, b)):
        assert rel(got, want) <= 2e-5
    ws = jnp.stack([w, w * 0.5, -w])
    for fn, args in ((lambda x: dense.linear(x, w, b, impl="native", activation="gelu"), (x,)),        # rows fold
                     (lambda x, w: dense.linear(x, w, b, impl="native", activation="gelu"), (x, ws))):  # a loop
        ref = jax.vmap(lambda *a: dense.gelu(dense.linear(*a[:1], *(a[1:] or (w,)), b, impl="xla")))(*args)
        assert rel(jax.jit(jax.vmap(fn))(*args), ref) <= 1e-5
    with pytest.raises(ValueError, match="unknown activation"):
        dense.linear(x, w, b, activation="relu")


def test_gradients_to_second_order_equal_xla_dot():
    rng = np.random.default_rng(3)
    for ta, tb in itertools.product((False, True), repeat=2):
        a = jnp.asarray(rng.normal(size=(37, 20) if ta else (20, 37)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(45, 37) if tb else (37, 45)), jnp.float32)

        def loss(f):
            first = lambda a, b: jnp.sum(jnp.sin(f(a, b, ta, tb)))             # noqa: E731
            return lambda a, b: jnp.sum(jax.grad(first, 1)(a, b) ** 2)          # a gradient of a gradient
        for f, g in ((jax.grad(loss(dense.matmul), (0, 1)), jax.grad(loss(dense._xla), (0, 1))),
                     (jax.grad(lambda a, b: jnp.sum(jnp.cos(dense.matmul(a, b, ta, tb))), (0, 1)),
                      jax.grad(lambda a, b: jnp.sum(jnp.cos(dense._xla(a, b, ta, tb))), (0, 1)))):
            for got, want in zip(jax.jit(f)(a, b), g(a, b)):
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


def test_linear_under_vmap_and_with_bias():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 2, 5, 40)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 33, 40)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(33,)), jnp.float32)
    ref = lambda x, w, b: np.einsum("...i,oi->...o", np.float64(x), np.float64(w)) + b   # noqa: E731
    got = jax.jit(jax.vmap(lambda x: dense.linear(x, w[0], bias, impl="native")))(x)        # rows folded
    np.testing.assert_allclose(got, ref(x, w[0], bias), rtol=1e-5, atol=1e-4)
    got = jax.jit(jax.vmap(lambda x, w: dense.linear(x, w, impl="native")))(x, w)           # weights mapped too
    np.testing.assert_allclose(got, np.stack([ref(x[i], w[i], 0) for i in range(3)]), rtol=1e-5, atol=1e-4)


def test_dispatcher(monkeypatch):
    assert dense.selected_impl(jnp.float32, backend="cpu") == "native"
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float64):
        assert dense.selected_impl(dtype, backend="cpu") == "xla"
        with pytest.raises(ValueError, match="float32 only"):
            dense.selected_impl(dtype, "native", backend="cpu")
    assert dense.selected_impl(jnp.float32, backend="gpu") == "xla"
    with pytest.raises(ValueError, match="CPU only"):
        dense.selected_impl(jnp.float32, "native", backend="gpu")
    monkeypatch.setenv(dense.ENV_VAR, "xla")
    assert dense.selected_impl(jnp.float32, backend="cpu") == "xla"
    assert dense.selected_impl(jnp.float32, "native", backend="cpu") == "native"    # the argument wins
    monkeypatch.setenv(dense.ENV_VAR, "blas")
    with pytest.raises(ValueError, match="unknown dense implementation 'blas'"):
        dense.selected_impl(jnp.float32, backend="cpu")
    monkeypatch.setattr(native, "_state", {"ok": False, "reason": "OSError: no C++ compiler found"})
    monkeypatch.delenv(dense.ENV_VAR)
    assert dense.selected_impl(jnp.float32, backend="cpu") == "xla"
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        dense.selected_impl(jnp.float32, "native", backend="cpu")


def test_mismatched_shapes_are_refused_when_traced():
    with pytest.raises(ValueError, match="matching inner sizes"):
        dense.linear(jnp.ones((4, 5)), jnp.ones((3, 6)), impl="native")
    with pytest.raises(ValueError, match="matching inner sizes"):
        dense.matmul(jnp.ones((4, 5)), jnp.ones((4, 5)), False, False)
    with pytest.raises(ValueError, match="matching inner sizes"):
        dense.matmul(jnp.ones((2, 4, 5)), jnp.ones((5, 3)), False, False)


def test_models_linear_and_pointwise_layers_run_it():
    from models.layers import Conv2d, Linear
    rngs = nnx.Rngs(0)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 6, 6, 24)), jnp.float32)
    for layer in (Linear(24, 40, rngs=rngs), Conv2d(24, 40, 1, stride=2, rngs=rngs)):
        assert "dcls_jax_matmul" in str(jax.make_jaxpr(layer)(x))
        w = np.float64(layer.weight[...]).reshape(40, 24)
        xs = np.float64(x) if isinstance(layer, Linear) else np.float64(x)[:, ::2, ::2]
        np.testing.assert_allclose(layer(x), xs @ w.T + np.float64(layer.bias[...]), rtol=1e-5, atol=1e-5)


def test_models_mlps_take_the_fused_call():
    """ConvNeXt's Linear Mlp and FastViT's 1x1-conv Mlp run fc1 + GELU as one call, MetaFormer's fc1 + StarReLU
    too, equal to the float64 layers; a non-pointwise Conv2d applies the activation after its convolution."""
    from scipy.special import erf

    from models.layers import Conv2d, Mlp
    rngs = nnx.Rngs(1)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 5, 24)), jnp.float32)
    gelu64 = lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))
    for mlp in (Mlp(24, 40, rngs=rngs), Mlp(24, 40, rngs=rngs, use_conv=True)):
        assert "dcls_jax_linear_act" in str(jax.make_jaxpr(mlp)(x))
        w1, w2 = (np.float64(f.weight[...]).reshape(f.weight.shape[:2]) for f in (mlp.fc1, mlp.fc2))
        h = gelu64(np.float64(x) @ w1.T + np.float64(mlp.fc1.bias[...]))
        np.testing.assert_allclose(mlp(x), h @ w2.T + np.float64(mlp.fc2.bias[...]), rtol=1e-5, atol=1e-5)
    from models.metaformer import StarReLU
    act = StarReLU(0.7, -0.2)
    mlp = Mlp(24, 40, act=act, bias=False, rngs=rngs)
    assert "dcls_jax_linear_act" in str(jax.make_jaxpr(mlp)(x))
    w1, w2 = (np.float64(f.weight[...]) for f in (mlp.fc1, mlp.fc2))
    h = 0.7 * np.maximum(np.float64(x) @ w1.T, 0) ** 2 - 0.2
    np.testing.assert_allclose(mlp(x), h @ w2.T, rtol=1e-5, atol=1e-5)
    conv = Conv2d(24, 24, 3, padding=1, groups=24, rngs=rngs)
    np.testing.assert_allclose(conv(x, activation="gelu"), gelu64(np.float64(conv(x))), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown activation"):
        conv(x, activation="relu")
