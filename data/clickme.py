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

data_source() prepares under a lock (`<data_dir>/.clickme-<config>.lock`), so runs sharing a data directory
prepare it once, and records what the dataset was built from in `<dataset dir>/source.json` (the shards'
directory, sizes, modification times and SHA-256, or the download URL and the shards' SHA-256). A prepared
dataset whose source no longer matches (another --clickme-dir with other shards, another URL, another
subset) is rebuilt; a call that names no source (no clickme_dir, base_url or num_shards) uses whatever is
prepared. A shard without records is an error (unless allow_empty_shards / $DCLS_JAX_ALLOW_EMPTY_SHARDS=1).

Training (train.py data="clickme", the harmonization objective): data.pipeline.Loader yields shuffled,
host-sharded, resumable batches of the Harmonization pipeline's float images and blurred human maps
(data.pipeline.ClickmeTransform):

    source = data_source("train", data_dir=..., config="with_train")
    pipe = pipeline.Loader(source, pipeline.ClickmeTransform(train=True), 64, seed=0)
    for batch in pipe.iterate(start_step):      # image (L, 224, 224, 3) float32, heatmap (L, 224, 224), label
        ...
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data.download import cached_download, file_lock, read_record, sha256_file, write_atomic
from data.preprocess import jpeg_header
from data.tfrecord import RecordError, parse_example, read_records

BASE_URL = "https://storage.googleapis.com/serrelab/prj_harmonization/dataset/click-me"
# split -> (URL folder and file prefix, official number of shards). Harmonization's loader reads val-0..16
# (a val-17 shard of 256 records exists but is not part of the official set) and train-0..317. The bucket
# publishes no checksums: each shard's SHA-256 is recorded at its first download (data.download) and checked
# afterwards.
SHARDS = {"validation": ("val", 17), "train": ("train", 318)}
NUM_VALIDATION = 52_224                 # images the study assumes in the 17 validation shards
NUM_CLASSES = 1000
SOURCE_FILE = "source.json"
# A shard without records is an error (a real ClickMe shard is never empty); tests that imitate the 17-shard
# layout with a few records set this variable to "1" (or pass allow_empty_shards=True) to accept them.
ALLOW_EMPTY_ENV = "DCLS_JAX_ALLOW_EMPTY_SHARDS"

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
        if (p := Path(clickme_dir) / name).is_file():
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
    for name, channels in (("image", 3), ("heatmap", 1)):
        try:
            jpeg_header(out[name], f"feature {name!r}", channels)
        except ValueError as e:
            raise RecordError(f"{where}: {e}") from None
    if not 0 <= (label := int(out["label"])) < NUM_CLASSES:
        raise RecordError(f"{where}: label {label} outside [0, {NUM_CLASSES})")
    return dict(out, label=label)


class Clickme(tfds.core.GeneratorBasedBuilder):
    """ClickMe human feature-importance maps on ImageNet images (Harmonization, Fel et al. 2022).

    The shards are downloaded with data.download into the download manager's directory, not with
    `dl_manager.download`: tfds's downloader has no read timeout, minimum rate, size cap or resume, and takes
    the file name from the server's Content-Disposition; data.download has all of these and records each
    shard's SHA-256 (the bucket publishes none for tfds's checksum files)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original TFRecord shards, JPEG bytes unchanged."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="default", description="validation split only (the study's data)"),
        tfds.core.BuilderConfig(name="with_train", description="validation and train splits"),
    ]
    # tfds derives this from the package through importlib_resources (not installed, and only needed there).
    code_path = epath.Path(__file__)

    def __init__(self, *, clickme_dir: str | os.PathLike | None = None, base_url: str = BASE_URL,
                 num_shards: Mapping[str, int] | None = None, allow_empty_shards: bool | None = None, **kwargs):
        """clickme_dir: local directory with the shards (no download); base_url: where to download them;
        num_shards: {split: n} to read only shards 0..n-1 (tests, samples). Through data_source() a
        prepared dataset built from another source than the one named is rebuilt (see the module's docstring)."""
        self._clickme_dir = clickme_dir
        self._base_url = base_url
        self._num_shards = {s: n for s, (_, n) in SHARDS.items()} | dict(num_shards or {})
        self._shard_sha256: dict[tuple[str, int], str] = {}   # of the shards read by the last preparation
        self._allow_empty = (os.environ.get(ALLOW_EMPTY_ENV) == "1" if allow_empty_shards is None
                             else allow_empty_shards)
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

    def _splits(self) -> list[str]:
        return ["validation"] + (["train"] if self.builder_config.name == "with_train" else [])

    def _shard_paths(self, split: str, dl_manager) -> list[Path]:
        n = self._num_shards[split]
        if self._clickme_dir is not None:
            paths = [find_local_shard(self._clickme_dir, split, i) for i in range(n)]
            self._shard_sha256 |= {(split, i): sha256_file(p) for i, p in enumerate(paths)}
            return paths
        cache = Path(os.fspath(dl_manager.download_dir)) / "clickme"
        paths = [cached_download(shard_url(split, i, self._base_url), cache) for i in range(n)]
        self._shard_sha256 |= {(split, i): read_record(p)["sha256"] for i, p in enumerate(paths)}
        return paths

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, self._shard_paths(s, dl_manager)) for s in self._splits()}

    def source(self) -> dict:
        """What the dataset would be built from now (no hashes: those are computed while preparing)."""
        splits = self._splits()
        if self._clickme_dir is None:
            return {"kind": "url", "base_url": self._base_url, "num_shards": {s: self._num_shards[s] for s in splits}}
        shards = [{"split": s, "shard": i, "path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                  for s in splits for i in range(self._num_shards[s])
                  for p in [find_local_shard(self._clickme_dir, s, i)] for st in [p.stat()]]
        return {"kind": "dir", "dir": str(Path(self._clickme_dir).resolve()), "shards": shards}

    def _generate_examples(self, split: str, paths: list[Path]):
        index = 0
        for shard, path in enumerate(paths):
            records = read_records(path)
            if not records and self._allow_empty:
                _log.warning("%s: the shard holds no records", path)
            elif not records:
                raise RecordError(f"{path}: the shard holds no records (an empty or truncated download?); "
                                  f"a ClickMe shard is never empty (set {ALLOW_EMPTY_ENV}=1 to accept empty shards)")
            for record, data in enumerate(records):
                ex = parse_clickme(data, f"{path}: record {record}")
                yield index, dict(ex, index=index, shard=shard, record=record)
                index += 1
        if split == "validation" and len(paths) == SHARDS[split][1] and index != NUM_VALIDATION:
            _log.warning("ClickMe validation has %d records; the study assumes %d", index, NUM_VALIDATION)


def data_source(split: str = "validation", *, data_dir: str | os.PathLike | None = None, config: str | None = None,
                decode: bool = False, **builder_kwargs):
    """The split as a random-access tfds data source (prepared on first use, rebuilt when its source changed;
    see the module's docstring). With decode=False (default) "image" and "heatmap" are the original JPEG
    bytes, to be decoded with data.preprocess."""
    decoders = None if decode else {"image": tfds.decode.SkipDecoding(), "heatmap": tfds.decode.SkipDecoding()}
    name = "clickme" + (f"/{config}" if config else "")
    builder = prepare(name, data_dir, **builder_kwargs)
    return builder.as_data_source(split=split, decoders=decoders)


def prepare(name: str = "clickme", data_dir: str | os.PathLike | None = None, **builder_kwargs) -> Clickme:
    """The prepared builder: under a lock shared by the runs using `data_dir`, reused if it was built from
    the same source, else (re)built, and its source recorded. The source is compared only when the caller
    names one (clickme_dir, base_url or num_shards): without, a prepared dataset is used as it is."""
    version_dir = Path(os.fspath(tfds.builder(name, data_dir=data_dir, **builder_kwargs).data_dir))
    config = version_dir.parent.name
    with file_lock(version_dir.parents[2] / f".clickme-{config}.lock"):
        for stale in version_dir.parent.glob(f"incomplete.*_{version_dir.name}"):   # killed preparations
            shutil.rmtree(stale, ignore_errors=True)
        builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)    # sees what another run prepared
        if builder.is_prepared() and not {"clickme_dir", "base_url", "num_shards"} & builder_kwargs.keys():
            return builder                         # no source named: whatever was prepared
        current, record = builder.source(), None
        if builder.is_prepared():
            record = _same_source(recorded := _read_json(version_dir / SOURCE_FILE), current)
            if record is None:
                _log.warning("the ClickMe dataset prepared in %s was built from %s; now from %s: rebuilding it",
                             version_dir, _describe(recorded), _describe(current))
                trash = version_dir.with_name(f"incomplete.stale{os.getpid()}_{version_dir.name}")
                os.rename(version_dir, trash)
                shutil.rmtree(trash, ignore_errors=True)
                builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
            elif record is recorded:
                return builder
        if record is None:
            builder.download_and_prepare()
            hashes = builder._shard_sha256
            record = (dict(current, sha256={f"{s}-{i}": h for (s, i), h in sorted(hashes.items())})
                      if current["kind"] == "url" else
                      dict(current, shards=[dict(sh, sha256=hashes[sh["split"], sh["shard"]])
                                            for sh in current["shards"]]))
        write_atomic(version_dir / SOURCE_FILE, json.dumps(record, indent=1))
    return builder


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(source) -> str:
    if not isinstance(source, dict):
        return "an unrecorded source"
    return source.get("dir") or f"{source.get('base_url')} ({source.get('num_shards')} shards)"


def _same_source(recorded, current: dict) -> dict | None:
    """The record to keep if the dataset built from `recorded` is the one `current` would build (`recorded`
    itself, or for a directory whose shards were touched but hold the same bytes, a refreshed record)."""
    try:
        if current["kind"] == "url":
            return recorded if all(recorded[k] == v for k, v in current.items()) else None
        old, new = recorded["shards"], current["shards"]
        if recorded["kind"] != "dir" or len(old) != len(new):
            return None
        if all(o[k] == n[k] for o, n in zip(old, new) for k in ("split", "shard", "path", "size", "mtime_ns")):
            return recorded
        if all(o[k] == n[k] for o, n in zip(old, new) for k in ("split", "shard", "size")):
            new = [dict(n, sha256=sha256_file(n["path"])) for n in new]
            return dict(current, shards=new) if all(o["sha256"] == n["sha256"] for o, n in zip(old, new)) else None
    except (KeyError, TypeError, OSError):
        pass
    return None
