"""The timing loops of the benchmarks.

median_ms: median milliseconds of `fn` over `iters` calls after `warmup` calls, each call's result passed to
`sync` (jax.block_until_ready, torch.cuda.synchronize...) before the clock stops.
paired_ms: the same for several functions whose calls alternate (a, b, a, b...), so that on a shared machine a
burst of load hits all of them alike: their ratio is what to read.
keep_freed_memory (evaluation.runtime's, re-exported): glibc's malloc gives freed memory back and XLA:CPU
allocates its outputs and temporaries per call, so large activations are page-faulted in again at every call.
It changes the whole process (PyTorch too, which gains more from it than JAX: convnext_tiny's forward 395 -> 324
ms against 337 -> 319), so the benchmarks only do it when asked (--keep-memory).
"""
import time

import numpy as np

from evaluation.runtime import keep_freed_memory  # noqa: F401  (re-exported; the scripts put the root on sys.path)


def median_ms(fn, sync, iters: int, warmup: int = 1) -> float:
    return paired_ms([(fn, sync)], iters, warmup)[0]


def paired_ms(fns, iters: int, warmup: int = 1) -> list[float]:
    """[(fn, sync), ...] -> the median milliseconds of each, their calls interleaved."""
    for fn, sync in fns:
        for _ in range(warmup):
            sync(fn())
    times = [[] for _ in fns]
    for _ in range(iters):
        for (fn, sync), t in zip(fns, times):
            t0 = time.perf_counter()
            sync(fn())
            t.append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]
