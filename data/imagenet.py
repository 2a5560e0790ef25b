"""ImageNet input pipeline: sources, deterministic sharded order, host-side decoding and augmentation.

Sources (both return the encoded image bytes and an int label; nothing here imports TensorFlow):
- `ImageFolder(root, split)`: root/split/CLASS/*.JPEG (classes sorted by name, files sorted by path);
- `TfdsSource(data_dir, split, name="imagenet2012")`: a tensorflow-datasets build prepared in array_record
  format (`tfds build imagenet2012 --file_format=array_record`), read with `tfds.data_source`.

Order: epoch e visits `default_rng((seed, e)).permutation(n)`, cut into global batches of `global_batch`
(the last partial batch is dropped in training). Process p of P reads only rows [p*L, (p+1)*L) of each global
batch (L = global_batch / P), so the global batch, and each sample's augmentation (seeded by seed, epoch and
its position in the epoch), is the same whatever the number of hosts. The position of the iterator is a
function of the step alone, which is what makes resuming exact.

A batch is a dict of numpy arrays: image uint8 (L, S, S, 3), label int32 (L,), and erase int32 (L, 4)
(random-erasing boxes, training) or mask bool (L,) (evaluation: False on padding rows).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import multiprocessing
import os
import queue
import re
import threading
from collections.abc import Iterator

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

    def read(self, index: int) -> tuple[bytes, int]:
        with open(self.files[index], "rb") as f:
            return f.read(), int(self.labels[index])


class TfdsSource:
    """A tensorflow-datasets ImageNet (`image`, `label` features) prepared as array_record, random access."""

    def __init__(self, data_dir: str, split: str, name: str = "imagenet2012"):
        import tensorflow_datasets as tfds
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

    def read(self, index: int) -> tuple[bytes, int]:
        ex = self._source[index]
        return ex["image"], int(ex["label"])


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
    """Per-sample host work. Training: random-resized crop, flip, RandAugment, erasing box; evaluation:
    resize + centre crop. Returns (uint8 image, extra) with extra the erasing box in training."""
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

    def __call__(self, data: bytes, rng: np.random.Generator | None):
        img = decode(data)
        resample = augment.INTERPOLATIONS[self.interpolation]
        if not self.train:
            return np.asarray(augment.resize_center_crop(img, self.image_size, self.crop_pct, resample)), None
        img = augment.random_resized_crop(img, self.image_size, rng, self.scale, self.ratio, resample, self.hflip)
        if self.rand_augment:
            img = self._rand_augment(img, rng)
        box = augment.erase_box(self.image_size, self.image_size, rng, self.erase_prob)
        return np.asarray(img), box


# ------------------------------------------------------------------------------------------------------------
# Worker processes: each opens the source once and maps (index, seed entropy) -> sample.

_WORKER = {}


def _init_worker(source_args, transform):
    _WORKER["source"] = open_source(*source_args)
    _WORKER["transform"] = transform


def _load(items):
    return _load_with(_WORKER["source"], _WORKER["transform"], items)


def _load_with(source, transform, items):
    out = []
    for index, entropy in items:
        if index < 0:   # evaluation padding, label -1
            out.append((np.zeros((transform.image_size,) * 2 + (3,), np.uint8), None, -1))
            continue
        data, label = source.read(index)
        rng = np.random.default_rng(entropy) if entropy is not None else None
        image, extra = transform(data, rng)
        out.append((image, extra, label))
    return out


class Pipeline:
    """Produces this process's share of each global batch, in order, `prefetch` batches ahead, with `workers`
    processes (0: in a background thread of this process)."""

    def __init__(self, source_args: tuple, transform: Transform, global_batch: int, *, seed: int,
                 process_index: int = 0, process_count: int = 1, workers: int = 0, prefetch: int = 2,
                 chunk: int = 16):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        self.source_args, self.transform, self.seed = source_args, transform, seed
        self.source = open_source(*source_args)
        self.size, self.num_classes = len(self.source), self.source.num_classes
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.process_index = process_index
        self.workers, self.prefetch, self.chunk = workers, prefetch, chunk
        if transform.train and self.size < global_batch:
            raise ValueError(f"the training split has {self.size} images, fewer than one global batch "
                             f"({global_batch})")

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per training epoch; evaluation pads the last batch instead."""
        if self.transform.train:
            return self.size // self.global_batch
        return -(-self.size // self.global_batch)

    def _items(self, start_step: int, num_steps: int | None):
        """(index, entropy) per local sample, batch after batch, from global step `start_step` on."""
        spe, g, lo = self.steps_per_epoch, self.global_batch, self.process_index * self.local_batch
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            epoch, b = divmod(step, spe)
            if self.transform.train:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
            else:
                order = np.arange(self.size)
            for pos in range(b * g + lo, b * g + lo + self.local_batch):
                if pos < self.size:
                    yield int(order[pos]), ((self.seed, 1, epoch, pos) if self.transform.train else None)
                else:
                    yield -1, None
            step += 1
            if not self.transform.train and b == spe - 1 and num_steps is None:
                return

    def _samples(self, items) -> Iterator:
        chunks = _chunked(items, self.chunk)
        if self.workers == 0:
            for c in chunks:
                yield from _load_with(self.source, self.transform, c)
            return
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(self.source_args, self.transform)) as pool:
            pending = collections.deque()
            window = max(2 * self.workers, (self.prefetch + 1) * self.local_batch // self.chunk + 1)
            for c in chunks:
                pending.append(pool.submit(_load, c))
                if len(pending) >= window:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()

    def _batches(self, start_step: int, num_steps: int | None):
        images, extras, labels = [], [], []
        for image, extra, label in self._samples(self._items(start_step, num_steps)):
            images.append(image)
            extras.append(extra)
            labels.append(label)
            if len(images) == self.local_batch:
                label = np.asarray(labels, np.int32)
                batch = {"image": np.stack(images), "label": np.maximum(label, 0)}
                if self.transform.train:
                    batch["erase"] = np.stack(extras)
                else:
                    batch["mask"] = label >= 0
                yield batch
                images, extras, labels = [], [], []

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Local batches for global steps start_step, start_step + 1, ... (training: endless unless
        num_steps; evaluation: one pass), prefetched in a background thread."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()
        end = object()

        def produce():
            try:
                for batch in self._batches(start_step, num_steps):
                    if stop.is_set():
                        return
                    q.put(batch)
                q.put(end)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass


def _chunked(it, n):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
