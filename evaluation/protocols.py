"""How a model's CAM is put next to the human ClickMe map: two named protocols (jit-able JAX).

Both maps end as (B, 224, 224) arrays given to cam.metrics.spearman:

    cam = align_cam(cam_maps)                          # CAM (any resolution) -> 224 x 224, bilinear
    human = align_heatmap(heatmaps, entry, protocol)   # the pipeline's (B, 224, 224) human map

The CAM side is the same under both protocols (the CAM covers the model's input); only the human side depends on
the protocol and on the model's transform (`entry`: resize_size, input_size).

"study": faithful to the study. The CAM, which covers the model's input, i.e. the center crop of the resized
    224 x 224 image, is stretched to 224 x 224 and compared with the full human map. For models whose
    transform crops (ResNet-50: resize 235, crop 224; ConvNeXt: resize 256, crop 224) the two maps cover
    different image regions.
"corrected": the human map is resampled onto the model's crop window, so that both maps cover the same
    image region. The crop of torchvision's CenterCrop(C) after Resize(R) of the 224-pixel image spans
    [t, t + C) pixels of the resized image, t = round((R - C) / 2), i.e. [t * 224 / R, (t + C) * 224 / R)
    in the 224 frame; 224 x 224 bilinear samples (half-pixel centres, no antialias) of the human map over
    that window are compared with the CAM. Without a crop (R == C: CAFormer, ConvFormer, FastViT) it
    equals "study".

`resize` is bilinear with half-pixel centres, edge clamp and no antialias (TensorFlow's and PyTorch's
align_corners=False), computed separably in TensorFlow's lerp form a + (b - a) * t, so a constant region stays
exactly constant. Ties matter to Spearman: Threshold-Grad-CAM floors its map at 0.3, and the study's torchvision
Resize keeps that floor one tie group; a weighted-sum resampler (jax.image.resize, scale_and_translate) turns it
into 0.29999995 / 0.29999998 / 0.3 and moves rho by up to 7e-4 per image, the lerp form by < 3e-6 (random
4 x 4 to 8 x 8 maps). For the study's upsampling of the CAM pass the map at feature resolution (7 x 7, 8 x 8): a map
already resized to the input resolution (256 for FastViT) is resampled once more, which is close to but not
the same as the study. The "corrected" window resampling uses jax.image.scale_and_translate(method="linear",
antialias=False).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from data.preprocess import SIZE, crop_offset
from dcls_jax.image import resize_bilinear
from evaluation import PROTOCOLS

__all__ = ["PROTOCOLS", "SIZE", "align_cam", "align_heatmap", "check_protocol", "crop_window", "resize"]


def check_protocol(protocol: str) -> str:
    """`protocol`, or ValueError naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    return protocol


def crop_window(entry, size: int = SIZE) -> tuple[float, float]:
    """(start, extent) of the model's center crop in the `size`-pixel frame of the (square) ClickMe image."""
    r, c = entry.resize_size, entry.input_size
    return crop_offset(r, c) * size / r, c * size / r


def resize(maps: jax.Array, size: int | tuple[int, int] = SIZE) -> jax.Array:
    """(B, h, w) -> (B, *size): dcls_jax.image.resize_bilinear over the last two axes."""
    return resize_bilinear(maps, size, axes=(1, 2))


def align_cam(cam_maps: jax.Array, size: int = SIZE) -> jax.Array:
    """The CAM side of both protocols: the (B, h, w) map (feature resolution, as the study resizes it once)
    bilinearly resized to (B, size, size), float32."""
    return resize(jnp.asarray(cam_maps, jnp.float32), size)


def align_heatmap(heatmaps: jax.Array, entry, protocol: str, size: int = SIZE) -> jax.Array:
    """The human side: (B, 224, 224) unchanged for "study"; for "corrected", resampled onto the crop window
    of `entry` (needs resize_size, input_size)."""
    check_protocol(protocol)
    heatmaps = jnp.asarray(heatmaps, jnp.float32)
    start, extent = crop_window(entry, heatmaps.shape[-1])
    if protocol == "study" or (start, extent) == (0, heatmaps.shape[-1]):
        return resize(heatmaps, size)
    # output x = (input x - start) * size / extent, in continuous coordinates (pixel centres at +0.5)
    s = size / extent
    scale = jnp.array([s, s], jnp.float32)
    translation = jnp.array([-start * s, -start * s], jnp.float32)
    return jax.image.scale_and_translate(heatmaps, (heatmaps.shape[0], size, size), (1, 2), scale, translation,
                                         method="linear", antialias=False)
