"""Batches of preprocessed ClickMe examples, decoded in parallel, in a fixed order, sharded over processes.

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
reads only block p. Every process yields the same number of batches; the last ones are padded with
zeros and valid=False, never dropped, so each record appears exactly once over all processes.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from data.preprocess import SIZE, ModelTransform, clickme_heatmap, clickme_image, model_input


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


def _read(source, indices: Sequence[int]) -> list:
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(list(indices)))
    return [source[i] for i in indices]


_SOURCE: list = []      # the source, in a worker process
_SHM = "/dev/shm"       # where batch files go (RAM-backed on Linux; else the temporary directory)


def _init_worker(source) -> None:
    _SOURCE[:] = [source]


def _map(path: str, shapes: dict[str, tuple[int, ...]], mode: str) -> dict[str, np.ndarray]:
    """The float32 arrays {key: shape} laid out one after the other in the file `path`, memory-mapped."""
    out, offset = {}, 0
    for key, shape in shapes.items():
        out[key] = np.memmap(path, np.float32, mode, offset=offset, shape=shape)
        offset += 4 * math.prod(shape)
    return out


def _fill(target, source, row: int, indices: Sequence[int], transform) -> list[tuple[int, int]]:
    """Reads and preprocesses source[indices] into rows row, row + 1, ... of the batch `target`: its
    arrays, or (file, shapes) to map in a worker process (source None: the worker's). Returns their
    (label, index)."""
    arrays = _map(*target, "r+") if isinstance(target, tuple) else target
    examples = _read(_SOURCE[0] if source is None else source, indices)
    meta = [(int(ex["label"]), int(ex.get("index", j))) for j, ex in zip(indices, examples)]
    for i, ex in enumerate(examples):
        try:
            arrays["image"][row + i], arrays["heatmap"][row + i] = preprocess_example(ex["image"], ex["heatmap"],
                                                                                      transform)
        except Exception as e:
            raise ValueError(f"record {meta[i][1]} of the source: {e}") from e
    return meta


def batches(source, entry=None, *, batch_size: int, limit: int | None = None, process_index: int = 0,
            process_count: int = 1, workers: int | None = None, processes: bool = False,
            prefetch: int = 2, chunk: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches described in the module docstring.

    source: a random-access sequence of examples {"image": JPEG bytes, "heatmap": JPEG bytes, "label",
    optionally "index" (else the position is used)} such as data.clickme.data_source(...); entry: a
    models.registry.Entry (or anything with resize_size, input_size, mean, std, interpolation), None for the
    224 image. Reading and preprocessing run in tasks of `chunk` examples on `workers` threads (default: up to
    8), or with processes=True on `workers` spawned processes (default: all CPUs; each gets a pickled copy of
    `source` once) that write into a shared-memory file per batch. Workers write each batch's arrays in
    place (no copies). Processes scale with the CPUs where threads stop at a few (the GIL; see
    benchmarks/ for measured rates): use processes for GPU evaluation; as for any spawned process, the main
    script must guard its entry point with `if __name__ == "__main__":`. `prefetch` batches are prepared ahead."""
    if batch_size < 1 or prefetch < 1 or chunk < 1:
        raise ValueError(f"batch_size, prefetch and chunk must be >= 1, got {batch_size}, {prefetch}, {chunk}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n = len(source) if limit is None else min(int(limit), len(source))
    mine = shard_range(n, process_index, process_count)
    steps = num_batches(n, batch_size, process_count)
    transform = ModelTransform.of(entry)
    s = SIZE if transform is None else transform.input_size
    shapes = {"image": (batch_size, s, s, 3), "heatmap": (batch_size, SIZE, SIZE)}
    cpus = os.cpu_count() or 1
    workers = workers or (cpus if processes else min(cpus, 8))
    if processes:
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(source,))
    else:
        pool = cf.ThreadPoolExecutor(workers)

    def submit(step: int):
        if processes:                          # a zero-filled file in shared memory, mapped by the workers
            fd, path = tempfile.mkstemp(prefix="clickme-batch-", dir=_SHM if os.path.isdir(_SHM) else None)
            os.ftruncate(fd, sum(4 * math.prod(shape) for shape in shapes.values()))
            os.close(fd)
            arrays, target, src = _map(path, shapes, "r+"), (path, shapes), None
        else:
            arrays = {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}
            target, src, path = arrays, source, None
        idx = mine[step * batch_size:(step + 1) * batch_size]
        futures = [pool.submit(_fill, target, src, r, idx[r:r + chunk], transform) for r in range(0, len(idx), chunk)]
        return arrays, path, futures

    pending = collections.deque()
    try:
        for step in range(min(prefetch, steps)):
            pending.append(submit(step))
        for step in range(steps):
            arrays, path, futures = pending[0]
            meta = [m for f in futures for m in f.result()]
            pending.popleft()
            if path is not None:
                os.unlink(path)                # the mappings stay valid; the memory goes with the arrays
            k = len(meta)
            out = {key: np.asarray(a) for key, a in arrays.items()}
            out["label"] = np.zeros(batch_size, np.int32)
            out["index"] = np.full(batch_size, -1, np.int64)
            if k:
                out["label"][:k], out["index"][:k] = zip(*meta)
            out["valid"] = np.arange(batch_size) < k
            if step + prefetch < steps:
                pending.append(submit(step + prefetch))
            yield out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for _, path, _ in pending:
            if path is not None and os.path.exists(path):
                os.unlink(path)
