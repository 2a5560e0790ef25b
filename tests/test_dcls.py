"""dcls_jax against PyTorch dcls 0.1.1: kernels, outputs, gradients, init, shared positions, clamp, errors."""
import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from DCLS.construct import modules as ref
from flax import nnx
from scipy import stats

import dcls_jax

logging.getLogger().setLevel(logging.ERROR)  # DCLS.Dcls2d logs CUDA/implicit-GEMM notices on construction
torch.set_num_threads(1)

VERSIONS = ("v0", "v1", "gauss", "max")
JAX_CLS = {1: dcls_jax.Dcls1d, 2: dcls_jax.Dcls2d, 3: dcls_jax.Dcls3d}
REF_CLS = {1: ref.Dcls1d, 2: ref.Dcls2d, 3: ref.Dcls3d}

# (in, out, kernel_count, dilated_kernel_size, groups, stride, padding, padding_mode, bias, input spatial)
CONFIGS = {
    "1d": (3, 5, 4, 7, 1, 1, 3, "zeros", True, (12,)),
    "1d-dw-even": (4, 8, 3, 6, 4, 2, 2, "reflect", False, (11,)),
    "2d-dw": (4, 4, 5, 4, 4, 1, 2, "zeros", True, (8, 9)),
    "2d-even": (3, 6, 3, 6, 1, 2, (1, 2), "replicate", True, (9, 8)),
    "2d-nonsquare": (4, 6, 2, (5, 7), 2, (1, 2), 2, "circular", False, (8, 9)),
    "3d": (2, 4, 3, 5, 2, 1, 2, "zeros", True, (6, 5, 5)),
    "3d-dw-nonsquare": (3, 6, 2, (4, 5, 3), 3, 2, 1, "reflect", False, (6, 7, 5)),
}
# Depthwise layers with a channel multiplier (out = 2 * in) run XLA's grouped convolution; "2d-dw" (in = out =
# groups) runs conv.py's CPU shifted-sum path, whose compile time grows with the number of taps: kept small.


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _sizes(d, nd):
    return tuple(d) if isinstance(d, tuple) else (d,) * nd


def _special_positions(rng, nd, shape, d):
    """Random positions, a quarter of them on integers, some on or beyond the grid edge (v0 drops those taps)."""
    lim = np.array([di // 2 for di in d], np.float32).reshape(nd, 1, 1, 1)
    p = rng.normal(0, 1, shape).astype(np.float32) * (lim + 0.5) / 1.5
    flat = p.reshape(nd, -1)
    n = flat.shape[1]
    flat[:, : n // 4] = np.round(flat[:, : n // 4])                     # exactly on the grid
    edge = lim.reshape(nd, 1) + np.array([0.0, 0.6, 1.0, 1.7], np.float32)
    k = min(4, n - n // 4)
    flat[:, n // 4: n // 4 + k] = (edge * np.sign(rng.normal(size=(nd, 4))))[:, :k]
    return flat.reshape(shape)


def _params(nd, cfg, version, seed=0):
    cin, cout, kc, dks, groups = cfg[:5]
    d = _sizes(dks, nd)
    rng = np.random.default_rng(seed)
    shape = (nd, cout, cin // groups, kc)
    out = {"weight": rng.normal(0, 1, shape[1:]).astype(np.float32),
           "P": _special_positions(rng, nd, shape, d)}
    if cfg[8]:
        out["bias"] = rng.normal(0, 1, (cout,)).astype(np.float32)
    if version in ("gauss", "max"):
        sig = np.abs(rng.normal(0, 0.5, shape)).astype(np.float32) * rng.choice([-1, 1], shape)
        sig.reshape(-1)[::3] = 0.0  # |SIG| at 0: torch's abs has gradient 0 there
        out["SIG"] = sig.astype(np.float32)
    return out


def _layers(nd, cfg, version, params):
    """The reference layer and ours, both holding `params` (ours built abstractly: no init compiles)."""
    cin, cout, kc, dks, groups, stride, padding, mode, bias, _ = cfg
    kw = dict(stride=stride, padding=padding, dilated_kernel_size=dks, groups=groups, bias=bias,
              padding_mode=mode, version=version)
    t = REF_CLS[nd](cin, cout, kc, **kw)
    m = nnx.eval_shape(lambda: JAX_CLS[nd](cin, cout, kc, **kw, rngs=nnx.Rngs(0)))
    with torch.no_grad():
        for name, v in params.items():
            getattr(t, name).copy_(torch.from_numpy(v))
            getattr(m, name).set_value(jnp.asarray(v))
    return t, m


# Each parity case compiles one program; LLVM -O0 halves XLA:CPU compile time (the HLO passes still run, and
# XLA:CPU keeps fast-math off by default), which keeps this file fast on two cores.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jax_run(graphdef, params, x, ct):
    """Output, dense kernel (construct_kernel) and gradients of sum(y * ct) w.r.t. params and x."""
    def run(params, x, ct):
        def loss(params, x):
            m = nnx.merge(graphdef, params)
            sig = None if m.SIG is None else m.SIG[...]
            k = dcls_jax.construct_kernel(m.weight[...], m.P[...], sig, m.dilated_kernel_size, m.version)
            y = m(x)
            return jnp.sum(y * ct), (y, k)
        (_, (y, k)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, k, grads
    return jax.jit(run).lower(params, x, ct).compile(_FAST_COMPILE)(params, x, ct)


def _torch_run(t, x, ct):
    x = x.clone().requires_grad_(True)
    y = t(x)
    (y * ct).sum().backward()
    k = t.DCK(t.weight, t.P, t.SIG).detach().numpy()
    return y.detach().numpy(), k, x.grad.numpy(), {n: p.grad.numpy() for n, p in t.named_parameters()}


def _to_last(a):
    return np.moveaxis(np.asarray(a), 1, -1)


def _check_parity(cfg, version):
    nd = len(cfg[-1])
    params = _params(nd, cfg, version)
    t, m = _layers(nd, cfg, version, params)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, cfg[0], *cfg[-1])).astype(np.float32)
    with torch.no_grad():
        y_shape = t(torch.from_numpy(x)).shape
    ct = rng.normal(size=y_shape).astype(np.float32)
    y_t, k_t, gx_t, g_t = _torch_run(t, torch.from_numpy(x), torch.from_numpy(ct))

    graphdef, state = nnx.split(m)
    y, k, (g, gx) = _jax_run(graphdef, state, jnp.asarray(_to_last(x)), jnp.asarray(_to_last(ct)))
    assert k.shape == k_t.shape
    assert rel(k, k_t) <= 1e-5
    assert rel(y, _to_last(y_t)) <= 1e-5
    assert rel(gx, _to_last(gx_t)) <= 1e-4
    assert set(g_t) == set(params)
    for n in params:
        assert rel(g[n].get_value(), g_t[n]) <= 1e-4, n


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_pytorch(name, version):
    _check_parity(CONFIGS[name], version)


def test_parity_published_depthwise():
    """The MetaFormer/FastViT layer (17 / 34 / v1, depthwise, in = out = groups): conv.py's scanned CPU path."""
    _check_parity((8, 8, 34, 17, 8, 1, 8, "zeros", False, (9, 9)), "v1")


@pytest.mark.parametrize("version", ["v0", "v1"])
@pytest.mark.parametrize("name", ["1d", "2d-nonsquare", "3d-dw-nonsquare"])
def test_einsum_parity_with_pytorch(monkeypatch, name, version):
    """v0 and v1 as the einsum of their profiles (GPU, TPU); the CPU's default, the scatter of their corners, is
    test_parity_with_pytorch's."""
    monkeypatch.setattr(importlib.import_module("dcls_jax.kernel"), "SCATTER", False)
    _check_parity(CONFIGS[name], version)


def test_far_positions_are_dropped():
    """Taps far outside the grid (beyond int32 once floored) add nothing; the in-grid tap adds its bilinear corners,
    computed here by hand from the reference's formulas (v1: P[0] moves columns, normalised by its profile sums).
    A NaN position: v0 drops the tap, v1's whole kernel is NaN (its normaliser), as in the reference."""
    d, w = 5, np.array([[[1.5, -2.0, 0.75, 3.0]]], np.float32)                    # (O=1, I=1, K=4)
    P = np.array([[[[0.25, 3e9, -1e30, np.inf]]], [[[-1.5, 0.0, 0.0, 1.0]]]], np.float32)
    want = np.zeros((d, d), np.float64)
    py, px = P[0, 0, 0, 0] + d // 2, P[1, 0, 0, 0] + d // 2
    fy, fx = int(np.floor(py)), int(np.floor(px))
    ry, rx = py - fy, px - fx
    for a, b, c in ((0, 0, (1 - ry) * (1 - rx)), (0, 1, (1 - ry) * rx), (1, 0, ry * (1 - rx)), (1, 1, ry * rx)):
        want[fy + a, fx + b] += w[0, 0, 0] * c
    kernel_mod = importlib.import_module("dcls_jax.kernel")
    nan = P.copy()
    nan[0, 0, 0, 3] = np.nan
    for scatter in (True, False):
        old, kernel_mod.SCATTER = kernel_mod.SCATTER, scatter
        try:
            build = lambda p, v: np.asarray(dcls_jax.construct_kernel(jnp.asarray(w), jnp.asarray(p), None, d, v))
            np.testing.assert_allclose(build(P, "v0")[0, 0], want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(build(P[::-1], "v1")[0, 0], want / (1 + 1e-7), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(build(nan, "v0")[0, 0], want, rtol=1e-6, atol=1e-6)
            assert np.isnan(build(nan[::-1], "v1")).all()
        finally:
            kernel_mod.SCATTER = old


def test_corner_gradients_are_torch_zeros():
    """Positions on integers (v1) and SIG = 0 (max): torch's abs/relu give exactly 0 gradient there."""
    @jax.jit
    def grads(w, p, s):
        g_v1 = jax.grad(lambda p: dcls_jax.construct_kernel(w, p, None, 3, "v1").sum())(p)
        g_sig = jax.grad(lambda s: dcls_jax.construct_kernel(w, p + 0.3, s, 3, "max")[0, 0, 1, 1])(s)
        return g_v1, g_sig

    g_v1, g_sig = grads(jnp.ones((1, 1, 1)), jnp.zeros((2, 1, 1, 1)), jnp.zeros((2, 1, 1, 1)))
    tp = torch.zeros(2, 1, 1, 1, requires_grad=True)
    ts = torch.zeros(2, 1, 1, 1, requires_grad=True)
    dck = lambda v: ref.ConstructKernel2d(1, 1, 1, 1, (3, 3), v)  # noqa: E731
    dck("v1")(torch.ones(1, 1, 1), tp, None).sum().backward()
    dck("max")(torch.ones(1, 1, 1), tp.detach() + 0.3, ts)[0, 0, 1, 1].backward()
    np.testing.assert_array_equal(np.asarray(g_v1), tp.grad.numpy())
    np.testing.assert_array_equal(np.asarray(g_sig), ts.grad.numpy())
    assert np.all(tp.grad.numpy() == 0) and np.all(ts.grad.numpy() == 0)


@pytest.mark.parametrize("version", ["v1", "gauss"])
def test_shared_positions_sum_gradients(version):
    """Two layers sharing P (and SIG): one leaf in nnx.split, gradient = sum over both users, as in PyTorch."""
    cfg = (4, 4, 3, 5, 2, 1, 2, "zeros", True, (7, 7))
    p1, p2 = _params(2, cfg, version, seed=0), _params(2, cfg, version, seed=1)
    t1, m1 = _layers(2, cfg, version, p1)
    t2, _ = _layers(2, cfg, version, p2)
    shared = {"P": m1.P} | ({"SIG": m1.SIG} if version == "gauss" else {})
    m2 = dcls_jax.Dcls2d(4, 4, 3, padding=2, dilated_kernel_size=5, groups=2, version=version,
                         rngs=nnx.Rngs(1), **shared)
    t2.P = t1.P
    if version == "gauss":
        t2.SIG = t1.SIG
    m2.weight.set_value(jnp.asarray(p2["weight"]))
    m2.bias.set_value(jnp.asarray(p2["bias"]))
    assert m2.P is m1.P

    x = np.random.default_rng(2).normal(size=(2, 4, 7, 7)).astype(np.float32)
    (t2(t1(torch.from_numpy(x))) ** 2).sum().backward()
    graphdef, state = nnx.split(nnx.List([m1, m2]))
    names = [".".join(map(str, k)) for k, _ in nnx.to_flat_state(state)]
    assert sum(n.endswith(".P") for n in names) == 1

    @jax.jit
    def grads(state, x):
        def loss(state):
            pair = nnx.merge(graphdef, state)
            return (pair[1](pair[0](x)) ** 2).sum()
        return jax.grad(loss)(state)

    g = grads(state, jnp.asarray(_to_last(x)))
    assert rel(g[0]["P"].get_value(), t1.P.grad.numpy()) <= 1e-4
    if version == "gauss":
        assert rel(g[0]["SIG"].get_value(), t1.SIG.grad.numpy()) <= 1e-4


def _ks(a, b) -> float:
    return stats.ks_2samp(np.asarray(a).ravel(), np.asarray(b).ravel()).pvalue


@pytest.mark.parametrize("version", ["v0", "gauss", "max"])
def test_init_distributions(version):
    """Same distributions as the reference: weight/bias U(+-1/sqrt(I/g*K)), P ~ N(0, .5) clamped per axis."""
    args = (64, 256, 24)
    kw = dict(dilated_kernel_size=(3, 5), groups=4, version=version)
    torch.manual_seed(0)
    t = ref.Dcls2d(*args, **kw)
    m = dcls_jax.Dcls2d(*args, **kw, rngs=nnx.Rngs(0))
    bound = 1 / np.sqrt(16 * 24)
    for name in ("weight", "bias"):
        a, b = np.asarray(getattr(m, name)[...]), getattr(t, name).detach().numpy()
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.98 * bound
        assert _ks(a, b) > 1e-3
    assert abs(np.asarray(m.weight[...]).std() - bound / np.sqrt(3)) < 0.01 * bound
    p, pt = np.asarray(m.P[...]), t.P.detach().numpy()
    assert p.shape == pt.shape == (2, 256, 16, 24)
    for axis, lim in enumerate((1, 2)):
        assert np.abs(p[axis]).max() == lim and np.abs(pt[axis]).max() == lim
        assert abs(np.mean(np.abs(p[axis]) == lim) - np.mean(np.abs(pt[axis]) == lim)) < 0.005
        assert abs(p[axis].std() - pt[axis].std()) < 0.01
        assert _ks(p[axis], pt[axis]) > 1e-3
    assert abs(np.mean(np.abs(p[0]) == 1) - 2 * stats.norm.sf(2)) < 0.005  # clamp at 2 sigma
    if version == "v0":
        assert m.SIG is None and t.SIG is None
    else:
        np.testing.assert_array_equal(np.asarray(m.SIG[...]), t.SIG.detach().numpy())


def test_clamp_matches_clamp_parameters():
    """clamp_positions, and the optax transform chained after an optimizer, equal torch's clamp_parameters."""
    torch.manual_seed(0)
    t = ref.Dcls2d(4, 4, 6, dilated_kernel_size=(5, 7), groups=4, version="v0")
    m = dcls_jax.Dcls2d(4, 4, 6, dilated_kernel_size=(5, 7), groups=4, version="v0", rngs=nnx.Rngs(0))
    big = np.random.default_rng(0).normal(0, 4, t.P.shape).astype(np.float32)
    with torch.no_grad():
        t.P.copy_(torch.from_numpy(big))
    t.clamp_parameters()

    m.P.set_value(jnp.asarray(big))
    dcls_jax.clamp_positions(m)
    np.testing.assert_array_equal(np.asarray(m.P[...]), t.P.detach().numpy())

    m.P.set_value(jnp.zeros_like(m.P[...]))
    w0 = m.weight[...]
    tx = optax.chain(optax.multi_transform({"default": optax.sgd(1.0), "positions": optax.sgd(2.0)},
                                           dcls_jax.position_labels),
                     dcls_jax.clamp_positions_transform(dcls_jax.position_bounds(m)))
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    grads = nnx.state(m, nnx.Param)
    grads = jax.tree.map(lambda v: -jnp.ones_like(v), grads)
    grads["P"].set_value(jnp.asarray(-big / 2))
    opt.update(m, grads)
    np.testing.assert_allclose(np.asarray(m.P[...]), t.P.detach().numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.weight[...]), np.asarray(w0) + 1.0)  # lr 1, unclamped
    labels = dcls_jax.position_labels(nnx.state(m, nnx.Param))
    assert labels["P"].get_value() == "positions" and labels["weight"].get_value() == "default"
    assert dcls_jax.position_bounds(m) == {("P",): (2, 3)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=6, groups=4), "in_channels"),
    (dict(out_channels=6, groups=4), "out_channels"),
    (dict(version="v2"), "version"),
    (dict(version="v1", SIG=nnx.Param(jnp.zeros((2, 4, 1, 3)))), "SIG"),
    (dict(version="v0", SIG=nnx.Param(jnp.zeros((2, 4, 1, 3)))), "SIG"),
    (dict(kernel_count=0), "kernel_count"),
    (dict(padding_mode="mirror"), "padding_mode"),
    (dict(P=nnx.Param(jnp.zeros((2, 4, 1, 5)))), "P must have shape"),
    (dict(dilated_kernel_size=(3, 3, 3)), "dilated_kernel_size"),
])
def test_bad_arguments(kwargs, match):
    args = dict(in_channels=4, out_channels=4, kernel_count=3, dilated_kernel_size=3, groups=4,
                version="gauss") | kwargs
    with pytest.raises(ValueError, match=match):
        dcls_jax.Dcls2d(**args, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape, match", [((4, 5, 5), "4-D"), ((1, 5, 5, 3), "input channels")])
def test_bad_input(shape, match):
    m = dcls_jax.Dcls2d(4, 4, 3, dilated_kernel_size=3, groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        m(jnp.zeros(shape))
