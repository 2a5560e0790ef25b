"""Bilinear resize as TensorFlow computes it, for NumPy and JAX arrays alike.

`resize_bilinear` is tf.image.resize(x, size, "bilinear", antialias=False): half-pixel centres, edge clamp, no
antialias (PyTorch's align_corners=False), in TensorFlow's lerp form a + (b - a) * t, float32, columns first
and then rows (tensorflow/core/kernels/image/resize_bilinear_op.cc). A constant region stays exactly constant,
unlike a weighted-sum resampler (jax.image.resize), which matters where ties matter (Spearman over a
Threshold-Grad-CAM map floored at 0.3). The study's ClickMe preprocessing (NumPy, host side) and the CAM
upsampling (JAX, jit-able) both use it.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.cache
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, weight of upper) per output pixel; TensorFlow's HalfPixelScaler and
    compute_interpolation_weights in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    f = np.floor(x)
    lower = np.maximum(f.astype(np.int64), 0)
    upper = np.minimum(np.ceil(x).astype(np.int64), in_size - 1)
    return lower, upper, (x - f).astype(np.float32)


def resize_bilinear(x, size: int | tuple[int, int], axes: tuple[int, int] = (0, 1)):
    """Resizes axes `axes` (height, width) of `x` to `size`, in float32. A NumPy array gives a NumPy array
    (computed with NumPy), anything else a JAX array (traceable)."""
    xp = np if isinstance(x, np.ndarray | np.generic | list) else jnp
    x = xp.asarray(x, xp.float32)
    sh, sw = (size, size) if isinstance(size, int) else tuple(size)
    ah, aw = (a % x.ndim for a in axes)
    if ah == aw:
        raise ValueError(f"axes must name two different axes, got {axes}")
    if (x.shape[ah], x.shape[aw]) == (sh, sw):
        return x
    if min(sh, sw, x.shape[ah], x.shape[aw]) < 1:
        raise ValueError(f"cannot resize axes of sizes {(x.shape[ah], x.shape[aw])} to {(sh, sw)}")

    def lerp(v, a, n_out):
        lo, hi, t = bilinear_taps(v.shape[a], n_out)
        t = t.reshape((-1,) + (1,) * (v.ndim - a - 1))
        left, right = xp.take(v, lo, axis=a), xp.take(v, hi, axis=a)
        return left + (right - left) * t

    return lerp(lerp(x, aw, sw), ah, sh)


__all__ = ["bilinear_taps", "resize_bilinear"]
