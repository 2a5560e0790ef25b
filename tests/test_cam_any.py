"""CAM on any Flax NNX model (cam.capture): a user-defined CNN, a small ViT-style token model and the 16 registry
models, at layers named by attribute path or given as modules.

References: the activations A and gradients G = dS/dA computed by hand (the forward pass split by hand at the
target, jax.grad of the score through the second half) and the CAM definitions written out in numpy; for the
torch-backed families the PyTorch model with a forward hook and autograd (tests/torch_ref.py) at the same layer.
Also: the top-prediction default, per-example labels, callable targets, jit / vmap / jax.grad through the CAM,
and the caller's model (train mode, BatchNorm statistics) left as it was.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cam
from cam import capture

RTOL = 1e-4


def assert_close(ours, ref, rtol=RTOL, what=""):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = np.abs(ref).max()
    assert scale > 0, f"{what}: reference is all zero: the comparison would prove nothing"
    err = np.abs(ours - ref).max()
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} > {rtol} * max |ref| {scale:.3g}"


def hand_grad(rest, a, target):
    """G = d S / d a for S = sum_b score_b(rest(a)), the target as labels (B,), None (top class) or a callable."""
    def score(a):
        logits = rest(a)
        if target is None:
            return jnp.take_along_axis(logits, jnp.argmax(jax.lax.stop_gradient(logits), -1)[:, None], 1).sum()
        if callable(target):
            return target(logits).sum()
        return jnp.take_along_axis(logits, jnp.asarray(target)[:, None], 1).sum()
    return jax.grad(score)(a)


def numpy_gradcam(a, g):
    """The study's Grad-CAM at feature resolution, numpy (NHWC)."""
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    return np.maximum((a * g.mean(axis=(1, 2), keepdims=True)).mean(-1), 0)


def eval_clone(model):
    m = nnx.clone(model)
    m.eval()
    return m


# ----------------------------------------------------------------------------------------------------------------
# A user-defined CNN: flax.nnx layers, a list of blocks, a function attribute, no forward_features.


class Block(nnx.Module):
    def __init__(self, cin, cout, stride, *, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, rngs=rngs)
        self.act = jax.nn.relu

    def __call__(self, x):
        return self.act(self.bn(self.conv(x)))


class SmallCNN(nnx.Module):
    def __init__(self, num_classes=5, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.blocks = nnx.List([Block(8, 12, 2, rngs=rngs), Block(12, 16, 2, rngs=rngs)])
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(self.drop(x.mean(axis=(1, 2))))


def cnn_split(m, x, layer):
    """The forward pass of an eval-mode SmallCNN split by hand at `layer`: (A, rest) with rest(A) = logits."""
    h = jax.nn.relu(m.stem(x))
    b0, b1 = m.blocks
    head = lambda h: m.fc(m.drop(h.mean(axis=(1, 2))))   # noqa: E731
    if layer in ("blocks.0", "blocks.0.act"):
        return b0(h), lambda a: head(b1(a))
    if layer == "blocks.1.bn":
        return b1.bn(b1.conv(b0(h))), lambda a: head(b1.act(a))
    if layer == "stem":
        return m.stem(x), lambda a: head(b1(b0(jax.nn.relu(a))))
    raise KeyError(layer)


@pytest.fixture(scope="module")
def cnn():
    model = SmallCNN(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for block in model.blocks:   # non-trivial running statistics: eval and train mode differ
        n = block.bn.mean.shape[0]
        block.bn.mean[...] = jnp.asarray(rng.standard_normal(n) * 0.3, jnp.float32)
        block.bn.var[...] = jnp.asarray(rng.random(n) + 0.5, jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
    labels = np.array([0, 4, 2])
    return model, x, labels       # the model stays in train mode (nnx default): CAM must use an eval-mode copy


def assert_train_mode(model):
    assert model.drop.deterministic is False
    assert all(b.bn.use_running_average is False for b in model.blocks)


@pytest.mark.parametrize("layer", ["blocks.1.bn", "blocks.0.act", "stem", "module"])
def test_cnn_named_layer_is_hand_split(cnn, layer):
    model, x, labels = cnn
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    target = model.blocks[0] if layer == "module" else layer           # a submodule given as the target
    a, g, ok = cam.activations_and_grads(model, x, labels, layer=target)
    ref_a, rest = cnn_split(eval_clone(model), x, "blocks.0" if layer == "module" else layer)
    ref_g = hand_grad(rest, ref_a, labels)
    assert a.dtype == jnp.float32 and np.asarray(ok).all()
    assert_close(a, ref_a, 1e-6, "A")
    assert_close(g, ref_g, RTOL, "G")
    maps = cam.grad_cam(model, x, labels, layer=target, output_size=a.shape[1:3])
    assert_close(maps, numpy_gradcam(ref_a, ref_g), RTOL, "gradcam")
    assert_train_mode(model)
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def test_cnn_targets(cnn):
    """Per-example labels, the top prediction (labels=None) and a callable score, against jax.grad by hand."""
    model, x, labels = cnn
    layer = "blocks.1.bn"
    ref_a, rest = cnn_split(eval_clone(model), x, layer)
    top = np.asarray(jnp.argmax(rest(ref_a), -1))
    other = np.array([(t + 1) % 5 for t in top])       # per-example labels different from the top class
    contrast = lambda z: z[:, 1] - jax.nn.logsumexp(z, axis=-1)   # noqa: E731  log-probability of class 1
    for target, ref_target in [(None, top), (other, other), (contrast, contrast)]:
        for method in ("gradcam", "layercam"):
            maps = cam.METHODS[method](model, x, target, layer=layer, output_size=ref_a.shape[1:3])
            ref_g = hand_grad(rest, ref_a, ref_target)
            ref = numpy_gradcam(ref_a, ref_g) if method == "gradcam" else np.maximum(
                (np.maximum(np.asarray(ref_g, np.float64), 0) * np.asarray(ref_a, np.float64)).sum(-1), 0)
            assert_close(maps, ref, RTOL, f"{method} {target}")
    # None really is the top prediction, and a different label gives a different map.
    none = np.asarray(cam.grad_cam(model, x, None, layer=layer))
    np.testing.assert_array_equal(none, np.asarray(cam.grad_cam(model, x, top, layer=layer)))
    assert not np.allclose(none, np.asarray(cam.grad_cam(model, x, other, layer=layer)))
    assert_train_mode(model)


def test_cnn_jit_vmap_grad(cnn):
    model, x, labels = cnn
    layer = "blocks.1.bn"
    graphdef, params, rest_state = nnx.split(model, nnx.Param, ...)
    fn = cam.make_cam_fn(graphdef, "gradcam", layer=layer, output_size=(4, 4))     # the layer's resolution
    f = jax.jit(lambda p, x, y: fn(nnx.merge_state(p, rest_state), x, y))
    y = jnp.asarray(labels)
    batch = f(params, x, y)
    np.testing.assert_allclose(batch, cam.grad_cam(model, x, labels, layer=layer, output_size=(4, 4)), rtol=1e-6,
                               atol=1e-7)
    singles = jax.vmap(lambda xi, yi: f(params, xi[None], yi[None])[0])(x, y)
    np.testing.assert_allclose(singles, batch, rtol=1e-5, atol=1e-7)
    state = nnx.merge_state(params, rest_state)
    raw = jax.vmap(lambda xi, yi: fn(state, xi[None], yi[None])[0])(x, y)     # vmap without jit: batch tracers
    np.testing.assert_allclose(raw, batch, rtol=1e-5, atol=1e-7)
    none = jax.jit(lambda p, x: fn(nnx.merge_state(p, rest_state), x))(params, x)    # top prediction, traced

    # jax.grad through the CAM into the weights, against the same CAM written by hand.
    def hand_cam(p):
        m = nnx.merge(graphdef, p, rest_state)
        m.eval()
        a, rest = cnn_split(m, x, layer)
        g = hand_grad(rest, a, y)
        return jax.nn.relu((a * g.mean(axis=(1, 2), keepdims=True)).mean(-1)).sum()

    grads = jax.jit(jax.grad(lambda p: f(p, x, y).sum()))(params)
    ref = jax.jit(jax.grad(hand_cam))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(v).all() for v in leaves)
    assert np.abs(np.asarray(grads["blocks"][0]["conv"]["kernel"][...])).max() > 0     # reaches early layers
    assert np.abs(np.asarray(grads["fc"]["kernel"][...])).max() > 0
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref)):
        ours, theirs = np.asarray(ours.get_value()), np.asarray(theirs.get_value())
        if np.abs(theirs).max() > 0:
            assert_close(ours, theirs, 1e-3, str(path))
        else:
            assert np.abs(ours).max() == 0, path
    assert np.isfinite(none).all()
    assert_train_mode(model)


class Twice(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.act = jax.nn.relu
        self.fc = nnx.Linear(4, 3, rngs=rngs)
        self.size = (3, 3)

    def __call__(self, x):
        return self.fc(self.act(self.act(self.conv(x))).mean(axis=(1, 2)))


def test_errors(cnn):
    model, x, labels = cnn
    with pytest.raises(ValueError, match=r"SmallCNN has no default CAM target .*submodule paths: .*blocks\.0\.bn"):
        cam.grad_cam(model, x, labels)
    with pytest.raises(ValueError, match=r"unknown layer 'blocks.2.bn' for SmallCNN: blocks has no '2'"):
        cam.grad_cam(model, x, labels, layer="blocks.2.bn")
    with pytest.raises(ValueError, match=r"unknown layer 'blocks..bn'|dotted attribute path"):
        cam.grad_cam(model, x, labels, layer="blocks..bn")
    with pytest.raises(ValueError, match=r"labels out of range \[0, 5\): \[9\]"):
        cam.grad_cam(model, x, [0, 9, 1], layer="stem")
    with pytest.raises(ValueError, match="is not a submodule of SmallCNN"):
        cam.grad_cam(model, x, labels, layer=Block(3, 3, 1, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="path string"):
        cam.make_cam_fn(nnx.graphdef(model), "gradcam", layer=model.stem)
    with pytest.raises(ValueError, match="one score per image"):
        cam.grad_cam(model, x, lambda z: z[:, :2], layer="stem")
    twice = Twice(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer 'act' was called 2 times"):
        cam.grad_cam(twice, x, layer="act")
    with pytest.raises(ValueError, match="is a tuple, not a callable"):
        cam.grad_cam(twice, x, layer="size")
    assert_close(cam.grad_cam(twice, x, None, layer="conv"), cam.grad_cam(twice, x, None, layer=twice.conv), 0)


# ----------------------------------------------------------------------------------------------------------------
# A small ViT-style model: patch tokens after a class token, transformer blocks, the class token classified.


class ViTBlock(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def mix(self, t, a):
        """The block after norm1: a = norm1(t)."""
        t = t + self.attn(a)
        return t + self.fc2(jax.nn.gelu(self.fc1(self.norm2(t))))

    def __call__(self, t):
        return self.mix(t, self.norm1(t))


class TinyViT(nnx.Module):
    def __init__(self, dim=16, patch=4, num_classes=5, *, rngs):
        self.patch_embed = nnx.Conv(3, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
        self.blocks = nnx.List([ViTBlock(dim, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def embed(self, x):
        t = self.patch_embed(x)
        t = t.reshape(t.shape[0], -1, t.shape[-1])
        return jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (t.shape[0], 1, t.shape[-1])), t], axis=1)

    def __call__(self, x):
        t = self.embed(x)
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t)[:, 0])


@pytest.fixture(scope="module")
def vit():
    model = TinyViT(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 24, 3)), jnp.float32)   # a 4 x 6 grid
    return model, x, np.array([1, 3])


def test_vit_tokens_are_hand_split(vit):
    """pytorch-grad-cam's ViT recipe (target blocks[-1].norm1, class token dropped, tokens reshaped to the grid)."""
    model, x, labels = vit
    m = eval_clone(model)
    t1 = m.blocks[0](m.embed(x))
    b = m.blocks[1]
    ref_a = b.norm1(t1)
    ref_g = hand_grad(lambda a: m.head(m.norm(b.mix(t1, a))[:, 0]), ref_a, labels)
    grid = lambda t: t[:, 1:].reshape(t.shape[0], 4, 6, t.shape[-1])   # noqa: E731
    for reshape in (None, (4, 6), grid):      # inferred from 25 tokens and the 16 x 24 input; given; a callable
        a, g, ok = cam.activations_and_grads(model, x, labels, layer="blocks.1.norm1", reshape=reshape)
        assert a.shape == (2, 4, 6, 16)
        assert_close(a, grid(ref_a), 1e-6, f"A {reshape}")
        assert_close(g, grid(ref_g), RTOL, f"G {reshape}")
    maps = cam.grad_cam(model, x, labels, layer="blocks.1.norm1", output_size=(4, 6))
    assert_close(maps, numpy_gradcam(grid(ref_a), grid(ref_g)), RTOL, "gradcam")
    assert cam.grad_cam(model, x, labels, layer="blocks.1.norm1").shape == (2, 16, 24)
    with pytest.raises(ValueError, match=r"reshape=\(5, 6\) needs 30 tokens, the target has 25"):
        cam.grad_cam(model, x, labels, layer="blocks.1.norm1", reshape=(5, 6))
    with pytest.raises(ValueError, match=r"NHWC maps \(B, h, w, C\) or token sequences"):
        cam.grad_cam(model, x, labels, layer="head")


def test_token_grid_inference():
    t = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
    np.testing.assert_array_equal(capture.to_nhwc(t, None, (32, 32)), t[:, 1:].reshape(2, 4, 4, 3))   # class token
    np.testing.assert_array_equal(capture.to_nhwc(t[:, 1:], None, (8, 8)), t[:, 1:].reshape(2, 4, 4, 3))
    np.testing.assert_array_equal(capture.to_nhwc(t[:, :13], None, (12, 16)), t[:, 1:13].reshape(2, 3, 4, 3))
    np.testing.assert_array_equal(capture.to_nhwc(t, (2, 4), (8, 8)), t[:, 9:].reshape(2, 2, 4, 3))  # prefix dropped
    with pytest.raises(ValueError, match="cannot infer the token grid of 23 tokens for 16x24"):
        capture.to_nhwc(jnp.zeros((1, 23, 3)), None, (16, 24))
    with pytest.raises(ValueError, match="NHWC maps"):
        capture.to_nhwc(jnp.zeros((1, 3)), None, (16, 24))


# ----------------------------------------------------------------------------------------------------------------
# The 16 registry models (tiny variants): an inner layer of the last stage named by path, through cam.capture,
# against the forward pass split by hand. (The study targets themselves take the models' own cut, tested against
# PyTorch in test_cam.py.)

TINY = {"resnet": dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=10),
        "convnext": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10),
        "metaformer": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), num_classes=10),
        "fastvit": dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_classes=10)}


def inner_split(family, m, x):
    """(path, A, rest): an inner layer of the last stage, and the rest of the forward pass written out by hand."""
    if family == "resnet":     # the projection shortcut of layer4's block: a side branch, not a prefix
        blk = m.layer4[0]
        h = m.forward_features(x, "layer3")
        main = blk.drop_path(blk.bn3(blk.conv3(jax.nn.relu(blk.bn2(blk.conv2(jax.nn.relu(blk.bn1(blk.conv1(h)))))))))
        return "layer4.0.downsample", blk.downsample(h), lambda a: m.forward_head(jax.nn.relu(main + a), "layer4")
    stage = m.stages[3]
    a = stage.downsample(m.forward_features(x, "stages.2"))
    if family == "fastvit":
        return "stages.3.downsample", a, lambda a: m.forward_head(stage.blocks(stage.pos_emb(a)), "stages.3")
    return "stages.3.downsample", a, lambda a: m.forward_head(stage.blocks(a), "stages.3")


@pytest.mark.parametrize("name", [n for n in sorted(__import__("models").list_models()) if not n.startswith("test_")])
def test_registry_named_layers(name):
    import models
    entry = models.get_entry(name)
    model = models.create_model(name, **TINY[entry.family])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    labels = jnp.array([3, 7])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        m.eval()
        path, inner_a, inner_rest = inner_split(entry.family, m, x)
        return capture.capture(m, x, labels, layer=path)[:2], (inner_a, hand_grad(inner_rest, inner_a, labels))

    (a, g), (ref_a, ref_g) = run(state)
    assert_close(a, ref_a, 1e-6, f"{name} A")
    assert_close(g, ref_g, RTOL, f"{name} G")
    # The study's target stays the default: layer=None takes the models' own cut at entry.target_layer.
    assert cam.methods.check_layer(model, None) is None and model.target_layer == entry.target_layer


# ----------------------------------------------------------------------------------------------------------------
# Torch-backed families at a named inner layer, against PyTorch (forward hook + autograd on the same weights).

def converted_pair(name):
    """(timm reference in eval mode, our converted model) with random non-trivial weights, reduced in size."""
    from models.convert import from_state_dict
    if name in ("resnet50", "convnext_tiny_dcls"):
        from tests.test_cam import REAL, timm_reference
        tmodel, _ = timm_reference(name)
        overrides = REAL[name]
    elif name == "caformer_s18":
        from tests.test_metaformer import timm_model
        overrides = dict(depths=(1, 1, 1, 1))
        tmodel = timm_model(name, **overrides)
    else:
        from tests.test_fastvit import SMALL, reference
        overrides = SMALL
        tmodel = reference(name, **overrides)
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    return tmodel.eval(), from_state_dict(name, sd, **overrides)


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny_dcls", "caformer_s18", "fastvit_sa24_dcls"])
def test_torch_parity_named_layer(name):
    """Grad-CAM / Threshold-Grad-CAM at an inner layer named by path (not one of the models' cut points) against
    the same definitions in PyTorch, a forward hook on the same module of the timm model."""
    import torch

    from tests.test_cam import check_study_parity
    path = {"resnet50": "layer4.0.downsample", "caformer_s18": "stages.1.downsample"}.get(name, "stages.3.downsample")
    tmodel, model = converted_pair(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = tmodel(x).argmax(1)
    assert path not in model.layer_names
    check_study_parity(model, tmodel, tmodel.get_submodule(path), x, labels, layer=path)
