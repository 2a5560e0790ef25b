"""ClickMe (Harmonization's human feature-importance maps) as a tensorflow-datasets dataset, built without
TensorFlow.

    import data.clickme                       # registers the builder "clickme"
    ds = data.clickme.data_source("validation", data_dir=..., clickme_dir=None)   # downloads if needed
    ex = ds[0]   # {"image": JPEG bytes, "heatmap": JPEG bytes, "label": int64, "index", "shard", "record"}

or plainly `tfds.data_source("clickme", split="validation", data_dir=...)` (images then decoded by tfds with
OpenCV, which is not TensorFlow's decoder: use data.preprocess for the study's pixels).

The builder reads the original TFRecord shards (downloaded from the official URLs into
<data_dir>/downloads/clickme, or found in `clickme_dir`), checks every record's CRC, parses the
tf.train.Example and writes array_record files, keeping the JPEG bytes exactly as they are. Records keep
their reading order (shard by shard, record by record: `index`), not the interleaved order of Harmonization's
tf.data loader, which is irrelevant to the mean score. Configs: "default" builds the validation split only
(17 shards, the study's data); "with_train" also builds the 318 training shards.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import simplejpeg
import tensorflow_datasets as tfds
from etils import epath

from data.tfrecord import RecordError, parse_example, read_records

BASE_URL = "https://storage.googleapis.com/serrelab/prj_harmonization/dataset/click-me"
# split -> (URL folder and file prefix, official number of shards). Harmonization's loader reads val-0..16
# (a val-17 shard of 256 records exists but is not part of the official set) and train-0..317.
SHARDS = {"validation": ("val", 17), "train": ("train", 318)}
NUM_VALIDATION = 52_224                 # images the study assumes in the 17 validation shards
NUM_CLASSES = 1000

_log = logging.getLogger(__name__)


def shard_url(split: str, i: int, base_url: str = BASE_URL) -> str:
    prefix = SHARDS[split][0]
    return f"{base_url.rstrip('/')}/{prefix}/{prefix}-{i}.tfrecords"


def find_local_shard(clickme_dir: str | os.PathLike, split: str, i: int) -> Path:
    """Shard i of a split in a local directory: <prefix>-i.tfrecords, <prefix>/<prefix>-i.tfrecords, or
    Harmonization's Keras cache name clickme_<prefix>_i."""
    prefix = SHARDS[split][0]
    names = [f"{prefix}-{i}.tfrecords", f"{prefix}/{prefix}-{i}.tfrecords", f"clickme_{prefix}_{i}"]
    for name in names:
        p = Path(clickme_dir) / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"clickme_dir {os.fspath(clickme_dir)!r} has no shard {i} of the {split} split "
                            f"(looked for {', '.join(names)})")


def parse_clickme(record: bytes, where: str) -> dict:
    """A serialized ClickMe tf.train.Example -> {"image": bytes, "heatmap": bytes, "label": int}.

    Checks what Harmonization's loader relies on: one JPEG image with 3 channels, one grayscale (1-channel)
    JPEG heatmap, one int64 label in [0, 1000). `where` names the file and record in errors."""
    try:
        ex = parse_example(record)
    except RecordError as e:
        raise RecordError(f"{where}: malformed tf.train.Example: {e}") from None
    out = {}
    for name, kind in (("image", "bytes_list"), ("heatmap", "bytes_list"), ("label", "int64_list")):
        if name not in ex:
            raise RecordError(f"{where}: missing feature {name!r} (features: {sorted(ex)})")
        v = ex[name]
        ok = isinstance(v, list) if kind == "bytes_list" else (isinstance(v, np.ndarray) and v.dtype == np.int64)
        if not ok or len(v) != 1:
            got = f"{len(v)} value(s)" if ok else ("bytes_list" if isinstance(v, list) else f"{v.dtype} list")
            raise RecordError(f"{where}: feature {name!r} must be a {kind} with one value, got {got}")
        out[name] = v[0]
    for name, want in (("image", ("YCbCr", "RGB")), ("heatmap", ("Gray",))):
        try:
            colorspace = simplejpeg.decode_jpeg_header(out[name])[2]
        except ValueError as e:
            raise RecordError(f"{where}: feature {name!r} is not a readable JPEG ({e})") from None
        if colorspace not in want:
            channels = {"Gray": 1, "YCbCr": 3, "RGB": 3}.get(colorspace, 4)
            raise RecordError(f"{where}: feature {name!r} is a {channels}-channel ({colorspace}) JPEG, expected "
                              f"{'a 1-channel grayscale' if name == 'heatmap' else 'a 3-channel colour'} JPEG")
    label = int(out["label"])
    if not 0 <= label < NUM_CLASSES:
        raise RecordError(f"{where}: label {label} outside [0, {NUM_CLASSES})")
    out["label"] = label
    return out


class Clickme(tfds.core.GeneratorBasedBuilder):
    """ClickMe human feature-importance maps on ImageNet images (Harmonization, Fel et al. 2022)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original TFRecord shards, JPEG bytes unchanged."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="default", description="validation split only (the study's data)"),
        tfds.core.BuilderConfig(name="with_train", description="validation and train splits"),
    ]
    # tfds derives this from the package through importlib_resources (not installed, and only needed there).
    code_path = epath.Path(__file__)

    def __init__(self, *, clickme_dir: str | os.PathLike | None = None, base_url: str = BASE_URL,
                 num_shards: Mapping[str, int] | None = None, **kwargs):
        """clickme_dir: local directory with the shards (no download); base_url: where to download them;
        num_shards: {split: n} to read only shards 0..n-1 (tests, samples). They matter only when the
        dataset is prepared: a prepared dataset in data_dir is reused as it is, so keep subsets apart."""
        self._clickme_dir = clickme_dir
        self._base_url = base_url
        self._num_shards = {s: n for s, (_, n) in SHARDS.items()} | dict(num_shards or {})
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "heatmap": tfds.features.Image(shape=(None, None, 1), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(np.int64, doc="position in the split's reading order"),
                "shard": tfds.features.Scalar(np.int32, doc="source TFRecord shard"),
                "record": tfds.features.Scalar(np.int32, doc="record number within the shard"),
            }),
            homepage="https://serre-lab.github.io/Harmonization/",
            citation="@inproceedings{fel2022aligning, title={Harmonizing the object recognition strategies of "
                     "deep neural networks with humans}, author={Fel, Thomas and Felipe, Ivan and Linsley, Drew "
                     "and Serre, Thomas}, booktitle={NeurIPS}, year={2022}}",
            disable_shuffling=True,
        )

    def _shard_paths(self, split: str, dl_manager) -> list[Path]:
        n = self._num_shards[split]
        if self._clickme_dir is not None:
            return [find_local_shard(self._clickme_dir, split, i) for i in range(n)]
        from data.download import cached_download
        cache = Path(os.fspath(dl_manager.download_dir)) / "clickme"
        return [Path(cached_download(shard_url(split, i, self._base_url), cache_dir=cache)) for i in range(n)]

    def _split_generators(self, dl_manager):
        splits = ["validation"] + (["train"] if self.builder_config.name == "with_train" else [])
        return {s: self._generate_examples(s, self._shard_paths(s, dl_manager)) for s in splits}

    def _generate_examples(self, split: str, paths: list[Path]):
        index = 0
        for shard, path in enumerate(paths):
            for record, data in enumerate(read_records(path)):
                ex = parse_clickme(data, f"{path}: record {record}")
                yield index, dict(ex, index=index, shard=shard, record=record)
                index += 1
        if split == "validation" and len(paths) == SHARDS[split][1] and index != NUM_VALIDATION:
            _log.warning("ClickMe validation has %d records; the study assumes %d", index, NUM_VALIDATION)


def data_source(split: str = "validation", *, data_dir: str | os.PathLike | None = None, config: str | None = None,
                decode: bool = False, **builder_kwargs):
    """The split as a random-access tfds data source (prepared on first use). With decode=False (default)
    "image" and "heatmap" are the original JPEG bytes, to be decoded with data.preprocess."""
    decoders = None if decode else {"image": tfds.decode.SkipDecoding(), "heatmap": tfds.decode.SkipDecoding()}
    return tfds.data_source("clickme" + (f"/{config}" if config else ""), split=split, data_dir=data_dir,
                            decoders=decoders, builder_kwargs=builder_kwargs)
