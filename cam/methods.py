"""Class activation maps: Grad-CAM and Threshold-Grad-CAM as the study defines them, the pytorch-grad-cam family,
and input-gradient saliency.

Everything is a pure function of arrays. Gradients are those of the class score
    S = sum_b logits[b, labels[b]]          (pre-softmax; the labels given, not the predictions)
with respect to the activations A = model.forward_features(x, layer) (NHWC), through model.forward_head(A, layer),
so G[b] = dS/dA[b] = d logits[b, labels[b]] / dA[b] (eval mode: images do not interact).
Any other layer -- any attribute path of any Flax NNX model, or a submodule -- is captured on an eval-mode clone
(cam/capture.py), token sequences reshaped to NHWC; labels=None explains each image's top prediction and a
callable target(logits) -> (B,) any score (see cam/capture.py).

Maps at feature resolution, (B, h, w) from A, G of shape (B, h, w, C); `alpha = mean_hw G` per image and channel:
  gradcam            relu(mean_c A * alpha)                     the study's (channel MEAN; raw, not normalised)
  threshold_gradcam  max(minmax_hw(mean_c relu(A * alpha)), t)  the study's Threshold-Grad-CAM (t = 0.3), in [t, 1]
  gradcam++          relu(sum_c w_c A_c), w_c = sum_hw relu(G) a_ij,
                     a_ij = G^2 / (2 G^2 + sum_hw(A) G^3 + 1e-6) (0 where G == 0)
  hirescam           relu(sum_c G * A)
  xgradcam           relu(sum_c w_c A_c), w_c = sum_hw G A / (sum_hw A + 1e-7)
  layercam           relu(sum_c relu(G) * A)
  eigencam           relu(projection of the centred (hw, C) activations on their first right singular vector),
                     sign chosen so that the largest |value| is positive (the Seg-Eigen-CAM rule, Eq. 13)
and at input resolution:
  saliency           max_rgb |dS/dx|                            Xplique Saliency, Harmonization's default

The pytorch-grad-cam methods follow grad-cam 1.5.7 (`get_cam_weights` / `get_cam_image`) exactly, channel SUM
included. That package then (1) clips at 0 (our maps already are), (2) min-max normalises each map with
`(m - min) / (max - min + 1e-7)` at feature resolution, (3) cv2-resizes, (4) min-max normalises again. We do not
normalise (except where the study's definition does: threshold_gradcam): scale is kept so that users choose.
Its GradCAM is C times our `gradcam` (sum vs mean); its EigenCAM's sign is whatever LAPACK returns; it replaces
NaN activations by 0 where we flag the map.

Every map is resized to `output_size` (default: the input's H, W; `NATIVE`: not resized) by `resize`: upsampling
is bilinear with half-pixel centres in TensorFlow's lerp form, equal to torch `F.interpolate(mode="bilinear",
align_corners=False)` (and to torchvision's Resize, which the study uses), constant regions staying exactly
constant; a downsampling resize antialiases.

Use: `METHODS[name](model, images, labels, **kw)` (or `grad_cam`, `threshold_grad_cam`, `compute`) checks its
arguments (ValueError) and compiles the network once per structure and layer for all methods; evaluation jits or
shards `make_cam_fn(graphdef, name, ...)`, a pure f(state, images, labels).

Degenerate maps (`is_degenerate`): the metric must skip them and count them.
  - A map with no positive evidence is all zero (gradcam) or, for threshold_gradcam, whose feature-resolution map
    is constant (max == min, e.g. all zero; the study divides 0 by 0), the constant `threshold`: constant maps.
  - Non-finite activations, gradients, logits or map values, or a label outside [0, num_classes) inside a jitted
    call (where it cannot raise), make the whole map NaN.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import cam.capture as capture
from cam.capture import check_labels
from dcls_jax.image import resize_bilinear
from dcls_jax.options import compiler_options

# ---------------------------------------------------------------------------------------------------------------
# Maps at feature resolution from activations `a` and gradients `g`, both (B, h, w, C) float32.


def _alpha(g):
    return g.mean(axis=(1, 2), keepdims=True)


def _spatial_sum(x):
    return x.sum(axis=(1, 2), keepdims=True)


def gradcam_map(a, g):
    return jax.nn.relu((a * _alpha(g)).mean(-1))


def threshold_gradcam_map(a, g, threshold: float = 0.3):
    h = jax.nn.relu(a * _alpha(g)).mean(-1)
    lo, hi = h.min(axis=(1, 2), keepdims=True), h.max(axis=(1, 2), keepdims=True)
    span = hi - lo
    h = jnp.where(span > 0, (h - lo) / jnp.where(span > 0, span, 1), 0)   # constant map -> 0 (policy, see above)
    return jnp.maximum(h, threshold)


def gradcam_pp_map(a, g):
    g2 = g * g
    aij = jnp.where(g != 0, g2 / (2 * g2 + _spatial_sum(a) * g2 * g + 1e-6), 0)
    w = _spatial_sum(jax.nn.relu(g) * aij)
    return jax.nn.relu((a * w).sum(-1))


def hirescam_map(a, g):
    return jax.nn.relu((a * g).sum(-1))


def xgradcam_map(a, g):
    w = _spatial_sum(g * a / (_spatial_sum(a) + 1e-7))
    return jax.nn.relu((a * w).sum(-1))


def layercam_map(a, g):
    return jax.nn.relu((jax.nn.relu(g) * a).sum(-1))


def eigencam_map(a, g=None):
    b, h, w, c = a.shape
    x = a.reshape(b, h * w, c)
    x = x - x.mean(axis=1, keepdims=True)
    u, s, _ = jnp.linalg.svd(x, full_matrices=False)
    p = u[..., 0] * s[:, :1]                                        # == x @ v_1
    flip = jnp.abs(p.min(axis=1, keepdims=True)) > jnp.abs(p.max(axis=1, keepdims=True))
    return jax.nn.relu(jnp.where(flip, -p, p)).reshape(b, h, w)


FEATURE_MAPS: dict[str, Callable] = {
    "gradcam": gradcam_map,
    "threshold_gradcam": threshold_gradcam_map,
    "gradcam++": gradcam_pp_map,
    "hirescam": hirescam_map,
    "xgradcam": xgradcam_map,
    "layercam": layercam_map,
    "eigencam": eigencam_map,
}
METHOD_NAMES: tuple[str, ...] = (*FEATURE_MAPS, "saliency")

# ---------------------------------------------------------------------------------------------------------------
# Checks, gradients and resizing.


def _fast_path(model, layer) -> bool:
    """The models' own cut (forward_features / forward_head) serves `layer`: None or one of its layer_names."""
    return (hasattr(model, "forward_features") and hasattr(model, "forward_head")
            and (layer is None or (isinstance(layer, str) and layer in getattr(model, "layer_names", ()))))


def check_layer(model, layer) -> str | None:
    """The layer key for `model`: None (the model's default target), one of its `layer_names`, or the dotted
    path of any attribute of the model (a module given as `layer` is looked up among the model's submodules).
    ValueError when it names nothing, or when the model has no default target and none is given."""
    if _fast_path(model, layer):
        return layer
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no default CAM target (no forward_features / forward_head): "
                         f"name one with layer='path' or layer=model.<submodule>{capture._suggest(model)}")
    try:
        return capture.target_path(model, layer)
    except ValueError as e:
        names = getattr(model, "layer_names", None)
        if names is None or not isinstance(layer, str):
            raise
        raise ValueError(f"unknown layer {layer!r} for {type(model).__name__}; valid names: {', '.join(names)}, "
                         f"or a submodule path ({e})") from None


def check_method(method: str) -> None:
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown CAM method {method!r}; valid names: {', '.join(METHOD_NAMES)}")


def _finite_rows(x):
    return jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)


def _is_labels(labels) -> bool:
    return labels is not None and not callable(labels)


def _vjp_score(fn, x, labels):
    """dS/dx for S = sum_b fn(x)[b, labels[b]] (labels (B,); None: the top prediction; a callable: S = sum
    labels(logits)); per row whether the target is valid and the logits finite; the class count. Concrete labels
    are checked (ValueError); traced out-of-range labels get a zero cotangent row."""
    logits, vjp = jax.vjp(fn, x)
    n = logits.shape[-1]
    if _is_labels(labels) and not isinstance(labels, jax.core.Tracer):
        check_labels(labels, n, logits.shape[0])
    ct, ok = capture.score_cotangent(logits, labels)
    (g,) = vjp(ct)
    return g.astype(jnp.float32), ok, n


def _gradients(model, images, labels, method: str, layer: str | None, reshape=None):
    """(A, G, ok, num_classes) with A, G (float32, NHWC) at `layer`; for saliency (None, dS/dx, ok, num_classes).
    `layer` in the model's layer_names (or None) uses its forward_features / forward_head cut; any other path is
    captured on a clone (cam.capture)."""
    if method == "saliency":
        return (None, *_vjp_score(model, images, labels))
    if not _fast_path(model, layer):
        return capture.capture(model, images, labels, layer=check_layer(model, layer), reshape=reshape)
    check_layer(model, layer)
    a = model.forward_features(images, layer=layer)
    return (a.astype(jnp.float32), *_vjp_score(lambda a: model.forward_head(a, layer=layer), a, labels))


def activations_and_grads(model, images, labels=None, layer=None, *, reshape=None):
    """A at `layer` (model.forward_features(images, layer) for the models' own layer names, else captured at any
    attribute path or submodule) and G = dS/dA (float32, NHWC), and per row whether the target is valid and the
    logits are finite. labels: (B,) ints, None (top prediction) or a callable on the logits. Runs on an eval-mode
    clone: the model is not changed."""
    layer = check_layer(model, layer)     # a submodule -> its path, looked up in this model (not the clone)
    return _gradients(_eval_clone(model), images, labels, "features", layer, _check_reshape(reshape))[:3]


def input_grads(model, images, labels=None):
    """dS/dx (float32, NHWC), and per row whether the label is in range and the logits are finite (on an eval-mode
    clone of the model)."""
    return _gradients(_eval_clone(model), images, labels, "saliency", None)[1:3]


def _eval_clone(model):
    """The model in eval mode, as a clone (nnx.split / merge: free inside a trace): the caller's model keeps its
    mode and its batch statistics."""
    clone = nnx.merge(*nnx.split(model))
    clone.eval()
    return clone


def resize(maps, size: tuple[int, int]):
    """(B, h, w) -> (B, *size) bilinear, half-pixel centres. Upsampling is dcls_jax.image.resize_bilinear
    (TensorFlow's lerp form, torch align_corners=False: constant regions stay exactly constant, so
    Threshold-Grad-CAM's floor keeps its ties); downsampling antialiases (jax.image.resize)."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    if size[0] >= maps.shape[1] and size[1] >= maps.shape[2]:
        return resize_bilinear(maps, tuple(size), axes=(1, 2))
    return jax.image.resize(maps, (maps.shape[0], *size), "linear")


NATIVE = "native"   # output_size=NATIVE: no resize (feature maps at the layer's h, w; saliency at the input's)


def _size(output_size, images) -> tuple[int, int] | None:
    if output_size == NATIVE:
        return None
    if output_size is None:
        return tuple(images.shape[1:3])
    return (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)


def is_degenerate(maps):
    """(B,) bool: maps that hold a non-finite value or are constant. Metrics must skip (and count) these."""
    flat = jnp.asarray(maps).reshape(maps.shape[0], -1)
    return ~jnp.isfinite(flat).all(axis=1) | (flat.max(axis=1) == flat.min(axis=1))


# ---------------------------------------------------------------------------------------------------------------
# Pure functions over nnx.split state, and model-taking wrappers.


def _check_kw(method: str, layer, kw) -> None:
    check_method(method)
    if method == "saliency" and layer is not None:
        raise ValueError("saliency is an input gradient: it takes no layer")
    if "threshold" in kw and not 0 <= kw["threshold"] <= 1:
        raise ValueError(f"threshold must lie in [0, 1], got {kw['threshold']}")


def _maps(method: str, a, g, ok, size: tuple[int, int], **kw):
    """Maps from (A, G) (or dS/dx), NaN where `ok` is False or a value is not finite, resized to `size`."""
    if method == "saliency":
        m = jnp.abs(g).max(axis=-1)
    else:
        m = FEATURE_MAPS[method](a, g, **kw)
        ok = ok & _finite_rows(a) & _finite_rows(g)
    ok = ok & _finite_rows(m)
    m = jnp.where(ok[:, None, None], m, jnp.nan)
    return (m if size is None else resize(m, size)).astype(jnp.float32)


def _check_reshape(reshape):
    if reshape is None or callable(reshape):
        return reshape
    try:
        h, w = (int(v) for v in reshape)
    except (TypeError, ValueError):
        raise ValueError(f"reshape must be None, (h, w) or a callable, got {reshape!r}") from None
    return (h, w)


def cam_from_model(model, images, labels, method: str, *, layer=None, output_size=None, reshape=None, **kw):
    """(B, H, W) float32 maps of `method` for an (eval-mode) model; traceable (no jit inside)."""
    _check_kw(method, layer, kw)
    a, g, ok, _ = _gradients(model, images, labels, method, layer, _check_reshape(reshape))
    return _maps(method, a, g, ok, _size(output_size, images), **kw)


def _static_layer(layer):
    if layer is not None and not isinstance(layer, str):
        raise ValueError("make_cam_fn takes the layer as a path string: use cam.target_path(model, module)")
    return layer


def make_cam_fn(graphdef, method: str, *, layer: str | None = None, output_size=None, reshape=None, **kw):
    """f(state, images, labels=None) -> (B, H, W) maps, pure over `nnx.split(model)` state: jit, vmap, shard or
    differentiate it freely.

    The model is merged and put in eval mode inside (dropout off, BatchNorm running statistics). `layer`: None
    (the model's default), one of its layer_names, or any attribute path. labels: (B,) ints, None (the top
    prediction) or a callable score on the logits. Labels are checked when concrete; inside jit an out-of-range
    label gives a NaN map (see `is_degenerate`).
    """
    _check_kw(method, layer, kw)
    layer, reshape = _static_layer(layer), _check_reshape(reshape)

    def cam_fn(state, images, labels=None):
        model = nnx.merge(graphdef, state)
        model.eval()
        return cam_from_model(model, images, labels, method, layer=layer, output_size=output_size, reshape=reshape,
                              **kw)

    return cam_fn


def make_cams_fn(graphdef, methods, *, layer: str | None = None, output_size=None, options=None, reshape=None):
    """f(state, images, labels=None) -> {method: (B, H, W) maps} for several methods at once, pure like
    make_cam_fn.

    All feature-map methods share one forward and backward pass (saliency adds its own input gradient), so
    evaluating gradcam and threshold_gradcam together costs one pass. `options`: {method: kwargs}."""
    methods, options = tuple(methods), dict(options or {})
    for m in methods:
        _check_kw(m, layer if m != "saliency" else None, options.get(m, {}))
    layer, reshape = _static_layer(layer), _check_reshape(reshape)

    def cams_fn(state, images, labels=None):
        model = nnx.merge(graphdef, state)
        model.eval()
        size, out, grads = _size(output_size, images), {}, {}
        for m in methods:
            kind = "saliency" if m == "saliency" else "features"
            if kind not in grads:
                grads[kind] = _gradients(model, images, labels, m, layer if kind == "features" else None, reshape)
            a, g, ok, _ = grads[kind]
            out[m] = _maps(m, a, g, ok, size, **options.get(m, {}))
        return out

    return cams_fn


# The model-taking wrappers compile the network once per (structure, layer, target kind) -- every method at that
# layer reuses it -- and each method's small map function once per size.
@functools.lru_cache(maxsize=64)
def _jitted_gradients(graphdef, method: str, layer: str | None, reshape=None, target=None):
    def fn(state, images, labels):
        model = nnx.merge(graphdef, state)
        model.eval()
        # the class count comes back as an array
        return _gradients(model, images, target if labels is None else labels, method, layer, reshape)
    return jax.jit(fn, compiler_options=compiler_options())


@functools.lru_cache(maxsize=64)
def _jitted_maps(method: str, size: tuple[int, int], kw_items: tuple):
    return jax.jit(functools.partial(_maps, method, size=size, **dict(kw_items)), compiler_options=compiler_options())


def compute(model, images, labels=None, method: str = "gradcam", *, layer=None, output_size=None,
            reshape=None, jit: bool = True, **kw):
    """(B, H, W) float32 maps of `method` for `model` (an eval-mode copy: the model itself, its train/eval mode
    included, is not changed). Checks the method, the layer and the labels (ValueError). jit=False runs
    `make_cam_fn` eagerly.

    layer: None (the model's study target), a name of model.layer_names, any attribute path ("layer4.2",
    "blocks.11.norm1") or a submodule of the model. labels: (B,) ints, None (each image's top prediction) or a
    callable f(logits) -> (B,) scores. reshape: for token sequences, see cam.capture."""
    _check_kw(method, layer, kw)
    if method != "saliency":
        layer = check_layer(model, layer)
    reshape = _check_reshape(reshape)
    images = jnp.asarray(images)
    target = labels if callable(labels) else None
    if _is_labels(labels):
        labels = check_labels(labels, None, images.shape[0])
    else:
        labels = None
    graphdef, state = nnx.split(model)
    if not jit:
        return make_cam_fn(graphdef, method, layer=layer, output_size=output_size, reshape=reshape,
                           **kw)(state, images, target if labels is None else labels)
    gradient_key = "saliency" if method == "saliency" else "features"
    fn = _jitted_gradients(graphdef, gradient_key, layer, reshape, target)
    a, g, ok, num_classes = fn(state, images, None if labels is None else jnp.asarray(labels))
    if labels is not None:
        check_labels(labels, int(num_classes), images.shape[0])
    return _jitted_maps(method, _size(output_size, images), tuple(sorted(kw.items())))(a, g, ok)


def grad_cam(model, images, labels=None, *, layer=None, output_size=None, reshape=None):
    """The study's Grad-CAM: relu(mean_c A * mean_hw dS/dA), bilinearly resized; (B, H, W) float32."""
    return compute(model, images, labels, "gradcam", layer=layer, output_size=output_size, reshape=reshape)


def threshold_grad_cam(model, images, labels=None, *, threshold: float = 0.3, layer=None, output_size=None,
                       reshape=None):
    """The study's Threshold-Grad-CAM: max(minmax(mean_c relu(A * alpha)), threshold), bilinearly resized."""
    return compute(model, images, labels, "threshold_gradcam", layer=layer, output_size=output_size,
                   reshape=reshape, threshold=threshold)


METHODS: dict[str, Callable] = {name: functools.partial(compute, method=name) for name in METHOD_NAMES}
METHODS["gradcam"] = grad_cam
METHODS["threshold_gradcam"] = threshold_grad_cam
