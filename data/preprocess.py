"""The study's preprocessing in NumPy: Harmonization's TensorFlow pipeline, then each model's input transform.

    image   = decode_jpeg -> float32 -> resize 224 x 224        (tf.image.resize bilinear: half-pixel, no antialias)
    heatmap = decode_jpeg -> float32 -> resize 64 x 64 -> blur (10 x 10, sigma 10, 'SAME') -> resize 224 x 224
    model input = uint8(image) (truncation) -> PIL -> Resize(resize_size, bicubic, shorter side)
                  -> CenterCrop(input_size) -> / 255 -> (x - mean) / std                (torchvision, NHWC here)

JPEG decoding uses libjpeg-turbo through simplejpeg with TensorFlow's settings (fast integer IDCT, fancy
upsampling), which decoded ClickMe-format records bit-identically to tf.io.decode_jpeg; PIL (accurate IDCT)
differs by a few grey levels (tests/test_data.py).
The resize is TensorFlow's CPU kernel formula, operation for operation in float32; the blur is a float32
cross-correlation with Harmonization's float32 kernel.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import simplejpeg
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from dcls_jax.image import resize_bilinear
from data.augment import INTERPOLATIONS, resize_center_crop

SIZE = 224                   # Harmonization's image and heatmap size
BLUR_SIZE, BLUR_SIGMA = 10, 10
HEATMAP_BLUR_SIZE = 64       # the heatmap is blurred at 64 x 64


# Images are decoded whole: their size is read from the JPEG header and capped before anything is allocated
# (ClickMe's images are about 256 x 256; 4096 x 4096 RGB is 48 MiB decoded, 192 MiB as float32).
MAX_JPEG_PIXELS = 4096 * 4096


_CHANNELS = {"Gray": 1, "YCbCr": 3, "RGB": 3}          # other colour spaces (CMYK, YCCK) have 4
_KINDS = {1: "a 1-channel grayscale", 3: "a 3-channel colour"}


def jpeg_header(data: bytes, what: str = "JPEG", channels: int | None = None) -> tuple[int, int, str]:
    """(height, width, colour space) from a JPEG's header; ValueError for an unreadable header, an image over
    MAX_JPEG_PIXELS, or (if `channels` is given) another number of channels."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise ValueError(f"{what} is not a readable JPEG ({e})") from None
    if height * width > MAX_JPEG_PIXELS or not (height and width):
        raise ValueError(f"{what} declares {width} x {height} pixels; images over {MAX_JPEG_PIXELS} pixels "
                         "(4096 x 4096) are refused before decoding")
    if channels is not None and (got := _CHANNELS.get(colorspace, 4)) != channels:
        raise ValueError(f"{what} is a {got}-channel ({colorspace}) JPEG, expected {_KINDS[channels]} JPEG")
    return height, width, colorspace


def decode_image(data: bytes) -> np.ndarray:
    """JPEG -> (H, W, 3) uint8, as tf.io.decode_jpeg."""
    jpeg_header(data, "image")
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)


def decode_heatmap(data: bytes) -> np.ndarray:
    """Grayscale JPEG -> (H, W) uint8, as tf.io.decode_jpeg; a colour JPEG is an error, not converted."""
    jpeg_header(data, "heatmap", channels=1)
    return simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, fastupsample=False)[..., 0]


def blur_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Harmonization's Gaussian: x = -(size-1)//2 .. (size-1)//2 (left to right), y the reverse (top to
    bottom), exp(-(x^2 + y^2) / (2 sigma^2)) normalised in float64, then float32. For size 10: x = -5..4,
    y = 4..-5, so the kernel is centred on row 4 and column 5."""
    xs = np.arange(-(size - 1) // 2, (size - 1) // 2 + 1)
    ys = np.arange((size - 1) // 2, -(size - 1) // 2 - 1, -1)
    xx, yy = np.meshgrid(xs, ys)
    k = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).astype(np.float32)


_KERNEL = blur_kernel()


def blur(x: np.ndarray, kernel: np.ndarray = _KERNEL) -> np.ndarray:
    """tf.nn.conv2d(x, kernel, 1, 'SAME') of a (H, W) map: cross-correlation with zero padding
    (k - 1) // 2 before and k // 2 after."""
    kh, kw = kernel.shape
    p = np.pad(np.asarray(x, np.float32), (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)))
    return np.tensordot(sliding_window_view(p, (kh, kw)), kernel, axes=2).astype(np.float32)


def clickme_image(data: bytes) -> np.ndarray:
    """JPEG bytes -> (224, 224, 3) float32 in [0, 255], as Harmonization's loader."""
    return resize_bilinear(decode_image(data), (SIZE, SIZE))


def clickme_heatmap(data: bytes) -> np.ndarray:
    """Grayscale JPEG bytes -> (224, 224) float32 blurred human map, as Harmonization's loader."""
    h = resize_bilinear(decode_heatmap(data), (HEATMAP_BLUR_SIZE, HEATMAP_BLUR_SIZE))
    return resize_bilinear(blur(h), (SIZE, SIZE))


@dataclasses.dataclass(frozen=True)
class ModelTransform:
    """What model_input needs of a registry Entry (picklable for worker processes). The ImageNet training
    and evaluation transform is data.imagenet.Transform."""
    resize_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    @classmethod
    def of(cls, entry) -> ModelTransform | None:
        if entry is None:
            return None
        return cls(entry.resize_size, entry.input_size, tuple(entry.mean), tuple(entry.std), entry.interpolation)


def crop_offset(size: int, crop: int) -> int:
    """torchvision CenterCrop's start offset along one axis."""
    if crop > size:
        raise ValueError(f"center crop {crop} is larger than the resized image ({size})")
    return int(round((size - crop) / 2.0))


def model_input(image: np.ndarray, entry) -> np.ndarray:
    """The study's model transform of a (224, 224, 3) float image -> (S, S, 3) float32, S = entry.input_size.

    `entry` needs resize_size, input_size, mean, std, interpolation (a models.registry.Entry)."""
    if entry.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {entry.interpolation!r}; known: {sorted(INTERPOLATIONS)}")
    img = Image.fromarray(np.asarray(image).astype(np.uint8))            # truncation, as .astype(np.uint8)
    img = resize_center_crop(img, entry.input_size, interpolation=INTERPOLATIONS[entry.interpolation],
                             resize_size=entry.resize_size)
    x = np.asarray(img).astype(np.float32) / np.float32(255)
    return (x - np.asarray(entry.mean, np.float32)) / np.asarray(entry.std, np.float32)
