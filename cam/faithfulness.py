"""Faithfulness of attribution maps to the model: deletion / insertion curves, average drop and increase in
confidence, and ROAD (remove and debias) with noisy linear imputation. Batched, pure and jit-able.

    from cam import faithfulness as ff
    apply = ff.eval_apply(model)                      # images -> logits, an eval-mode clone (or any function)
    maps = cam.grad_cam(model, images, labels)        # (B, H, W) at the input resolution
    d = ff.deletion(apply, images, maps, labels)      # {"curve": (B, n + 1), "auc": (B,)}
    i = ff.insertion(apply, images, maps, labels)
    c = ff.confidence_change(apply, images, maps, labels)   # {"drop", "increase", "drop_relative", ...} per image
    r = ff.road_combined(apply, images, maps, labels, key=jax.random.key(0))   # (B,)
    all_ = ff.evaluate(apply, images, maps, labels)   # every metric above, per image

`images` are the model's (normalised, NHWC) inputs, `maps` (B, H, W) at the same H, W (cam.resize them), labels
(B,) ints or None (each image's top prediction on the unperturbed images). The class score is
`score="softmax"` (the class probability; default), `"logit"`, or a callable f(logits, labels) -> (B,).

Definitions (per image; a perturbed image is scored on the same class as the original):
  deletion            pixels in decreasing map order (ties: raster order) are set to the baseline (default 0, the
                      dataset mean after normalisation) `step` at a time; curve[k] = score after k steps,
                      k = 0 .. n = ceil(H W / step); auc = (sum(curve) - curve[0] / 2 - curve[n] / 2) / n, the
                      trapezoid on [0, 1] (RISE, Petsiuk et al. 2018, `CausalMetric`). Lower is more faithful.
  insertion           the same from the baseline (default: the image blurred by a Gaussian of sigma 5 on 11 x 11
                      taps with zero padding, RISE's substrate) towards the image. Higher is more faithful.
  confidence_change   pytorch-grad-cam's `DropInConfidence` / `IncreaseInConfidence` (cam_mult_image): the image
                      multiplied by the map, o = score(x * map), y = score(x): drop = max(y - o, 0),
                      increase = (o > y); drop_relative = max(y - o, 0) / y (Grad-CAM++'s Average Drop, x100 there).
                      Maps are expected in [0, 1] (normalise them first, as pytorch-grad-cam's maps are).
  road                pytorch-grad-cam's ROADMostRelevantFirst / ROADLeastRelevantFirst (Rong et al. 2022):
                      most relevant first removes the pixels with map >= percentile_p(map), least relevant first
                      those with 1 - map >= percentile_p(1 - map) (numpy's linear percentile); removed pixels are
                      filled by noisy linear imputation (each the weighted mean of its 8 neighbours, weights 1/6
                      for edge and 1/12 for corner neighbours, solved jointly, plus N(0, noise^2) noise);
                      road = score(imputed) - score(x). `road_average` averages over percentiles (10, ..., 90),
                      `road_combined` = (average_lerf - average_morf) / 2 (pytorch-grad-cam's ROADCombined).
The imputation system (symmetric positive definite for every removed region touching a kept pixel) is solved by
Jacobi-preconditioned conjugate gradients in float32 to a relative residual `tol`, where pytorch-grad-cam calls
scipy's sparse direct solver. An image with every pixel removed has no solution: NaN.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["METRIC_NAMES", "NEIGHBOR_WEIGHTS", "ROAD_PERCENTILES", "confidence_change", "deletion", "eval_apply",
           "evaluate", "gaussian_blur", "insertion", "make_faithfulness_fn", "noisy_linear_impute",
           "perturbation_curve", "road", "road_average", "road_combined", "road_mask"]

ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# (row offset, column offset), weight: the ROAD paper's (and pytorch-grad-cam's) neighbour weights; they sum to 1.
NEIGHBOR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
                    ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


# ---------------------------------------------------------------------------------------------------------------
# Models and scores


def eval_apply(model) -> Callable:
    """A pure images -> logits function of an eval-mode clone of an NNX model (the model is not changed)."""
    graphdef, state = nnx.split(model)

    def apply(images):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(images)

    return apply


def _as_apply(model_or_apply) -> Callable:
    return eval_apply(model_or_apply) if isinstance(model_or_apply, nnx.Module) else model_or_apply


def _score_fn(score) -> Callable:
    if callable(score):
        return score
    if score == "softmax":
        return lambda logits, y: jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), -1), y[:, None],
                                                     -1)[:, 0]
    if score == "logit":
        return lambda logits, y: jnp.take_along_axis(logits.astype(jnp.float32), y[:, None], -1)[:, 0]
    raise ValueError(f"score must be 'softmax', 'logit' or a callable f(logits, labels), got {score!r}")


def _check(images, maps):
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    if maps.shape != images.shape[:3]:
        raise ValueError(f"maps must be (B, H, W) = {images.shape[:3]} (resize them to the input), got {maps.shape}")


def _labels_and_scores(apply, images, labels, score):
    """Labels (top prediction where None) and the score of the unperturbed images."""
    logits = apply(images)
    if labels is None:
        labels = jnp.argmax(logits, -1)
    labels = jnp.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    return labels, score(logits, labels)


# ---------------------------------------------------------------------------------------------------------------
# Deletion and insertion


def gaussian_blur(images, sigma: float = 5.0, size: int = 11):
    """Per-channel Gaussian blur (sampled, normalised kernel of size x size), zero padding, NHWC."""
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    k1 = jnp.exp(-r ** 2 / (2 * sigma ** 2))
    k = jnp.outer(k1, k1)
    k = k / k.sum()
    c = images.shape[-1]
    kernel = jnp.broadcast_to(k[:, :, None, None], (size, size, 1, c)).astype(images.dtype)
    pad = ((size // 2, (size - 1) // 2),) * 2
    return jax.lax.conv_general_dilated(images, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


def _ranks(maps):
    """Per image, each pixel's position in decreasing map order (ties in raster order), (B, H * W)."""
    flat = maps.reshape(maps.shape[0], -1)
    order = jnp.argsort(-flat, axis=1, stable=True)
    return jnp.argsort(order, axis=1)


def perturbation_curve(model, images, maps, labels=None, *, mode: str = "deletion", baseline=None,
                       step: int | None = None, num_steps: int = 32, score="softmax", batch_steps: int = 1):
    """{"curve": (B, n + 1), "auc": (B,), "labels": (B,)}: the deletion or insertion curve (see the module doc).

    step: pixels changed per step (default ceil(H W / num_steps)); baseline: an array broadcastable to the images
    (default: 0 for deletion, gaussian_blur(images) for insertion); batch_steps: curve points evaluated per model
    call (memory against speed)."""
    apply, score = _as_apply(model), _score_fn(score)
    images, maps = jnp.asarray(images), jnp.asarray(maps)
    _check(images, maps)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    b, h, w, _ = images.shape
    step = int(step) if step is not None else -(-h * w // int(num_steps))
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    n = -(-h * w // step)
    if baseline is None:
        baseline = jnp.zeros_like(images) if mode == "deletion" else gaussian_blur(images)
    baseline = jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)
    start, finish = (images, baseline) if mode == "deletion" else (baseline, images)
    labels, _ = _labels_and_scores(apply, images, labels, score)
    ranks = _ranks(maps).reshape(b, h, w, 1)

    def point(k):
        return score(apply(jnp.where(ranks < k * step, finish, start)), labels)

    curve = jax.lax.map(point, jnp.arange(n + 1), batch_size=batch_steps if batch_steps > 1 else None).T
    auc = (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n
    return {"curve": curve, "auc": auc, "labels": labels}


def deletion(model, images, maps, labels=None, **kw):
    """The deletion curve and its AUC (lower: the map finds what the model needs). See perturbation_curve."""
    return perturbation_curve(model, images, maps, labels, mode="deletion", **kw)


def insertion(model, images, maps, labels=None, **kw):
    """The insertion curve and its AUC (higher: the map finds what the model needs). See perturbation_curve."""
    return perturbation_curve(model, images, maps, labels, mode="insertion", **kw)


# ---------------------------------------------------------------------------------------------------------------
# Average drop / increase in confidence


def confidence_change(model, images, maps, labels=None, *, score="softmax"):
    """Per image: y = score(x), o = score(x * map); drop = max(y - o, 0), increase = float(o > y) (pytorch-grad-cam's
    DropInConfidence and IncreaseInConfidence), drop_relative = max(y - o, 0) / y; means over images are the
    average drop and the increase in confidence."""
    apply, score = _as_apply(model), _score_fn(score)
    images, maps = jnp.asarray(images), jnp.asarray(maps)
    _check(images, maps)
    labels, y = _labels_and_scores(apply, images, labels, score)
    o = score(apply(images * maps[..., None].astype(images.dtype)), labels)
    drop = jnp.maximum(y - o, 0)
    return {"drop": drop, "increase": (o > y).astype(jnp.float32), "drop_relative": drop / y,
            "score": y, "score_masked": o, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------
# ROAD


def _shift(x, dy: int, dx: int):
    """out[i, j] = x[i + dy, j + dx], 0 outside; x (H, W, ...)."""
    h, w = x.shape[:2]
    pad = [(max(-dy, 0), max(dy, 0)), (max(-dx, 0), max(dx, 0))] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad)[max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w]


def _impute_one(image, keep, noise_key, noise: float, tol: float, maxiter: int | None):
    """image (H, W, C), keep (H, W) bool -> image with the removed pixels imputed."""
    m = (~keep).astype(image.dtype)[..., None]                       # 1 where imputed
    known = (1 - m) * image
    s = sum(w * _shift(jnp.ones_like(m), *o) for o, w in NEIGHBOR_WEIGHTS)   # in-image neighbour weight
    rhs = m * sum(w * _shift(known, *o) for o, w in NEIGHBOR_WEIGHTS)

    def matvec(x):
        mx = m * x
        return m * (s * x - sum(w * _shift(mx, *o) for o, w in NEIGHBOR_WEIGHTS)) + (1 - m) * x

    diag = m * s + (1 - m)
    x, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, x0=rhs / diag, tol=tol, maxiter=maxiter,
                                      M=lambda r: r / diag)
    x = x + jnp.asarray(noise, x.dtype) * jax.random.normal(noise_key, x.shape, x.dtype)
    out = jnp.where(m > 0, x, image)
    return jnp.where(keep.any(), out, jnp.nan)


def noisy_linear_impute(images, keep, *, noise: float = 0.01, key=None, tol: float = 1e-6,
                        maxiter: int | None = None):
    """ROAD's noisy linear imputation: images (B, H, W, C), keep (B, H, W) bool (False: impute). Each removed pixel
    becomes the weighted mean of its in-image neighbours (NEIGHBOR_WEIGHTS), all solved jointly, plus
    N(0, noise^2) noise. maxiter: conjugate-gradient iterations at most (default 20 (H + W); they stop at a relative
    residual `tol`)."""
    images, keep = jnp.asarray(images), jnp.asarray(keep, bool)
    if keep.shape != images.shape[:3]:
        raise ValueError(f"keep must be (B, H, W) = {images.shape[:3]}, got {keep.shape}")
    h, w = images.shape[1:3]
    maxiter = maxiter if maxiter is not None else 20 * (h + w)
    key = jax.random.key(0) if key is None else key
    return _impute_batch(images, keep, key, noise, tol=tol, maxiter=maxiter)


@functools.partial(jax.jit, static_argnames=("tol", "maxiter"))
def _impute_batch(images, keep, key, noise, *, tol, maxiter):
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda x, k, r: _impute_one(x, k, r, noise, tol, maxiter))(images, keep, keys)


def road_mask(maps, percentile: float, most_relevant_first: bool = True):
    """(B, H, W) bool, True where a pixel is kept: pytorch-grad-cam's RemoveMostRelevantFirst (map <
    percentile_p(map)) or RemoveLeastRelevantFirst (1 - map < percentile_p(1 - map))."""
    maps = jnp.asarray(maps)
    v = maps if most_relevant_first else 1 - maps
    t = jnp.percentile(v.reshape(v.shape[0], -1), percentile, axis=1, method="linear")
    return v < t[:, None, None].astype(v.dtype)


def road(model, images, maps, labels=None, *, percentile: float, most_relevant_first: bool = True,
         noise: float = 0.01, key=None, score="softmax", tol: float = 1e-6, maxiter: int | None = None):
    """score(imputed) - score(x) per image (pytorch-grad-cam's ROADMostRelevantFirst / ROADLeastRelevantFirst)."""
    return road_average(model, images, maps, labels, percentiles=(percentile,), most_relevant_first=most_relevant_first,
                        noise=noise, key=key, score=score, tol=tol, maxiter=maxiter, _split=False)


def road_average(model, images, maps, labels=None, *, percentiles=ROAD_PERCENTILES, most_relevant_first=True,
                 noise: float = 0.01, key=None, score="softmax", tol: float = 1e-6, maxiter: int | None = None,
                 _split: bool = True):
    """road averaged over `percentiles` (pytorch-grad-cam's ROAD{Most,Least}RelevantFirstAverage), (B,). The
    percentiles are evaluated one after the other (lax.map: one compiled model call)."""
    apply, score = _as_apply(model), _score_fn(score)
    images, maps = jnp.asarray(images), jnp.asarray(maps)
    _check(images, maps)
    if len(percentiles) == 0 or any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must lie in [0, 100], got {tuple(percentiles)}")
    labels, y = _labels_and_scores(apply, images, labels, score)
    key = jax.random.key(0) if key is None else key
    keys = jax.random.split(key, len(percentiles)) if _split else key[None]

    def one(args):
        p, k = args
        keep = road_mask(maps, p, most_relevant_first)
        imputed = noisy_linear_impute(images, keep, noise=noise, key=k, tol=tol, maxiter=maxiter)
        return score(apply(imputed), labels) - y

    return jax.lax.map(one, (jnp.asarray(percentiles, jnp.float32), keys)).mean(0)


def road_combined(model, images, maps, labels=None, *, percentiles=ROAD_PERCENTILES, key=None, **kw):
    """(road_average least relevant first - road_average most relevant first) / 2 (ROADCombined), (B,): higher is
    more faithful."""
    key = jax.random.key(0) if key is None else key
    k1, k2 = jax.random.split(key)
    lerf = road_average(model, images, maps, labels, percentiles=percentiles, most_relevant_first=False, key=k1, **kw)
    morf = road_average(model, images, maps, labels, percentiles=percentiles, most_relevant_first=True, key=k2, **kw)
    return (lerf - morf) / 2


# ---------------------------------------------------------------------------------------------------------------
# Everything at once


METRIC_NAMES = ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "road_morf", "road_lerf",
                "road_combined")


def evaluate(model, images, maps, labels=None, *, score="softmax", num_steps: int = 32,
             percentiles=ROAD_PERCENTILES, noise: float = 0.01, key=None, normalize: bool = True,
             batch_steps: int = 1):
    """{name: (B,)} for every name in METRIC_NAMES (means over images are the usual summaries). With normalize,
    each map is min-max scaled to [0, 1] first (as pytorch-grad-cam scales its maps; the orders used by deletion,
    insertion and ROAD do not change, the image x map product of the confidence metrics does)."""
    apply = _as_apply(model)
    maps = jnp.asarray(maps, jnp.float32)
    if normalize:
        lo = maps.min(axis=(1, 2), keepdims=True)
        span = maps.max(axis=(1, 2), keepdims=True) - lo
        maps = jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1), 0)
    labels, _ = _labels_and_scores(apply, jnp.asarray(images), labels, _score_fn(score))
    key = jax.random.key(0) if key is None else key
    k1, k2 = jax.random.split(key)
    common = dict(score=score)
    c = confidence_change(apply, images, maps, labels, **common)
    lerf = road_average(apply, images, maps, labels, percentiles=percentiles, most_relevant_first=False, key=k1,
                        noise=noise, **common)
    morf = road_average(apply, images, maps, labels, percentiles=percentiles, most_relevant_first=True, key=k2,
                        noise=noise, **common)
    return {"deletion_auc": deletion(apply, images, maps, labels, num_steps=num_steps, batch_steps=batch_steps,
                                     **common)["auc"],
            "insertion_auc": insertion(apply, images, maps, labels, num_steps=num_steps, batch_steps=batch_steps,
                                       **common)["auc"],
            "average_drop": c["drop"], "increase_in_confidence": c["increase"],
            "road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2}


def make_faithfulness_fn(graphdef, *, num_steps: int = 32, percentiles=ROAD_PERCENTILES, noise: float = 0.01,
                         score="softmax", seed: int = 0, batch_steps: int = 1):
    """f(state, images, maps, labels) -> {name: (B,)} for METRIC_NAMES, pure over `nnx.split(model)` state (the
    model merged and put in eval mode inside): jit or shard it. Maps at another resolution than the images are
    resized to it (cam.resize: bilinear); degenerate maps (cam.is_degenerate: constant or non-finite) get NaN
    metrics (skip them, as the alignment metric does). The ROAD noise uses jax.random.key(seed)."""
    from cam.methods import is_degenerate, resize

    def fn(state, images, maps, labels):
        def apply(x):
            m = nnx.merge(graphdef, state)
            m.eval()
            return m(x)

        maps = maps if maps.shape[1:3] == images.shape[1:3] else resize(maps, tuple(images.shape[1:3]))
        bad = is_degenerate(maps)
        ramp = jnp.broadcast_to(jnp.arange(maps[0].size, dtype=jnp.float32).reshape(maps.shape[1:]), maps.shape)
        safe = jnp.where(bad[:, None, None], ramp, maps)        # any finite map: its metrics are discarded
        out = evaluate(apply, images, safe, labels, score=score, num_steps=num_steps, percentiles=percentiles,
                       noise=noise, key=jax.random.key(seed), batch_steps=batch_steps)
        return {k: jnp.where(bad, jnp.nan, v) for k, v in out.items()}

    return fn
