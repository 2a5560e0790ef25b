"""ImageNet training augmentations as timm 1.0.31 defines them (`create_transform(is_training=True)`, `Mixup`).

Per image on the host (PIL/numpy, one `np.random.Generator` per sample, so the result depends only on the seed
and the sample's place in the epoch): random-resized crop + horizontal flip (`random_resized_crop`),
RandAugment (`RandAugment.from_string("rand-m9-mstd0.5-inc1")`), and the box of random erasing
(`erase_box`). Per batch on the device (JAX, inside the jitted train step): normalisation, the erasing itself
(per-pixel N(0, 1) noise in normalised space, timm's mode "pixel") and mixup / cutmix with label smoothing
(`Mixup.apply`, whose per-batch lambda and box `Mixup.params` draws on the host, as timm does).

The random draws follow timm's order and distributions call for call (the host functions take any object with
numpy Generator's methods), so the parity tests replay timm's own random streams through them. timm's
ColorJitter is omitted: timm disables it when RandAugment is on.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BICUBIC = Image.Resampling.BICUBIC
INTERPOLATIONS = {name: getattr(Image.Resampling, name.upper())  # the one table of PIL filters in data/
                  for name in ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")}


# ------------------------------------------------------------------------------------------------------------
# Random-resized crop and flip (timm RandomResizedCropAndInterpolation, torchvision RandomHorizontalFlip)

def rrc_params(width: int, height: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of the crop, timm's `RandomResizedCropAndInterpolation.get_params`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        interpolation=BICUBIC, hflip: float = 0.5) -> Image.Image:
    top, left, h, w = rrc_params(img.width, img.height, rng, scale, ratio)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), interpolation)
    if hflip > 0 and rng.random() < hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 0.875, interpolation=BICUBIC, *,
                       resize_size: int | None = None) -> Image.Image:
    """torchvision Resize(resize_size) + CenterCrop(size), timm's eval transform: the shorter side to
    `resize_size` (default floor(size / crop_pct)), then the centre size x size crop."""
    short = resize_size or math.floor(size / crop_pct)
    if size > short:
        raise ValueError(f"center crop {size} is larger than the resized image ({short})")
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new != (w, h):
        img = img.resize(new, interpolation)
    top, left = (int(round((n - size) / 2.0)) for n in (img.height, img.width))
    return img.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------------------------
# RandAugment (timm auto_augment.py: ops, level -> argument maps, AugmentOp, RandAugment)

_LEVEL_DENOM = 10.0


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img, bits):
    """Keeps the `bits` high bits; 0 bits gives black (what PIL < 11 did; newer PIL refuses bits=0)."""
    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits > 0 else img.point([0] * 256 * len(img.getbands()))


# name -> (op(img, arg, fill, resample), level -> arg (without sign), signed)
_OPS = {
    "AutoContrast": (lambda img, a, f, r: ImageOps.autocontrast(img), None, False),
    "Equalize": (lambda img, a, f, r: ImageOps.equalize(img), None, False),
    "Invert": (lambda img, a, f, r: ImageOps.invert(img), None, False),
    "Rotate": (lambda img, a, f, r: img.rotate(a, resample=r, fillcolor=f), lambda m: m / _LEVEL_DENOM * 30.0, True),
    "Posterize": (lambda img, a, f, r: _posterize(img, a), lambda m: int(m / _LEVEL_DENOM * 4), False),
    "PosterizeIncreasing": (lambda img, a, f, r: _posterize(img, a), lambda m: 4 - int(m / _LEVEL_DENOM * 4), False),
    "Solarize": (lambda img, a, f, r: ImageOps.solarize(img, a), lambda m: min(256, int(m / _LEVEL_DENOM * 256)),
                 False),
    "SolarizeIncreasing": (lambda img, a, f, r: ImageOps.solarize(img, a),
                           lambda m: 256 - min(256, int(m / _LEVEL_DENOM * 256)), False),
    "SolarizeAdd": (lambda img, a, f, r: _solarize_add(img, a), lambda m: min(128, int(m / _LEVEL_DENOM * 110)),
                    False),
    "ShearX": (lambda img, a, f, r: _affine(img, (1, a, 0, 0, 1, 0), f, r), lambda m: m / _LEVEL_DENOM * 0.3, True),
    "ShearY": (lambda img, a, f, r: _affine(img, (1, 0, 0, a, 1, 0), f, r), lambda m: m / _LEVEL_DENOM * 0.3, True),
    "TranslateXRel": (lambda img, a, f, r: _affine(img, (1, 0, a * img.size[0], 0, 1, 0), f, r),
                      lambda m: m / _LEVEL_DENOM * 0.45, True),
    "TranslateYRel": (lambda img, a, f, r: _affine(img, (1, 0, 0, 0, 1, a * img.size[1]), f, r),
                      lambda m: m / _LEVEL_DENOM * 0.45, True),
}
# ImageEnhance's four, with factor 0.1 + 1.8 m / 10; the "Increasing" ones move away from 1.0 in a random
# direction: max(0.1, 1 +- 0.9 m / 10).
def _enhancement(cls):
    return lambda img, a, f, r: cls(img).enhance(a)


for _name in ("Color", "Contrast", "Brightness", "Sharpness"):
    _OPS[_name] = (_enhancement(getattr(ImageEnhance, _name)), lambda m: m / _LEVEL_DENOM * 1.8 + 0.1, False)
    _OPS[_name + "Increasing"] = (_OPS[_name][0], lambda m: m / _LEVEL_DENOM * 0.9, True)

_RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_RAND_INCREASING_TRANSFORMS = tuple(
    n + "Increasing" if n in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness") else n
    for n in _RAND_TRANSFORMS)


def op_argument(name: str, magnitude: float, negate: bool):
    """The argument timm's level function gives op `name` at `magnitude` (`negate`: its random sign draw)."""
    _, level, signed = _OPS[name]
    if level is None:
        return None
    arg = level(magnitude)
    if signed:
        arg = -arg if negate else arg
        if name.endswith("Increasing"):
            arg = max(0.1, 1.0 + arg)
    return arg


def apply_op(img: Image.Image, name: str, arg, fill=(128, 128, 128), resample=BICUBIC) -> Image.Image:
    return _OPS[name][0](img, arg, fill, resample)


# timm's RandAugment config sections: name -> (field, parser)
_SECTIONS = {"m": ("magnitude", lambda v: float(int(v))), "n": ("num_layers", int), "p": ("prob", float),
             "mstd": ("magnitude_std", lambda v: float("inf") if float(v) > 100 else float(v)),
             "mmax": ("magnitude_max", lambda v: float(int(v))), "inc": ("increasing", lambda v: bool(int(v)))}


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with probability
    `prob` at a magnitude drawn from N(magnitude, magnitude_std) (uniform on [0, m] if the std is inf) and
    clipped to [0, magnitude_max]."""
    ops: tuple[str, ...] = _RAND_INCREASING_TRANSFORMS
    magnitude: float = 9.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.5
    magnitude_max: float = _LEVEL_DENOM
    fill: tuple[int, int, int] = (124, 116, 104)   # round(255 * ImageNet mean)
    resample: int = BICUBIC

    @classmethod
    def from_string(cls, spec: str, **kw) -> "RandAugment":
        """Parses timm's config strings: "rand-m9-mstd0.5-inc1", sections m, n, p, mstd, mmax, inc."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand-', got {spec!r}")
        args = {}
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)(\d.*)", part)
            if m is None or m[1] not in _SECTIONS:
                what = "bad" if part.rstrip("0123456789.") in _SECTIONS else "unknown"   # a known one, no value
                raise ValueError(f"{what} RandAugment section {part!r} in {spec!r} (known: {', '.join(_SECTIONS)})")
            field, parse = _SECTIONS[m[1]]
            args[field] = parse(m[2])
        increasing = args.pop("increasing", False)
        ops = _RAND_INCREASING_TRANSFORMS if increasing else _RAND_TRANSFORMS
        return cls(ops=ops, **args, **kw)

    def __call__(self, img: Image.Image, rng) -> Image.Image:
        for i in rng.choice(len(self.ops), self.num_layers):
            name = self.ops[int(i)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std == float("inf"):
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            m = max(0.0, min(m, self.magnitude_max))
            negate = _OPS[name][2] and rng.random() > 0.5
            img = apply_op(img, name, op_argument(name, m, negate), self.fill, self.resample)
        return img


# ------------------------------------------------------------------------------------------------------------
# Random erasing: the box on the host (timm RandomErasing._erase, count 1), the noise on the device

def erase_box(height: int, width: int, rng, prob: float = 0.25, min_area: float = 0.02,
              max_area: float = 1 / 3, min_aspect: float = 0.3) -> np.ndarray:
    """[top, left, h, w] of the erased box, or zeros when nothing is erased."""
    if rng.random() > prob:
        return np.zeros(4, np.int32)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = rng.integers(0, height - h + 1)
            left = rng.integers(0, width - w + 1)
            return np.array([top, left, h, w], np.int32)
    return np.zeros(4, np.int32)


# ------------------------------------------------------------------------------------------------------------
# Device side (JAX): normalisation, erasing, mixup / cutmix

def normalize(images, mean, std, dtype=None):
    """uint8 NHWC -> (x / 255 - mean) / std, as ToTensor + Normalize."""
    import jax.numpy as jnp
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x if dtype is None else x.astype(dtype)


def _box_mask(height: int, width: int, boxes):
    """(B, H, W, 1) mask of boxes (B, 4) given as [top, left, h, w]."""
    import jax.numpy as jnp
    iy = jnp.arange(height)[None, :, None]
    ix = jnp.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    return ((iy >= top) & (iy < top + h) & (ix >= left) & (ix < left + w))[..., None]


def random_erase(x, boxes, key):
    """Replaces each image's box with N(0, 1) noise (timm RandomErasing mode "pixel" after normalisation)."""
    import jax
    noise = jax.random.normal(key, x.shape, x.dtype)
    return jax.numpy.where(_box_mask(x.shape[1], x.shape[2], boxes), noise, x)


@dataclasses.dataclass(frozen=True)
class Mixup:
    """timm's Mixup in mode "batch" with label smoothing, applied per group of consecutive images (each group
    flips onto itself with its own lambda and box, as timm does on each data-parallel worker)."""
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def params(self, rng, num_groups: int, height: int, width: int):
        """Per group, timm's `_params_per_batch` and `cutmix_bbox_and_lam` (correct_lam): lam (float32),
        use_cutmix (bool) and the cutmix box [top, left, h, w] (int32, zeros without cutmix)."""
        lam = np.ones(num_groups, np.float32)
        use_cutmix = np.zeros(num_groups, bool)
        box = np.zeros((num_groups, 4), np.int32)
        for g in range(num_groups):
            if not rng.random() < self.prob:
                continue
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix[g] = rng.random() < self.switch_prob
            else:
                use_cutmix[g] = self.cutmix_alpha > 0
            alpha = self.cutmix_alpha if use_cutmix[g] else self.mixup_alpha
            lam_g = float(rng.beta(alpha, alpha))
            lam[g] = lam_g
            if use_cutmix[g]:
                ratio = np.sqrt(1 - lam_g)
                cut_h, cut_w = int(height * ratio), int(width * ratio)
                cy, cx = rng.integers(0, height), rng.integers(0, width)
                yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
                xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
                box[g] = (yl, xl, yh - yl, xh - xl)
                lam[g] = 1.0 - (yh - yl) * (xh - xl) / float(height * width)
        return lam, use_cutmix, box

    def apply(self, x, labels, lam, use_cutmix, box):
        """Mixes NHWC `x` (B = groups * group size) with its per-group flip; returns (x, soft targets)."""
        import jax.numpy as jnp
        g = lam.shape[0]
        b, h, w, c = x.shape
        xg = x.reshape(g, b // g, h, w, c)
        flipped = xg[:, ::-1]
        lam_x = lam.astype(x.dtype)[:, None, None, None, None]
        mixed = xg * lam_x + flipped * (1 - lam_x)
        cut = _box_mask(h, w, box)[:, None]
        cutmixed = jnp.where(cut, flipped, xg)
        out = jnp.where(use_cutmix[:, None, None, None, None], cutmixed, mixed).reshape(x.shape)
        yg = smooth_labels(labels, self.num_classes, self.label_smoothing).reshape(g, b // g, -1)
        target = yg * lam[:, None, None] + yg[:, ::-1] * (1.0 - lam[:, None, None])
        return out, target.reshape(b, -1)


def smooth_labels(labels, num_classes: int, smoothing: float):
    """One-hot targets with label smoothing (timm's on/off values): training without mixup, and Mixup's."""
    import jax
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes
