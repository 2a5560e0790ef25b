"""Dcls3_1d and Dcls2dK1d against PyTorch dcls 0.1.1 (kernels, outputs, gradients, init), and the nnx.Conv-style
arguments (padding strings and pairs, aliases, initialisers, dtype / param_dtype) against the PyTorch-style ones
and against torch / XLA references."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from DCLS.construct import modules as ref
from flax import nnx
from scipy import stats

import dcls_jax

logging.getLogger().setLevel(logging.ERROR)
torch.set_num_threads(1)
_FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Dcls3_1d: (in, out, K, stride, padding, dense_kernel_size, dilated_kernel_size, groups, mode, bias, spatial)
CONFIGS_3_1D = {
    "grouped": (2, 4, 3, 1, (1, 1, 2), (3, 2), 5, 2, "zeros", True, (5, 4, 8)),
    "dw-even": (3, 3, 2, (1, 2, 1), (0, 1, 3), (1, 2), 6, 3, "reflect", False, (4, 6, 9)),
}
# Dcls2dK1d: (in, out, K, stride, padding, dilated_kernel_size, groups, mode, bias, flat_dim, spatial)
CONFIGS_2DK1D = {
    "flat0": (3, 6, 3, 1, (2, 0), 5, 3, "zeros", True, 0, (9, 7)),
    "flat1-even": (4, 8, 2, (2, 1), (0, 3), 6, 4, "circular", False, 1, (6, 10)),
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _params(wshape, d, version, bias, seed=0):
    """weight, P (a quarter on integers, some at or beyond the grid edge), SIG (a third at 0), bias."""
    rng = np.random.default_rng(seed)
    shape = (1, *wshape)
    lim = d // 2
    p = (rng.normal(0, 1, shape) * (lim + 0.5) / 1.5).astype(np.float32).reshape(-1)
    n = p.size
    p[: n // 4] = np.round(p[: n // 4])
    p[n // 4: n // 4 + 4] = (lim + np.array([0.0, 0.6, 1.0, 1.7])) * np.sign(rng.normal(size=4))
    out = {"weight": rng.normal(0, 1, wshape).astype(np.float32), "P": p.reshape(shape)}
    if bias:
        out["bias"] = rng.normal(0, 1, (wshape[0],)).astype(np.float32)
    if version in ("gauss", "max"):
        sig = (np.abs(rng.normal(0, 0.5, shape)) * rng.choice([-1, 1], shape)).astype(np.float32)
        sig.reshape(-1)[::3] = 0.0
        out["SIG"] = sig
    return out


def _to_last(a):
    return np.moveaxis(np.asarray(a), 1, -1)


def _jax_run(m, x, ct):
    graphdef, state = nnx.split(m)

    def run(state, x, ct):
        def loss(state, x):
            layer = nnx.merge(graphdef, state)
            y = layer(x)
            return jnp.sum(y * ct), (y, layer.kernel())
        (_, (y, k)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
        return y, k, grads
    return jax.jit(run).lower(state, x, ct).compile(_FAST_COMPILE)(state, x, ct)


def _compare(t, m, params, x, kernel_ref):
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for name, v in params.items():
            getattr(t, name).copy_(torch.from_numpy(v))
            getattr(m, name).set_value(jnp.asarray(v))
        y_shape = t(torch.from_numpy(x)).shape
    ct = rng.normal(size=y_shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    y_t = t(xt)
    (y_t * torch.from_numpy(ct)).sum().backward()
    k_t = kernel_ref(t).detach().numpy()
    y, k, (g, gx) = _jax_run(m, jnp.asarray(_to_last(x)), jnp.asarray(_to_last(ct)))
    assert k.shape == k_t.shape
    assert rel(k, k_t) <= 1e-5
    assert rel(y, _to_last(y_t.detach().numpy())) <= 1e-5
    assert rel(gx, _to_last(xt.grad.numpy())) <= 1e-4
    grads_t = {n: p.grad.numpy() for n, p in t.named_parameters()}
    assert set(grads_t) == set(params)
    for n in params:
        assert rel(g[n].get_value(), grads_t[n]) <= 1e-4, n


@pytest.mark.parametrize("version", ["v1", "gauss", "max"])
@pytest.mark.parametrize("name", list(CONFIGS_3_1D))
def test_dcls3_1d_parity(name, version):
    cin, cout, kc, stride, padding, dense, d, groups, mode, bias, spatial = CONFIGS_3_1D[name]
    kw = dict(stride=stride, padding=padding, dense_kernel_size=dense, dilated_kernel_size=d, groups=groups,
              bias=bias, padding_mode=mode, version=version)
    t = ref.Dcls3_1d(cin, cout, kc, **kw)
    m = nnx.eval_shape(lambda: dcls_jax.Dcls3_1d(cin, cout, kc, **kw, rngs=nnx.Rngs(0)))
    params = _params((cout, cin // groups, *dense, kc), d, version, bias)
    x = np.random.default_rng(2).normal(size=(2, cin, *spatial)).astype(np.float32)
    _compare(t, m, params, x, lambda t: t.DCK(t.weight, t.P, t.SIG))


@pytest.mark.parametrize("version", ["v0", "v1", "gauss", "max"])
@pytest.mark.parametrize("name", list(CONFIGS_2DK1D))
def test_dcls2dk1d_parity(name, version):
    cin, cout, kc, stride, padding, d, groups, mode, bias, flat, spatial = CONFIGS_2DK1D[name]
    kw = dict(stride=stride, padding=padding, dilated_kernel_size=d, groups=groups, bias=bias, padding_mode=mode,
              version=version, flat_dim=flat)
    t = ref.Dcls2dK1d(cin, cout, kc, **kw)
    m = nnx.eval_shape(lambda: dcls_jax.Dcls2dK1d(cin, cout, kc, **kw, rngs=nnx.Rngs(0)))
    params = _params((cout, cin // groups, kc), d, version, bias)
    x = np.random.default_rng(2).normal(size=(2, cin, *spatial)).astype(np.float32)
    _compare(t, m, params, x, lambda t: t.DCK(t.weight, t.P, t.SIG).unsqueeze(-1 - flat))


def test_dcls3_1d_v0_is_dcls1d_v0_per_dense_tap():
    """dcls 0.1.1 has no v0 for Dcls3_1d; ours builds each dense tap's row as ConstructKernel1d's v0."""
    params = _params((4, 2, 3, 2, 5), 7, "v0", False)
    w, p = params["weight"], params["P"]
    k = jax.jit(lambda w, p: dcls_jax.construct_kernel(w, p, None, 7, "v0"))(w, p)
    dck = ref.ConstructKernel1d(4, 2 * 3 * 2, 1, 5, (7,), "v0")
    k_t = dck(torch.from_numpy(w.reshape(4, 12, 5)), torch.from_numpy(p.reshape(1, 4, 12, 5)), None)
    assert k.shape == (4, 2, 3, 2, 7)
    assert rel(k, k_t.numpy().reshape(4, 2, 3, 2, 7)) <= 1e-6


def _ks(a, b) -> float:
    return stats.ks_2samp(np.asarray(a).ravel(), np.asarray(b).ravel()).pvalue


def test_init_distributions_match_reference():
    """Dcls3_1d: weight/bias U(+-1/sqrt(I/g*dk0*dk1*K)), P ~ U(-d//2, d//2) (N_Md); Dcls2dK1d: P ~ N(0, .5) clamped."""
    torch.manual_seed(0)
    t = ref.Dcls3_1d(16, 32, 12, dense_kernel_size=(3, 2), dilated_kernel_size=9, groups=2, version="gauss")
    m = dcls_jax.Dcls3_1d(16, 32, 12, dense_kernel_size=(3, 2), dilated_kernel_size=9, groups=2, version="gauss",
                          rngs=nnx.Rngs(0))
    bound = 1 / np.sqrt(8 * 3 * 2 * 12)
    for name in ("weight", "bias", "P"):
        a, b = np.asarray(getattr(m, name)[...]), getattr(t, name).detach().numpy()
        assert a.shape == b.shape and a.dtype == np.float32, name
        assert _ks(a, b) > 1e-3, name
    assert bound * 0.98 < np.abs(np.asarray(m.weight[...])).max() <= bound
    assert 3.9 < np.abs(np.asarray(m.P[...])).max() <= 4
    np.testing.assert_array_equal(np.asarray(m.SIG[...]), t.SIG.detach().numpy())

    t = ref.Dcls2dK1d(16, 32, 24, dilated_kernel_size=5, version="max")
    m = dcls_jax.Dcls2dK1d(16, 32, 24, dilated_kernel_size=5, version="max", rngs=nnx.Rngs(0))
    p, pt = np.asarray(m.P[...]), t.P.detach().numpy()
    assert p.shape == pt.shape == (1, 32, 16, 24) and np.abs(p).max() == 2
    assert _ks(p, pt) > 1e-3
    np.testing.assert_array_equal(np.asarray(m.SIG[...]), t.SIG.detach().numpy())


# ------------------------------------------------------------------------------------------------------------
# nnx.Conv conventions


def _torch_out(t, x_nchw):
    with torch.no_grad():
        return _to_last(t(torch.from_numpy(x_nchw)).numpy())


@pytest.fixture(scope="module")
def pair():
    """A reference Dcls2d (4 -> 8, groups 2, 5 x 5, v1) without padding and our layer holding its parameters."""
    torch.manual_seed(0)
    t = ref.Dcls2d(4, 8, 3, dilated_kernel_size=5, groups=2, version="v1")
    params = {n: p.detach().numpy() for n, p in t.named_parameters()}
    return t, params


def _ours(params, **kw):
    m = dcls_jax.Dcls2d(4, 8, 3, dilated_kernel_size=5, groups=2, version="v1", rngs=nnx.Rngs(0), **kw)
    for n, v in params.items():
        getattr(m, n).set_value(jnp.asarray(v))
    return m


def test_padding_strings_and_pairs(pair):
    t, params = pair
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 8)).astype(np.float32)
    xl = jnp.asarray(_to_last(x))
    run = lambda m: np.asarray(nnx.jit(lambda m, x: m(x))(m, xl))  # noqa: E731
    # "VALID" == 0; "SAME" at stride 1 (odd kernel) == d // 2, the PyTorch-style argument
    np.testing.assert_allclose(run(_ours(params, padding="VALID")), _torch_out(t, x), rtol=0, atol=1e-5)
    same = run(_ours(params, padding="same"))
    np.testing.assert_array_equal(same, run(_ours(params, padding=2)))
    t.padding = (2, 2)
    np.testing.assert_allclose(same, _torch_out(t, x), rtol=0, atol=1e-5)
    t.padding = (0, 0)
    # (low, high) pairs == torch on F.pad(x) (F.pad takes the last axis first)
    pairs = run(_ours(params, padding=((1, 3), (0, 2))))
    with torch.no_grad():
        ref_pairs = _to_last(t(F.pad(torch.from_numpy(x), (0, 2, 1, 3))).numpy())
    np.testing.assert_allclose(pairs, ref_pairs, rtol=0, atol=1e-5)
    # "SAME" with stride 2 == XLA's own SAME convolution of the reference's dense kernel
    k = jnp.asarray(t.DCK(t.weight, t.P, t.SIG).detach().numpy())
    want = jax.lax.conv_general_dilated(xl, k, (2, 2), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                        feature_group_count=2) + jnp.asarray(params["bias"])
    got = run(_ours(params, padding="SAME", strides=2))
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5)
    # "CIRCULAR" (flax's name) == padding_mode="circular" with d // 2
    np.testing.assert_array_equal(run(_ours(params, padding="CIRCULAR")),
                                  run(_ours(params, padding=2, padding_mode="circular")))


def test_nnx_aliases_and_initialisers_match_pytorch_style():
    a = dcls_jax.Dcls2d(4, 4, 3, stride=2, padding=1, dilated_kernel_size=3, groups=4, bias=False,
                        version="gauss", rngs=nnx.Rngs(3))
    b = dcls_jax.Dcls2d(4, 4, 3, strides=2, padding="SAME", dilated_kernel_size=3, feature_group_count=4,
                        use_bias=False, version="gauss", rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 7, 7, 4)).astype(np.float32))
    assert b.stride == (2, 2) and b.groups == 4 and b.bias is None
    for n in ("weight", "P", "SIG"):
        np.testing.assert_array_equal(np.asarray(getattr(a, n)[...]), np.asarray(getattr(b, n)[...]))
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))

    # initialisers are called with the PyTorch-layout shapes; positions are clamped to +-d//2 afterwards
    m = dcls_jax.Dcls2d(4, 8, 5, dilated_kernel_size=(3, 5), groups=2, version="gauss", rngs=nnx.Rngs(0),
                        kernel_init=lambda k, s, d: jnp.full(s, 0.5, d), bias_init=nnx.initializers.ones,
                        position_init=lambda k, s, d: jnp.full(s, 9.0, d),
                        sigma_init=lambda k, s, d: jnp.full(s, 0.7, d))
    assert m.weight.shape == (8, 2, 5) and np.all(np.asarray(m.weight[...]) == 0.5)
    assert np.all(np.asarray(m.bias[...]) == 1.0) and np.all(np.asarray(m.SIG[...]) == 0.7)
    np.testing.assert_array_equal(np.asarray(m.P[...])[:, 0, 0, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="either stride or strides"):
        dcls_jax.Dcls2d(4, 4, 3, stride=2, strides=2, rngs=nnx.Rngs(0))


def test_bf16_dtype_and_param_dtype():
    m = dcls_jax.Dcls2d(8, 8, 4, padding="SAME", dilated_kernel_size=7, groups=8, version="gauss",
                        rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 8)).astype(np.float32))
    f = nnx.jit(lambda m, x: m(x))
    y = f(m, x)
    assert y.dtype == jnp.bfloat16 and m.weight[...].dtype == jnp.float32
    m.dtype = None
    y32 = f(m, x)
    assert y32.dtype == jnp.float32
    assert rel(y.astype(jnp.float32), y32) < 2e-2
    h = dcls_jax.Dcls3_1d(4, 4, 3, dense_kernel_size=2, dilated_kernel_size=5, padding=(0, 0, 2), groups=2,
                          rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert {h.weight[...].dtype, h.P[...].dtype, h.SIG[...].dtype, h.bias[...].dtype} == {jnp.dtype(jnp.bfloat16)}
    out = nnx.jit(lambda m, x: m(x))(h, jnp.ones((1, 3, 3, 6, 4), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 2, 6, 4) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("make, match", [
    (lambda: dcls_jax.Dcls2dK1d(4, 4, 3, flat_dim=2, rngs=nnx.Rngs(0)), "flat_dim"),
    (lambda: dcls_jax.Dcls3_1d(4, 4, 3, dense_kernel_size=(1, 2, 3), rngs=nnx.Rngs(0)), "dense_kernel_size"),
    (lambda: dcls_jax.Dcls3_1d(4, 4, 3, dilated_kernel_size=(3, 3), rngs=nnx.Rngs(0)), "dilated_kernel_size"),
    (lambda: dcls_jax.Dcls2d(4, 4, 3, padding="FULL", rngs=nnx.Rngs(0)), "padding"),
    (lambda: dcls_jax.Dcls2d(4, 4, 3, padding=((1, 2),), rngs=nnx.Rngs(0)), "padding"),
    (lambda: dcls_jax.Dcls2d(4, 4, 3, padding=-1, rngs=nnx.Rngs(0)), "padding"),
    (lambda: dcls_jax.Dcls2d(4, 4, 3, stride=0, rngs=nnx.Rngs(0)), "stride"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------------------
# docs/DCLS.md: its examples run as written


def _guide_blocks():
    import os
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "DCLS.md")
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_guide_examples_run(capsys):
    blocks = _guide_blocks()
    assert len(blocks) == 4
    spaces = []
    for code in blocks:
        ns = {"__name__": "guide"}
        exec(compile(code, "docs/DCLS.md", "exec"), ns)
        spaces.append(ns)
    assert abs(spaces[1]["delay"] - 6) < 0.5                  # the 1-D example learns its delay
    assert spaces[2]["delays"](spaces[2]["spikes"]).shape == (2, 3, 3, 50, 4)
    ns = spaces[3]
    y = np.asarray(ns["dcls"](ns["x"]))
    np.testing.assert_allclose(np.asarray(ns["frozen"](ns["x"])), y, rtol=0, atol=1e-5 * np.abs(y).max())
