"""Input pipelines on grain: ClickMe evaluation batches, and the training loader of train.py.

Both are a grain MapDataset of rows (row k of this process: a function of k alone, so reading can start at any
position), read and transformed by grain's threads or worker processes, and batched to a fixed size: padding
rows are zeros with valid=False and index -1.

Evaluation (evaluate.py):

    source = data.clickme.data_source("validation", data_dir=...)
    for batch in batches(source, entry, batch_size=64, process_index=jax.process_index(),
                         process_count=jax.process_count()):
        batch["image"]     # (B, S, S, 3) float32, the model's input (S = entry.input_size); with
                           # entry=None the (B, 224, 224, 3) float image in [0, 255] before the transform
        batch["heatmap"]   # (B, 224, 224) float32 human map (the "study" protocol's; see evaluation.protocols)
        batch["label"]     # (B,) int32
        batch["index"]     # (B,) int64, the record's index in the split (-1 for padding)
        batch["valid"]     # (B,) bool, False for padding

The first `limit` records (all by default) are split into `process_count` contiguous blocks; process p
reads only block p. Every process yields the same number of batches; the last ones are padded, never
dropped, so each record appears exactly once over all processes.

Training (train.py): `Loader(source, transform, global_batch, seed=...)`. Epoch e visits
`default_rng((seed, e)).permutation(n)` in global batches of `global_batch` (the last partial batch dropped);
process p of P reads rows [p*L, (p+1)*L) of each global batch (L = global_batch / P), and each example's
random draws come from `default_rng((seed, 1, e, position in the epoch))`: the data are the same whatever the
number of hosts or workers. Evaluation (train=False) reads the split once in order, the last batch padded.
Every row is a function of its position, so `loader.iterate(step)` starts anywhere: the training checkpoint
saves `loader.state(step)` and a resumed run continues from `loader.resume_step(saved)`, reading exactly what
an uninterrupted one would (whatever its number of workers).
A batch: the transform's arrays (L, ...) plus label int32 (L,), index int64 (L,) (-1: padding) and
valid bool (L,).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import grain
import numpy as np
from absl import flags

from data.preprocess import SIZE, ModelTransform, clickme_heatmap, clickme_image, model_input
from dcls_jax.image import resize_bilinear


def rows_to_batches(rows: grain.MapDataset, batch_size: int, *, workers: int = 0, processes: bool = False,
                    prefetch: int = 2) -> grain.IterDataset:
    """A MapDataset of row dicts -> an IterDataset of batch dicts (np.stack of `batch_size` consecutive rows).

    Rows are read on `workers` threads (0: one background thread), `prefetch` batches ahead, or with
    processes=True by `workers` grain worker processes, each building whole batches (`prefetch` ahead each)."""
    if batch_size < 1 or prefetch < 1 or workers < 0:
        raise ValueError(f"batch_size and prefetch must be >= 1 and workers >= 0, got {batch_size}, {prefetch}, "
                         f"{workers}")
    if processes and workers:
        if not flags.FLAGS.is_parsed():   # grain's worker processes read absl flags (defaults outside absl.app)
            flags.FLAGS.mark_as_parsed()
        batched = rows.batch(batch_size).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        return batched.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch))
    if workers:
        options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=prefetch * batch_size)
        return rows.to_iter_dataset(options).batch(batch_size)
    batched = rows.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).batch(batch_size)
    return grain.experimental.ThreadPrefetchIterDataset(batched, prefetch_buffer_size=prefetch)


def drain(dataset: grain.IterDataset) -> Iterator:
    """The elements of `dataset`; its iterator (and any worker processes) closed when done or abandoned."""
    it = iter(dataset)
    try:
        yield from it
    finally:
        if hasattr(it, "close"):
            it.close()


def _row(arrays: dict, label: int, index: int) -> dict:
    return {**arrays, "label": np.int32(max(label, 0)), "index": np.int64(index), "valid": np.bool_(index >= 0)}


# ------------------------------------------------------------------------------------------------------------
# ClickMe evaluation


def preprocess_example(image: bytes, heatmap: bytes, transform: ModelTransform | None) -> tuple[np.ndarray, np.ndarray]:
    """JPEG bytes -> (model input or 224 float image, 224 x 224 human map)."""
    img = clickme_image(image)
    return (img if transform is None else model_input(img, transform)), clickme_heatmap(heatmap)


def shard_range(n: int, process_index: int, process_count: int) -> range:
    """Records [p * n // P, (p + 1) * n // P) of process p."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return range(process_index * n // process_count, (process_index + 1) * n // process_count)


def num_batches(n: int, batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields for n records: the largest shard, rounded up."""
    per_process = -(-n // process_count)
    return -(-per_process // batch_size)


@dataclasses.dataclass(frozen=True)
class _EvalRow:
    """Row k of a process: record records[k] preprocessed, or padding past the end (picklable for workers)."""
    source: object
    records: range
    transform: ModelTransform | None

    def __call__(self, k: int) -> dict:
        if k >= len(self.records):
            s = SIZE if self.transform is None else self.transform.input_size
            return _row({"image": np.zeros((s, s, 3), np.float32), "heatmap": np.zeros((SIZE, SIZE), np.float32)},
                        0, -1)
        i = self.records[k]
        ex = self.source[i]
        index = int(ex.get("index", i)) if hasattr(ex, "get") else i
        try:
            image, heatmap = preprocess_example(ex["image"], ex["heatmap"], self.transform)
        except Exception as e:
            raise ValueError(f"record {index} of the source: {e}") from e
        return _row({"image": image, "heatmap": heatmap}, int(ex["label"]), index)


def batches(source, entry=None, *, batch_size: int, limit: int | None = None, process_index: int = 0,
            process_count: int = 1, workers: int | None = None, processes: bool = False,
            prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Yields the evaluation batches described in the module docstring.

    source: a random-access sequence of examples {"image": JPEG bytes, "heatmap": JPEG bytes, "label",
    optionally "index" (else the position is used)} such as data.clickme.data_source(...); entry: a
    models.registry.Entry (or anything with resize_size, input_size, mean, std, interpolation), None for the
    224 image. Examples are read and preprocessed on `workers` grain threads (default: up to 8), or with
    processes=True by `workers` grain worker processes (default: all CPUs), which scale with the CPUs where
    threads stop at a few (the GIL): use processes for GPU evaluation; as for any spawned process, the main
    script must guard its entry point with `if __name__ == "__main__":`. `prefetch` batches are prepared ahead."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n = len(source) if limit is None else min(int(limit), len(source))
    records = shard_range(n, process_index, process_count)
    steps = num_batches(n, batch_size, process_count)
    cpus = os.cpu_count() or 1
    workers = workers or (cpus if processes else min(cpus, 8))
    rows = grain.MapDataset.range(steps * batch_size).map(_EvalRow(source, records, ModelTransform.of(entry)))
    yield from drain(rows_to_batches(rows, batch_size, workers=workers, processes=processes, prefetch=prefetch))


# ------------------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class _TrainRow:
    """Row k of a process in a Loader's stream: (step, row) = divmod(k, local_batch) -> the example at that
    position of the epoch's order, transformed with its own generator (picklable for worker processes)."""
    source: object
    transform: object
    size: int
    global_batch: int
    local_batch: int
    first_row: int            # this process's first row in each global batch
    steps_per_epoch: int
    seed: int
    train: bool

    def __call__(self, k: int) -> dict:
        step, r = divmod(k, self.local_batch)
        epoch, b = divmod(step, self.steps_per_epoch)
        pos = b * self.global_batch + self.first_row + r
        if not self.train:
            if pos >= self.size:
                return _row(self.transform.empty(), 0, -1)
            index, rng = pos, None
        else:
            index = int(epoch_order(self.seed, self.size, epoch)[pos])
            rng = np.random.default_rng((self.seed, 1, epoch, pos))
        example = self.source[index]
        try:
            arrays = self.transform(example, rng)
        except Exception as e:
            raise ValueError(f"record {index} of the source: {e}") from e
        return _row(arrays, int(example["label"]), index)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, size: int, epoch: int) -> np.ndarray:
    """The training order of an epoch: default_rng((seed, epoch)).permutation(size) (cached per process)."""
    return np.random.default_rng((seed, epoch)).permutation(size)


class Loader:
    """This process's share of each global batch (module docstring), read by grain.

    source: a random-access sequence of examples (dicts with at least "label"); transform: example, rng ->
    dict of arrays (rng None in evaluation), with `empty()` giving the zero arrays of a padding row.
    `workers` grain threads (threads=True) or worker processes (False: for PIL augmentations, which hold the
    GIL) read `prefetch` batches ahead; 0: one background thread."""

    def __init__(self, source, transform, global_batch: int, *, seed: int, process_index: int = 0,
                 process_count: int = 1, workers: int = 0, prefetch: int = 2, threads: bool = True,
                 num_classes: int | None = None):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self.source, self.transform, self.seed = source, transform, seed
        self.train = transform.train
        self.size = len(source)
        self.num_classes = num_classes if num_classes is not None else getattr(source, "num_classes", None)
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.process_index = process_index
        self.workers, self.prefetch, self.threads = workers, max(prefetch, 1), threads
        if self.size == 0:
            raise ValueError("the split holds no records")
        if self.train and self.size < global_batch:
            raise ValueError(f"the training split has {self.size} images, fewer than one global batch "
                             f"({global_batch})")

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per training epoch; evaluation pads the last batch instead."""
        return self.size // self.global_batch if self.train else -(-self.size // self.global_batch)

    def dataset(self, start_step: int, end_step: int) -> grain.IterDataset:
        """Batches of global steps [start_step, end_step) as a grain IterDataset."""
        row = _TrainRow(self.source, self.transform, self.size, self.global_batch, self.local_batch,
                        self.process_index * self.local_batch, self.steps_per_epoch, self.seed, self.train)
        rows = grain.MapDataset.range(start_step * self.local_batch, end_step * self.local_batch).map(row)
        return rows_to_batches(rows, self.local_batch, workers=self.workers, processes=not self.threads,
                               prefetch=self.prefetch)

    def state(self, step: int) -> dict:
        """The data position after `step` training steps, saved with the checkpoint (JSON): epoch, batch in
        the epoch, and what fixes the order (seed, split size, global batch)."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch, "seed": self.seed, "size": self.size,
                "global_batch": self.global_batch}

    def resume_step(self, state: dict) -> int:
        """The step from which `iterate` continues a run saved with `state(step)`; ValueError if the order it
        was saved with is not this loader's (another seed, split or batch size)."""
        mine = self.state(0)
        changed = {k: (state.get(k), mine[k]) for k in ("seed", "size", "global_batch") if state.get(k) != mine[k]}
        if changed:
            raise ValueError("the checkpoint's data order differs from this run's: "
                             + ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in changed.items()))
        return state["epoch"] * self.steps_per_epoch + state["batch_in_epoch"]

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Local batches for global steps start_step, start_step + 1, ... (training: endless unless num_steps;
        evaluation: one pass)."""
        end = (self.steps_per_epoch if not self.train
               else start_step + (num_steps if num_steps is not None else 2**40 // self.local_batch))
        yield from drain(self.dataset(start_step if self.train else 0, end))


# ------------------------------------------------------------------------------------------------------------
# ClickMe training examples (train.py data="clickme", the harmonization objective)


@dataclasses.dataclass(frozen=True)
class ClickmeTransform:
    """One ClickMe example -> {"image": float32 (S, S, 3) in [0, 255], "heatmap": float32 (S, S)}.

    Harmonization's loader (`common/clickme_dataset.py: parse_clickme_prototype`): the 224 x 224 float image
    (not cast to uint8: the model is fed floats) and the blurred 224 x 224 heatmap, exactly as
    data.preprocess. Harmonization trains on them as they are; `image_size` != 224 resizes both (TensorFlow's
    bilinear, no antialias: small test models) and `hflip` flips both together with that probability. Nothing
    that would move the image off its map (crops, RandAugment, erasing, mixup) exists here."""
    train: bool
    image_size: int = 224
    hflip: float = 0.0

    def __call__(self, example, rng: np.random.Generator | None) -> dict:
        image, heatmap = clickme_image(example["image"]), clickme_heatmap(example["heatmap"])
        s = self.image_size
        if image.shape[:2] != (s, s):
            image, heatmap = resize_bilinear(image, (s, s)), resize_bilinear(heatmap, (s, s))
        if self.train and self.hflip > 0 and rng.random() < self.hflip:
            image, heatmap = image[:, ::-1], heatmap[:, ::-1]
        return {"image": np.ascontiguousarray(image, np.float32), "heatmap": np.ascontiguousarray(heatmap, np.float32)}

    def empty(self) -> dict:
        s = self.image_size
        return {"image": np.zeros((s, s, 3), np.float32), "heatmap": np.zeros((s, s), np.float32)}
