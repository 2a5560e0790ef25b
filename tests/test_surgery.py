"""dcls_jax.replace_convs / to_dense: on a user-defined nnx.Conv CNN (against a hand-built DCLS twin) and on the
registry's ConvNeXt-T (against convnext_tiny_dcls and convnext_tiny_dcls_gauss, built by the registry's own
factories): same graph, parameter tree and outputs; the dense export reproduces the DCLS outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dcls_jax
from models.layers import Conv2d
from models.registry import create_model

SMALL = dict(depths=(2, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)


class Block(nnx.Module):
    def __init__(self, c, dw, *, rngs):
        self.dw = dw(c, rngs=rngs)
        self.pw = nnx.Conv(c, c, (1, 1), rngs=rngs)

    def __call__(self, x):
        return x + self.pw(nnx.gelu(self.dw(x)))


class Net(nnx.Module):
    """A user's CNN: nnx.Conv stem, two stages of depthwise 7x7 blocks, a depthwise 3x3 that stays, a head."""

    def __init__(self, dw, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.stage1 = nnx.List([Block(8, dw, rngs=rngs) for _ in range(2)])
        self.down = nnx.Conv(8, 16, (2, 2), strides=2, padding="VALID", rngs=rngs)
        self.small_dw = nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=rngs)
        self.stage2 = nnx.List([Block(16, dw, rngs=rngs) for _ in range(3)])
        self.head = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for b in self.stage1:
            x = b(x)
        x = self.small_dw(self.down(x))
        for b in self.stage2:
            x = b(x)
        return self.head(x.mean((1, 2)))


def plain_dw(c, *, rngs):
    return nnx.Conv(c, c, (7, 7), feature_group_count=c, rngs=rngs)


def twin_dw():
    """The DCLS twin, written by hand: Dcls2d gauss 9 / 5 / padding 4, P and SIG owned by each stage's first."""
    first = {}

    def build(c, *, rngs):
        shared = {"P": first[c].P, "SIG": first[c].SIG} if c in first else {}
        layer = dcls_jax.Dcls2d(c, c, 5, padding=4, dilated_kernel_size=9, groups=c, version="gauss", rngs=rngs,
                                **shared)
        first.setdefault(c, layer)
        return layer
    return build


def _flat(model):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def run(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, x))


def _randomize(model, seed=0):
    """Every parameter random (biases, SIG and P too, so that no part of the comparison is trivial)."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = v.get_value().shape
        v.set_value(jnp.asarray(rng.normal(0, 0.5, shape).astype(np.float32)))


def test_user_cnn_equals_hand_built_twin_and_exports():
    net = Net(plain_dw, rngs=nnx.Rngs(0))
    before = _flat(net)
    out = dcls_jax.replace_convs(net, dcls_jax.depthwise(min_kernel=7), kernel_count=5, dilated_kernel_size=9,
                                 version="gauss", share=lambda p: p.split(".")[0], rngs=nnx.Rngs(1))
    assert _flat(net).keys() == before.keys() and isinstance(net.stage1[0].dw, nnx.Conv)   # input untouched
    twin = Net(twin_dw(), rngs=nnx.Rngs(2))
    assert nnx.graphdef(out) == nnx.graphdef(twin)                  # same modules, attributes and sharing
    flat, flat_twin = _flat(out), _flat(twin)
    assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in flat_twin.items()}
    for k, v in before.items():                                     # every other weight kept
        if ".dw." not in k or k.startswith("small_dw"):
            np.testing.assert_array_equal(flat[k], v, err_msg=k)
    assert out.stage1[1].dw.P is out.stage1[0].dw.P and out.stage1[1].dw.SIG is out.stage1[0].dw.SIG
    assert out.stage2[2].dw.P is out.stage2[0].dw.P and out.stage2[0].dw.P is not out.stage1[0].dw.P
    assert isinstance(out.small_dw, nnx.Conv)

    _randomize(twin)
    nnx.update(out, nnx.state(twin))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32))
    y = run(out, x)
    np.testing.assert_array_equal(y, run(twin, x))
    dense = dcls_jax.to_dense(out)
    assert isinstance(dense.stage2[1].dw, nnx.Conv) and dense.stage2[1].dw.kernel.shape == (9, 9, 1, 16)
    assert isinstance(out.stage2[1].dw, dcls_jax.Dcls2d)            # to_dense works on a copy
    np.testing.assert_allclose(run(dense, x), y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


@pytest.mark.parametrize("kw", [dict(stride=2, padding="SAME"), dict(padding=((1, 3), (2, 0)), groups=2),
                                dict(stride=(1, 2), padding="VALID", version="v0")])
def test_dense_export_of_one_layer(kw):
    kw = dict(dict(groups=4, version="v1"), **kw)
    layer = dcls_jax.Dcls2d(4, 8, 4, dilated_kernel_size=(5, 5), rngs=nnx.Rngs(0), **kw)
    _randomize(layer, seed=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 10, 4)).astype(np.float32))
    y = run(layer, x)
    conv = dcls_jax.to_dense(layer)
    assert isinstance(conv, nnx.Conv)
    np.testing.assert_allclose(run(conv, x), y, rtol=0, atol=1e-5 * np.abs(y).max())


def _random_model(name, seed):
    model = nnx.eval_shape(lambda: create_model(name, **SMALL))   # no init compute: every Param set below
    _randomize(model, seed)
    return model


@pytest.mark.parametrize("make, shape", [
    (lambda: dcls_jax.Dcls2dK1d(4, 4, 3, padding="SAME", dilated_kernel_size=7, flat_dim=1, version="gauss",
                                rngs=nnx.Rngs(0)), (2, 6, 9, 4)),
    (lambda: dcls_jax.Dcls3_1d(2, 4, 2, stride=(1, 1, 2), padding=(1, 0, 3), dense_kernel_size=(3, 2),
                               dilated_kernel_size=7, version="max", rngs=nnx.Rngs(0)), (2, 4, 5, 9, 2)),
])
def test_dense_export_of_the_n_md_layers(make, shape):
    layer = make()
    _randomize(layer, seed=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    y = run(layer, x)
    conv = dcls_jax.to_dense(layer)
    assert conv.kernel.shape == (*layer.kernel_size, layer.in_channels // layer.groups, layer.out_channels)
    np.testing.assert_allclose(run(conv, x), y, rtol=0, atol=1e-5 * np.abs(y).max())


@pytest.fixture(scope="module")
def convnext_tiny():
    return _random_model("convnext_tiny", 5)


@pytest.mark.parametrize("name, version, count, size", [("convnext_tiny_dcls", "v0", 34, 17),
                                                         ("convnext_tiny_dcls_gauss", "gauss", 26, 23)])
def test_convnext_tiny_becomes_the_registry_dcls_model(convnext_tiny, name, version, count, size):
    out = dcls_jax.replace_convs(convnext_tiny, dcls_jax.depthwise(min_kernel=7), kernel_count=count,
                                 dilated_kernel_size=size, version=version,
                                 share=lambda path: path.split(".blocks.")[0])
    ref = _random_model(name, 6)
    for part in ("stem", "stages", "head"):   # (the model's `config` record keeps the plain model's kernel_count)
        assert nnx.graphdef(getattr(out, part)) == nnx.graphdef(getattr(ref, part)), part
    flat, flat_ref = _flat(out), _flat(ref)
    assert [(k, v.shape) for k, v in flat.items()] == [(k, v.shape) for k, v in flat_ref.items()]
    plain = _flat(convnext_tiny)
    for k, v in flat.items():
        if ".conv_dw." not in k:
            np.testing.assert_array_equal(v, plain[k], err_msg=k)
    nnx.update(out, nnx.state(ref))
    ref.eval()
    out.eval()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32))
    y = run(ref, x)
    np.testing.assert_array_equal(run(out, x), y)

    if version == "gauss":
        return   # the export is checked once (v0): it does not depend on the version
    # dense export into the models' own PyTorch-layout Conv2d
    def conv2d(layer, kernel, bias):
        c = nnx.eval_shape(lambda: Conv2d(layer.in_channels, layer.out_channels, kernel.shape[2:],
                                          stride=layer.stride, padding=layer.padding, groups=layer.groups,
                                          rngs=nnx.Rngs(0)))
        c.weight.set_value(kernel)
        c.bias.set_value(bias)
        return c
    dense = dcls_jax.to_dense(out, factory=conv2d)
    assert dense.stages[2].blocks[1].conv_dw.weight.shape == (24, 1, size, size)
    np.testing.assert_allclose(run(dense, x), y, rtol=0, atol=1e-5 * np.abs(y).max())


def test_errors():
    net = Net(plain_dw, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no convolution"):
        dcls_jax.replace_convs(net, dcls_jax.depthwise(min_kernel=9), kernel_count=3, dilated_kernel_size=9)
    # one share group across stages of different widths
    with pytest.raises(ValueError, match="stage2.0.dw .*P must have shape"):
        dcls_jax.replace_convs(net, dcls_jax.depthwise(7), kernel_count=3, dilated_kernel_size=9,
                               share=lambda p: "all")
    shared = nnx.Conv(8, 8, (7, 7), feature_group_count=8, rngs=nnx.Rngs(0))
    net.stage1[1].dw = shared
    net.extra = shared
    with pytest.raises(ValueError, match="also reachable"):
        dcls_jax.replace_convs(net, dcls_jax.depthwise(7), kernel_count=3, dilated_kernel_size=9)
    with pytest.raises(ValueError, match="no DCLS layer"):
        dcls_jax.to_dense(Net(plain_dw, rngs=nnx.Rngs(0)))


def test_1d_and_3d_convs_become_dcls1d_and_dcls3d():
    """An audio-style 1-D model and a video-style 3-D one: the layer class follows the kernel's rank; the output
    shapes stay those of the original (padding d // 2 at stride 1, the conv's stride kept)."""
    rngs = nnx.Rngs(0)
    audio = nnx.Sequential(nnx.Conv(2, 6, (9,), feature_group_count=2, strides=2, rngs=rngs),
                           nnx.Conv(6, 6, (3,), rngs=rngs))
    video = nnx.Sequential(nnx.Conv(3, 3, (3, 7, 7), feature_group_count=3, rngs=rngs))
    for model, shape, cls in ((audio, (2, 20, 2), dcls_jax.Dcls1d), (video, (1, 4, 9, 9, 3), dcls_jax.Dcls3d)):
        out = dcls_jax.replace_convs(model, dcls_jax.depthwise(min_kernel=3), kernel_count=4,
                                     dilated_kernel_size=11, version="v1")
        assert isinstance(out.layers[0], cls) and out.layers[0].groups == model.layers[0].feature_group_count
        x = jax.ShapeDtypeStruct(shape, jnp.float32)   # shapes only: no compile
        assert nnx.eval_shape(lambda m, x: m(x), out, x).shape == nnx.eval_shape(lambda m, x: m(x), model, x).shape
    assert isinstance(out.layers[0], dcls_jax.Dcls3d) and out.layers[0].dilated_kernel_size == (11, 11, 11)
    assert isinstance(dcls_jax.replace_convs(audio, lambda i: i.nd == 1 and i.groups == 1, kernel_count=2,
                                             dilated_kernel_size=5).layers[1], dcls_jax.Dcls1d)
