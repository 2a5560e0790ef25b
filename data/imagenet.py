"""ImageNet for train.py: sources and the per-example transform, read by data.pipeline.Loader (grain).

Sources (random access; source[i] is {"image": encoded bytes, "label": int}; nothing here imports TensorFlow):
- `ImageFolder(root, split)`: root/split/CLASS/*.JPEG (classes sorted by name, files sorted by path);
- `TfdsSource(data_dir, split, name="imagenet2012")`: a tensorflow-datasets build prepared in array_record
  format (`tfds build imagenet2012 --file_format=array_record`), read with `tfds.data_source`.

Order, host sharding, per-example random draws and resuming: data.pipeline.Loader. A batch is a dict of numpy
arrays: image uint8 (L, S, S, 3), label int32 (L,), index int64 (L,), valid bool (L,) (False: padding rows of
evaluation) and, in training, erase int32 (L, 4) (random-erasing boxes).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import re

import numpy as np
from PIL import Image

from data import augment

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class ImageFolder:
    """root/split/CLASS/IMAGE files; labels are the indices of the sorted class folder names."""

    def __init__(self, root: str, split: str):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise ValueError(f"ImageFolder split directory {path!r} does not exist")
        self.classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
        if not self.classes:
            raise ValueError(f"ImageFolder split directory {path!r} has no class folders")
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            for dirpath, _, names in sorted(os.walk(os.path.join(path, cls))):
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.join(dirpath, name))
                        labels.append(label)
        if not files:
            raise ValueError(f"ImageFolder split directory {path!r} has no images")
        self.files, self.labels = files, np.asarray(labels, np.int32)
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with open(self.files[index], "rb") as f:
            return {"image": f.read(), "label": int(self.labels[index])}


class TfdsSource:
    """A tensorflow-datasets ImageNet (`image`, `label` features) prepared as array_record, random access."""

    def __init__(self, data_dir: str, split: str, name: str = "imagenet2012"):
        import tensorflow_datasets as tfds
        self._args = (data_dir, split, name)
        root = os.path.join(data_dir, name)
        versions = sorted((d for d in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", d)),
                          key=lambda v: tuple(map(int, v.split(".")))) if os.path.isdir(root) else []
        if not versions:
            raise ValueError(f"no prepared tensorflow-datasets {name!r} (a VERSION folder) in {root!r}")
        try:  # the prepared files carry their own features: no dataset code (or TensorFlow) is needed
            builder = tfds.builder_from_directory(os.path.join(root, versions[-1]))
            self.num_classes = builder.info.features["label"].num_classes
            self._source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:  # tfds raises assorted types for missing or unprepared data
            raise ValueError(f"cannot open tensorflow-datasets {name!r} split {split!r} in {data_dir!r} "
                             f"(prepared in array_record format?): {e}") from e

    def __len__(self):
        return len(self._source)

    def __reduce__(self):   # grain's worker processes reopen the files
        return TfdsSource, self._args

    def __getitem__(self, index: int) -> dict:
        ex = self._source[index]
        return {"image": ex["image"], "label": int(ex["label"])}


def open_source(kind: str, data_dir: str, split: str, tfds_name: str = "imagenet2012"):
    if kind == "imagefolder":
        return ImageFolder(data_dir, split)
    if kind == "tfds":
        return TfdsSource(data_dir, split, tfds_name)
    raise ValueError(f"unknown data source {kind!r}; expected 'imagefolder' or 'tfds'")


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class Transform:
    """Per-example host work for data.pipeline.Loader. Training: random-resized crop, flip, RandAugment,
    erasing box; evaluation: resize + centre crop. Returns {"image": uint8 (S, S, 3)} and in training
    "erase", the random-erasing box (applied on the device)."""
    train: bool
    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    erase_prob: float = 0.25
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)

    @functools.cached_property
    def _rand_augment(self):
        fill = tuple(min(255, round(255 * m)) for m in self.mean)
        return augment.RandAugment.from_string(self.rand_augment, fill=fill,
                                               resample=augment.INTERPOLATIONS[self.interpolation])

    def __call__(self, example: dict, rng: np.random.Generator | None) -> dict:
        img = decode(example["image"])
        resample = augment.INTERPOLATIONS[self.interpolation]
        if not self.train:
            return {"image": np.asarray(augment.resize_center_crop(img, self.image_size, self.crop_pct, resample))}
        img = augment.random_resized_crop(img, self.image_size, rng, self.scale, self.ratio, resample, self.hflip)
        if self.rand_augment:
            img = self._rand_augment(img, rng)
        return {"image": np.asarray(img), "erase": augment.erase_box(self.image_size, self.image_size, rng,
                                                                     self.erase_prob)}

    def empty(self) -> dict:
        """A padding row (evaluation)."""
        return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8)}
