"""The harmonization objective (Fel, Felipe, Linsley, Serre, "Harmonizing the object recognition strategies of
deep neural networks with humans", NeurIPS 2022) in JAX, for any model of the registry.

    loss = CE_smooth(logits, y) + LAMBDA_HARMONIZATION * alignment_loss(saliency, human, tokens)
           + LAMBDA_WEIGHTS * weight_l2(model)

Reference: serre-lab/Harmonization (MIT), v0.0.9 (commit ffe1c49), `harmonization/training/loss.py`
(`harmonizer_loss`, `standardize_cut`, `_mse_with_tokens`, `pyramidal_mse_with_tokens`) and
`harmonization/training/pyramid.py` (`_binomial_kernel`, `_downsample`, `pyramidal_representation`). Every
definition below names the reference function it follows; constants are the reference's defaults.

The model side (`model_maps`):
  "input_gradient"  the reference's: dS/dx, S = sum_b logits[b, y_b] (pre-softmax, one-hot of the label), with x
                    the image in the pixel units the model is fed ([0, 255]; Harmonization's Keras models hold
                    their preprocessing), averaged over RGB (signed: `tf.reduce_mean(sa_maps, -1)`), computed in
                    the model's current mode (the reference calls `model(images, training=True)`).
  any cam method    cam.METHOD_NAMES: the same class score's gradients at `layer` (default: the study's target
                    layer), the feature map of cam/methods.py, bilinearly resized to the input resolution; or
                    "saliency" = max_rgb |dS/dx| (Xplique's, Harmonization's evaluation map).
Everything is differentiable end to end: the loss's gradient reaches the weights through the input gradient
(a second-order derivative).

Departures from the reference, all at degenerate inputs and documented where they occur:
  - tokens: the reference takes a per-image flag (1: the image has a human map); `alignment_loss` defaults to
    `human_tokens(human)`, 1 for a human map that varies, 0 for a constant one (an all-zero ClickMe map has no
    clicks: standardize_cut turns it into 0 and the reference would pull the saliency towards 0). Masked images
    still count in the mean's denominator, exactly as `_mse_with_tokens` (a plain mean over the batch).
  - standardize_cut's standard deviation has a zero gradient at zero variance (tf.math.reduce_std's is NaN
    there); values are identical.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cam import methods as cam_methods

NB_LEVELS = 5                  # pyramidal_mse_with_tokens(nb_levels=5)
STD_EPSILON = 1e-5             # standardize_cut(epsilon=1e-5)
MAX_EPSILON = 1e-6             # harmonizer_loss: reduce_max(...) + 1e-6, both maps
LAMBDA_HARMONIZATION = 1.0     # harmonizer_loss(lambda_harmonization=1.0)
LAMBDA_WEIGHTS = 1e-5          # harmonizer_loss(lambda_weights=1e-5)
LABEL_SMOOTHING = 0.1          # loss.Cross_entropy = CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
MODEL_SIDES = ("input_gradient", *cam_methods.METHOD_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# The alignment term


def standardize_cut(maps, axes=(1, 2), epsilon: float = STD_EPSILON):
    """loss.py `standardize_cut`: relu((m - mean) / (std + epsilon)) over `axes`, std the population (ddof 0)
    standard deviation (tf.math.reduce_std)."""
    maps = jnp.asarray(maps, jnp.float32)
    mean = maps.mean(axes, keepdims=True)
    centred = maps - mean
    var = jnp.square(centred).mean(axes, keepdims=True)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)   # value of sqrt; gradient 0 at var 0
    return jax.nn.relu(centred / (std + epsilon))


def binomial_kernel() -> np.ndarray:
    """pyramid.py `_binomial_kernel`: outer((1, 4, 6, 4, 1), (1, 4, 6, 4, 1)) / 256, float32, (5, 5)."""
    k = np.array((1.0, 4.0, 6.0, 4.0, 1.0), np.float32)
    k = np.outer(k, k)
    return k / np.sum(k)


def downsample(maps):
    """pyramid.py `_downsample` on one channel: tf.nn.conv2d(m, binomial, strides 2, 'SAME') of (B, H, W) maps.
    'SAME' with stride 2: output ceil(n / 2), zero padding max(2 (out - 1) + 5 - n, 0), its smaller half before
    (224 -> 112: 1 before, 2 after)."""
    x = jnp.asarray(maps, jnp.float32)[..., None]
    k = jnp.asarray(binomial_kernel())[:, :, None, None]
    y = jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y[..., 0]


def pyramid(maps, levels: int = NB_LEVELS) -> list:
    """pyramid.py `pyramidal_representation(image, num_levels)`: [m, down(m), ..., down^levels(m)] (levels + 1
    maps; the loss uses the first `levels`)."""
    out = [jnp.asarray(maps, jnp.float32)]
    for _ in range(levels):
        out.append(downsample(out[-1]))
    return out


def mse_with_tokens(a, b, tokens):
    """loss.py `_mse_with_tokens`: mean over batch and pixels of (a - b)^2 * tokens[b]."""
    return jnp.mean(jnp.square(a - b) * jnp.asarray(tokens, jnp.float32)[:, None, None])


def pyramidal_mse_with_tokens(true_maps, predicted_maps, tokens, levels: int = NB_LEVELS):
    """loss.py `pyramidal_mse_with_tokens`: the mean over pyramid levels 0 .. levels-1 of mse_with_tokens."""
    py, pp = pyramid(true_maps, levels), pyramid(predicted_maps, levels)
    return jnp.mean(jnp.stack([mse_with_tokens(py[i], pp[i], tokens) for i in range(levels)]))


def human_tokens(human):
    """(B,) float32: 1 where the human map varies, 0 where it is constant (e.g. all zero: no clicks)."""
    flat = jnp.asarray(human, jnp.float32).reshape(human.shape[0], -1)
    return (flat.max(axis=1) > flat.min(axis=1)).astype(jnp.float32)


def alignment_loss(saliency, human, tokens=None, levels: int = NB_LEVELS):
    """The harmonization term of loss.py `harmonizer_loss` between (B, H, W) model maps and human maps:

        s = standardize_cut(saliency);  h = standardize_cut(human)
        h = h / (max_hw h + 1e-6) * (stop_gradient(max_hw s) + 1e-6)
        pyramidal_mse_with_tokens(s, h, tokens)

    tokens: (B,) weights; None: `human_tokens(human)` (constant human maps masked, see the module docstring)."""
    human = jax.lax.stop_gradient(jnp.asarray(human, jnp.float32))
    if tokens is None:
        tokens = human_tokens(human)
    s = standardize_cut(saliency)
    h = standardize_cut(human)
    h_max = h.max(axis=(1, 2), keepdims=True) + MAX_EPSILON
    s_max = jax.lax.stop_gradient(s.max(axis=(1, 2), keepdims=True)) + MAX_EPSILON
    return pyramidal_mse_with_tokens(s, h / h_max * s_max, tokens, levels)


# ---------------------------------------------------------------------------------------------------------------
# The model side


def check_method(method: str, layer: str | None = None) -> None:
    if method not in MODEL_SIDES:
        raise ValueError(f"unknown harmonization map {method!r}; valid names: {', '.join(MODEL_SIDES)}")
    if method in ("input_gradient", "saliency") and layer is not None:
        raise ValueError(f"{method} is an input gradient: it takes no layer")


def model_maps(model, pixels, labels, *, preprocess: Callable = lambda x: x, method: str = "input_gradient",
               layer: str | None = None):
    """(maps (B, H, W) float32 at the input resolution, logits (B, classes) float32) of a model in its current
    mode (train mode in training: BatchNorm batch statistics and their updates, dropout, as the reference).

    pixels: (B, H, W, 3) images in the units the gradient is taken in; the model sees preprocess(pixels).
    Traceable, with NNX state updates (batch statistics, RNG streams) kept on `model`; differentiable with
    respect to the model's parameters (nnx.grad inside)."""
    check_method(method, layer)
    pixels = jnp.asarray(pixels)

    def class_score(logits):
        logits = logits.astype(jnp.float32)
        return jnp.sum(logits * jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)), logits

    if method in ("input_gradient", "saliency"):
        def score(m, p):
            return class_score(m(preprocess(p)))

        g, logits = nnx.grad(score, argnums=1, has_aux=True)(model, pixels)
        g = g.astype(jnp.float32)
        maps = g.mean(-1) if method == "input_gradient" else jnp.abs(g).max(-1)
        return maps, logits

    if layer is not None:
        cam_methods.check_layer(model, layer)
    a = model.forward_features(preprocess(pixels), layer=layer)

    def head_score(m, a):
        return class_score(m.forward_head(a, layer=layer))

    g, logits = nnx.grad(head_score, argnums=1, has_aux=True)(model, a)
    maps = cam_methods.FEATURE_MAPS[method](a.astype(jnp.float32), g.astype(jnp.float32))
    return cam_methods.resize(maps, tuple(pixels.shape[1:3])), logits


# ---------------------------------------------------------------------------------------------------------------
# The weight penalty


def _is_norm(node) -> bool:
    """A normalisation layer: Flax's, or one of ours (models.layers.BatchNorm2d, LayerNorm: modules with `eps`)."""
    return isinstance(node, (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)) or (
        isinstance(node, nnx.Module) and isinstance(getattr(node, "eps", None), float))


def weight_l2_mask(model) -> dict[tuple[str, ...], bool]:
    """{path of each parameter in nnx.state(model, nnx.Param): whether harmonizer_loss's weight term counts it}.

    The reference sums tf.nn.l2_loss over trainable variables whose Keras name has none of 'bn/',
    'normalization', 'embed', 'Norm', 'norm', 'class_token': normalisation layers (and ViT embeddings, absent
    from our models). Here: every parameter outside a normalisation module, except DCLS positions (P, SIG)."""
    norms = [tuple(str(k) for k in path) for path, node in nnx.iter_graph(model) if _is_norm(node)]
    mask = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = tuple(str(k) for k in path)
        in_norm = any(names[:len(p)] == p for p in norms)
        mask[names] = not in_norm and names[-1] not in ("P", "SIG")
    return mask


def weight_l2(model):
    """harmonizer_loss's `weight_loss`: sum of tf.nn.l2_loss (sum v^2 / 2) over the parameters `weight_l2_mask`
    selects."""
    mask = weight_l2_mask(model)
    total = jnp.zeros((), jnp.float32)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if mask[tuple(str(k) for k in path)]:
            total = total + 0.5 * jnp.sum(jnp.square(var[...].astype(jnp.float32)))
    return total
