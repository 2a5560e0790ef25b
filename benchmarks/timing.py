"""The timing loops of the benchmarks.

median_ms: median milliseconds of `fn` over `iters` calls after `warmup` calls, each call's result passed to
`sync` (jax.block_until_ready, torch.cuda.synchronize...) before the clock stops.
paired_ms: the same for several functions whose calls alternate (a, b, a, b...), so that on a shared machine a
burst of load hits all of them alike: their ratio is what to read.
keep_freed_memory: glibc's malloc returns every freed block above 32 MiB to the OS and maps (and page-faults)
it anew on the next call; XLA:CPU allocates its outputs and temporaries per call, so large activations pay
that every time (on this VM ~1.7 us per 4 KiB page: 16 ms for x + 1 on a (8, 56, 56, 384) float32 array, 5 ms
without). This raises the thresholds, as `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`
in the environment would; it changes the whole process (PyTorch too), so the benchmarks only do it when asked.
"""
import ctypes
import ctypes.util
import time

import numpy as np


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


def keep_freed_memory() -> bool:
    """mallopt(M_MMAP_THRESHOLD, 1 GiB) and mallopt(M_TRIM_THRESHOLD, 1 GiB) on glibc; False elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError, TypeError):
        return False
