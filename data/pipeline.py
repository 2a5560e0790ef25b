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
import multiprocessing
import os
from collections.abc import Iterator, Sequence

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


def batches(source, entry=None, *, batch_size: int, limit: int | None = None, process_index: int = 0,
            process_count: int = 1, workers: int | None = None, processes: bool = False,
            prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches described in the module docstring.

    source: a random-access sequence of examples {"image": JPEG bytes, "heatmap": JPEG bytes, "label",
    optionally "index" (else the position is used)} such as data.clickme.data_source(...); entry: a models.registry.Entry (or anything with
    resize_size, input_size, mean, std, interpolation), None for the 224 image. Decoding runs on `workers`
    threads (default: all CPUs), or spawned processes with processes=True; `prefetch` batches are kept in flight."""
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
    pool = (cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if processes
            else cf.ThreadPoolExecutor(workers))

    def submit(step: int):
        idx = mine[step * batch_size:(step + 1) * batch_size]
        examples = _read(source, idx)
        futures = [pool.submit(preprocess_example, ex["image"], ex["heatmap"], transform) for ex in examples]
        return idx, examples, futures

    try:
        pending = collections.deque(submit(k) for k in range(min(prefetch, steps)))
        for step in range(steps):
            idx, examples, futures = pending.popleft()
            if step + prefetch < steps:
                pending.append(submit(step + prefetch))
            out = {"image": np.zeros((batch_size, s, s, 3), np.float32),
                   "heatmap": np.zeros((batch_size, SIZE, SIZE), np.float32),
                   "label": np.zeros(batch_size, np.int32),
                   "index": np.full(batch_size, -1, np.int64),
                   "valid": np.zeros(batch_size, bool)}
            for i, (j, ex, fut) in enumerate(zip(idx, examples, futures)):
                out["image"][i], out["heatmap"][i] = fut.result()
                out["label"][i] = ex["label"]
                out["index"][i] = ex.get("index", j)
                out["valid"][i] = True
            yield out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
