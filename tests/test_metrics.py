"""cam.metrics against scipy.stats.spearmanr and Harmonization's numpy Dice / IoU, on 224 x 224 maps.

Every case is one (8, 224, 224) batch through one jitted function (compiled once for the module).
"""
import warnings

import jax
import numpy as np
import pytest
from scipy.stats import spearmanr

from cam import metrics

B, S = 8, 224
_ALL = jax.jit(lambda a, b: (metrics.spearman(a, b), metrics.dice(a, b), metrics.iou(a, b)))


def _run(a, b):
    return [np.asarray(x) for x in _ALL(np.asarray(a, np.float32), np.asarray(b, np.float32))]


def _scipy(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # scipy warns on constant input (NaN)
        return np.array([spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])


def _harmonization(a, b, percentile=10):
    """Harmonization's evaluation/metrics.py dice and intersection_over_union, on float32 numpy maps."""
    dice, iou = [], []
    for ha, hb in zip(np.asarray(a, np.float32), np.asarray(b, np.float32)):
        ha = (ha > np.percentile(ha, 100 - percentile, (0, 1))).astype(np.float32)
        hb = (hb > np.percentile(hb, 100 - percentile, (0, 1))).astype(np.float32)
        dice.append(2.0 * np.sum(ha * hb) / (np.sum(ha + hb) + 1e-9))
        iou.append(np.sum(np.logical_and(ha, hb)) / (np.sum(np.logical_or(ha, hb)) + 1e-9))
    return np.array(dice), np.array(iou)


def _upsample(m, size=S):
    """Bilinear, half-pixel (what the CAMs go through), numpy."""
    h = m.shape[-1]
    x = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, h - 1)
    f = x - i0
    rows = m[..., i0, :] * (1 - f)[:, None] + m[..., i1, :] * f[:, None]
    return (rows[..., i0] * (1 - f) + rows[..., i1] * f).astype(np.float32)


def _human(rng, n=B):
    """Smooth positive maps with a background, like the blurred ClickMe heatmaps."""
    yy, xx = np.mgrid[:S, :S] / S
    out = []
    for _ in range(n):
        cx, cy, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
        out.append(255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s)) + rng.uniform(0, 3))
    return np.array(out, np.float32)


def _check(a, b, tol=1e-6):
    rho, dice, iou = _run(a, b)
    ref = _scipy(a, b)
    np.testing.assert_array_equal(np.isnan(rho), np.isnan(ref))
    assert np.nanmax(np.abs(rho - ref)) <= tol, np.nanmax(np.abs(rho - ref))
    ref_dice, ref_iou = _harmonization(a, b)
    np.testing.assert_allclose(dice, ref_dice, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(iou, ref_iou, rtol=1e-6, atol=1e-7)
    return rho


def test_random_maps():
    rng = np.random.default_rng(0)
    a = rng.random((B, S, S), np.float32)
    b = a + rng.normal(0, np.linspace(0.05, 3, B), (S, S, B)).T.astype(np.float32)
    b[0] = rng.random((S, S))                        # independent: rho ~ 0 (the cancellation-prone case)
    b[1] = -a[1]                                     # exactly -1
    b[2] = a[2] * 3 + 1                              # exactly +1
    rho = _check(a, b)
    assert rho[1] == -1.0 and rho[2] == 1.0


def test_heavy_ties():
    rng = np.random.default_rng(1)
    human = _human(rng)
    feat = np.maximum(rng.normal(0, 1, (B, 7, 7)), 0)                         # ReLU'd 7 x 7 feature maps
    feat[:, :3] = 0.0                                                         # zero background rows
    lo, hi = feat.min((1, 2), keepdims=True), feat.max((1, 2), keepdims=True)
    thr = _upsample(np.maximum((feat - lo) / (hi - lo), 0.3))                 # Threshold-Grad-CAM: floor 0.3
    grad = _upsample(feat)                                                    # Grad-CAM with a zero background
    cams = np.concatenate([thr[:4], grad[:4]])
    assert (cams == cams.min((1, 2), keepdims=True)).mean() > 0.3             # ties indeed heavy
    _check(cams, human)
    quantised = np.round(human / 32) * 32                                     # few grey levels
    quantised[0, :S // 2] = -0.0                                              # -0.0 ties with 0.0
    quantised[0, S // 2:, :5] = 0.0
    _check(cams, quantised)
    _check(np.floor(cams * 4), np.floor(np.asarray(human) / 64))              # a handful of values each


def test_percentile_threshold_rounds_like_numpy():
    """Two adjacent float32 values straddle the 90th percentile: numpy's float32 interpolation rounds the
    threshold onto one of them (0.1: onto the upper one, so no pixel is above it)."""
    rng = np.random.default_rng(3)
    n, lo = S * S, int(0.9 * (S * S - 1))
    maps = []
    for x in np.float32([1.0, 0.1, 3.0, 1e-30, 255.0, -0.3, 0.0, 7.7]):
        m = np.full(n, x, np.float32)
        m[lo + 1:] = np.nextafter(x, np.float32(1e9))
        maps.append(rng.permutation(m).reshape(S, S))
    maps = np.array(maps)
    human = _human(rng)
    _check(human, maps)
    assert np.asarray(metrics.binarize(maps)).sum(-1)[1] == 0


def test_constant_and_non_finite_maps_give_nan():
    rng = np.random.default_rng(2)
    a = rng.random((B, S, S), np.float32)
    b = rng.random((B, S, S), np.float32)
    a[0] = 0.0                                  # all-zero CAM
    b[1] = 0.3                                  # constant human map
    a[2, 5, 5] = np.nan
    b[3, 0, 0] = np.inf
    rho = _run(a, b)[0]
    assert np.isnan(rho[:4]).all() and np.isfinite(rho[4:]).all()
    np.testing.assert_array_equal(np.asarray(metrics.constant_maps(a)), [True] + [False] * 7)
    np.testing.assert_array_equal(np.asarray(metrics.constant_maps(b)), [False, True] + [False] * 6)
    ref = _scipy(a[4:], b[4:])
    assert np.abs(rho[4:] - ref).max() <= 1e-6


def test_alignment_score_counts():
    rhos = np.array([0.5, np.nan, 0.25, 0.1, np.nan, 0.9], np.float32)
    valid = np.array([True, True, True, False, False, True])
    s = metrics.alignment_score(rhos, valid)
    assert s["n_evaluated"] == 3 and s["n_skipped"] == 1
    mean = np.mean(np.float64(rhos[[0, 2, 5]]))
    assert s["mean_rho"] == pytest.approx(mean, abs=1e-12)
    assert s["score"] == pytest.approx(mean / 0.65753, abs=1e-12)
    empty = metrics.alignment_score([np.nan], [True])
    assert empty["n_evaluated"] == 0 and empty["n_skipped"] == 1 and np.isnan(empty["score"])
    with pytest.raises(ValueError, match="valid has shape"):
        metrics.alignment_score(rhos, valid[:3])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        metrics.spearman(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="65536"):
        metrics.spearman(np.zeros((1, 257, 256)), np.zeros((1, 257, 256)))
    with pytest.raises(ValueError, match="batch of maps"):
        metrics.spearman(np.zeros(5), np.zeros(5))
