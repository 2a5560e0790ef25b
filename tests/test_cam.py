"""cam/: the study's Grad-CAM and Threshold-Grad-CAM against the same definitions written in PyTorch (hooks and
autograd on the same weights), the pytorch-grad-cam family against grad-cam 1.5.7 itself, saliency, resizing,
batching, jit, labels, degenerate maps and overlays.

Tolerance for maps: max |ours - ref| <= 1e-4 * max |ref| (fp32, highest matmul precision).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import cam
from models.layers import BatchNorm2d, Conv2d, Dropout, Linear, Sequential, global_avg_pool
from tests.torch_ref import randomize_batchnorm, to_nhwc, torch_activation_and_grad

RTOL = 1e-4


def assert_close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max()
    assert scale > 0, "reference is all zero: the comparison would prove nothing"
    err = np.abs(ours - ref).max()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol} * max |ref| {scale:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# The study's definitions, written independently in PyTorch (NCHW).


def torch_study_maps(a, g, size, threshold=0.3):
    alpha = g.mean(dim=(2, 3), keepdim=True)
    grad_cam = torch.relu((a * alpha).mean(dim=1))
    h = torch.relu(a * alpha).mean(dim=1)
    lo, hi = h.amin(dim=(1, 2), keepdim=True), h.amax(dim=(1, 2), keepdim=True)
    thr = torch.clamp_min((h - lo) / (hi - lo), threshold)

    def up(m):
        return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    return up(grad_cam), up(thr)


def check_study_parity(model, tmodel, tmodule, x, labels, layer=None):
    """Our grad_cam / threshold_grad_cam (input resolution) == the PyTorch study definitions."""
    a, g = torch_activation_and_grad(tmodel, tmodule, x, labels)
    ref_gc, ref_thr = torch_study_maps(a, g, tuple(x.shape[2:]))
    xj, yj = jnp.asarray(to_nhwc(x)), labels.numpy()
    gc = cam.grad_cam(model, xj, yj, layer=layer)
    thr = cam.threshold_grad_cam(model, xj, yj, layer=layer)
    assert gc.dtype == jnp.float32 and gc.shape == (x.shape[0], *x.shape[2:])
    assert not np.asarray(cam.is_degenerate(gc)).any()     # every image's map says something
    assert_close(gc, ref_gc)
    assert_close(thr, ref_thr)


# ----------------------------------------------------------------------------------------------------------------
# A toy model with the models' contract, and its PyTorch twin (same names, same PyTorch layouts).

class ToyStage(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.conv = Conv2d(cin, cout, 3, stride=2, padding=1, rngs=rngs)
        self.bn = BatchNorm2d(cout)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class Toy(nnx.Module):
    layer_names = ("stem", "stages.0", "stages.1")

    def __init__(self, num_classes=5, *, rngs):
        self.stem = Conv2d(3, 6, 3, padding=1, rngs=rngs)
        self.stages = Sequential([ToyStage(6, 8, rngs=rngs), ToyStage(8, 12, rngs=rngs)])
        self.drop = Dropout(0.5, rngs=rngs)     # train mode by default: CAM must switch it off
        self.fc = Linear(12, num_classes, rngs=rngs)

    def forward_features(self, x, layer=None):
        x = self.stem(x)
        for stage in list(self.stages)[:self.layer_names.index(layer or "stages.1")]:
            x = stage(x)
        return x

    def forward_head(self, a, layer=None, pre_logits=False):
        start = self.layer_names.index(layer or "stages.1")
        for stage in list(self.stages)[start:]:
            a = stage(a)
        a = self.drop(global_avg_pool(a))
        return a if pre_logits else self.fc(a)

    def __call__(self, x):
        return self.forward_head(self.forward_features(x))


class TorchToy(torch.nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.stages = torch.nn.Sequential(*[torch.nn.Sequential() for _ in range(2)])
        for stage, (cin, cout) in zip(self.stages, [(6, 8), (8, 12)]):
            stage.conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            stage.bn = torch.nn.BatchNorm2d(cout)
            stage.act = torch.nn.ReLU()
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(12, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.stages(self.stem(x)).mean(dim=(2, 3))))


def load_toy(tmodel):
    model = Toy(rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = [(k, jnp.asarray(sd[".".join(map(str, k))])) for k, _ in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(flat))
    return model


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    tmodel = randomize_batchnorm(TorchToy(), seed=1).eval()
    model = load_toy(tmodel)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 4, 3])
    with torch.no_grad():
        ref = tmodel(x).numpy()
    model.eval()
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(to_nhwc(x))), ref, atol=1e-5)
    model.train()   # cam must use an eval-mode copy whatever the model's mode
    return model, tmodel, x, labels


@pytest.mark.parametrize("layer", [None, "stages.0", "stem"])
def test_study_parity_toy(toy, layer):
    model, tmodel, x, labels = toy
    module = {None: tmodel.stages[1], "stages.1": tmodel.stages[1], "stages.0": tmodel.stages[0],
              "stem": tmodel.stem}[layer]
    check_study_parity(model, tmodel, module, x, labels, layer=layer)
    assert model.drop.deterministic is False    # the caller's model is left as it was


def test_saliency_parity_toy(toy):
    model, tmodel, x, labels = toy
    x = x.clone().requires_grad_(True)
    logits = tmodel(x)
    (g,) = torch.autograd.grad((logits * F.one_hot(labels, logits.shape[1])).sum(), x)
    ref = g.abs().amax(dim=1).numpy()
    assert_close(cam.METHODS["saliency"](model, jnp.asarray(to_nhwc(x)), labels.numpy()), ref)


@pytest.mark.parametrize("src, dst", [((7, 7), (224, 224)), ((3, 5), (10, 13)), ((8, 8), (256, 256))])
def test_resize_is_torch_bilinear(src, dst):
    import torchvision.transforms as T
    m = torch.from_numpy(np.random.default_rng(0).standard_normal((2, *src)).astype(np.float32))
    ours = cam.resize(jnp.asarray(m.numpy()), dst)
    assert_close(ours, F.interpolate(m[:, None], size=dst, mode="bilinear", align_corners=False)[:, 0], 1e-6)
    assert_close(ours, T.Resize(dst)(m[:, None])[:, 0], 1e-6)     # the study's call (antialias on, upsampling)


@pytest.mark.parametrize("method", cam.METHOD_NAMES)
def test_batch_jit_and_registry(toy, method):
    model, _, x, labels = toy
    xj, yj = jnp.asarray(to_nhwc(x)), labels.numpy()
    batch = cam.METHODS[method](model, xj, yj)
    assert batch.shape == (3, 16, 16) and batch.dtype == jnp.float32
    assert not np.asarray(cam.is_degenerate(batch)).any()
    singles = np.concatenate([cam.METHODS[method](model, xj[i:i + 1], yj[i:i + 1]) for i in range(3)])
    assert_close(batch, singles, 1e-5)
    graphdef, state = nnx.split(model)
    eager = cam.make_cam_fn(graphdef, method)(state, xj, yj)
    assert_close(batch, eager, 1e-5)


def test_bad_arguments(toy):
    model, _, x, labels = toy
    xj = jnp.asarray(to_nhwc(x))
    with pytest.raises(ValueError, match=r"labels out of range \[0, 5\): \[5\] at batch positions \[1\]"):
        cam.grad_cam(model, xj, [1, 5, 0])
    with pytest.raises(ValueError, match=r"out of range .*\[-1\]"):
        cam.METHODS["saliency"](model, xj, np.array([-1, 0, 0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        cam.threshold_grad_cam(model, xj, [1, 2])
    with pytest.raises(ValueError, match="labels must be integers"):
        cam.grad_cam(model, xj, np.array([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="unknown layer 'stages.2' for Toy; valid names: stem, stages.0, stages.1"):
        cam.grad_cam(model, xj, labels.numpy(), layer="stages.2")
    with pytest.raises(ValueError, match=r"unknown CAM method 'gradcam\+'; valid names: gradcam, threshold_gradcam"):
        cam.compute(model, xj, labels.numpy(), "gradcam+")
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
        cam.threshold_grad_cam(model, xj, labels.numpy(), threshold=1.5)
    # The pure function raises on concrete labels; under jit the bad row is NaN and flagged.
    graphdef, state = nnx.split(model)
    fn = cam.make_cam_fn(graphdef, "gradcam")
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        fn(state, xj, np.array([0, 7, 3]))
    maps = jax.jit(fn)(state, xj, jnp.array([0, 7, 3]))
    assert np.asarray(cam.is_degenerate(maps)).tolist() == [False, True, False]
    assert np.isnan(maps[1]).all() and np.isfinite(maps[np.array([0, 2])]).all()


def test_degenerate_policy(toy):
    model, _, x, labels = toy
    xj, yj = jnp.asarray(to_nhwc(x)), labels.numpy()
    # Class 0 with a zero classifier row: zero gradient, no evidence.
    silent = nnx.clone(model)
    silent.fc.weight[...] = silent.fc.weight[...].at[0].set(0.0)
    y0 = np.array([0, 4, 0])
    gc = np.asarray(cam.grad_cam(silent, xj, y0))
    thr = np.asarray(cam.threshold_grad_cam(silent, xj, y0, threshold=0.25))
    assert (gc[[0, 2]] == 0).all() and (thr[[0, 2]] == 0.25).all()
    assert np.asarray(cam.is_degenerate(gc)).tolist() == [True, False, True]
    assert np.asarray(cam.is_degenerate(thr)).tolist() == [True, False, True]
    # A NaN pixel makes that image's map NaN for every method; the other images are untouched.
    bad = xj.at[1, 3, 5, 0].set(jnp.nan)
    for method in cam.METHOD_NAMES:
        clean, maps = cam.METHODS[method](model, xj, yj), np.asarray(cam.METHODS[method](model, bad, yj))
        assert np.isnan(maps[1]).all(), method
        np.testing.assert_array_equal(maps[[0, 2]], np.asarray(clean)[[0, 2]], err_msg=method)
        assert np.asarray(cam.is_degenerate(maps)).tolist() == [False, True, False], method


def test_overlay(tmp_path):
    from PIL import Image
    import matplotlib
    lut = matplotlib.colormaps["jet"](np.arange(256))[:, :3]      # matplotlib's own table, at i / 255
    np.testing.assert_allclose(cam.overlay.jet(np.arange(256) / 255), lut, atol=1e-6)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    heat, human = rng.random((5, 6)).astype(np.float32), rng.random((20, 24))
    row = cam.overlay.save_overlay(tmp_path / "o.png", image, heat, human, gap=2)
    assert row.shape == (20, 3 * 24 + 2 * 2, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), row)
    np.testing.assert_array_equal(row[:, :24], image)
    assert (row[:, 24:26] == 255).all()
    expected = (0.5 * cam.overlay.jet((human - human.min()) / np.ptp(human)) + 0.5 * image / 255) * 255
    np.testing.assert_allclose(row[:, -24:], expected, atol=0.5 + 1e-9)    # rounding
    two = cam.overlay.save_overlay(tmp_path / "p.png", image.astype(np.float32) / 255, np.zeros((5, 6)))
    assert two.shape == (20, 2 * 24 + 4, 3)
    np.testing.assert_allclose(two[:, -24:], (0.5 * np.array([0, 0, 0.5]) + image / 510) * 255, atol=0.5 + 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Real models: timm references (one with DCLS) converted with models.convert, reduced in depth and width.

REAL = {
    "resnet50": dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=10),
    "convnext_tiny_dcls": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10),
}


def timm_reference(name):
    import timm
    from tests.torch_ref import dclsify, randomize_params
    torch.manual_seed(0)
    if name == "resnet50":
        tmodel = randomize_batchnorm(timm.create_model("resnet50", **REAL[name]), seed=1)
        return tmodel.eval(), tmodel.layer4
    tmodel = timm.create_model("convnext_tiny", **REAL[name])
    dclsify([[(block, "conv_dw") for block in stage.blocks] for stage in tmodel.stages],
            kernel_count=34, dilated_kernel_size=17, version="v0")
    randomize_params(tmodel, ("gamma",), seed=1)          # layer scales start at 1e-6
    randomize_params(tmodel, ("P",), seed=2, scale=4.0)   # positions spread over the 17 x 17 grid
    with torch.no_grad():
        for n, p in tmodel.named_parameters():
            if n.endswith(".P"):
                p.clamp_(-8, 8)
    return tmodel.eval(), tmodel.stages[3]


@pytest.fixture(scope="module", params=list(REAL))
def real(request):
    from models.convert import from_state_dict
    name = request.param
    tmodel, tmodule = timm_reference(name)
    model = from_state_dict(name, {k: v.numpy() for k, v in tmodel.state_dict().items()}, **REAL[name])
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = tmodel(x).argmax(1)     # the top class: its Grad-CAM is rarely all zero
    return name, model, tmodel, tmodule, x, labels


def test_study_parity_real(real):
    name, model, tmodel, tmodule, x, labels = real
    check_study_parity(model, tmodel, tmodule, x, labels)


PGC = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
       "layercam": "LayerCAM", "eigencam": "EigenCAM"}


def run_pgc(method, tmodel, tmodule, x, labels):
    """pytorch-grad-cam's final maps, and its raw per-layer map (`get_cam_image`, before clipping and scaling)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    c = getattr(pytorch_grad_cam, PGC[method])(model=tmodel, target_layers=[tmodule])
    try:
        targets = [ClassifierOutputTarget(int(y)) for y in labels]
        out = c(input_tensor=x, targets=targets)
        acts = c.activations_and_grads.activations[0].numpy()
        grads = c.activations_and_grads.gradients[0].numpy() if c.uses_gradients else None
        raw = c.get_cam_image(x, tmodule, targets, acts, grads, False)
    finally:
        c.activations_and_grads.release()
    return out, raw, acts


def check_pytorch_grad_cam(model, tmodel, tmodule, x, labels):
    """Our maps == grad-cam 1.5.7 after its conventions: its GradCAM sums channels (C x ours); every map is
    clipped at 0, min-max scaled with a 1e-7 guard, cv2-resized and scaled again (applied here to our
    feature-resolution maps with its own scale_cam_image); EigenCAM's SVD sign is fixed by the Seg-Eigen-CAM rule."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
    xj, yj = jnp.asarray(to_nhwc(x)), labels.numpy()
    for method in PGC:
        out, raw, acts = run_pgc(method, tmodel, tmodule, x, labels)
        ours = np.asarray(cam.METHODS[method](model, xj, yj, output_size=acts.shape[2:]))
        if method == "gradcam":
            ours = ours * acts.shape[1]
        ref = np.maximum(get_2d_projection_with_sign_correction(acts) if method == "eigencam" else raw, 0)
        assert_close(ours, ref)
        if method != "eigencam":     # its final map depends on LAPACK's sign choice
            assert_close(scale_cam_image(scale_cam_image(ours, x.shape[:1:-1])), out)


def test_pytorch_grad_cam_toy(toy):
    model, tmodel, x, labels = toy
    check_pytorch_grad_cam(model, tmodel, tmodel.stages[1], x, labels)


def test_pytorch_grad_cam_real(real):
    _, model, tmodel, tmodule, x, labels = real
    check_pytorch_grad_cam(model, tmodel, tmodule, x, labels)
