"""Forward + backward time of one depthwise DCLS layer: dcls_jax.Dcls2d against PyTorch dcls 0.1.1, same run.

    python benchmarks/bench_dcls.py                  # small, CPU-friendly
    python benchmarks/bench_dcls.py --batch 128 --size 56 --channels 96 --iters 20   # GPU (ConvNeXt-T stage 1)

Each step computes the layer on x (B, H, W, C) and the gradients of sum(y) w.r.t. x, weight, P (and SIG).
Prints milliseconds per step and PyTorch / JAX (> 1 means JAX is faster). PyTorch runs on CUDA when available.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dcls_jax import Dcls2d  # noqa: E402

from timing import median_ms  # noqa: E402  (benchmarks/, the script's folder)

CASES = (("v0", 17, 34), ("v1", 17, 34), ("gauss", 23, 26))


def _median_ms(step, sync, iters: int, warmup: int = 2) -> float:
    return median_ms(step, sync, iters, warmup)


def bench_jax(version, d, k, x, iters):
    c = x.shape[-1]
    layer = Dcls2d(c, c, k, padding=d // 2, dilated_kernel_size=d, groups=c, version=version, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    @jax.jit
    def step(params, x):
        return jax.grad(lambda p, x: nnx.merge(graphdef, p)(x).sum(), argnums=(0, 1))(params, x)

    return _median_ms(lambda: step(params, x), jax.block_until_ready, iters)


def bench_torch(version, d, k, x, iters):
    import torch
    from DCLS.construct.modules import Dcls2d as TorchDcls2d

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = x.shape[-1]
    layer = TorchDcls2d(c, c, k, padding=d // 2, dilated_kernel_size=d, groups=c, version=version).to(dev)
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().to(dev).requires_grad_(True)

    def step():
        layer.zero_grad(set_to_none=True)
        xt.grad = None
        layer(xt).sum().backward()
        return xt.grad

    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    return _median_ms(step, sync, iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=28, help="H = W")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="time JAX only")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # DCLS logs CUDA/implicit-GEMM notices
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, args.channels), jnp.float32)
    print(f"x = {tuple(x.shape)} NHWC fp32, JAX on {jax.devices()[0].platform}, depthwise, fwd + bwd")
    print(f"{'version':>7} {'d':>3} {'K':>3} {'jax ms':>9} {'torch ms':>9} {'torch/jax':>9}")
    for version, d, k in CASES:
        tj = bench_jax(version, d, k, x, args.iters)
        tt = float("nan") if args.no_torch else bench_torch(version, d, k, x, args.iters)
        print(f"{version:>7} {d:>3} {k:>3} {tj:9.2f} {tt:9.2f} {tt / tj:9.2f}", flush=True)


if __name__ == "__main__":
    main()
