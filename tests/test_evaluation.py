"""The evaluation library without a model: protocols (moved from data/), the metric registry, the evaluated-image
mask against scipy's Spearman, and the layer split of the checkpoint code (models downloads nothing).

References are independent: torch's F.interpolate and a bilinear sampling matrix written here with numpy for the
protocols, scipy.stats.spearmanr for which map pairs have a rho.
"""
from __future__ import annotations

import types

import numpy as np
import pytest


def _entry(resize_size: int, input_size: int):
    return types.SimpleNamespace(resize_size=resize_size, input_size=input_size)


# ----------------------------------------------------------------------------------------------------------
# Protocols


def test_protocols():
    import jax.numpy as jnp
    import torch

    from evaluation import protocols
    rng = np.random.default_rng(0)
    cam = rng.random((2, 7, 7)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(cam)[:, None], size=(224, 224), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(protocols.align_cam(cam)), ref, atol=1e-6)     # either protocol
    yy, xx = np.mgrid[:224, :224] / 224
    heat = np.stack([255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02) for cx, cy in ((0.3, 0.6), (0.7, 0.2))])
    heat = heat.astype(np.float32)
    resnet, convnext, fastvit = _entry(235, 224), _entry(256, 224), _entry(256, 256)
    assert protocols.crop_window(resnet) == pytest.approx((6 * 224 / 235, 224 * 224 / 235))
    assert protocols.crop_window(convnext) == pytest.approx((14.0, 196.0))
    np.testing.assert_array_equal(np.asarray(protocols.align_heatmap(heat, resnet, "study")), heat)
    np.testing.assert_array_equal(np.asarray(protocols.align_heatmap(heat, fastvit, "corrected")), heat)
    for entry in (resnet, convnext):
        start, extent = protocols.crop_window(entry)
        # bilinear samples (half-pixel centres, edge clamp) of the human map over the crop window
        pos = start + (np.arange(224) + 0.5) * extent / 224 - 0.5
        f = np.floor(pos).astype(int)
        w = pos - f
        lo, hi = np.clip(f, 0, 223), np.clip(f + 1, 0, 223)
        m = np.zeros((224, 224))
        np.add.at(m, (np.arange(224), lo), 1 - w)
        np.add.at(m, (np.arange(224), hi), w)
        want = np.einsum("ij,bjk,lk->bil", m, heat.astype(np.float64), m, optimize=True)
        got = np.asarray(protocols.align_heatmap(jnp.asarray(heat), entry, "corrected"))
        assert np.abs(got - want).max() <= 1e-3          # 0-255 scale
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.align_heatmap(heat, resnet, "faithful")


def test_data_no_longer_holds_the_protocols():
    import importlib.util
    assert importlib.util.find_spec("data.protocols") is None


# ----------------------------------------------------------------------------------------------------------
# The metric registry


def test_metric_registry():
    from cam import metrics as cam_metrics
    from evaluation import metrics
    assert list(metrics.METRICS)[:3] == ["rho", "dice", "iou"]
    assert metrics.METRICS["rho"].fn is cam_metrics.spearman
    assert [m.name for m in metrics.resolve_metrics("iou, rho")] == ["iou", "rho"]
    assert metrics.resolve_metrics(None) == tuple(metrics.METRICS.values())
    for bad, message in (("nope", "unknown metric 'nope'"), ("rho,rho", "named twice"), ("", "no metric")):
        with pytest.raises(ValueError, match=message):
            metrics.resolve_metrics(bad)
    for name, message in (("rho", "already registered"), ("n_evaluated", "reserved"), ("evaluated", "reserved"),
                          ("a-b", "identifier")):
        with pytest.raises(ValueError, match=message):
            metrics.register_metric(name, cam_metrics.dice)
    entry = metrics.register_metric("test_registry_max", lambda c, h: c.max((1, 2)),
                                    reduce=lambda v, images: {"test_max": float(v[images.evaluated].max())})
    try:
        assert metrics.get_metric("test_registry_max") is entry
        images = metrics.Images(index=np.arange(4), valid=np.array([1, 1, 1, 0], bool),
                                evaluated=np.array([1, 0, 1, 0], bool))
        values = np.array([0.5, 9.0, 0.25, 7.0])
        assert entry.summarize(values, images) == {"test_max": 0.5}
        assert metrics.METRICS["dice"].summarize(values, images) == {"dice": 0.375}   # mean over evaluated
        rho = metrics.METRICS["rho"].summarize(np.array([0.5, np.nan, 0.25, 0.9]), images)
        assert rho["mean_rho"] == 0.375 and rho["score"] == pytest.approx(0.375 / 0.65753)
        assert rho["rho_per_image"] == {0: 0.5, 1: None, 2: 0.25}          # padding row 3 left out
    finally:
        metrics.unregister_metric("test_registry_max")
    assert "test_registry_max" not in metrics.METRICS


def test_evaluated_mask_is_where_spearman_has_a_rho():
    """The evaluator's evaluated mask (both maps finite and non-constant) against scipy.stats.spearmanr's NaN, on
    hostile pairs: constant maps (0, -0.0 mixed with 0.0, the threshold floor), a NaN or Inf pixel, one pixel
    apart, subnormal differences."""
    import warnings

    import jax
    import jax.numpy as jnp
    import scipy.stats

    from cam import metrics as cam_metrics
    from evaluation.evaluator import _scorable
    rng = np.random.default_rng(0)
    base = rng.random((6, 6)).astype(np.float32)
    maps = [np.zeros((6, 6)), np.where(rng.random((6, 6)) < 0.5, -0.0, 0.0), np.full((6, 6), 0.3), base,
            np.where(np.arange(36).reshape(6, 6) == 7, np.nan, base), np.where(base > 0.9, np.inf, base),
            np.eye(6) * 1e-3, np.eye(6) * np.float32(1e-45), np.zeros((6, 6)) + (np.arange(36) == 5).reshape(6, 6)]
    maps = np.stack(maps).astype(np.float32)
    human = np.stack([rng.random((6, 6)), np.zeros((6, 6))]).astype(np.float32)
    ok = np.asarray(jax.jit(_scorable)(jnp.asarray(maps)))
    ok_human = np.asarray(jax.jit(_scorable)(jnp.asarray(human)))
    assert ok.tolist() == [False, False, False, True, False, False, True, True, True]
    for h, h_ok in zip(human, ok_human):      # and cam.metrics.spearman has a rho exactly there
        ours = np.asarray(cam_metrics.spearman(maps, np.broadcast_to(h, maps.shape)))
        np.testing.assert_array_equal(np.isfinite(ours), ok & h_ok)
    for h, h_ok in zip(human, ok_human):
        for m, m_ok in zip(maps, ok):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rho = scipy.stats.spearmanr(m.ravel(), h.ravel())[0] if np.isfinite(m).all() else np.nan
            assert (m_ok and h_ok) == bool(np.isfinite(rho)), (m, h, rho)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: the model layer downloads nothing; the evaluation layer does


def test_models_need_a_fetch_for_urls(tmp_path):
    from evaluation import checkpoints
    from models import checkpoints as store, convert
    with pytest.raises(ValueError, match="needs a download: use evaluation.checkpoints.load"):
        store.load("resnet50", "https://example.invalid/r.pth")
    with pytest.raises(ValueError, match="needs a download"):
        store.load("resnet50")
    assert not hasattr(convert, "load_published") and not hasattr(store, "download")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.load_model("resnet50", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="exclude each other"):
        checkpoints.load_model("resnet50", tmp_path / "missing.pth", random_init=True)


def test_converter_cli_refuses_urls_without_the_evaluation_layer(tmp_path, capsys):
    from models import convert
    code = convert.main(["--model", "resnet50", "--checkpoint", "https://example.invalid/r.pth", "--out",
                         str(tmp_path / "out")])
    assert code == 1 and "python -m evaluation.checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
