"""The one timing loop of the benchmarks: median milliseconds of `fn` over `iters` calls after `warmup` calls,
each call's result passed to `sync` (jax.block_until_ready, torch.cuda.synchronize...) before the clock stops."""
import time

import numpy as np


def median_ms(fn, sync, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))
