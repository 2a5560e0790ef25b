"""Batches of preprocessed ClickMe examples, decoded in parallel, in a fixed order, sharded over processes.

    source = data.clickme.data_source("validation", data_dir=...)
    for batch in batches(source, entry, batch_size=64, process_index=jax.process_index(),
                         process_count=jax.process_count()):
        batch["image"]     # (B, S, S, 3) float32, the model's input (S = entry.input_size); with
                           # entry=None the (B, 224, 224, 3) float image in [0, 255] before the transform
        batch["heatmap"]   # (B, 224, 224) float32 human map (the "study" protocol's; see data.protocols)
        batch["label"]     # (B,) int32
        batch["index"]     # (B,) int64, the record's index in the split (-1 for padding)
        batch["valid"]     # (B,) bool, False for padding

The first `limit` records (all by default) are split into `process_count` contiguous blocks; process p
reads only block p. Every process yields the same number of batches; the last ones are padded with
zeros and valid=False, never dropped, so each record appears exactly once over all processes.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from multiprocessing import shared_memory

import numpy as np

from data.preprocess import SIZE, clickme_heatmap, clickme_image, model_input


@dataclasses.dataclass(frozen=True)
class Transform:
    """What the model transform needs of a registry Entry (picklable for worker processes)."""
    resize_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    @classmethod
    def of(cls, entry) -> Transform | None:
        if entry is None:
            return None
        return cls(entry.resize_size, entry.input_size, tuple(entry.mean), tuple(entry.std), entry.interpolation)


def preprocess_example(image: bytes, heatmap: bytes, transform: Transform | None) -> tuple[np.ndarray, np.ndarray]:
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


def _read(source, indices: Sequence[int]) -> list:
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(list(indices)))
    return [source[i] for i in indices]


_BUFFERS: dict[str, np.ndarray] = {}      # a worker process's views of the shared batch buffers


def _attach(specs: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Worker process initializer: maps the shared memory blocks {key: (name, shape)} as float32 arrays."""
    for key, (name, shape) in specs.items():
        shm = shared_memory.SharedMemory(name=name)
        _BUFFERS[key] = np.ndarray(shape, np.float32, shm.buf)
        _BUFFERS[key + ".shm"] = shm                # keep the mapping alive


def _fill(buffers, slot: int, row: int, examples: list[tuple[bytes, bytes]], transform) -> None:
    """Preprocesses examples into rows row, row + 1, ... of a batch slot (this process's buffers if None)."""
    buffers = buffers or _BUFFERS
    for i, (image, heatmap) in enumerate(examples):
        buffers["image"][slot, row + i], buffers["heatmap"][slot, row + i] = preprocess_example(image, heatmap,
                                                                                               transform)


def batches(source, entry=None, *, batch_size: int, limit: int | None = None, process_index: int = 0,
            process_count: int = 1, workers: int | None = None, processes: bool = False,
            prefetch: int = 2, chunk: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches described in the module docstring.

    source: a random-access sequence of examples {"image": JPEG bytes, "heatmap": JPEG bytes, "label",
    optionally "index" (else the position is used)} such as data.clickme.data_source(...); entry: a
    models.registry.Entry (or anything with resize_size, input_size, mean, std, interpolation), None for the
    224 image. Preprocessing runs in tasks of `chunk` examples on `workers` threads (default: all CPUs), or on
    spawned processes writing into shared memory with processes=True (faster with many cores; as with any
    spawned process, the main script must guard its entry point with `if __name__ == "__main__":`).
    `prefetch` batches are prepared ahead."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n = len(source) if limit is None else min(int(limit), len(source))
    mine = shard_range(n, process_index, process_count)
    steps = num_batches(n, batch_size, process_count)
    transform = Transform.of(entry)
    s = SIZE if transform is None else transform.input_size
    workers = workers or os.cpu_count() or 1
    slots = prefetch + 1                       # batches in preparation + the one being copied out
    shapes = {"image": (slots, batch_size, s, s, 3), "heatmap": (slots, batch_size, SIZE, SIZE)}
    blocks = []
    if processes:
        for shape in shapes.values():
            blocks.append(shared_memory.SharedMemory(create=True, size=4 * math.prod(shape)))
        buffers = {k: np.ndarray(shape, np.float32, b.buf) for (k, shape), b in zip(shapes.items(), blocks)}
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_attach,
                                      initargs=({k: (b.name, shapes[k]) for k, b in zip(shapes, blocks)},))
        task_buffers = None
    else:
        buffers = {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}
        pool = cf.ThreadPoolExecutor(workers)
        task_buffers = buffers

    def submit(step: int):
        idx = mine[step * batch_size:(step + 1) * batch_size]
        examples = _read(source, idx)
        pairs = [(ex["image"], ex["heatmap"]) for ex in examples]
        futures = [pool.submit(_fill, task_buffers, step % slots, r, pairs[r:r + chunk], transform)
                   for r in range(0, len(pairs), chunk)]
        return idx, examples, futures

    try:
        pending = collections.deque(submit(k) for k in range(min(prefetch, steps)))
        for step in range(steps):
            idx, examples, futures = pending.popleft()
            for f in futures:
                f.result()
            k = len(examples)
            out = {key: buf[step % slots].copy() for key, buf in buffers.items()}
            out["image"][k:] = 0
            out["heatmap"][k:] = 0
            out["label"] = np.zeros(batch_size, np.int32)
            out["label"][:k] = [ex["label"] for ex in examples]
            out["index"] = np.full(batch_size, -1, np.int64)
            out["index"][:k] = [ex.get("index", j) for j, ex in zip(idx, examples)]
            out["valid"] = np.arange(batch_size) < k
            if step + prefetch < steps:
                pending.append(submit(step + prefetch))       # reuses the slot just copied out
            yield out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for b in blocks:
            b.close()
            b.unlink()
