"""PNG overlays of heatmaps on images (numpy + PIL; no matplotlib).

    cam.overlay.save_overlay("cam.png", image, model_map, human_map)   # image | image+model map | image+human map

The bare strip, without text. Labelled figures (class, prediction, rho, colour bar), grids, model-vs-twin and the
table plot are in cam.figures, which draws these overlays.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# matplotlib's "jet" segment data: (x, value) knots per channel, linear in between.
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


def jet(x) -> np.ndarray:
    """Values in [0, 1] (clipped) -> RGB floats in [0, 1], shape x.shape + (3,)."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.stack([np.interp(x, *zip(*knots)) for knots in _JET], axis=-1)


def _to_unit(m) -> np.ndarray:
    """Min-max to [0, 1] for display; non-finite values count as the minimum, a constant map is all 0."""
    m = np.asarray(m, np.float64)
    finite = np.isfinite(m)
    if not finite.any():
        return np.zeros(m.shape)
    lo, hi = m[finite].min(), m[finite].max()
    m = np.where(finite, m, lo)
    return (m - lo) / (hi - lo) if hi > lo else np.zeros(m.shape)


def _image_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8, or floats in [0, 1] (floats outside [0, 1], e.g. normalised inputs, are min-max scaled)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255
    image = image.astype(np.float64)
    return image if image.min() >= 0 and image.max() <= 1 else _to_unit(image)


def overlay(image, heatmap, *, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: `alpha` * jet(heatmap, min-max scaled, bilinearly resized to the image) + rest * image."""
    rgb = _image_rgb(image)
    heatmap = np.asarray(heatmap, np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got {heatmap.shape}")
    h, w = rgb.shape[:2]
    if heatmap.shape != (h, w):
        heatmap = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    out = alpha * jet(_to_unit(heatmap)) + (1 - alpha) * rgb
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_overlay(path, image, heatmap, human=None, *, alpha: float = 0.5, gap: int = 4) -> np.ndarray:
    """Write a PNG: image | image + heatmap [| image + human map], separated by `gap` white pixels.
    Returns the written (H, W', 3) uint8 array."""
    rgb = np.round(_image_rgb(image) * 255).astype(np.uint8)
    panels = [rgb, overlay(image, heatmap, alpha=alpha)]
    if human is not None:
        panels.append(overlay(image, human, alpha=alpha))
    sep = np.full((rgb.shape[0], gap, 3), 255, np.uint8)
    row = np.concatenate([p for panel in panels for p in (panel, sep)][:-1], axis=1)
    Image.fromarray(row).save(path, format="PNG")
    return row
