"""The harmonization objective (cam/harmonization.py), its ClickMe training input and its train.py integration.

- The loss against a numpy transcription of serre-lab/Harmonization's definitions (training/loss.py, pyramid.py):
  pyramid, standardize_cut, token weighting, masking of constant (zero) human maps; and against a golden file
  made once by the reference's own TensorFlow code (tests/golden/make_harmonization_golden.py): pyramid levels,
  pyramidal MSE, and the gradients `harmonizer_loss` returns for its own test model (max pool -> dense).
- The alignment term's gradient reaches every kind of weight of a (tiny) DCLS ConvNeXt and a CAFormer.
- train.py on fixture ClickMe shards with a planted signal (the class is told by a coloured patch, where the human
  map points, and by a global tint, a shortcut): harmonization raises the Grad-CAM alignment of held-out images,
  cross-entropy alone does not; a run stopped and resumed is bit-identical; the exported model loads in
  evaluate.py.
"""
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

import models
import train
from cam import harmonization as H
from cam import metrics
from data.tfrecord import write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "harmonization.npz")


# ------------------------------------------------------------------------------------------------------------
# numpy transcription of the reference (float64), written from loss.py / pyramid.py


def np_standardize_cut(m, eps=1e-5):
    m = np.asarray(m, np.float64)
    mean = m.mean((1, 2), keepdims=True)
    std = np.sqrt(np.square(m - mean).mean((1, 2), keepdims=True))
    return np.maximum((m - mean) / (std + eps), 0)


def np_downsample(m):
    """tf.nn.conv2d(strides 2, 'SAME') with outer((1, 4, 6, 4, 1)) / 256, as explicit padding and sums."""
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    b, h, w = m.shape
    oh, ow = -(-h // 2), -(-w // 2)
    ph, pw = max(2 * (oh - 1) + 5 - h, 0), max(2 * (ow - 1) + 5 - w, 0)
    p = np.pad(m, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    out = np.zeros((b, oh, ow))
    for i in range(5):
        for j in range(5):
            out += k[i, j] * p[:, i:i + 2 * oh:2, j:j + 2 * ow:2]
    return out


def np_pyramidal_mse(a, b, tokens, levels=5):
    a, b, t = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(tokens, np.float64)
    losses = []
    for _ in range(levels):
        losses.append(np.mean(np.square(a - b) * t[:, None, None]))
        a, b = np_downsample(a), np_downsample(b)
    return np.mean(losses)


def np_alignment(saliency, human, tokens=None):
    if tokens is None:   # constant human maps (no clicks) masked
        flat = human.reshape(len(human), -1)
        tokens = (flat.max(1) > flat.min(1)).astype(np.float64)
    s, h = np_standardize_cut(saliency), np_standardize_cut(human)
    h = h / (h.max((1, 2), keepdims=True) + 1e-6) * (s.max((1, 2), keepdims=True) + 1e-6)
    return np_pyramidal_mse(s, h, tokens)


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(1)
    for shape in ((3, 224, 224), (4, 37, 50)):      # the ClickMe size, and odd sizes (asymmetric SAME padding)
        sal = rng.normal(0, 1, shape).astype(np.float32)
        human = rng.uniform(0, 1, shape).astype(np.float32) ** 3
        human[1] = 0.0                                # a map without clicks
        np.testing.assert_allclose(np.asarray(H.standardize_cut(sal)), np_standardize_cut(sal), rtol=1e-5, atol=1e-5)
        levels = H.pyramid(sal, 5)
        ref = sal.astype(np.float64)
        for i, level in enumerate(levels):
            np.testing.assert_allclose(np.asarray(level), ref, rtol=1e-5, atol=1e-6, err_msg=f"level {i}")
            ref = np_downsample(ref)
        assert np.asarray(H.human_tokens(human)).tolist() == [1, 0] + [1] * (shape[0] - 2)
        np.testing.assert_allclose(float(H.alignment_loss(sal, human)), np_alignment(sal, human), rtol=1e-5)
        tokens = rng.uniform(0, 1, shape[0]).astype(np.float32)
        np.testing.assert_allclose(float(H.alignment_loss(sal, human, tokens)), np_alignment(sal, human, tokens),
                                   rtol=1e-5)
    # masked images still count in the mean's denominator, as the reference's plain mean
    a = np.ones((2, 8, 8), np.float32)
    assert float(H.pyramidal_mse_with_tokens(a, 0 * a, np.array([1, 0]), 1)) == pytest.approx(0.5)


def test_matches_golden_from_reference_tensorflow():
    g = dict(np.load(GOLDEN))
    levels = H.pyramid(g["maps"], 5)
    assert len(levels) == 6
    for i, level in enumerate(levels):
        np.testing.assert_allclose(np.asarray(level), g[f"pyr_{i}"], rtol=1e-5, atol=1e-6, err_msg=f"level {i}")
    np.testing.assert_allclose(np.asarray(H.standardize_cut(g["maps"])), g["std_cut"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(H.pyramidal_mse_with_tokens(g["a"], g["b"], g["tokens"])), g["pmse"], rtol=1e-5)

    class Net(nnx.Module):   # the reference's test model: MaxPooling2D(10) -> Flatten -> Dense(10)
        def __init__(self):
            self.kernel, self.bias = nnx.Param(jnp.asarray(g["kernel0"])), nnx.Param(jnp.asarray(g["bias0"]))

        def __call__(self, x):
            b = x.shape[0]
            x = x[:, :60, :60].reshape(b, 6, 10, 6, 10, 3).max((2, 4))
            return x.reshape(b, -1) @ self.kernel[...] + self.bias[...]

    labels = g["labels"].argmax(-1)
    for suffix, lam in (("", 1.0), ("_h1000", 1000.0)):
        def loss_fn(model):   # harmonizer_loss: smoothed CE + 1e-5 * L2 + lambda * alignment (tokens given: 1)
            maps, logits = H.model_maps(model, jnp.asarray(g["images"]), labels)
            ce = optax.softmax_cross_entropy(logits, g["labels"] * (1 - H.LABEL_SMOOTHING) + H.LABEL_SMOOTHING / 10)
            return (ce.mean() + H.LAMBDA_WEIGHTS * H.weight_l2(model)
                    + lam * H.alignment_loss(maps, g["human"], jnp.ones(4)))

        grads = nnx.grad(loss_fn)(Net())
        for name in ("kernel", "bias"):
            want = g[f"grad_{name}{suffix}"]
            np.testing.assert_allclose(np.asarray(grads[name][...]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{name}{suffix}")
    # the alignment term's own gradient (the difference of the two runs) is matched, not just the CE part
    g_align = (g["grad_kernel_h1000"] - g["grad_kernel"]) / 999
    ours = nnx.grad(lambda m: H.alignment_loss(H.model_maps(m, jnp.asarray(g["images"]), labels)[0], g["human"],
                                               jnp.ones(4)))(Net())
    np.testing.assert_allclose(np.asarray(ours["kernel"][...]), g_align, rtol=1e-3, atol=1e-3 * np.abs(g_align).max())
